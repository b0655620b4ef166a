//! Blocked scaled-dot-product attention (`ops::attention`): gradients against central finite
//! differences in f64, values and gradients against torch SDPA fixtures (f64 and f32), a direct
//! quadratic-memory reference at lengths spanning several tiles, bit-identical results for any
//! thread count, and shape errors.

use phenocore::autograd::{Params, Tape};
use phenocore::ops::attention::{attention, BK, BQ};
use phenocore::ops::gradcheck::check;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::PathBuf;

fn rand_vec(n: usize, seed: u64, amp: f64) -> Vec<f64> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(-amp..amp)).collect()
}

fn inp(shape: &[usize], seed: u64, amp: f64) -> (Vec<usize>, Vec<f64>) {
    (shape.to_vec(), rand_vec(shape.iter().product(), seed, amp))
}

/// One attention problem: (N, Lq, Lk, H, D, Dv, scale).
type Case = (usize, usize, usize, usize, usize, usize, Option<f64>);

fn shapes(c: &Case) -> [Vec<usize>; 3] {
    let &(n, lq, lk, h, d, dv, _) = c;
    [vec![n, lq, h * d], vec![n, lk, h * d], vec![n, lk, h * dv]]
}

#[test]
fn gradients_match_finite_differences() {
    let cases: [(&str, Case); 5] = [
        ("self, 3 heads, L = 70", (2, 70, 70, 3, 4, 4, None)),
        (
            "cross, Lq 67, Lk 130, Dv ≠ D",
            (2, 67, 130, 2, 3, 5, Some(0.4)),
        ),
        ("single key", (2, 9, 1, 2, 3, 2, None)),
        ("one head, Lk 260", (1, 5, 260, 1, 7, 3, None)),
        ("negative scale, odd D", (1, 66, 3, 1, 13, 1, Some(-1.3))),
    ];
    for (i, (name, c)) in cases.iter().enumerate() {
        let [qs, ks, vs] = shapes(c);
        let (h, scale) = (c.3, c.6);
        let seed = 10 * i as u64;
        // Amplitude 2: softmax far from uniform, so errors in P would show.
        let r = check(
            &[
                inp(&qs, seed, 2.0),
                inp(&ks, seed + 1, 2.0),
                inp(&vs, seed + 2, 1.0),
            ],
            true,
            40,
            |t, v| attention(t, &v[0], &v[1], &v[2], h, scale),
        )
        .unwrap();
        println!("{name}: {:?} (checked {:?})", r.max_err, r.checked);
        assert!(r.worst() <= 1e-7, "{name}: {:?}", r.max_err);
    }
}

/// Direct O(Lq·Lk) reference in f64: out and the gradients of Σ g ⊙ out.
#[allow(clippy::type_complexity, clippy::needless_range_loop)]
fn naive(
    c: &Case,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let &(n, lq, lk, h, d, dv, scale) = c;
    let sc = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let (hd, hdv) = (h * d, h * dv);
    let mut out = vec![0.0; n * lq * hdv];
    let (mut dq, mut dk, mut dvv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for b in 0..n {
        for hh in 0..h {
            let qi = |i: usize, x: usize| q[(b * lq + i) * hd + hh * d + x];
            let kj = |j: usize, x: usize| k[(b * lk + j) * hd + hh * d + x];
            let vj = |j: usize, x: usize| v[(b * lk + j) * hdv + hh * dv + x];
            for i in 0..lq {
                let s: Vec<f64> = (0..lk)
                    .map(|j| sc * (0..d).map(|x| qi(i, x) * kj(j, x)).sum::<f64>())
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|x| x / z).collect();
                let gi = &g[(b * lq + i) * hdv + hh * dv..][..dv];
                let mut o = vec![0.0; dv];
                for j in 0..lk {
                    for x in 0..dv {
                        o[x] += p[j] * vj(j, x);
                    }
                }
                out[(b * lq + i) * hdv + hh * dv..][..dv].copy_from_slice(&o);
                let delta: f64 = (0..dv).map(|x| gi[x] * o[x]).sum();
                for j in 0..lk {
                    let dp: f64 = (0..dv).map(|x| gi[x] * vj(j, x)).sum();
                    let ds = p[j] * (dp - delta);
                    for x in 0..dv {
                        dvv[(b * lk + j) * hdv + hh * dv + x] += p[j] * gi[x];
                    }
                    for x in 0..d {
                        dq[(b * lq + i) * hd + hh * d + x] += sc * ds * kj(j, x);
                        dk[(b * lk + j) * hd + hh * d + x] += sc * ds * qi(i, x);
                    }
                }
            }
        }
    }
    (out, dq, dk, dvv)
}

/// Runs the op; returns out, dq, dk, dv (gradients of Σ g ⊙ out).
#[allow(clippy::type_complexity)]
fn run<T: phenocore::autograd::Float>(
    c: &Case,
    q: &[T],
    k: &[T],
    v: &[T],
    g: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>, Vec<T>) {
    let [qs, ks, vs] = shapes(c);
    let mut tape = Tape::<T>::new(true);
    let qv = tape.input(&qs, q.to_vec(), true).unwrap();
    let kv = tape.input(&ks, k.to_vec(), true).unwrap();
    let vv = tape.input(&vs, v.to_vec(), true).unwrap();
    let o = attention(&mut tape, &qv, &kv, &vv, c.3, c.6).unwrap();
    assert_eq!(o.shape(), &[c.0, c.1, c.3 * c.5]);
    let out = tape.data(&o).to_vec();
    let grads = tape
        .backward_with(&o, g.to_vec(), &mut Params::new())
        .unwrap();
    let get = |x| grads.get(x).unwrap().to_vec();
    (out, get(&qv), get(&kv), get(&vv))
}

/// max |a − b| / max |b|; a reference that is zero up to rounding (dq and dk with a single key: the
/// softmax is constant) is compared absolutely (inputs are O(1)).
fn rel(what: &str, a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: length");
    assert!(a.iter().all(|x| x.is_finite()), "{what}: non-finite");
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    assert!(
        !(1e-6..=1e-3).contains(&scale),
        "{what}: degenerate reference"
    );
    let scale = if scale < 1e-6 { 1.0 } else { scale };
    let err = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    err / scale
}

#[test]
fn matches_direct_reference_across_tiles() {
    // Several query tiles and key blocks, partial last ones, several heads; and a 1-key cross case.
    // Cases 0 and 2 take the fused backward (≥ 4 (sample, head) pairs), case 1 the two-pass one.
    let cases: [Case; 3] = [
        (2, 2 * BQ + 5, 2 * BK + 3, 3, 6, 4, None),
        (1, BQ + 1, BK - 1, 2, 5, 5, Some(0.9)),
        (2, 3 * BQ, 1, 4, 2, 3, None),
    ];
    for (i, c) in cases.iter().enumerate() {
        let [qs, ks, vs] = shapes(c);
        let seed = 100 + 10 * i as u64;
        let q = rand_vec(qs.iter().product(), seed, 3.0);
        let k = rand_vec(ks.iter().product(), seed + 1, 3.0);
        let v = rand_vec(vs.iter().product(), seed + 2, 1.0);
        let g = rand_vec(c.0 * c.1 * c.3 * c.5, seed + 3, 1.0);
        let want = naive(c, &q, &k, &v, &g);
        let got = run(c, &q, &k, &v, &g);
        for (what, a, b) in [
            ("out", &got.0, &want.0),
            ("dq", &got.1, &want.1),
            ("dk", &got.2, &want.2),
            ("dv", &got.3, &want.3),
        ] {
            let e = rel(what, a, b);
            println!("case {i} {what}: {e:.2e}");
            assert!(e <= 1e-12, "case {i} {what}: {e:.2e}");
        }
        // f32 against the f64 reference.
        let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let got32 = run(c, &f(&q), &f(&k), &f(&v), &f(&g));
        let up = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        for (what, a, b) in [
            ("out f32", up(&got32.0), &want.0),
            ("dq f32", up(&got32.1), &want.1),
            ("dk f32", up(&got32.2), &want.2),
            ("dv f32", up(&got32.3), &want.3),
        ] {
            let e = rel(what, &a, b);
            println!("case {i} {what}: {e:.2e}");
            assert!(e <= 1e-5, "case {i} {what}: {e:.2e}");
        }
    }
}

struct Fixture {
    t: HashMap<String, Vec<f64>>,
    shapes: HashMap<String, Vec<usize>>,
    heads: usize,
    scale: Option<f64>,
}

fn fixture(name: &str) -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/attention")
        .join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    let heads = meta["heads"].parse().unwrap();
    let scale = match meta["scale"].as_str() {
        "default" => None,
        s => Some(s.parse().unwrap()),
    };
    let (mut t, mut shapes) = (HashMap::new(), HashMap::new());
    for (key, view) in st.tensors() {
        let raw = view.data();
        let vals: Vec<f64> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            d => panic!("{name}/{key}: dtype {d:?}"),
        };
        shapes.insert(key.clone(), view.shape().to_vec());
        t.insert(key, vals);
    }
    Fixture {
        t,
        shapes,
        heads,
        scale,
    }
}

#[test]
fn matches_torch_sdpa_fixtures() {
    for name in ["self", "cross", "single_key", "one_head_long"] {
        let fx = fixture(name);
        let (qs, ks, vs) = (&fx.shapes["q"], &fx.shapes["k"], &fx.shapes["v"]);
        let h = fx.heads;
        let c: Case = (qs[0], qs[1], ks[1], h, qs[2] / h, vs[2] / h, fx.scale);
        let (q, k, v, g) = (&fx.t["q"], &fx.t["k"], &fx.t["v"], &fx.t["g"]);
        let got = run(&c, q, k, v, g);
        let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let up = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let got32 = run(&c, &f(q), &f(k), &f(v), &f(g));
        let got32 = [up(&got32.0), up(&got32.1), up(&got32.2), up(&got32.3)];
        for (j, (key, ours)) in [
            ("out", &got.0),
            ("dq", &got.1),
            ("dk", &got.2),
            ("dv", &got.3),
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(&fx.shapes[key], &fx.shapes[&format!("{key}32")]);
            let e64 = rel(key, ours, &fx.t[key]);
            // Our f32 against torch float64 and against torch float32.
            let e32 = rel(key, &got32[j], &fx.t[key]);
            let e32t = rel(key, &got32[j], &fx.t[&format!("{key}32")]);
            println!(
                "{name} {key}: f64 {e64:.2e}, f32 vs torch f64 {e32:.2e}, vs torch f32 {e32t:.2e}"
            );
            assert!(e64 <= 1e-12, "{name} {key}: f64 {e64:.2e}");
            assert!(e32 <= 1e-5, "{name} {key}: f32 vs torch f64 {e32:.2e}");
            assert!(e32t <= 1e-5, "{name} {key}: f32 vs torch f32 {e32t:.2e}");
        }
    }
}

#[test]
fn bit_identical_for_any_thread_count() {
    // 2 × 3 (sample, head) pairs: the fused backward; 1 × 2: the two-pass backward.
    for c in [
        (2, 3 * BQ + 7, 2 * BK + 9, 3, 16, 8, None),
        (1, 2 * BQ + 3, 3 * BK + 1, 2, 9, 12, Some(0.3)),
    ] {
        same_bits_1_2_3_threads(c);
    }
}

fn same_bits_1_2_3_threads(c: Case) {
    let [qs, ks, vs] = shapes(&c);
    let f = |n: usize, s: u64| -> Vec<f32> {
        rand_vec(n, s, 2.0).into_iter().map(|v| v as f32).collect()
    };
    let (q, k, v) = (
        f(qs.iter().product(), 1),
        f(ks.iter().product(), 2),
        f(vs.iter().product(), 3),
    );
    let g = f(c.0 * c.1 * c.3 * c.5, 4);
    let in_pool = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| run(&c, &q, &k, &v, &g))
    };
    let one = in_pool(1);
    for threads in [2, 3] {
        let many = in_pool(threads);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&one.0), bits(&many.0), "out, {threads} threads");
        assert_eq!(bits(&one.1), bits(&many.1), "dq, {threads} threads");
        assert_eq!(bits(&one.2), bits(&many.2), "dk, {threads} threads");
        assert_eq!(bits(&one.3), bits(&many.3), "dv, {threads} threads");
    }
}

#[test]
fn uniform_keys_average_the_values_and_only_wanted_grads_flow() {
    // All keys equal → softmax uniform → every output row is the mean of v (closed form), for any q.
    let (n, lq, lk, d) = (1usize, 3usize, 200usize, 2usize);
    let mut tape = Tape::<f64>::new(true);
    let q = tape
        .input(&[n, lq, d], rand_vec(lq * d, 5, 3.0), false)
        .unwrap();
    let k = tape
        .input(&[n, lk, d], [0.5, -1.0].repeat(lk), false)
        .unwrap();
    let vals: Vec<f64> = (0..lk).map(|j| j as f64).collect();
    let v = tape.input(&[n, lk, 1], vals, true).unwrap();
    let o = attention(&mut tape, &q, &k, &v, 1, None).unwrap();
    for &x in tape.data(&o) {
        assert!((x - 99.5).abs() < 1e-10, "{x}");
    }
    // Only v requires a gradient: dv = Σ_i g_i / Lk for every key.
    let grads = tape
        .backward_with(&o, vec![1.0, 2.0, 3.0], &mut Params::new())
        .unwrap();
    assert!(grads.get(&q).is_none() && grads.get(&k).is_none());
    for &x in grads.get(&v).unwrap() {
        assert!((x - 6.0 / lk as f64).abs() < 1e-14, "{x}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let mut tape = Tape::<f32>::new(false);
    let mut mk = |s: &[usize]| tape.input(s, vec![0.0; s.iter().product()], false).unwrap();
    let q = mk(&[2, 5, 8]);
    let k = mk(&[2, 7, 8]);
    let v = mk(&[2, 7, 6]);
    let k_batch = mk(&[1, 7, 8]);
    let v_len = mk(&[2, 6, 6]);
    let k_ch = mk(&[2, 7, 4]);
    let k_empty = mk(&[2, 0, 8]);
    let v_empty = mk(&[2, 0, 6]);
    let rank2 = mk(&[10, 8]);
    let cases = [
        (&q, &k_batch, &v, 2, "same batch size"),
        (&q, &k, &v_len, 2, "same length"),
        (&q, &k_ch, &v, 2, "same channel count"),
        (&q, &k_empty, &v_empty, 2, "no keys"),
        (&rank2, &k, &v, 2, "[N, L, C]"),
        (&q, &k, &v, 3, "multiples of heads"),
        (&q, &k, &v, 4, "multiples of heads"), // 8 % 4 == 0 but 6 % 4 != 0
    ];
    for (q, k, v, h, want) in cases {
        let e = attention(&mut tape, q, k, v, h, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want) && e.contains("attention"), "{e}");
    }
    let e = attention(&mut tape, &q, &k, &v, 0, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("heads"), "{e}");
    let e = attention(&mut tape, &q, &k, &v, 2, Some(f64::NAN))
        .unwrap_err()
        .to_string();
    assert!(e.contains("scale"), "{e}");
    // Zero query rows is fine: an empty output.
    let q0 = tape.input(&[2, 0, 8], vec![], false).unwrap();
    let o = attention(&mut tape, &q0, &k, &v, 2, None).unwrap();
    assert_eq!(o.shape(), &[2, 0, 6]);
}

/// Timing for benches/attention.py (not a check): `ATTN_BENCH="N L LK C HEADS REPS"`, run with
/// `cargo test --release --test attention_ops bench_timing -- --ignored --nocapture`; prints one
/// JSON line with the median forward and forward+backward seconds (f32, the global rayon pool).
#[test]
#[ignore]
fn bench_timing() {
    let spec = std::env::var("ATTN_BENCH").unwrap_or("2 576 576 512 8 5".into());
    let p: Vec<usize> = spec
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let (n, l, lk, ch, h, reps) = (p[0], p[1], p[2], p[3], p[4], p[5]);
    let c: Case = (n, l, lk, h, ch / h, ch / h, None);
    let f = |len: usize, s: u64| -> Vec<f32> {
        rand_vec(len, s, 1.0)
            .into_iter()
            .map(|v| v as f32)
            .collect()
    };
    let (q, k, v, g) = (
        f(n * l * ch, 1),
        f(n * lk * ch, 2),
        f(n * lk * ch, 3),
        f(n * l * ch, 4),
    );
    let [qs, ks, vs] = shapes(&c);
    let median = |mut t: Vec<f64>| {
        t.sort_by(|a, b| a.total_cmp(b));
        t[t.len() / 2]
    };
    let (mut fwd, mut both) = (Vec::new(), Vec::new());
    for _ in 0..reps + 1 {
        let t0 = std::time::Instant::now();
        let mut tape = Tape::<f32>::new(false);
        let qv = tape.input(&qs, q.clone(), false).unwrap();
        let kv = tape.input(&ks, k.clone(), false).unwrap();
        let vv = tape.input(&vs, v.clone(), false).unwrap();
        let o = attention(&mut tape, &qv, &kv, &vv, h, None).unwrap();
        std::hint::black_box(tape.data(&o)[0]);
        drop(tape);
        fwd.push(t0.elapsed().as_secs_f64());
        let t0 = std::time::Instant::now();
        std::hint::black_box(run(&c, &q, &k, &v, &g).1[0]);
        both.push(t0.elapsed().as_secs_f64());
    }
    fwd.remove(0);
    both.remove(0);
    println!(
        "{{\"fwd_s\": {}, \"fwd_bwd_s\": {}, \"threads\": {}}}",
        median(fwd),
        median(both),
        rayon::current_num_threads()
    );
}

#[test]
fn fused_and_two_pass_backward_agree() {
    // 2 × 2 (sample, head) pairs: all three gradients wanted → fused; a subset → two passes.
    let c: Case = (2, BQ + 9, BK + 5, 2, 5, 3, None);
    let [qs, ks, vs] = shapes(&c);
    let (q, k, v) = (
        rand_vec(qs.iter().product(), 31, 2.0),
        rand_vec(ks.iter().product(), 32, 2.0),
        rand_vec(vs.iter().product(), 33, 1.0),
    );
    let g = rand_vec(c.0 * c.1 * c.3 * c.5, 34, 1.0);
    let fused = run(&c, &q, &k, &v, &g);
    let subset = |want: [bool; 3]| {
        let mut tape = Tape::<f64>::new(true);
        let qv = tape.input(&qs, q.clone(), want[0]).unwrap();
        let kv = tape.input(&ks, k.clone(), want[1]).unwrap();
        let vv = tape.input(&vs, v.clone(), want[2]).unwrap();
        let o = attention(&mut tape, &qv, &kv, &vv, c.3, c.6).unwrap();
        let gr = tape
            .backward_with(&o, g.clone(), &mut Params::new())
            .unwrap();
        [&qv, &kv, &vv].map(|x| gr.get(x).map(|s| s.to_vec()))
    };
    let only_q = subset([true, false, false]);
    let kv = subset([false, true, true]);
    assert!(only_q[1].is_none() && only_q[2].is_none() && kv[0].is_none());
    for (what, a, b) in [
        ("dq", only_q[0].as_ref().unwrap(), &fused.1),
        ("dk", kv[1].as_ref().unwrap(), &fused.2),
        ("dv", kv[2].as_ref().unwrap(), &fused.3),
    ] {
        let e = rel(what, a, b);
        assert!(e <= 1e-13, "{what}: {e:.2e}");
    }
}
