use super::*;
use phenocore::autograd::{Params, Tape};
use phenocore::backend::gpu::geglu::Geglu;
use phenocore::backend::gpu::Gpu;
use phenocore::ops::gelu::geglu;
use phenocore::DType;

/// (rows, 2D): odd D, D = 1, and sizes needing several grid-stride steps (the emulation has 2
/// multiprocessors: 16 blocks of 256 threads per step).
const CASES: [(usize, usize); 4] = [(3, 10), (7, 2), (70, 200), (33, 1282)];

fn cpu(rows: usize, two_d: usize, x: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut tape = Tape::<f64>::new(true);
    let xv = tape.input(&[rows, two_d], x.to_vec(), true).unwrap();
    let y = geglu(&mut tape, &xv).unwrap();
    let out = tape.data(&y).to_vec();
    let grads = tape
        .backward_with(&y, dy.to_vec(), &mut Params::new())
        .unwrap();
    (out, grads.get(&xv).unwrap().to_vec())
}

fn run<G: Gpu>(g: &G, dtype: DType, tol: f64) {
    for (i, (rows, two_d)) in CASES.into_iter().enumerate() {
        let p = Geglu::new(dtype, rows, two_d).unwrap();
        // ±4: the GELU's curved part and both tails.
        let x: Vec<f32> = uniform(p.input_len(), 50 + i as u64)
            .iter()
            .map(|v| 4.0 * v)
            .collect();
        let dy = uniform(p.output_len(), 60 + i as u64);
        let bf = dtype == DType::BF16;
        let (x, dy) = if bf {
            (to_bf16(&x).1, to_bf16(&dy).1)
        } else {
            (x, dy)
        };
        let upload = |v: &[f32]| {
            if bf {
                g.upload_slice(&to_bf16(v).0).unwrap()
            } else {
                g.upload_slice(v).unwrap()
            }
        };
        let back = |b: &G::Buf, n: usize| {
            if bf {
                from_bf16(&g.download_vec::<u16>(b, n).unwrap())
            } else {
                f64s(&g.download_vec::<f32>(b, n).unwrap())
            }
        };
        let (want_y, want_dx) = cpu(rows, two_d, &f64s(&x), &f64s(&dy));
        let (xb, dyb) = (upload(&x), upload(&dy));
        let es = dtype.size_in_bytes();
        let (yb, dxb) = (
            g.alloc(p.output_len() * es).unwrap(),
            g.alloc(p.input_len() * es).unwrap(),
        );
        unsafe {
            p.forward(g, g.ptr(&xb), g.ptr(&yb)).unwrap();
            p.backward(g, g.ptr(&xb), g.ptr(&dyb), g.ptr(&dxb)).unwrap();
        }
        let name = format!("geglu {dtype:?} {rows} × {two_d}");
        assert_close(
            &format!("{name}: y"),
            &back(&yb, p.output_len()),
            &want_y,
            tol,
        );
        assert_close(
            &format!("{name}: dx"),
            &back(&dxb, p.input_len()),
            &want_dx,
            tol,
        );
    }
}

pub fn geglu_f32<G: Gpu>(g: &G) {
    run(g, DType::F32, F32_TOL);
}

pub fn geglu_bf16<G: Gpu>(g: &G) {
    run(g, DType::BF16, BF16_TOL);
}

pub fn geglu_rejects_unsupported_plans<G: Gpu>(_g: &G) {
    for (dtype, rows, two_d) in [
        (DType::F32, 4, 7),
        (DType::F32, 4, 0),
        (DType::BF16, 0, 8),
        (DType::F16, 4, 8),
        (DType::F64, 4, 8),
    ] {
        assert!(
            Geglu::new(dtype, rows, two_d).is_err(),
            "geglu plan {dtype:?} {rows} × {two_d} accepted"
        );
    }
}
