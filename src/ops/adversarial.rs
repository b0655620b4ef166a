//! Ops of the domain-adversarial branch (Ganin & Lempitsky 2015, "Unsupervised domain adaptation
//! by backpropagation"; CP-CNN paper Methods, "Gradient reversal layer"): the gradient reversal
//! layer, ReLU, and the weighted sum of two losses. Plus `tanh` (attention MIL scores).

use crate::autograd::{Float, Tape, Var};
use crate::error::{Error, Result};

/// Gradient reversal: y = x in the forward pass, dL/dx = −λ·dL/dy in the backward pass.
/// λ must be finite (λ = 0 blocks the gradient; a negative λ passes it un-reversed, scaled).
pub fn gradient_reversal<T: Float>(tape: &mut Tape<T>, x: &Var, lambda: f64) -> Result<Var> {
    if !lambda.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "gradient reversal: lambda must be finite, got {lambda}"
        )));
    }
    let out = tape.data(x).to_vec();
    let xid = x.id();
    let need = tape.requires_grad(x);
    let neg = T::from_f64(-lambda);
    Ok(tape.push(x.shape(), out, need, move |out_id, gr| {
        if let Some(mut d) = gr.take(out_id) {
            d.iter_mut().for_each(|v| *v *= neg);
            gr.add(xid, d);
        }
        Ok(())
    }))
}

/// y = max(x, 0) (gradient 0 at x = 0, as torch).
pub fn relu<T: Float>(tape: &mut Tape<T>, x: &Var) -> Var {
    let xv = tape.value(x);
    let out: Vec<T> = xv
        .iter()
        .map(|&v| if v > T::ZERO { v } else { T::ZERO })
        .collect();
    let xid = x.id();
    let need = tape.requires_grad(x);
    tape.push(x.shape(), out, need, move |out_id, gr| {
        if let Some(mut d) = gr.take(out_id) {
            d.iter_mut().zip(xv.iter()).for_each(|(d, &v)| {
                if v <= T::ZERO {
                    *d = T::ZERO
                }
            });
            gr.add(xid, d);
        }
        Ok(())
    })
}

/// y = tanh(x).
pub fn tanh<T: Float>(tape: &mut Tape<T>, x: &Var) -> Var {
    let out: Vec<T> = tape
        .data(x)
        .iter()
        .map(|&v| T::from_f64(v.to_f64().tanh()))
        .collect();
    let saved = std::sync::Arc::new(out.clone());
    let xid = x.id();
    let need = tape.requires_grad(x);
    tape.push(x.shape(), out, need, move |out_id, gr| {
        if let Some(mut d) = gr.take(out_id) {
            d.iter_mut()
                .zip(saved.iter())
                .for_each(|(d, &t)| *d *= T::ONE - t * t);
            gr.add(xid, d);
        }
        Ok(())
    })
}

/// y = a + β·b (same shapes): the total loss `class + weight · domain`.
pub fn add_scaled<T: Float>(tape: &mut Tape<T>, a: &Var, b: &Var, beta: f64) -> Result<Var> {
    if a.shape() != b.shape() {
        return Err(Error::Shape(format!(
            "add_scaled: shapes {:?} and {:?} differ",
            a.shape(),
            b.shape()
        )));
    }
    if !beta.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "add_scaled: weight must be finite, got {beta}"
        )));
    }
    let bt = T::from_f64(beta);
    let out: Vec<T> = tape
        .data(a)
        .iter()
        .zip(tape.data(b))
        .map(|(&x, &y)| x + bt * y)
        .collect();
    let (aid, bid) = (a.id(), b.id());
    let need = tape.requires_grad(a) || tape.requires_grad(b);
    Ok(tape.push(a.shape(), out, need, move |out_id, gr| {
        if let Some(d) = gr.take(out_id) {
            if gr.wants(bid) {
                let db: Vec<T> = d.iter().map(|&g| g * bt).collect();
                gr.add(bid, db);
            }
            gr.add(aid, d);
        }
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::check;

    fn vals(n: usize, seed: u64) -> Vec<f64> {
        // Deterministic values away from 0 (ReLU's kink).
        (0..n)
            .map(|i| {
                let u = ((i as u64 * 2654435761 + seed * 97) % 1000) as f64 / 1000.0;
                let v = u * 2.0 - 1.0;
                if v.abs() < 0.05 {
                    v + 0.1
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn gradient_reversal_fd_and_sign() {
        let x = vals(12, 1);
        // Through a nonlinearity so the check is not trivial: y = tanh(GRL(x)).
        let r = check(&[(vec![3, 4], x.clone())], true, 12, |t, v| {
            let g = gradient_reversal(t, &v[0], 0.7)?;
            Ok(tanh(t, &g))
        })
        .unwrap();
        // The FD derivative of the forward (identity) is +; GRL's analytic gradient is −0.7 of it.
        // Check the reversed gradient exactly against −0.7 × the plain one.
        let grad = |lambda: Option<f64>| -> Vec<f64> {
            let mut tape = Tape::<f64>::new(true);
            let xv = tape.input(&[3, 4], x.clone(), true).unwrap();
            let g = match lambda {
                Some(l) => gradient_reversal(&mut tape, &xv, l).unwrap(),
                None => xv.clone(),
            };
            let y = tanh(&mut tape, &g);
            let mut p = crate::autograd::Params::new();
            let gr = tape.backward_with(&y, vec![1.0; 12], &mut p).unwrap();
            gr.get(&xv).unwrap().to_vec()
        };
        let (plain, rev, zero) = (grad(None), grad(Some(0.7)), grad(Some(0.0)));
        for i in 0..12 {
            assert!(plain[i] > 0.0);
            assert!((rev[i] + 0.7 * plain[i]).abs() <= 1e-15 * plain[i].abs());
            assert_eq!(zero[i], 0.0);
        }
        // FD sees the identity: the relative error is |−0.7 − 1| / 1 = 1.7.
        assert!((r.worst() - 1.7).abs() < 1e-6, "{r:?}");
        // λ = −1 reproduces the plain gradient, which FD confirms to 1e-6.
        let r = check(&[(vec![3, 4], x)], true, 12, |t, v| {
            let g = gradient_reversal(t, &v[0], -1.0)?;
            Ok(tanh(t, &g))
        })
        .unwrap();
        assert!(r.worst() < 1e-6, "{r:?}");
    }

    #[test]
    fn relu_tanh_add_scaled_fd() {
        let r = check(&[(vec![5, 3], vals(15, 2))], true, 15, |t, v| {
            Ok(relu(t, &v[0]))
        })
        .unwrap();
        assert!(r.worst() < 1e-6, "{r:?}");
        let r = check(&[(vec![5, 3], vals(15, 3))], true, 15, |t, v| {
            Ok(tanh(t, &v[0]))
        })
        .unwrap();
        assert!(r.worst() < 1e-6, "{r:?}");
        let r = check(
            &[(vec![4], vals(4, 4)), (vec![4], vals(4, 5))],
            true,
            4,
            |t, v| {
                let a = tanh(t, &v[0]);
                let b = tanh(t, &v[1]);
                add_scaled(t, &a, &b, 0.3)
            },
        )
        .unwrap();
        assert!(r.worst() < 1e-6, "{r:?}");
        // Closed forms.
        let mut tape = Tape::<f64>::new(true);
        let x = tape.input(&[3], vec![-1.0, 0.0, 2.0], false).unwrap();
        let y = relu(&mut tape, &x);
        assert_eq!(tape.data(&y), &[0.0, 0.0, 2.0]);
        let z = tanh(&mut tape, &x);
        assert_eq!(tape.data(&z)[2], 2f64.tanh());
        assert!(gradient_reversal(&mut tape, &x, f64::NAN).is_err());
    }
}
