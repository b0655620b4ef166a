//! Softmax cross-entropy with label smoothing (torch.nn.functional.cross_entropy, mean reduction).

use crate::autograd::{Float, Tape, Var};
use crate::error::{Error, Result};

/// Mean over the batch of −Σ_k q_k log softmax(z)_k with q = (1 − ε)·onehot(y) + ε / K.
/// `logits` [N, K], `labels` N values < K. Returns a [1] var.
pub fn softmax_cross_entropy<T: Float>(
    tape: &mut Tape<T>,
    logits: &Var,
    labels: &[u32],
    label_smoothing: f64,
) -> Result<Var> {
    let (n, k) = match logits.shape() {
        &[n, k] if n > 0 && k > 0 => (n, k),
        s => {
            return Err(Error::Shape(format!(
                "cross-entropy: logits must be a non-empty [N, K], got {s:?}"
            )))
        }
    };
    if labels.len() != n {
        return Err(Error::Shape(format!(
            "cross-entropy: {} labels for {n} rows of logits",
            labels.len()
        )));
    }
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= k) {
        return Err(Error::InvalidArgument(format!(
            "label {l} of item {i} is out of range: the model has {k} classes (0..{})",
            k - 1
        )));
    }
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(Error::InvalidArgument(format!(
            "label_smoothing must be in [0, 1], got {label_smoothing}"
        )));
    }
    let zv = tape.value(logits);
    let eps = label_smoothing;
    let mut probs = vec![T::ZERO; n * k];
    let mut total = 0f64;
    for i in 0..n {
        let z = &zv[i * k..(i + 1) * k];
        let mx = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v.to_f64()));
        let se: f64 = z.iter().map(|&v| (v.to_f64() - mx).exp()).sum();
        let lse = mx + se.ln();
        let y = labels[i] as usize;
        let mean_logp = z.iter().map(|&v| v.to_f64() - lse).sum::<f64>() / k as f64;
        total += -(1.0 - eps) * (z[y].to_f64() - lse) - eps * mean_logp;
        for (p, &v) in probs[i * k..(i + 1) * k].iter_mut().zip(z) {
            *p = T::from_f64((v.to_f64() - lse).exp());
        }
    }
    let loss = total / n as f64;
    let labels = labels.to_vec();
    let zid = logits.id();
    let need = tape.requires_grad(logits);
    Ok(
        tape.push(&[1], vec![T::from_f64(loss)], need, move |out_id, gr| {
            if let Some(d) = gr.take(out_id) {
                let scale = d[0] / T::from_usize(n);
                let (on, off) = (
                    T::from_f64(1.0 - eps + eps / k as f64),
                    T::from_f64(eps / k as f64),
                );
                let mut dz = probs;
                for (i, row) in dz.chunks_exact_mut(k).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        let q = if j == labels[i] as usize { on } else { off };
                        *v = (*v - q) * scale;
                    }
                }
                gr.add(zid, dz);
            }
            Ok(())
        }),
    )
}

/// Mean over the batch of −Σ_k q_ik log softmax(z_i)_k for given target distributions `targets`
/// [N, K] (rows of non-negative weights summing to 1; online label smoothing builds them).
pub fn soft_target_cross_entropy<T: Float>(
    tape: &mut Tape<T>,
    logits: &Var,
    targets: Vec<f64>,
) -> Result<Var> {
    let (n, k) = match logits.shape() {
        &[n, k] if n > 0 && k > 0 => (n, k),
        s => {
            return Err(Error::Shape(format!(
                "cross-entropy: logits must be a non-empty [N, K], got {s:?}"
            )))
        }
    };
    if targets.len() != n * k {
        return Err(Error::Shape(format!(
            "cross-entropy: {} target values for logits [{n}, {k}]",
            targets.len()
        )));
    }
    for (i, row) in targets.chunks_exact(k).enumerate() {
        let s: f64 = row.iter().sum();
        if row.iter().any(|&q| !(q >= 0.0 && q.is_finite())) || (s - 1.0).abs() > 1e-6 {
            return Err(Error::InvalidArgument(format!(
                "cross-entropy: target row {i} is not a probability distribution (sum {s})"
            )));
        }
    }
    let zv = tape.value(logits);
    let mut probs = vec![0f64; n * k];
    let mut total = 0f64;
    for i in 0..n {
        let z = &zv[i * k..(i + 1) * k];
        let mx = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v.to_f64()));
        let lse = mx + z.iter().map(|&v| (v.to_f64() - mx).exp()).sum::<f64>().ln();
        for j in 0..k {
            let lp = z[j].to_f64() - lse;
            total -= targets[i * k + j] * lp;
            probs[i * k + j] = lp.exp();
        }
    }
    let zid = logits.id();
    let need = tape.requires_grad(logits);
    Ok(tape.push(
        &[1],
        vec![T::from_f64(total / n as f64)],
        need,
        move |out_id, gr| {
            if let Some(d) = gr.take(out_id) {
                let scale = d[0].to_f64() / n as f64;
                let dz: Vec<T> = probs
                    .iter()
                    .zip(&targets)
                    .map(|(p, q)| T::from_f64((p - q) * scale))
                    .collect();
                gr.add(zid, dz);
            }
            Ok(())
        },
    ))
}
