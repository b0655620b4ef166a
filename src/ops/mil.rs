//! Attention pooling of multiple-instance bags (Ilse, Tomczak & Welling 2018, eq. 8–9; CP-CNN paper
//! Methods, "Multiple instance learning with attention"): a = softmax over the bag of the instance
//! scores wᵀ tanh(V hᵢ) (computed by the caller with `linear` + `tanh` + `linear`), z = Σᵢ aᵢ hᵢ.

use crate::autograd::{Float, Tape, Var};
use crate::error::{Error, Result};

fn softmax_rows(s: &[f64], bag: usize) -> Vec<f64> {
    let mut a = vec![0f64; s.len()];
    for (ar, sr) in a.chunks_exact_mut(bag).zip(s.chunks_exact(bag)) {
        let mx = sr.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        let mut se = 0.0;
        for (a, &v) in ar.iter_mut().zip(sr) {
            *a = (v - mx).exp();
            se += *a;
        }
        ar.iter_mut().for_each(|a| *a /= se);
    }
    a
}

/// Attention weights of consecutive bags of `bag_size` instance scores (softmax within each bag).
pub fn attention_weights(scores: &[f64], bag_size: usize) -> Result<Vec<f64>> {
    if bag_size == 0 || scores.len() % bag_size != 0 {
        return Err(Error::Shape(format!(
            "attention: {} scores do not make bags of {bag_size}",
            scores.len()
        )));
    }
    Ok(softmax_rows(scores, bag_size))
}

/// z[b] = Σᵢ softmax(s[b, ·])ᵢ · h[b·S + i] for instance features `h` [B·S, D] and scores `s`
/// [B·S, 1] (or [B·S]), S = `bag_size`: one pooled row [B, D] per bag of consecutive instances.
pub fn attention_pool<T: Float>(
    tape: &mut Tape<T>,
    h: &Var,
    scores: &Var,
    bag_size: usize,
) -> Result<Var> {
    let (m, d) = match h.shape() {
        &[m, d] if m > 0 && d > 0 => (m, d),
        s => {
            return Err(Error::Shape(format!(
                "attention pooling: features must be a non-empty [N, D], got {s:?}"
            )))
        }
    };
    if bag_size == 0 || m % bag_size != 0 {
        return Err(Error::Shape(format!(
            "attention pooling: {m} instances do not make bags of {bag_size}"
        )));
    }
    if scores.numel() != m {
        return Err(Error::Shape(format!(
            "attention pooling: {} scores for {m} instances",
            scores.numel()
        )));
    }
    let nb = m / bag_size;
    let s: Vec<f64> = tape.data(scores).iter().map(|v| v.to_f64()).collect();
    let a = softmax_rows(&s, bag_size);
    let hv = tape.value(h);
    let mut out = vec![T::ZERO; nb * d];
    for (b, zr) in out.chunks_exact_mut(d).enumerate() {
        for i in 0..bag_size {
            let r = b * bag_size + i;
            let ai = T::from_f64(a[r]);
            for (z, &x) in zr.iter_mut().zip(&hv[r * d..(r + 1) * d]) {
                *z += ai * x;
            }
        }
    }
    let (hid, sid) = (h.id(), scores.id());
    let need = tape.requires_grad(h) || tape.requires_grad(scores);
    Ok(tape.push(&[nb, d], out, need, move |out_id, gr| {
        let Some(dz) = gr.take(out_id) else {
            return Ok(());
        };
        if gr.wants(sid) {
            // da_i = dz · h_i; ds_i = a_i (da_i − Σ_j a_j da_j).
            let mut ds = vec![T::ZERO; m];
            for b in 0..nb {
                let zr = &dz[b * d..(b + 1) * d];
                let da: Vec<f64> = (0..bag_size)
                    .map(|i| {
                        let r = b * bag_size + i;
                        zr.iter()
                            .zip(&hv[r * d..(r + 1) * d])
                            .map(|(&g, &x)| g.to_f64() * x.to_f64())
                            .sum()
                    })
                    .collect();
                let mean: f64 = (0..bag_size).map(|i| a[b * bag_size + i] * da[i]).sum();
                for i in 0..bag_size {
                    let r = b * bag_size + i;
                    ds[r] = T::from_f64(a[r] * (da[i] - mean));
                }
            }
            gr.add(sid, ds);
        }
        if gr.wants(hid) {
            let mut dh = vec![T::ZERO; m * d];
            for (r, row) in dh.chunks_exact_mut(d).enumerate() {
                let ar = T::from_f64(a[r]);
                let zr = &dz[(r / bag_size) * d..(r / bag_size + 1) * d];
                row.iter_mut().zip(zr).for_each(|(o, &g)| *o = ar * g);
            }
            gr.add(hid, dh);
        }
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::adversarial::tanh;
    use crate::ops::elementwise::linear;
    use crate::ops::gradcheck::check;

    fn vals(n: usize, seed: u64) -> Vec<f64> {
        (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed * 7919) % 2000) as f64 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn attention_pool_fd_and_closed_form() {
        // 3 bags of 4 instances with 5 features.
        let r = check(
            &[(vec![12, 5], vals(60, 1)), (vec![12, 1], vals(12, 2))],
            true,
            60,
            |t, v| attention_pool(t, &v[0], &v[1], 4),
        )
        .unwrap();
        assert!(r.worst() < 1e-6, "{r:?}");
        // The whole scoring path a = softmax(wᵀ tanh(V h + c)) with h feeding both branches.
        let r = check(
            &[
                (vec![8, 5], vals(40, 3)),
                (vec![3, 5], vals(15, 4)),
                (vec![3], vals(3, 5)),
                (vec![1, 3], vals(3, 6)),
            ],
            true,
            40,
            |t, v| {
                let u = linear(t, &v[0], &v[1], Some(&v[2]))?;
                let th = tanh(t, &u);
                let s = linear(t, &th, &v[3], None)?;
                attention_pool(t, &v[0], &s, 4)
            },
        )
        .unwrap();
        assert!(r.worst() < 1e-6, "{r:?}");
        // Equal scores: the bag mean; one dominant score: that instance.
        let mut tape = Tape::<f64>::new(false);
        let h = tape
            .input(&[4, 2], vec![1., 2., 3., 4., 5., 6., 7., 8.], false)
            .unwrap();
        let s = tape
            .input(&[4, 1], vec![0.0, 0.0, 100.0, 0.0], false)
            .unwrap();
        let s0 = tape.input(&[4], vec![0.5; 4], false).unwrap();
        let z = attention_pool(&mut tape, &h, &s0, 2).unwrap();
        assert_eq!(tape.data(&z), &[2.0, 3.0, 6.0, 7.0]);
        let z = attention_pool(&mut tape, &h, &s, 4).unwrap();
        assert!((tape.data(&z)[0] - 5.0).abs() < 1e-12 && (tape.data(&z)[1] - 6.0).abs() < 1e-12);
        assert!(attention_pool(&mut tape, &h, &s, 3).is_err());
        let w = attention_weights(&[0.0, 0.0, 1.0, 1.0], 2).unwrap();
        assert_eq!(w, vec![0.5; 4]);
    }
}
