//! The diffusion ops (issue 5): every backward against central finite differences in f64
//! (normalised max error ≤ 1e-6), forward values against PyTorch / MONAI in f32
//! (tests/fixtures/make_diffusion_ops_fixture.py → tests/fixtures/diffusion_ops/forward.safetensors,
//! max |a − b| / max |b| ≤ 1e-5), closed forms, determinism across thread counts and bad shapes.

use phenocore::autograd::{Params, Tape, Var};
use phenocore::error::Error;
use phenocore::io::safetensors::{read_f32_tensors, TensorMap};
use phenocore::ops::conv::{conv2d_pad, Pad2d};
use phenocore::ops::gelu::{geglu, gelu, timestep_embedding};
use phenocore::ops::gradcheck::check;
use phenocore::ops::groupnorm::{group_norm, layer_norm};
use phenocore::ops::norm::Act;
use phenocore::ops::shape::{
    add_per_sample, concat_last, embedding, mse_loss, mul_scalar, reshape, upsample_nearest2x,
};
use phenocore::ops::{elementwise as ew, shape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(-1.0..1.0)).collect()
}

fn inp(shape: &[usize], seed: u64) -> (Vec<usize>, Vec<f64>) {
    (shape.to_vec(), rand_vec(shape.iter().product(), seed))
}

const TOL: f64 = 1e-6;

fn assert_ok(name: &str, r: phenocore::ops::gradcheck::Report) {
    println!("{name}: {:?} (checked {:?})", r.max_err, r.checked);
    assert!(r.worst() <= TOL, "{name}: {:?}", r.max_err);
}

// ---------------------------------------------------------------- finite differences

#[test]
fn group_norm_backward_with_and_without_silu() {
    // [2, 3, 4, 6] with 3 groups of 2 channels; [2, 17, 17, 4] spans two 256-position chunks.
    for (shape, groups) in [
        (vec![2, 3, 4, 6], 3),
        (vec![2, 17, 17, 4], 2),
        (vec![3, 5, 8], 8),
    ] {
        let c = *shape.last().unwrap();
        for act in [Act::None, Act::Silu] {
            let (xs, mut xv) = inp(&shape, 1);
            // Offset and scale so the centring and the variance matter.
            xv.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = 1.7 * *v + 0.3 * (i % 5) as f64);
            let r = check(&[(xs, xv), inp(&[c], 2), inp(&[c], 3)], true, 60, |t, v| {
                group_norm(t, &v[0], &v[1], &v[2], groups, 1e-6, act)
            })
            .unwrap();
            assert_ok(&format!("group_norm {shape:?} g{groups} {act:?}"), r);
        }
    }
}

#[test]
fn layer_norm_backward() {
    for shape in [vec![2, 5, 8], vec![3, 7]] {
        let c = *shape.last().unwrap();
        let r = check(
            &[inp(&shape, 4), inp(&[c], 5), inp(&[c], 6)],
            true,
            60,
            |t, v| layer_norm(t, &v[0], &v[1], &v[2], 1e-5),
        )
        .unwrap();
        assert_ok(&format!("layer_norm {shape:?}"), r);
    }
}

#[test]
fn conv2d_pad_backward_all_geometries() {
    let p = |top, bottom, left, right| Pad2d {
        top,
        bottom,
        left,
        right,
    };
    for (k, s, pad, h, w, bias) in [
        (3, 2, p(0, 1, 0, 1), 7, 8, true),
        (3, 2, p(0, 1, 0, 1), 6, 6, false),
        (3, 1, Pad2d::same(1), 5, 4, true),
        (3, 2, Pad2d::same(1), 7, 6, true),
        (3, 1, p(2, 0, 1, 0), 5, 5, true),
        (1, 1, Pad2d::same(0), 4, 5, true),
        (1, 2, Pad2d::same(0), 5, 5, true),
    ] {
        let mut inputs = vec![inp(&[2, h, w, 3], 7), inp(&[4, 3, k, k], 8)];
        if bias {
            inputs.push(inp(&[4], 9));
        }
        let r = check(&inputs, true, 60, |t, v| {
            conv2d_pad(t, &v[0], &v[1], v.get(2), s, pad)
        })
        .unwrap();
        assert_ok(
            &format!("conv2d_pad k{k} s{s} {pad:?} {h}x{w} bias {bias}"),
            r,
        );
    }
}

#[test]
fn conv2d_pad_backward_over_several_row_blocks() {
    // 26 × 26 × 200 with a 3 × 3 kernel: 46,800 im2col values per output row, so the 2^20-value
    // blocks hold 22 rows and the 26 output rows take two blocks.
    let r = check(
        &[
            inp(&[1, 26, 26, 200], 10),
            inp(&[2, 200, 3, 3], 11),
            inp(&[2], 12),
        ],
        true,
        12,
        |t, v| conv2d_pad(t, &v[0], &v[1], Some(&v[2]), 1, Pad2d::same(1)),
    )
    .unwrap();
    assert_ok("conv2d_pad 26x26x200 two blocks", r);
}

#[test]
fn shape_ops_backward() {
    let r = check(&[inp(&[2, 3, 4, 5], 13)], true, 200, |t, v| {
        let y = reshape(t, &v[0], &[2, 12, 5])?;
        gelu_chain(t, &y)
    })
    .unwrap();
    assert_ok("reshape", r);
    let r = check(&[inp(&[2, 3, 4, 5], 14)], true, 200, |t, v| {
        upsample_nearest2x(t, &v[0])
    })
    .unwrap();
    assert_ok("upsample_nearest2x", r);
    let r = check(
        &[
            inp(&[2, 3, 2], 15),
            inp(&[2, 3, 5], 16),
            inp(&[2, 3, 1], 17),
        ],
        true,
        200,
        |t, v| concat_last(t, &[&v[0], &v[1], &v[2]]),
    )
    .unwrap();
    assert_ok("concat_last", r);
    // The same input twice: both halves of the gradient reach it.
    let r = check(&[inp(&[3, 4], 18)], true, 200, |t, v| {
        concat_last(t, &[&v[0], &v[0]])
    })
    .unwrap();
    assert_ok("concat_last same input twice", r);
    let r = check(&[inp(&[5, 3], 19)], true, 200, |t, v| {
        embedding(t, &v[0], &[4, 0, 4, 2, 4])
    })
    .unwrap();
    assert_ok("embedding (repeated index)", r);
    let r = check(
        &[inp(&[2, 3, 4, 5], 20), inp(&[2, 5], 21)],
        true,
        200,
        |t, v| add_per_sample(t, &v[0], &v[1]),
    )
    .unwrap();
    assert_ok("add_per_sample", r);
    let r = check(&[inp(&[4, 6], 22)], true, 200, |t, v| {
        Ok(mul_scalar(t, &v[0], -2.5))
    })
    .unwrap();
    assert_ok("mul_scalar", r);
    let target: Vec<f64> = rand_vec(24, 23);
    let r = check(&[inp(&[2, 3, 4], 24)], true, 200, |t, v| {
        mse_loss(t, &v[0], &target)
    })
    .unwrap();
    assert_ok("mse_loss", r);
}

/// A nonlinear op after a pass-through op, so a wrong gradient routing shows.
fn gelu_chain(t: &mut Tape<f64>, y: &Var) -> phenocore::error::Result<Var> {
    Ok(gelu(t, y))
}

#[test]
fn linear_rank3_gelu_geglu_backward() {
    let r = check(
        &[inp(&[2, 3, 5], 25), inp(&[4, 5], 26), inp(&[4], 27)],
        true,
        60,
        |t, v| ew::linear(t, &v[0], &v[1], Some(&v[2])),
    )
    .unwrap();
    assert_ok("linear [2, 3, 5] -> [2, 3, 4]", r);
    let (s, mut xv) = inp(&[60], 28);
    xv.iter_mut().for_each(|v| *v *= 4.0);
    let r = check(&[(s, xv)], true, 60, |t, v| Ok(gelu(t, &v[0]))).unwrap();
    assert_ok("gelu", r);
    let (s, mut xv) = inp(&[2, 3, 8], 29);
    xv.iter_mut().for_each(|v| *v *= 3.0);
    let r = check(&[(s, xv)], true, 60, |t, v| geglu(t, &v[0])).unwrap();
    assert_ok("geglu", r);
}

// ---------------------------------------------------------------- forward vs PyTorch / MONAI

struct Fixture(TensorMap);

impl Fixture {
    fn load() -> Self {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/diffusion_ops/forward.safetensors");
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        Fixture(read_f32_tensors(&bytes).unwrap())
    }
    fn get(&self, k: &str) -> (Vec<usize>, Vec<f32>) {
        let t = self
            .0
            .get(k)
            .unwrap_or_else(|| panic!("fixture has no {k}"));
        (t.shape().to_vec(), t.as_f32().unwrap().to_vec())
    }
    fn input(&self, tape: &mut Tape<f32>, k: &str) -> Var {
        let (s, v) = self.get(k);
        tape.input(&s, v, false).unwrap()
    }
    /// Asserts `got` (with `shape`) matches tensor `k`: max |a − b| / max |b| ≤ tol.
    fn expect(&self, k: &str, shape: &[usize], got: &[f32], tol: f64) {
        let (s, want) = self.get(k);
        assert_eq!(shape, &s[..], "{k}: shape");
        let err = rel_err(got, &want);
        println!("{k}: max rel error {err:.2e}");
        assert!(err <= tol, "{k}: max rel error {err:.3e} > {tol:.0e}");
    }
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    let scale = want.iter().map(|b| (*b as f64).abs()).fold(0.0, f64::max);
    diff / scale.max(f64::MIN_POSITIVE)
}

const FWD_TOL: f64 = 1e-5;

#[test]
fn forward_matches_torch_and_monai() {
    let f = Fixture::load();
    let mut t = Tape::<f32>::new(false);
    // GroupNorm(3, 12, eps 1e-6), with and without SiLU.
    let x = f.input(&mut t, "gn_x");
    let (g, b) = (f.input(&mut t, "gn_gamma"), f.input(&mut t, "gn_beta"));
    let y = group_norm(&mut t, &x, &g, &b, 3, 1e-6, Act::None).unwrap();
    f.expect("gn_y", y.shape(), t.data(&y), FWD_TOL);
    let y = group_norm(&mut t, &x, &g, &b, 3, 1e-6, Act::Silu).unwrap();
    f.expect("gn_silu_y", y.shape(), t.data(&y), FWD_TOL);
    // LayerNorm(16, eps 1e-5).
    let x = f.input(&mut t, "ln_x");
    let (g, b) = (f.input(&mut t, "ln_gamma"), f.input(&mut t, "ln_beta"));
    let y = layer_norm(&mut t, &x, &g, &b, 1e-5).unwrap();
    f.expect("ln_y", y.shape(), t.data(&y), FWD_TOL);
    // Convolutions with explicit padding and bias.
    let x = f.input(&mut t, "conv_x");
    let (w3, b3) = (f.input(&mut t, "conv_w3"), f.input(&mut t, "conv_b3"));
    let (w1, b1) = (f.input(&mut t, "conv_w1"), f.input(&mut t, "conv_b1"));
    let down = Pad2d {
        top: 0,
        bottom: 1,
        left: 0,
        right: 1,
    };
    for (key, w, b, s, pad) in [
        ("conv_down_y", &w3, &b3, 2, down),
        ("conv_same_y", &w3, &b3, 1, Pad2d::same(1)),
        ("conv_s2p1_y", &w3, &b3, 2, Pad2d::same(1)),
        ("conv_1x1_y", &w1, &b1, 1, Pad2d::same(0)),
    ] {
        let y = conv2d_pad(&mut t, &x, w, Some(b), s, pad).unwrap();
        f.expect(key, y.shape(), t.data(&y), FWD_TOL);
    }
    // Nearest ×2 upsampling is a copy: exact.
    let x = f.input(&mut t, "up_x");
    let y = upsample_nearest2x(&mut t, &x).unwrap();
    f.expect("up_y", y.shape(), t.data(&y), 0.0);
    // Exact GELU and MONAI's GEGLU.
    let x = f.input(&mut t, "gelu_x");
    let y = gelu(&mut t, &x);
    f.expect("gelu_y", y.shape(), t.data(&y), FWD_TOL);
    let x = f.input(&mut t, "geglu_x");
    let y = geglu(&mut t, &x).unwrap();
    f.expect("geglu_y", y.shape(), t.data(&y), FWD_TOL);
}

#[test]
fn timestep_embedding_matches_monai() {
    let f = Fixture::load();
    let (_, ts) = f.get("temb_t");
    let ts: Vec<f64> = ts.iter().map(|&v| v as f64).collect();
    for dim in [16usize, 9] {
        let key = format!("temb_{dim}");
        let (s, want) = f.get(&key);
        assert_eq!(s, vec![ts.len(), dim]);
        let got: Vec<f32> = timestep_embedding(&ts, dim, 10000.0);
        // MONAI computes t·freq in f32: its argument carries a rounding error of up to
        // ~t·2⁻²³ (6e-5 at t = 999), so rows are compared with that allowance on top of 1e-5.
        for (r, &tv) in ts.iter().enumerate() {
            let allow = FWD_TOL + tv * 2f64.powi(-23);
            for j in 0..dim {
                let (a, b) = (got[r * dim + j] as f64, want[r * dim + j] as f64);
                assert!(
                    (a - b).abs() <= allow,
                    "{key} t={tv} column {j}: {a} vs MONAI {b}"
                );
            }
        }
        let early: usize = ts.iter().take_while(|&&v| v <= 64.0).count();
        let err = rel_err(&got[..early * dim], &want[..early * dim]);
        println!("{key}: t ≤ 64 max rel error {err:.2e}");
        assert!(err <= FWD_TOL, "{key}: {err}");
        // Odd dim: the last column is the zero pad.
        if dim % 2 == 1 {
            assert!((0..ts.len()).all(|r| got[r * dim + dim - 1] == 0.0));
        }
    }
    // Closed form in f64: t = 2, dim 4: freqs [1, 1e-2] → [cos 2, cos 0.02, sin 2, sin 0.02].
    let e: Vec<f64> = timestep_embedding(&[2.0], 4, 10000.0);
    let want = [2f64.cos(), 0.02f64.cos(), 2f64.sin(), 0.02f64.sin()];
    for (a, b) in e.iter().zip(want) {
        assert!((a - b).abs() < 1e-15, "{e:?} vs {want:?}");
    }
}

// ---------------------------------------------------------------- closed forms, invariants

#[test]
fn shape_ops_closed_forms() {
    let mut t = Tape::<f64>::new(false);
    let x = t.input(&[1, 1, 2, 2], vec![1., 2., 3., 4.], false).unwrap();
    let y = upsample_nearest2x(&mut t, &x).unwrap();
    assert_eq!(y.shape(), &[1, 2, 4, 2]);
    let x = t.input(&[1, 2, 2, 1], vec![1., 2., 3., 4.], false).unwrap();
    let y = upsample_nearest2x(&mut t, &x).unwrap();
    assert_eq!(
        t.data(&y),
        &[1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.]
    );
    let a = t.input(&[2, 1], vec![1., 2.], false).unwrap();
    let b = t.input(&[2, 2], vec![3., 4., 5., 6.], false).unwrap();
    let c = concat_last(&mut t, &[&a, &b]).unwrap();
    assert_eq!(
        (c.shape(), t.data(&c)),
        (&[2usize, 3][..], &[1., 3., 4., 2., 5., 6.][..])
    );
    let tab = t
        .input(&[3, 2], vec![0., 1., 10., 11., 20., 21.], false)
        .unwrap();
    let e = embedding(&mut t, &tab, &[2, 0]).unwrap();
    assert_eq!(t.data(&e), &[20., 21., 0., 1.]);
    let x = t
        .input(&[2, 2, 1, 2], vec![1., 2., 3., 4., 5., 6., 7., 8.], false)
        .unwrap();
    let s = t.input(&[2, 2], vec![10., 20., 30., 40.], false).unwrap();
    let y = add_per_sample(&mut t, &x, &s).unwrap();
    assert_eq!(t.data(&y), &[11., 22., 13., 24., 35., 46., 37., 48.]);
    let y = mul_scalar(&mut t, &s, 0.5);
    assert_eq!(t.data(&y), &[5., 10., 15., 20.]);
    let l = mse_loss(&mut t, &s, &[10., 20., 31., 38.]).unwrap();
    assert_eq!((l.shape(), t.data(&l)), (&[1usize][..], &[1.25][..]));
    let r = reshape(&mut t, &s, &[4]).unwrap();
    assert_eq!(
        (r.shape(), t.data(&r)),
        (&[4usize][..], &[10., 20., 30., 40.][..])
    );
    // linear on [2, 1, 2] rows equals linear on the flattened [2, 2].
    let w = t
        .input(&[3, 2], vec![1., 0., 0., 1., 1., 1.], false)
        .unwrap();
    let x3 = t.input(&[2, 1, 2], vec![1., 2., 3., 4.], false).unwrap();
    let y = ew::linear(&mut t, &x3, &w, None).unwrap();
    assert_eq!(
        (y.shape(), t.data(&y)),
        (&[2usize, 1, 3][..], &[1., 2., 3., 3., 4., 7.][..])
    );
    // GELU closed forms: GELU(0) = 0, GELU(1) = Φ(1) = 0.841344746068543.
    let x = t.input(&[3], vec![0.0, 1.0, -1.0], false).unwrap();
    let g = gelu(&mut t, &x);
    let phi1 = 0.841_344_746_068_542_9;
    let want = [0.0, phi1, -(1.0 - phi1)];
    for (a, b) in t.data(&g).iter().zip(want) {
        assert!((a - b).abs() < 1e-15);
    }
}

#[test]
fn group_norm_with_one_group_per_channel_is_instance_norm_and_gradient_of_mse_is_exact() {
    // groups = C: each (sample, channel) normalised to mean 0, variance 1 (then γ = 1, β = 0).
    let (n, p, c) = (2usize, 9usize, 3usize);
    let xv = rand_vec(n * p * c, 30);
    let mut t = Tape::<f64>::new(true);
    let x = t.input(&[n, 3, 3, c], xv, true).unwrap();
    let g = t.input(&[c], vec![1.0; c], false).unwrap();
    let b = t.input(&[c], vec![0.0; c], false).unwrap();
    let y = group_norm(&mut t, &x, &g, &b, c, 0.0, Act::None).unwrap();
    let yv = t.data(&y).to_vec();
    for s in 0..n {
        for ch in 0..c {
            let v: Vec<f64> = (0..p).map(|q| yv[(s * p + q) * c + ch]).collect();
            let mean = v.iter().sum::<f64>() / p as f64;
            let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / p as f64;
            assert!(
                mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-10,
                "{mean} {var}"
            );
        }
    }
    // mse against zeros of a normalised map = mean(y²) = 1 exactly; its gradient wrt x is 0
    // (σ-normalisation makes Σy² constant).
    let l = mse_loss(&mut t, &y, &vec![0.0; n * p * c]).unwrap();
    assert!((t.data(&l)[0] - 1.0).abs() < 1e-12);
    let mut params = Params::new();
    let grads = t.backward_with(&l, vec![1.0], &mut params).unwrap();
    let gx = grads.get(&x).unwrap();
    assert!(gx.iter().all(|v| v.abs() < 1e-12), "{gx:?}");
}

/// group_norm, layer_norm and conv2d_pad forward + backward in f32 on pools of 1 and 3 threads.
fn norm_conv_run() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut t = Tape::<f32>::new(true);
    let v = |n: usize, s: u64| {
        rand_vec(n, s)
            .into_iter()
            .map(|v| v as f32)
            .collect::<Vec<_>>()
    };
    let x = t
        .input(&[3, 20, 20, 16], v(3 * 400 * 16, 40), true)
        .unwrap();
    let g = t.input(&[16], v(16, 41), true).unwrap();
    let b = t.input(&[16], v(16, 42), true).unwrap();
    let w = t.input(&[8, 16, 3, 3], v(8 * 16 * 9, 43), true).unwrap();
    let cb = t.input(&[8], v(8, 44), true).unwrap();
    let lg = t.input(&[8], v(8, 45), true).unwrap();
    let lb = t.input(&[8], v(8, 46), true).unwrap();
    let y = group_norm(&mut t, &x, &g, &b, 4, 1e-6, Act::Silu).unwrap();
    let y = conv2d_pad(
        &mut t,
        &y,
        &w,
        Some(&cb),
        2,
        Pad2d {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        },
    )
    .unwrap();
    let y = shape::reshape(&mut t, &y, &[3, 100, 8]).unwrap();
    let y = layer_norm(&mut t, &y, &lg, &lb, 1e-5).unwrap();
    let out = t.data(&y).to_vec();
    let seed = v(out.len(), 47);
    let mut params = Params::new();
    let grads = t.backward_with(&y, seed, &mut params).unwrap();
    (
        out,
        grads.get(&x).unwrap().to_vec(),
        grads.get(&w).unwrap().to_vec(),
    )
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(norm_conv_run)
    };
    let (a, b) = (run(1), run(3));
    assert!(
        a.0 == b.0 && a.1 == b.1 && a.2 == b.2,
        "f32 results differ between 1 and 3 threads"
    );
}

// ---------------------------------------------------------------- bad input

fn is_shape<T: std::fmt::Debug>(r: phenocore::error::Result<T>, what: &str) {
    match r {
        Err(Error::Shape(m)) => println!("{what}: {m}"),
        other => panic!("{what}: expected a shape error, got {other:?}"),
    }
}

fn is_invalid<T: std::fmt::Debug>(r: phenocore::error::Result<T>, what: &str, needle: &str) {
    match r {
        Err(Error::InvalidArgument(m)) if m.contains(needle) => println!("{what}: {m}"),
        other => {
            panic!("{what}: expected an invalid-argument error naming {needle}, got {other:?}")
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let mut t = Tape::<f64>::new(true);
    let input =
        |t: &mut Tape<f64>, s: &[usize]| t.input(s, vec![0.5; s.iter().product()], true).unwrap();
    let x = input(&mut t, &[2, 4, 4, 6]);
    let g6 = input(&mut t, &[6]);
    let g5 = input(&mut t, &[5]);
    is_invalid(
        group_norm(&mut t, &x, &g6, &g6, 4, 1e-6, Act::None),
        "groups 4 of 6 channels",
        "6 channels",
    );
    is_invalid(
        group_norm(&mut t, &x, &g6, &g6, 0, 1e-6, Act::None),
        "groups 0",
        "0 groups",
    );
    is_shape(
        group_norm(&mut t, &x, &g5, &g6, 3, 1e-6, Act::None),
        "group_norm γ [5]",
    );
    is_invalid(
        group_norm(&mut t, &x, &g6, &g6, 3, -1.0, Act::None),
        "negative eps",
        "eps",
    );
    is_shape(
        group_norm(&mut t, &g6, &g6, &g6, 3, 1e-6, Act::None),
        "group_norm rank 1",
    );
    is_shape(layer_norm(&mut t, &x, &g5, &g5, 1e-5), "layer_norm γ [5]");
    let w_bad = input(&mut t, &[3, 5, 3, 3]);
    let w = input(&mut t, &[3, 6, 3, 3]);
    let b4 = input(&mut t, &[4]);
    is_shape(
        conv2d_pad(&mut t, &x, &w_bad, None, 1, Pad2d::same(1)),
        "conv Cin mismatch",
    );
    is_shape(
        conv2d_pad(&mut t, &x, &w, Some(&b4), 1, Pad2d::same(1)),
        "conv bias [4] for Cout 3",
    );
    is_shape(
        conv2d_pad(&mut t, &g6, &w, None, 1, Pad2d::same(1)),
        "conv rank 1 input",
    );
    let w0 = input(&mut t, &[0, 6, 3, 3]);
    is_shape(
        conv2d_pad(&mut t, &x, &w0, None, 1, Pad2d::same(1)),
        "conv with no output channels",
    );
    let w7 = input(&mut t, &[3, 6, 7, 7]);
    is_shape(
        conv2d_pad(&mut t, &x, &w7, None, 1, Pad2d::same(1)),
        "kernel larger than padded input",
    );
    is_invalid(
        conv2d_pad(&mut t, &x, &w, None, 0, Pad2d::same(1)),
        "stride 0",
        "stride",
    );
    let x3 = input(&mut t, &[2, 4, 6]);
    is_shape(upsample_nearest2x(&mut t, &x3), "upsample rank 3");
    let a = input(&mut t, &[2, 3, 1]);
    is_shape(
        concat_last(&mut t, &[&x3, &a]),
        "concat leading dims differ",
    );
    is_invalid(
        concat_last::<f64>(&mut t, &[]),
        "concat of nothing",
        "at least one",
    );
    let tab = input(&mut t, &[4, 3]);
    is_invalid(
        embedding(&mut t, &tab, &[1, 4]),
        "embedding index 4 of 4",
        "index 4",
    );
    is_shape(embedding(&mut t, &x3, &[0]), "embedding table rank 3");
    let e = input(&mut t, &[2, 5]);
    is_shape(
        add_per_sample(&mut t, &x, &e),
        "add_per_sample e [2, 5] for C 6",
    );
    is_shape(mse_loss(&mut t, &x, &[0.0; 3]), "mse_loss target length");
    is_shape(reshape(&mut t, &x, &[2, 4, 4, 5]), "reshape element count");
    let odd = input(&mut t, &[2, 5]);
    is_shape(geglu(&mut t, &odd), "geglu odd last axis");
    let lw = input(&mut t, &[3, 5]);
    is_shape(
        ew::linear(&mut t, &x3, &lw, None),
        "linear In 6 vs weight [3, 5]",
    );
    is_shape(ew::linear(&mut t, &g6, &lw, None), "linear rank 1 input");
}

/// Forward and all gradients of `f` in f32 and f64 on the same values: max |a − b| / max |b|.
fn f32_vs_f64(
    shapes: &[Vec<usize>],
    f32_op: impl Fn(&mut Tape<f32>, &[Var]) -> phenocore::error::Result<Var>,
    f64_op: impl Fn(&mut Tape<f64>, &[Var]) -> phenocore::error::Result<Var>,
) -> Vec<f64> {
    let vals: Vec<Vec<f64>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| rand_vec(s.iter().product(), 50 + i as u64))
        .collect();
    let mut t32 = Tape::<f32>::new(true);
    let v32: Vec<Var> = shapes
        .iter()
        .zip(&vals)
        .map(|(s, v)| {
            t32.input(s, v.iter().map(|&x| x as f32).collect(), true)
                .unwrap()
        })
        .collect();
    let y32 = f32_op(&mut t32, &v32).unwrap();
    let mut t64 = Tape::<f64>::new(true);
    let v64: Vec<Var> = shapes
        .iter()
        .zip(&vals)
        .map(|(s, v)| t64.input(s, v.clone(), true).unwrap())
        .collect();
    let y64 = f64_op(&mut t64, &v64).unwrap();
    let seed = rand_vec(y64.numel(), 60);
    let mut errs = vec![rel_err(
        t32.data(&y32),
        &t64.data(&y64).iter().map(|&v| v as f32).collect::<Vec<_>>(),
    )];
    let g32 = t32
        .backward_with(
            &y32,
            seed.iter().map(|&v| v as f32).collect(),
            &mut Params::new(),
        )
        .unwrap();
    let g64 = t64.backward_with(&y64, seed, &mut Params::new()).unwrap();
    for (a, b) in v32.iter().zip(&v64) {
        let b: Vec<f32> = g64.get(b).unwrap().iter().map(|&v| v as f32).collect();
        errs.push(rel_err(g32.get(a).unwrap(), &b));
    }
    errs
}

#[test]
fn f32_kernels_match_f64() {
    // f32 takes the packed register-tile kernels on AVX-512 (conv forward, conv input gradient
    // with ≥ one sample per thread, linear forward and input gradient); f64 the generic GEMM.
    let n = 2 * rayon::current_num_threads().max(2);
    let conv = |s: usize, pad: Pad2d| {
        let e = f32_vs_f64(
            &[vec![n, 9, 8, 24], vec![40, 24, 3, 3], vec![40]],
            |t, v| conv2d_pad(t, &v[0], &v[1], Some(&v[2]), s, pad),
            |t, v| conv2d_pad(t, &v[0], &v[1], Some(&v[2]), s, pad),
        );
        println!("conv2d_pad s{s} {pad:?} f32 vs f64 (y, dx, dw, db): {e:?}");
        assert!(e.iter().all(|&v| v <= 1e-5), "{e:?}");
    };
    conv(1, Pad2d::same(1));
    conv(
        2,
        Pad2d {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        },
    );
    let e = f32_vs_f64(
        &[vec![3, 70, 48], vec![96, 48], vec![96]],
        |t, v| ew::linear(t, &v[0], &v[1], Some(&v[2])),
        |t, v| ew::linear(t, &v[0], &v[1], Some(&v[2])),
    );
    println!("linear [3, 70, 48] -> 96 f32 vs f64 (y, dx, dw, db): {e:?}");
    assert!(e.iter().all(|&v| v <= 1e-5), "{e:?}");
}
