use super::*;
use phenocore::autograd::{Params, Tape};
use phenocore::backend::gpu::norm::{BatchNorm, GroupNorm, LayerNorm};
use phenocore::backend::gpu::Gpu;
use phenocore::ops::groupnorm::{group_norm, layer_norm};
use phenocore::ops::norm::{batch_norm, Act, BatchNormConfig, Running};
use phenocore::DType;

/// Activation-path storage: uploads (rounded to bf16 for bf16), downloads as f64.
struct Io<'a, G: Gpu> {
    g: &'a G,
    dtype: DType,
}

impl<G: Gpu> Io<'_, G> {
    /// The values the device will hold (the reference's inputs).
    fn round(&self, v: Vec<f32>) -> Vec<f32> {
        if self.dtype == DType::BF16 {
            to_bf16(&v).1
        } else {
            v
        }
    }
    fn up(&self, v: &[f32]) -> G::Buf {
        if self.dtype == DType::BF16 {
            self.g.upload_slice(&to_bf16(v).0).unwrap()
        } else {
            self.g.upload_slice(v).unwrap()
        }
    }
    fn alloc(&self, n: usize) -> G::Buf {
        self.g.alloc(n * self.dtype.size_in_bytes()).unwrap()
    }
    fn down(&self, b: &G::Buf, n: usize) -> Vec<f64> {
        if self.dtype == DType::BF16 {
            from_bf16(&self.g.download_vec::<u16>(b, n).unwrap())
        } else {
            down32(self.g, b, n)
        }
    }
    fn tol(&self) -> f64 {
        if self.dtype == DType::BF16 {
            BF16_TOL
        } else {
            F32_TOL
        }
    }
}

fn down32<G: Gpu>(g: &G, b: &G::Buf, n: usize) -> Vec<f64> {
    f64s(&g.download_vec::<f32>(b, n).unwrap())
}

/// Values with mean `offset` and spread `scale` (uniform), fixed by `seed`.
fn shifted(n: usize, seed: u64, offset: f32, scale: f32) -> Vec<f32> {
    uniform(n, seed)
        .into_iter()
        .map(|v| offset + scale * v)
        .collect()
}

/// Per-channel (or per-group) f64 mean and 1/√(biased var + ε) of the given index sets.
fn stats_of(x: &[f64], sets: &[Vec<usize>], eps: f64) -> (Vec<f64>, Vec<f64>) {
    sets.iter()
        .map(|s| {
            let n = s.len() as f64;
            let mu = s.iter().map(|&i| x[i]).sum::<f64>() / n;
            let var = s.iter().map(|&i| (x[i] - mu) * (x[i] - mu)).sum::<f64>() / n;
            (mu, 1.0 / (var + eps).sqrt())
        })
        .unzip()
}

// ---- batch norm ------------------------------------------------------------------------------

struct BnCase {
    m: usize,
    c: usize,
    act: Act,
    residual: bool,
    rows_per_split: Option<usize>,
    /// x = offset + U(−1, 1): a large offset checks the statistics are not E[x²] − E[x]².
    offset: f32,
}

const fn bn(
    m: usize,
    c: usize,
    act: Act,
    residual: bool,
    rows_per_split: Option<usize>,
    offset: f32,
) -> BnCase {
    BnCase {
        m,
        c,
        act,
        residual,
        rows_per_split,
        offset,
    }
}

/// C below, at, above and not a multiple of 32; M not a multiple of the split; splits of fewer
/// rows than row groups (idle threads); more splits than row groups; default splits.
const BN_CASES: [BnCase; 6] = [
    bn(37, 5, Act::None, false, None, 0.0),
    bn(300, 40, Act::Silu, false, Some(24), 0.5),
    bn(1000, 33, Act::None, true, None, 0.0),
    bn(129, 64, Act::Silu, true, Some(5), -0.3),
    bn(517, 32, Act::None, false, Some(64), 100.0),
    bn(2, 7, Act::Silu, false, None, 0.0),
];

struct BnRef {
    y: Vec<f64>,
    dx: Vec<f64>,
    dgamma: Vec<f64>,
    dbeta: Vec<f64>,
    rmean: Vec<f64>,
    rvar: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn bn_cpu(
    training: bool,
    [m, c]: [usize; 2],
    act: Act,
    cfg: &BatchNormConfig,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    residual: Option<&[f64]>,
    rmean: &[f64],
    rvar: &[f64],
    dy: &[f64],
) -> BnRef {
    let mut tape = Tape::<f64>::new(training);
    let xv = tape.input(&[m, c], x.to_vec(), true).unwrap();
    let gv = tape.input(&[c], gamma.to_vec(), true).unwrap();
    let bv = tape.input(&[c], beta.to_vec(), true).unwrap();
    let (mut rm, mut rv) = (rmean.to_vec(), rvar.to_vec());
    let y = batch_norm(
        &mut tape,
        &xv,
        &gv,
        &bv,
        Running {
            mean: &mut rm,
            var: &mut rv,
        },
        cfg,
        act,
    )
    .unwrap();
    let mut out = tape.data(&y).to_vec();
    if let Some(r) = residual {
        out.iter_mut().zip(r).for_each(|(o, r)| *o += r);
    }
    // The residual is added after the BN op, so the BN op's gradient is the gradient wrt y.
    let grads = tape
        .backward_with(&y, dy.to_vec(), &mut Params::new())
        .unwrap();
    BnRef {
        y: out,
        dx: grads.get(&xv).unwrap().to_vec(),
        dgamma: grads.get(&gv).unwrap().to_vec(),
        dbeta: grads.get(&bv).unwrap().to_vec(),
        rmean: rm,
        rvar: rv,
    }
}

fn bn_train<G: Gpu>(g: &G, dtype: DType) {
    let io = Io { g, dtype };
    for (i, k) in BN_CASES.iter().enumerate() {
        let (m, c) = (k.m, k.c);
        let cfg = if i % 2 == 0 {
            BatchNormConfig::torch(1e-5)
        } else {
            BatchNormConfig {
                eps: 1e-3,
                momentum: 0.01,
                unbiased_running_var: false,
            }
        };
        let mut d = BatchNorm::new(dtype, m, c, k.act, &cfg).unwrap();
        if let Some(r) = k.rows_per_split {
            d = d.with_rows_per_split(r).unwrap();
        }
        let name = format!(
            "batch norm train {dtype:?} case {i} (m {m}, c {c}, {:?}, residual {})",
            k.act, k.residual
        );
        let seed = 1000 + 10 * i as u64;
        let x = io.round(shifted(m * c, seed, k.offset, 1.0));
        let dy = io.round(uniform(m * c, seed + 1));
        let res = io.round(uniform(m * c, seed + 2));
        let gamma = shifted(c, seed + 3, 1.0, 0.5);
        let beta = uniform(c, seed + 4);
        let rmean = uniform(c, seed + 5);
        let rvar = shifted(c, seed + 6, 1.5, 0.5);
        let want = bn_cpu(
            true,
            [m, c],
            k.act,
            &cfg,
            &f64s(&x),
            &f64s(&gamma),
            &f64s(&beta),
            k.residual.then(|| f64s(&res)).as_deref(),
            &f64s(&rmean),
            &f64s(&rvar),
            &f64s(&dy),
        );
        let sets: Vec<Vec<usize>> = (0..c)
            .map(|j| (0..m).map(|r| r * c + j).collect())
            .collect();
        let (want_mean, want_invstd) = stats_of(&f64s(&x), &sets, cfg.eps);

        let (xb, dyb, resb) = (io.up(&x), io.up(&dy), io.up(&res));
        let (gb, bb) = (
            g.upload_slice(&gamma).unwrap(),
            g.upload_slice(&beta).unwrap(),
        );
        let (rmb, rvb) = (
            g.upload_slice(&rmean).unwrap(),
            g.upload_slice(&rvar).unwrap(),
        );
        let (yb, dxb) = (io.alloc(m * c), io.alloc(m * c));
        let [meanb, invb, dgb, dbb] = [(); 4].map(|_| g.alloc(c * 4).unwrap());
        let p = |b: &G::Buf| g.ptr(b);
        unsafe {
            d.forward_train(
                g,
                p(&xb),
                p(&gb),
                p(&bb),
                k.residual.then(|| p(&resb)),
                p(&yb),
                p(&meanb),
                p(&invb),
                p(&rmb),
                p(&rvb),
            )
            .unwrap();
            d.backward(
                g,
                true,
                p(&xb),
                p(&dyb),
                p(&gb),
                p(&bb),
                p(&meanb),
                p(&invb),
                p(&dxb),
                p(&dgb),
                p(&dbb),
                false,
            )
            .unwrap();
        }
        assert_close(
            &format!("{name}: y"),
            &io.down(&yb, m * c),
            &want.y,
            io.tol(),
        );
        assert_close(
            &format!("{name}: mean"),
            &down32(g, &meanb, c),
            &want_mean,
            F32_TOL,
        );
        assert_close(
            &format!("{name}: invstd"),
            &down32(g, &invb, c),
            &want_invstd,
            F32_TOL,
        );
        assert_close(
            &format!("{name}: running mean"),
            &down32(g, &rmb, c),
            &want.rmean,
            F32_TOL,
        );
        assert_close(
            &format!("{name}: running var"),
            &down32(g, &rvb, c),
            &want.rvar,
            F32_TOL,
        );
        assert_close(
            &format!("{name}: dx"),
            &io.down(&dxb, m * c),
            &want.dx,
            io.tol(),
        );
        // Parameter gradients are f32 whatever the storage: their only error is f32 arithmetic,
        // but with |mean| ≫ σ the saved f32 mean itself is off by up to ulp(mean) / 2 ≈ 1e-5·σ
        // (mean 100, σ 0.58), which shifts every x̂ and so dγ by about that much relative.
        let ptol = if k.offset.abs() > 10.0 {
            4.0 * F32_TOL
        } else {
            F32_TOL
        };
        assert_close(
            &format!("{name}: dgamma"),
            &down32(g, &dgb, c),
            &want.dgamma,
            ptol,
        );
        assert_close(
            &format!("{name}: dbeta"),
            &down32(g, &dbb, c),
            &want.dbeta,
            ptol,
        );
    }
}

pub fn batch_norm_train_f32<G: Gpu>(g: &G) {
    bn_train(g, DType::F32);
}

pub fn batch_norm_train_bf16<G: Gpu>(g: &G) {
    bn_train(g, DType::BF16);
}

/// Eval mode (running statistics), forward with and without residual, and backward.
pub fn batch_norm_eval<G: Gpu>(g: &G) {
    for dtype in [DType::F32, DType::BF16] {
        let io = Io { g, dtype };
        for (i, (m, c, act, residual)) in [(45, 35, Act::Silu, false), (20, 6, Act::None, true)]
            .into_iter()
            .enumerate()
        {
            let cfg = BatchNormConfig::keras(1e-3, 0.99);
            let d = BatchNorm::new(dtype, m, c, act, &cfg).unwrap();
            let name = format!("batch norm eval {dtype:?} case {i}");
            let seed = 2000 + 10 * i as u64;
            let x = io.round(shifted(m * c, seed, 0.2, 2.0));
            let dy = io.round(uniform(m * c, seed + 1));
            let res = io.round(uniform(m * c, seed + 2));
            let gamma = shifted(c, seed + 3, 1.0, 0.5);
            let beta = uniform(c, seed + 4);
            let rmean = uniform(c, seed + 5);
            let rvar = shifted(c, seed + 6, 1.5, 0.5);
            let want = bn_cpu(
                false,
                [m, c],
                act,
                &cfg,
                &f64s(&x),
                &f64s(&gamma),
                &f64s(&beta),
                residual.then(|| f64s(&res)).as_deref(),
                &f64s(&rmean),
                &f64s(&rvar),
                &f64s(&dy),
            );
            let (xb, dyb, resb) = (io.up(&x), io.up(&dy), io.up(&res));
            let (gb, bb) = (
                g.upload_slice(&gamma).unwrap(),
                g.upload_slice(&beta).unwrap(),
            );
            let (rmb, rvb) = (
                g.upload_slice(&rmean).unwrap(),
                g.upload_slice(&rvar).unwrap(),
            );
            let (yb, dxb) = (io.alloc(m * c), io.alloc(m * c));
            let [invb, dgb, dbb] = [(); 3].map(|_| g.alloc(c * 4).unwrap());
            let p = |b: &G::Buf| g.ptr(b);
            unsafe {
                d.forward_eval(
                    g,
                    p(&xb),
                    p(&gb),
                    p(&bb),
                    residual.then(|| p(&resb)),
                    p(&yb),
                    p(&rmb),
                    p(&rvb),
                    p(&invb),
                )
                .unwrap();
                d.backward(
                    g,
                    false,
                    p(&xb),
                    p(&dyb),
                    p(&gb),
                    p(&bb),
                    p(&rmb),
                    p(&invb),
                    p(&dxb),
                    p(&dgb),
                    p(&dbb),
                    false,
                )
                .unwrap();
            }
            assert_close(
                &format!("{name}: y"),
                &io.down(&yb, m * c),
                &want.y,
                io.tol(),
            );
            let want_inv: Vec<f64> = rvar
                .iter()
                .map(|&v| 1.0 / (v as f64 + cfg.eps).sqrt())
                .collect();
            assert_close(
                &format!("{name}: invstd"),
                &down32(g, &invb, c),
                &want_inv,
                F32_TOL,
            );
            // Eval mode leaves the running statistics alone.
            assert_eq!(
                g.download_vec::<f32>(&rmb, c).unwrap(),
                rmean,
                "{name}: running mean changed"
            );
            assert_eq!(
                g.download_vec::<f32>(&rvb, c).unwrap(),
                rvar,
                "{name}: running var changed"
            );
            assert_close(
                &format!("{name}: dx"),
                &io.down(&dxb, m * c),
                &want.dx,
                io.tol(),
            );
            assert_close(
                &format!("{name}: dgamma"),
                &down32(g, &dgb, c),
                &want.dgamma,
                F32_TOL,
            );
            assert_close(
                &format!("{name}: dbeta"),
                &down32(g, &dbb, c),
                &want.dbeta,
                F32_TOL,
            );
        }
    }
}

/// dγ, dβ added to their contents with `accumulate`; the result is bitwise the same on a rerun
/// (fixed-order reductions).
pub fn batch_norm_accumulates_and_repeats<G: Gpu>(g: &G) {
    let (m, c) = (300, 40);
    let cfg = BatchNormConfig::torch(1e-5);
    let d = BatchNorm::new(DType::F32, m, c, Act::Silu, &cfg)
        .unwrap()
        .with_rows_per_split(17)
        .unwrap();
    let (x, dy) = (shifted(m * c, 31, 0.5, 1.0), uniform(m * c, 32));
    let (gamma, beta) = (shifted(c, 33, 1.0, 0.5), uniform(c, 34));
    let start_g = uniform(c, 35);
    let start_b = uniform(c, 36);
    let (xb, dyb) = (g.upload_slice(&x).unwrap(), g.upload_slice(&dy).unwrap());
    let (gb, bb) = (
        g.upload_slice(&gamma).unwrap(),
        g.upload_slice(&beta).unwrap(),
    );
    let (rmb, rvb) = (
        g.upload_slice(&vec![0f32; c]).unwrap(),
        g.upload_slice(&vec![1f32; c]).unwrap(),
    );
    let (dgb, dbb) = (
        g.upload_slice(&start_g).unwrap(),
        g.upload_slice(&start_b).unwrap(),
    );
    let [meanb, invb, fg, fb, fg2, fb2] = [(); 6].map(|_| g.alloc(c * 4).unwrap());
    let (yb, dx1, dx2) = (
        g.alloc(m * c * 4).unwrap(),
        g.alloc(m * c * 4).unwrap(),
        g.alloc(m * c * 4).unwrap(),
    );
    let p = |b: &G::Buf| g.ptr(b);
    unsafe {
        d.forward_train(
            g,
            p(&xb),
            p(&gb),
            p(&bb),
            None,
            p(&yb),
            p(&meanb),
            p(&invb),
            p(&rmb),
            p(&rvb),
        )
        .unwrap();
        d.backward(
            g,
            true,
            p(&xb),
            p(&dyb),
            p(&gb),
            p(&bb),
            p(&meanb),
            p(&invb),
            p(&dx1),
            p(&dgb),
            p(&dbb),
            true,
        )
        .unwrap();
        d.backward(
            g,
            true,
            p(&xb),
            p(&dyb),
            p(&gb),
            p(&bb),
            p(&meanb),
            p(&invb),
            p(&dx1),
            p(&fg),
            p(&fb),
            false,
        )
        .unwrap();
        d.backward(
            g,
            true,
            p(&xb),
            p(&dyb),
            p(&gb),
            p(&bb),
            p(&meanb),
            p(&invb),
            p(&dx2),
            p(&fg2),
            p(&fb2),
            false,
        )
        .unwrap();
    }
    let fresh_g = down32(g, &fg, c);
    let fresh_b = down32(g, &fb, c);
    let want_g: Vec<f64> = start_g
        .iter()
        .zip(&fresh_g)
        .map(|(&s, f)| s as f64 + f)
        .collect();
    let want_b: Vec<f64> = start_b
        .iter()
        .zip(&fresh_b)
        .map(|(&s, f)| s as f64 + f)
        .collect();
    assert_close(
        "batch norm dgamma accumulate",
        &down32(g, &dgb, c),
        &want_g,
        F32_TOL,
    );
    assert_close(
        "batch norm dbeta accumulate",
        &down32(g, &dbb, c),
        &want_b,
        F32_TOL,
    );
    assert!(
        fresh_g.iter().any(|v| v.abs() > 1e-3),
        "dgamma is all but zero: the test checks nothing"
    );
    assert_eq!(
        g.download_vec::<f32>(&fg, c).unwrap(),
        g.download_vec::<f32>(&fg2, c).unwrap(),
        "dgamma rerun"
    );
    assert_eq!(
        g.download_vec::<f32>(&dx1, m * c).unwrap(),
        g.download_vec::<f32>(&dx2, m * c).unwrap(),
        "dx rerun"
    );
}

// ---- group norm ------------------------------------------------------------------------------

/// (n, p, c, groups, act, rows per split): one channel per group, groups across 32-channel
/// tiles, odd sizes, several splits, default splits.
const GN_CASES: [(usize, usize, usize, usize, Act, Option<usize>); 5] = [
    (2, 30, 32, 32, Act::Silu, Some(8)),
    (3, 17, 12, 4, Act::None, None),
    (2, 20, 96, 2, Act::Silu, Some(6)),
    (1, 100, 40, 8, Act::None, Some(13)),
    (4, 9, 6, 3, Act::Silu, None),
];

fn gn_run<G: Gpu>(g: &G, dtype: DType) {
    let io = Io { g, dtype };
    for (i, (n, p, c, groups, act, rps)) in GN_CASES.into_iter().enumerate() {
        let eps = 1e-5;
        let mut d = GroupNorm::new(dtype, [n, p, c], groups, eps, act).unwrap();
        if let Some(r) = rps {
            d = d.with_rows_per_split(r).unwrap();
        }
        let name =
            format!("group norm {dtype:?} case {i} ({n}, {p}, {c}, {groups} groups, {act:?})");
        let seed = 3000 + 10 * i as u64;
        let len = n * p * c;
        let x = io.round(shifted(len, seed, 0.7, 2.0));
        let dy = io.round(uniform(len, seed + 1));
        let gamma = shifted(c, seed + 3, 1.0, 0.5);
        let beta = uniform(c, seed + 4);

        let mut tape = Tape::<f64>::new(true);
        let xv = tape.input(&[n, p, c], f64s(&x), true).unwrap();
        let gv = tape.input(&[c], f64s(&gamma), true).unwrap();
        let bv = tape.input(&[c], f64s(&beta), true).unwrap();
        let y = group_norm(&mut tape, &xv, &gv, &bv, groups, eps, act).unwrap();
        let want_y = tape.data(&y).to_vec();
        let grads = tape
            .backward_with(&y, f64s(&dy), &mut Params::new())
            .unwrap();
        let cg = c / groups;
        let sets: Vec<Vec<usize>> = (0..n * groups)
            .map(|t| {
                let (s, gr) = (t / groups, t % groups);
                (0..p)
                    .flat_map(|q| (0..cg).map(move |j| (s * p + q) * c + gr * cg + j))
                    .collect()
            })
            .collect();
        let (want_mean, want_inv) = stats_of(&f64s(&x), &sets, eps);

        let (xb, dyb) = (io.up(&x), io.up(&dy));
        let (gb, bb) = (
            g.upload_slice(&gamma).unwrap(),
            g.upload_slice(&beta).unwrap(),
        );
        let (yb, dxb) = (io.alloc(len), io.alloc(len));
        let [meanb, invb] = [(); 2].map(|_| g.alloc(d.stats_len() * 4).unwrap());
        let [dgb, dbb] = [(); 2].map(|_| g.alloc(c * 4).unwrap());
        let pt = |b: &G::Buf| g.ptr(b);
        unsafe {
            d.forward(g, pt(&xb), pt(&gb), pt(&bb), pt(&yb), pt(&meanb), pt(&invb))
                .unwrap();
            d.backward(
                g,
                pt(&xb),
                pt(&dyb),
                pt(&gb),
                pt(&bb),
                pt(&meanb),
                pt(&invb),
                pt(&dxb),
                pt(&dgb),
                pt(&dbb),
                false,
            )
            .unwrap();
        }
        assert_close(&format!("{name}: y"), &io.down(&yb, len), &want_y, io.tol());
        assert_close(
            &format!("{name}: mean"),
            &down32(g, &meanb, n * groups),
            &want_mean,
            F32_TOL,
        );
        assert_close(
            &format!("{name}: invstd"),
            &down32(g, &invb, n * groups),
            &want_inv,
            F32_TOL,
        );
        assert_close(
            &format!("{name}: dx"),
            &io.down(&dxb, len),
            grads.get(&xv).unwrap(),
            io.tol(),
        );
        assert_close(
            &format!("{name}: dgamma"),
            &down32(g, &dgb, c),
            grads.get(&gv).unwrap(),
            F32_TOL,
        );
        assert_close(
            &format!("{name}: dbeta"),
            &down32(g, &dbb, c),
            grads.get(&bv).unwrap(),
            F32_TOL,
        );
    }
}

pub fn group_norm_f32<G: Gpu>(g: &G) {
    gn_run(g, DType::F32);
}

pub fn group_norm_bf16<G: Gpu>(g: &G) {
    gn_run(g, DType::BF16);
}

// ---- layer norm ------------------------------------------------------------------------------

/// (rows, c, rows per split): C below, at, not a multiple of, and several times 32.
const LN_CASES: [(usize, usize, Option<usize>); 4] = [
    (37, 5, None),
    (50, 96, Some(7)),
    (9, 200, None),
    (70, 32, Some(64)),
];

fn ln_run<G: Gpu>(g: &G, dtype: DType) {
    let io = Io { g, dtype };
    for (i, (rows, c, rps)) in LN_CASES.into_iter().enumerate() {
        let eps = 1e-5;
        let mut d = LayerNorm::new(dtype, rows, c, eps).unwrap();
        if let Some(r) = rps {
            d = d.with_rows_per_split(r).unwrap();
        }
        let name = format!("layer norm {dtype:?} case {i} ({rows} × {c})");
        let seed = 4000 + 10 * i as u64;
        let len = rows * c;
        let x = io.round(shifted(len, seed, 0.3, 3.0));
        let dy = io.round(uniform(len, seed + 1));
        let gamma = shifted(c, seed + 3, 1.0, 0.5);
        let beta = uniform(c, seed + 4);

        let mut tape = Tape::<f64>::new(true);
        let xv = tape.input(&[rows, c], f64s(&x), true).unwrap();
        let gv = tape.input(&[c], f64s(&gamma), true).unwrap();
        let bv = tape.input(&[c], f64s(&beta), true).unwrap();
        let y = layer_norm(&mut tape, &xv, &gv, &bv, eps).unwrap();
        let want_y = tape.data(&y).to_vec();
        let grads = tape
            .backward_with(&y, f64s(&dy), &mut Params::new())
            .unwrap();
        let sets: Vec<Vec<usize>> = (0..rows).map(|r| (r * c..(r + 1) * c).collect()).collect();
        let (want_mean, want_inv) = stats_of(&f64s(&x), &sets, eps);

        let (xb, dyb) = (io.up(&x), io.up(&dy));
        let (gb, bb) = (
            g.upload_slice(&gamma).unwrap(),
            g.upload_slice(&beta).unwrap(),
        );
        let (yb, dxb) = (io.alloc(len), io.alloc(len));
        let [meanb, invb] = [(); 2].map(|_| g.alloc(rows * 4).unwrap());
        let [dgb, dbb] = [(); 2].map(|_| g.alloc(c * 4).unwrap());
        let pt = |b: &G::Buf| g.ptr(b);
        unsafe {
            d.forward(g, pt(&xb), pt(&gb), pt(&bb), pt(&yb), pt(&meanb), pt(&invb))
                .unwrap();
            d.backward(
                g,
                pt(&xb),
                pt(&dyb),
                pt(&gb),
                pt(&meanb),
                pt(&invb),
                pt(&dxb),
                pt(&dgb),
                pt(&dbb),
                false,
            )
            .unwrap();
        }
        assert_close(&format!("{name}: y"), &io.down(&yb, len), &want_y, io.tol());
        assert_close(
            &format!("{name}: mean"),
            &down32(g, &meanb, rows),
            &want_mean,
            F32_TOL,
        );
        assert_close(
            &format!("{name}: invstd"),
            &down32(g, &invb, rows),
            &want_inv,
            F32_TOL,
        );
        assert_close(
            &format!("{name}: dx"),
            &io.down(&dxb, len),
            grads.get(&xv).unwrap(),
            io.tol(),
        );
        assert_close(
            &format!("{name}: dgamma"),
            &down32(g, &dgb, c),
            grads.get(&gv).unwrap(),
            F32_TOL,
        );
        assert_close(
            &format!("{name}: dbeta"),
            &down32(g, &dbb, c),
            grads.get(&bv).unwrap(),
            F32_TOL,
        );
    }
}

pub fn layer_norm_f32<G: Gpu>(g: &G) {
    ln_run(g, DType::F32);
}

pub fn layer_norm_bf16<G: Gpu>(g: &G) {
    ln_run(g, DType::BF16);
}

/// Unsupported plans are errors, not panics.
pub fn norm_rejects_unsupported_plans<G: Gpu>(g: &G) {
    let cfg = BatchNormConfig::torch(1e-5);
    assert!(
        BatchNorm::new(DType::F16, 10, 4, Act::None, &cfg).is_err(),
        "f16 batch norm"
    );
    assert!(
        BatchNorm::new(DType::F32, 0, 4, Act::None, &cfg).is_err(),
        "empty batch norm"
    );
    assert!(
        BatchNorm::new(DType::F32, 10, 4, Act::None, &BatchNormConfig::torch(-1.0)).is_err(),
        "eps < 0"
    );
    assert!(BatchNorm::new(DType::F32, 10, 4, Act::None, &cfg)
        .unwrap()
        .with_rows_per_split(0)
        .is_err());
    // Training mode with one row per channel: refused before anything is launched.
    let one = BatchNorm::new(DType::F32, 1, 4, Act::None, &cfg).unwrap();
    assert!(
        unsafe { one.forward_train(g, 0, 0, 0, None, 0, 0, 0, 0, 0) }.is_err(),
        "training with m = 1"
    );
    assert!(
        unsafe { one.backward(g, true, 0, 0, 0, 0, 0, 0, 0, 0, 0, false) }.is_err(),
        "training backward with m = 1"
    );
    assert!(
        GroupNorm::new(DType::F32, [2, 5, 12], 5, 1e-5, Act::None).is_err(),
        "12 channels in 5 groups"
    );
    assert!(
        GroupNorm::new(DType::F32, [2, 5, 12], 0, 1e-5, Act::None).is_err(),
        "0 groups"
    );
    assert!(
        GroupNorm::new(DType::F64, [2, 5, 12], 4, 1e-5, Act::None).is_err(),
        "f64 group norm"
    );
    assert!(
        GroupNorm::new(DType::F32, [70000, 1, 4], 2, 1e-5, Act::None).is_err(),
        "n > 65535"
    );
    assert!(
        GroupNorm::new(DType::F32, [2, 5, 12], 4, f64::NAN, Act::None).is_err(),
        "NaN eps"
    );
    assert!(
        LayerNorm::new(DType::F32, 4, 0, 1e-5).is_err(),
        "empty layer norm"
    );
    assert!(
        LayerNorm::new(DType::F16, 4, 8, 1e-5).is_err(),
        "f16 layer norm"
    );
}
