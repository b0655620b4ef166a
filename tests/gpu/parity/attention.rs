use super::*;
use phenocore::autograd::{Params, Tape};
use phenocore::backend::gpu::attention::Attention;
use phenocore::backend::gpu::{Gpu, Math};
use phenocore::ops::attention::attention;
use phenocore::DType;

/// (n, lq, lk, heads, d, dv, scale).
type Case = (usize, usize, usize, usize, usize, usize, Option<f64>);

/// Cases: every head-dimension bound (32, 64, 128), Lk = 1, a handful of
/// context keys, 144 tokens, Lq and Lk not multiples of the tiles (16 / 8 query rows, 32 keys, 32 queries),
/// several key and query tiles, D ≠ Dv both ways, custom scales.
const CASES: [Case; 7] = [
    (2, 37, 20, 2, 16, 24, None),
    (1, 5, 1, 3, 8, 8, Some(0.7)),
    (2, 18, 41, 1, 64, 40, None),
    (1, 9, 6, 2, 128, 100, Some(0.05)),
    (1, 70, 33, 1, 72, 20, None),
    (2, 33, 67, 2, 24, 64, Some(0.3)),
    // The U-Net's 12 × 12 self-attention length.
    (2, 144, 144, 2, 32, 32, None),
];

/// Wide heads (max(D, Dv) > 128: batched GEMMs and row kernels): D = 160, 512, 768 and the limit
/// 1024; the U-Net's cross-attention shapes (Lk = 1 and 3 context keys); Lk not a multiple of
/// the score rows' 8-column padding; D ≠ Dv both ways (one of them ≤ 128); a custom scale;
/// several heads (strided per-head operands). N · heads = 2.
const WIDE_CASES: [Case; 7] = [
    (2, 20, 37, 1, 160, 160, None),
    (1, 40, 1, 2, 512, 512, None),
    (2, 33, 3, 1, 768, 768, None),
    (1, 40, 37, 2, 512, 512, Some(0.03)),
    (2, 23, 37, 1, 768, 768, None),
    (1, 26, 6, 2, 160, 96, Some(0.05)),
    (2, 9, 5, 1, 40, 1024, None),
];

/// The limit, D = Dv = 1024, across two key tiles.
const WIDE_LIMIT_CASE: [Case; 1] = [(1, 10, 35, 2, 1024, 1024, None)];

/// CPU output, dq, dk, dv in f64 and the per-row log-sum-exp [N, H, Lq].
#[allow(clippy::type_complexity)]
fn cpu(
    (n, lq, lk, h, d, dv, scale): Case,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dy: &[f64],
) -> (Vec<f64>, [Vec<f64>; 3], Vec<f64>) {
    let mut tape = Tape::<f64>::new(true);
    let qv = tape.input(&[n, lq, h * d], q.to_vec(), true).unwrap();
    let kv = tape.input(&[n, lk, h * d], k.to_vec(), true).unwrap();
    let vv = tape.input(&[n, lk, h * dv], v.to_vec(), true).unwrap();
    let o = attention(&mut tape, &qv, &kv, &vv, h, scale).unwrap();
    let out = tape.data(&o).to_vec();
    let grads = tape
        .backward_with(&o, dy.to_vec(), &mut Params::new())
        .unwrap();
    let g = |x| grads.get(x).unwrap().to_vec();
    // The log-sum-exp, directly.
    let sc = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let mut lse = vec![0f64; n * h * lq];
    for s in 0..n {
        for hh in 0..h {
            for i in 0..lq {
                let scores: Vec<f64> = (0..lk)
                    .map(|j| {
                        (0..d)
                            .map(|c| {
                                q[(s * lq + i) * h * d + hh * d + c]
                                    * k[(s * lk + j) * h * d + hh * d + c]
                            })
                            .sum::<f64>()
                            * sc
                    })
                    .collect();
                let m = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                lse[(s * h + hh) * lq + i] =
                    m + scores.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            }
        }
    }
    (out, [g(&qv), g(&kv), g(&vv)], lse)
}

fn run<G: Gpu>(g: &G, dtype: DType, tol: f64, cases: &[Case], wide: bool) {
    run_with(g, dtype, tol, cases, wide, None, Math::F32)
}

/// `run` with the wide plans' score scratch bounded by `scratch` bytes (several query chunks).
fn run_with<G: Gpu>(
    g: &G,
    dtype: DType,
    tol: f64,
    cases: &[Case],
    wide: bool,
    scratch: Option<usize>,
    math: Math,
) {
    for (i, &case) in cases.iter().enumerate() {
        let (n, lq, lk, h, d, dv, scale) = case;
        let mut a = Attention::new(dtype, n, lq, lk, h, d, dv, scale).unwrap();
        assert_eq!(a.is_wide(), wide, "{case:?}: wide kernels");
        if let Some(bytes) = scratch {
            a = a.with_max_scratch(bytes);
        }
        a = a.with_math(math);
        let seed = 1000 + 10 * i as u64 + if wide { 500 } else { 0 };
        // Spread the scores so the softmax is far from uniform.
        let q: Vec<f32> = uniform(a.q_len(), seed).iter().map(|x| 2.0 * x).collect();
        let k: Vec<f32> = uniform(a.k_len(), seed + 1)
            .iter()
            .map(|x| 2.0 * x)
            .collect();
        let (v, dy) = (uniform(a.v_len(), seed + 2), uniform(a.out_len(), seed + 3));
        let name = format!(
            "attention {dtype:?} case {i} {case:?} (bound {}, chunks {:?})",
            a.bound,
            a.chunk_counts()
        );
        let bf = dtype == DType::BF16;
        let round = |x: Vec<f32>| if bf { to_bf16(&x).1 } else { x };
        let (q, k, v, dy) = (round(q), round(k), round(v), round(dy));
        let upload = |x: &[f32]| {
            if bf {
                g.upload_slice(&to_bf16(x).0).unwrap()
            } else {
                g.upload_slice(x).unwrap()
            }
        };
        let back = |b: &G::Buf, len: usize| {
            if bf {
                from_bf16(&g.download_vec::<u16>(b, len).unwrap())
            } else {
                f64s(&g.download_vec::<f32>(b, len).unwrap())
            }
        };
        let (want_o, [want_dq, want_dk, want_dv], want_lse) =
            cpu(case, &f64s(&q), &f64s(&k), &f64s(&v), &f64s(&dy));
        let (qb, kb, vb, dyb) = (upload(&q), upload(&k), upload(&v), upload(&dy));
        let es = dtype.size_in_bytes();
        let ob = g.alloc(a.out_len() * es).unwrap();
        let lseb = g.alloc(a.lse_len() * 4).unwrap();
        let (dqb, dkb, dvb) = (
            g.alloc(a.q_len() * es).unwrap(),
            g.alloc(a.k_len() * es).unwrap(),
            g.alloc(a.v_len() * es).unwrap(),
        );
        let p = |b: &G::Buf| g.ptr(b);
        unsafe {
            a.forward(g, p(&qb), p(&kb), p(&vb), p(&ob), p(&lseb))
                .unwrap();
            a.backward(
                g,
                [p(&qb), p(&kb), p(&vb)],
                p(&ob),
                p(&lseb),
                p(&dyb),
                [p(&dqb), p(&dkb), p(&dvb)],
            )
            .unwrap();
        }
        assert_close(&format!("{name}: o"), &back(&ob, a.out_len()), &want_o, tol);
        let lse = f64s(&g.download_vec::<f32>(&lseb, a.lse_len()).unwrap());
        // lse is f32 in both storage types; from bf16-rounded inputs it is exact up to f32 sums.
        assert_close(&format!("{name}: lse"), &lse, &want_lse, F32_TOL);
        // With one key, dq and dk vanish (P = 1, dS = dO·v − Δ = 0): then the bound is relative to
        // the scale of dv (the rounding of dS's two terms).
        let dv_scale = want_dv.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (what, got, want) in [
            ("dq", back(&dqb, a.q_len()), &want_dq),
            ("dk", back(&dkb, a.k_len()), &want_dk),
        ] {
            if want.iter().all(|x| x.abs() < 1e-12) {
                let worst = got.iter().fold(0f64, |m, x| m.max(x.abs()));
                assert!(
                    worst <= tol * dv_scale,
                    "{name}: {what} should vanish, max |{what}| = {worst:e}"
                );
            } else {
                assert_close(&format!("{name}: {what}"), &got, want, tol);
            }
        }
        assert_close(
            &format!("{name}: dv"),
            &back(&dvb, a.v_len()),
            &want_dv,
            tol,
        );
    }
}

pub fn attention_f32<G: Gpu>(g: &G) {
    run(g, DType::F32, F32_TOL, &CASES, false);
}

pub fn attention_bf16<G: Gpu>(g: &G) {
    run(g, DType::BF16, BF16_TOL, &CASES, false);
}

pub fn attention_wide_f32<G: Gpu>(g: &G) {
    run(g, DType::F32, F32_TOL, &WIDE_CASES, true);
    run(g, DType::F32, F32_TOL, &WIDE_LIMIT_CASE, true);
}

pub fn attention_wide_bf16<G: Gpu>(g: &G) {
    run(g, DType::BF16, BF16_TOL, &WIDE_CASES, true);
    run(g, DType::BF16, BF16_TOL, &WIDE_LIMIT_CASE, true);
}

/// Wide plans over several chunks of query rows: a scratch bound of 3 query rows per chunk in the
/// backward (dk and dv summed over the chunks: in place in f32, through f32 sums for bf16), and
/// the minimum, one row per chunk.
pub fn attention_wide_chunked<G: Gpu>(g: &G) {
    let cases: [Case; 3] = [
        (2, 20, 37, 1, 160, 160, None),
        (1, 9, 6, 2, 160, 96, Some(0.05)),
        (2, 7, 3, 1, 768, 768, None),
    ];
    for dtype in [DType::F32, DType::BF16] {
        let tol = if dtype == DType::BF16 {
            BF16_TOL
        } else {
            F32_TOL
        };
        for (i, &(n, lq, lk, h, d, dv, scale)) in cases.iter().enumerate() {
            let a = Attention::new(dtype, n, lq, lk, h, d, dv, scale).unwrap();
            let ld = lk.next_multiple_of(8);
            let bwd_row = n * ld * (8 + 2 * dtype.size_in_bytes());
            let three = a.with_max_scratch(3 * bwd_row);
            assert_eq!(three.chunk_counts()[1], lq.div_ceil(3), "case {i}");
            assert_eq!(a.with_max_scratch(1).chunk_counts(), [lq, lq], "case {i}");
            assert_eq!(a.chunk_counts(), [1, 1], "case {i}: default bound");
            for bytes in [3 * bwd_row, 1] {
                run_with(
                    g,
                    dtype,
                    tol,
                    &cases[i..i + 1],
                    true,
                    Some(bytes),
                    Math::F32,
                );
            }
        }
    }
}

/// Wide heads in f32 storage with TF32 GEMMs (a model's TF32 mode; on a GPU 10-bit products)
/// stay within the bf16 bound of the CPU reference.
pub fn attention_wide_tf32<G: Gpu>(g: &G) {
    let cases: [Case; 2] = [
        (2, 20, 37, 1, 160, 160, None),
        (1, 9, 6, 2, 160, 96, Some(0.05)),
    ];
    run_with(g, DType::F32, BF16_TOL, &cases, true, None, Math::Tf32);
}

/// The same inputs twice give bit-identical results (no atomics, fixed summation order).
pub fn attention_deterministic<G: Gpu>(g: &G) {
    for (lq, lk, d, dv) in [(40, 70, 32, 32), (40, 37, 200, 136)] {
        deterministic(g, lq, lk, d, dv);
    }
}

fn deterministic<G: Gpu>(g: &G, lq: usize, lk: usize, d: usize, dv: usize) {
    let a = Attention::new(DType::F32, 1, lq, lk, 2, d, dv, None).unwrap();
    let (q, k, v, dy) = (
        uniform(a.q_len(), 1),
        uniform(a.k_len(), 2),
        uniform(a.v_len(), 3),
        uniform(a.out_len(), 4),
    );
    let (qb, kb, vb, dyb) = (
        g.upload_slice(&q).unwrap(),
        g.upload_slice(&k).unwrap(),
        g.upload_slice(&v).unwrap(),
        g.upload_slice(&dy).unwrap(),
    );
    let p = |b: &G::Buf| g.ptr(b);
    let once = || {
        let ob = g.alloc(a.out_len() * 4).unwrap();
        let lseb = g.alloc(a.lse_len() * 4).unwrap();
        let (dqb, dkb, dvb) = (
            g.alloc(a.q_len() * 4).unwrap(),
            g.alloc(a.k_len() * 4).unwrap(),
            g.alloc(a.v_len() * 4).unwrap(),
        );
        unsafe {
            a.forward(g, p(&qb), p(&kb), p(&vb), p(&ob), p(&lseb))
                .unwrap();
            a.backward(
                g,
                [p(&qb), p(&kb), p(&vb)],
                p(&ob),
                p(&lseb),
                p(&dyb),
                [p(&dqb), p(&dkb), p(&dvb)],
            )
            .unwrap();
        }
        [
            (&ob, a.out_len()),
            (&dqb, a.q_len()),
            (&dkb, a.k_len()),
            (&dvb, a.v_len()),
        ]
        .map(|(b, n)| g.download_vec::<u32>(b, n).unwrap())
    };
    assert!(
        once() == once(),
        "attention (Lq {lq}, Lk {lk}, D {d}, Dv {dv}): two runs differ"
    );
}

pub fn attention_rejects_unsupported_plans<G: Gpu>(_g: &G) {
    use phenocore::Error;
    let bad = [
        (DType::F32, 1, 4, 4, 1, 1025, 8, None, "D > 1024"),
        (DType::F32, 1, 4, 4, 2, 64, 1040, None, "Dv > 1024"),
        (DType::BF16, 1, 4, 4, 1, 2048, 2048, None, "D, Dv > 1024"),
        (DType::F16, 1, 4, 4, 1, 32, 32, None, "f16"),
        (DType::F64, 1, 4, 4, 1, 32, 32, None, "f64"),
        (DType::F32, 1, 4, 0, 1, 32, 32, None, "Lk = 0"),
        (DType::F32, 1, 0, 4, 1, 32, 32, None, "Lq = 0"),
        (DType::F32, 1, 4, 4, 0, 32, 32, None, "no heads"),
        (DType::BF16, 1, 4, 4, 1, 32, 32, Some(f64::NAN), "NaN scale"),
        (
            DType::BF16,
            1,
            4,
            4,
            1,
            32,
            32,
            Some(1e300),
            "scale beyond f32",
        ),
        (
            DType::F32,
            70000,
            4,
            4,
            1,
            32,
            32,
            None,
            "batch beyond the grid",
        ),
    ];
    for (dtype, n, lq, lk, h, d, dv, scale, what) in bad {
        match Attention::new(dtype, n, lq, lk, h, d, dv, scale) {
            Err(Error::InvalidArgument(_) | Error::Shape(_)) => {}
            other => panic!("attention plan with {what}: expected an error, got {other:?}"),
        }
    }
    // The error names the limit.
    match Attention::new(DType::F32, 1, 4, 4, 1, 1025, 64, None) {
        Err(Error::InvalidArgument(msg)) => assert!(
            msg.contains("1025") && msg.contains("1024"),
            "the error should name D and the limit 1024: {msg}"
        ),
        other => panic!("attention plan with D = 1025: expected InvalidArgument, got {other:?}"),
    }
    // At the bounds: accepted, tiled up to 128, wide above (any value up to 1024).
    let a = Attention::new(DType::BF16, 1, 4, 4, 1, 128, 128, Some(0.1)).unwrap();
    assert_eq!(a.bound, 128);
    assert!(!a.is_wide());
    for (d, dv) in [(129, 8), (8, 129), (1024, 1024), (1000, 3), (768, 768)] {
        let a = Attention::new(DType::F32, 1, 4, 4, 2, d, dv, None).unwrap();
        assert!(a.is_wide(), "D {d}, Dv {dv}: wide kernels");
        assert_eq!(a.bound, 1024);
    }
    assert_eq!(
        Attention::new(DType::F32, 1, 4, 4, 1, 33, 8, None)
            .unwrap()
            .bound,
        64
    );
    assert_eq!(
        Attention::new(DType::F32, 1, 4, 4, 1, 8, 32, None)
            .unwrap()
            .bound,
        32
    );
}
