use super::*;
use phenocore::autograd::Tape;
use phenocore::backend::gpu::elementwise::{affine, unary, Unary};
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
