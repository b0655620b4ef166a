//! Central finite-difference checks of op backwards in f64 (used by the tests).

use crate::autograd::{Params, Tape, Var};
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};

/// Result of one check: the largest normalised error per input, max |analytic − numeric| / max |numeric|.
#[derive(Debug)]
pub struct Report {
    pub max_err: Vec<f64>,
    pub checked: Vec<usize>,
}

impl Report {
    pub fn worst(&self) -> f64 {
        self.max_err.iter().cloned().fold(0.0, f64::max)
    }
}

/// Checks d(Σ r ⊙ f(inputs)) / d inputs, r a fixed random projection, at up to `per_input` elements
/// of every input (all of them when fewer), with step h = 1e-5·max(1, |x|). `f` must be
/// deterministic (seed any randomness inside it).
pub fn check(
    inputs: &[(Vec<usize>, Vec<f64>)],
    training: bool,
    per_input: usize,
    f: impl Fn(&mut Tape<f64>, &[Var]) -> Result<Var>,
) -> Result<Report> {
    let run = |vals: &[Vec<f64>]| -> Result<(Tape<f64>, Vec<Var>, Var)> {
        let mut tape = Tape::new(training);
        let vars = inputs
            .iter()
            .zip(vals)
            .map(|((s, _), v)| tape.input(s, v.clone(), true))
            .collect::<Result<Vec<_>>>()?;
        let out = f(&mut tape, &vars)?;
        Ok((tape, vars, out))
    };
    let base: Vec<Vec<f64>> = inputs.iter().map(|(_, v)| v.clone()).collect();
    let (tape, vars, out) = run(&base)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let r: Vec<f64> = (0..out.numel()).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let project = |tape: &Tape<f64>, out: &Var| -> f64 {
        tape.data(out).iter().zip(&r).map(|(a, b)| a * b).sum()
    };
    let mut params = Params::new();
    let grads = tape.backward_with(&out, r.clone(), &mut params)?;
    let mut report = Report {
        max_err: Vec::new(),
        checked: Vec::new(),
    };
    for (i, v) in vars.iter().enumerate() {
        let analytic = grads
            .get(v)
            .map(|g| g.to_vec())
            .unwrap_or(vec![0.0; v.numel()]);
        let len = v.numel();
        let idx: Vec<usize> = if len <= per_input {
            (0..len).collect()
        } else {
            (0..per_input).map(|_| rng.gen_range(0..len)).collect()
        };
        let (mut worst, mut scale) = (0f64, 0f64);
        for &j in &idx {
            let x0 = base[i][j];
            let h = 1e-5 * x0.abs().max(1.0);
            let mut vals = base.clone();
            vals[i][j] = x0 + h;
            let (tp, _, op) = run(&vals)?;
            let lp = project(&tp, &op);
            vals[i][j] = x0 - h;
            let (tm, _, om) = run(&vals)?;
            let lm = project(&tm, &om);
            let numeric = (lp - lm) / (2.0 * h);
            worst = worst.max((analytic[j] - numeric).abs());
            scale = scale.max(numeric.abs()).max(analytic[j].abs());
        }
        if !worst.is_finite() {
            return Err(Error::NonFinite(format!("gradient check of input {i}")));
        }
        report
            .max_err
            .push(if scale > 0.0 { worst / scale } else { worst });
        report.checked.push(idx.len());
    }
    Ok(report)
}
