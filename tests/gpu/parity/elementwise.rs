use super::*;
use phenocore::autograd::Tape;
use phenocore::backend::gpu::elementwise::{affine, bias_act, unary, Unary};
use phenocore::backend::gpu::Gpu;
use phenocore::ops::elementwise as ew;
use phenocore::DType;

fn cpu(op: Unary, x: &[f64]) -> Vec<f64> {
    let mut tape = Tape::<f64>::new(false);
    let v = tape.input(&[x.len()], x.to_vec(), false).unwrap();
    let y = match op {
        Unary::Silu => ew::silu(&mut tape, &v),
        Unary::Sigmoid => ew::sigmoid(&mut tape, &v),
    };
    tape.data(&y).to_vec()
}

// Lengths cover the 16-byte pack body, the scalar tail, and several grid-stride steps.
const LENS: [usize; 4] = [1, 7, 1029, 3 * 8 * 256 * 4 + 5];

pub fn unary_f32<G: Gpu>(g: &G) {
    for (i, n) in LENS.into_iter().enumerate() {
        let x: Vec<f32> = uniform(n, i as u64).iter().map(|v| v * 8.0).collect();
        for op in [Unary::Silu, Unary::Sigmoid] {
            let xb = g.upload_slice(&x).unwrap();
            let yb = g.alloc(n * 4).unwrap();
            unsafe { unary(g, op, DType::F32, g.ptr(&xb), g.ptr(&yb), n) }.unwrap();
            let y: Vec<f32> = g.download_vec(&yb, n).unwrap();
            assert_close(
                &format!("{op:?} f32 n={n}"),
                &f64s(&y),
                &cpu(op, &f64s(&x)),
                F32_TOL,
            );
        }
    }
}

pub fn unary_bf16<G: Gpu>(g: &G) {
    for (i, n) in LENS.into_iter().enumerate() {
        let x: Vec<f32> = uniform(n, 10 + i as u64).iter().map(|v| v * 8.0).collect();
        let (bits, rounded) = to_bf16(&x);
        for op in [Unary::Silu, Unary::Sigmoid] {
            let xb = g.upload_slice(&bits).unwrap();
            let yb = g.alloc(n * 2).unwrap();
            unsafe { unary(g, op, DType::BF16, g.ptr(&xb), g.ptr(&yb), n) }.unwrap();
            let y: Vec<u16> = g.download_vec(&yb, n).unwrap();
            assert_close(
                &format!("{op:?} bf16 n={n}"),
                &from_bf16(&y),
                &cpu(op, &f64s(&rounded)),
                BF16_TOL,
            );
        }
    }
}

pub fn affine_f32<G: Gpu>(g: &G) {
    let n = 4099;
    let x = uniform(n, 3);
    let xb = g.upload_slice(&x).unwrap();
    let yb = g.alloc(n * 4).unwrap();
    unsafe { affine(g, DType::F32, g.ptr(&xb), g.ptr(&yb), n, 2.5, -0.75) }.unwrap();
    let y: Vec<f32> = g.download_vec(&yb, n).unwrap();
    let want: Vec<f64> = x.iter().map(|&v| v as f64 * 2.5 - 0.75).collect();
    assert_close("affine f32", &f64s(&y), &want, F32_TOL);
}

/// f32 → bf16 rounds to nearest even exactly as `half::bf16::from_f32` (ties, NaN, ±∞, values
/// that overflow to ∞, subnormals), and bf16 → f32 is exact; the same dtype twice is a copy.
pub fn cast_f32_bf16<G: Gpu>(g: &G) {
    use phenocore::backend::gpu::elementwise::cast;
    let special = [
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE / 4.0,
        // Ties: halfway between two bf16 values, one with an even mantissa, one with an odd.
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x3f80_8001),
    ];
    for (i, n) in LENS.into_iter().enumerate() {
        let mut x: Vec<f32> = uniform(n, 40 + i as u64)
            .iter()
            .map(|v| v * 300.0)
            .collect();
        for (d, s) in x.iter_mut().zip(special) {
            *d = s;
        }
        let xb = g.upload_slice(&x).unwrap();
        let yb = g.alloc(n * 2).unwrap();
        unsafe { cast(g, DType::F32, DType::BF16, g.ptr(&xb), g.ptr(&yb), n) }.unwrap();
        let got: Vec<u16> = g.download_vec(&yb, n).unwrap();
        for (j, (&v, &b)) in x.iter().zip(&got).enumerate() {
            let want = half::bf16::from_f32(v);
            let ok = if v.is_nan() {
                half::bf16::from_bits(b).is_nan()
            } else {
                b == want.to_bits()
            };
            assert!(
                ok,
                "cast f32 -> bf16 n={n} [{j}] {v:e}: got {b:#06x}, want {:#06x}",
                want.to_bits()
            );
        }
        let back = g.alloc(n * 4).unwrap();
        unsafe { cast(g, DType::BF16, DType::F32, g.ptr(&yb), g.ptr(&back), n) }.unwrap();
        let wide: Vec<f32> = g.download_vec(&back, n).unwrap();
        for (j, (&b, &w)) in got.iter().zip(&wide).enumerate() {
            let want = half::bf16::from_bits(b).to_f32();
            assert!(
                w.to_bits() == want.to_bits() || (w.is_nan() && want.is_nan()),
                "cast bf16 -> f32 n={n} [{j}]: got {w:e}, want {want:e}"
            );
        }
        let same = g.alloc(n * 4).unwrap();
        unsafe { cast(g, DType::F32, DType::F32, g.ptr(&xb), g.ptr(&same), n) }.unwrap();
        let c: Vec<f32> = g.download_vec(&same, n).unwrap();
        assert!(c.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    let e = unsafe { cast(g, DType::F32, DType::F16, 0, 0, 4) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("not supported"), "{e}");
}

/// The fused bias + activation epilogue against bias then the CPU activation: f32 and bf16, no
/// activation, SiLU and sigmoid, channel counts that take the 16-byte path in both dtypes (16),
/// in f32 only (12) and in neither (5), over several grid-stride steps.
pub fn bias_act_matches_cpu<G: Gpu>(g: &G) {
    for dtype in [DType::F32, DType::BF16] {
        let bf = dtype == DType::BF16;
        for (i, (rows, ch)) in [(3, 16), (257, 12), (1100, 5), (700, 16)]
            .into_iter()
            .enumerate()
        {
            let round = |v: Vec<f32>| if bf { to_bf16(&v).1 } else { v };
            let y0 = round(
                uniform(rows * ch, 40 + i as u64)
                    .iter()
                    .map(|v| v * 6.0)
                    .collect(),
            );
            let b = round(uniform(ch, 50 + i as u64));
            let upload = |v: &[f32]| {
                if bf {
                    g.upload_slice(&to_bf16(v).0).unwrap()
                } else {
                    g.upload_slice(v).unwrap()
                }
            };
            let bb = upload(&b);
            for op in [None, Some(Unary::Silu), Some(Unary::Sigmoid)] {
                let yb = upload(&y0);
                // SAFETY: yb holds rows · ch, bb ch elements of dtype.
                unsafe { bias_act(g, dtype, g.ptr(&yb), g.ptr(&bb), rows, ch, op) }.unwrap();
                let got = if bf {
                    from_bf16(&g.download_vec::<u16>(&yb, rows * ch).unwrap())
                } else {
                    f64s(&g.download_vec::<f32>(&yb, rows * ch).unwrap())
                };
                let z: Vec<f64> = y0
                    .iter()
                    .enumerate()
                    .map(|(j, &y)| y as f64 + b[j % ch] as f64)
                    .collect();
                let want = match op {
                    None => z,
                    Some(op) => cpu(op, &z),
                };
                let tol = if bf { BF16_TOL } else { F32_TOL };
                assert_close(
                    &format!("bias_act {dtype:?} {op:?} {rows}×{ch}"),
                    &got,
                    &want,
                    tol,
                );
            }
        }
    }
}
