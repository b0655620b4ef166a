use super::*;
use phenocore::autograd::{Params, Tape};
use phenocore::backend::gpu::depthwise::Depthwise;
use phenocore::backend::gpu::Gpu;
use phenocore::models::efficientnet::Padding;
use phenocore::ops::conv::depthwise;
use phenocore::DType;

/// (n, h, w, c, k, stride, padding): both kernel sizes and strides, odd sizes, channel counts
/// below, at and above the 32-channel weight-gradient tile.
const CASES: [(usize, usize, usize, usize, usize, usize, Padding); 5] = [
    (2, 9, 7, 5, 3, 1, Padding::Symmetric),
    (3, 8, 8, 33, 3, 2, Padding::TfSame),
    (1, 11, 10, 64, 5, 1, Padding::Symmetric),
    (2, 13, 9, 40, 5, 2, Padding::TfSame),
    (4, 6, 6, 32, 5, 2, Padding::Symmetric),
];

/// CPU forward and gradients (dx, dw) in f64.
fn cpu(
    [n, h, w, c, k, s]: [usize; 6],
    p: Padding,
    x: &[f64],
    wt: &[f64],
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut tape = Tape::<f64>::new(true);
    let xv = tape.input(&[n, h, w, c], x.to_vec(), true).unwrap();
    let wv = tape.input(&[c, 1, k, k], wt.to_vec(), true).unwrap();
    let y = depthwise(&mut tape, &xv, &wv, s, p).unwrap();
    let out = tape.data(&y).to_vec();
    let grads = tape
        .backward_with(&y, dy.to_vec(), &mut Params::new())
        .unwrap();
    (
        out,
        grads.get(&xv).unwrap().to_vec(),
        grads.get(&wv).unwrap().to_vec(),
    )
}

fn plan(
    dtype: DType,
    (n, h, w, c, k, s, p): (usize, usize, usize, usize, usize, usize, Padding),
) -> Depthwise {
    let (oh, pt) = p.out_and_pad(h, k, s);
    let (ow, pl) = p.out_and_pad(w, k, s);
    Depthwise::new(dtype, [n, h, w, c], k, s, pt, pl, [oh, ow]).unwrap()
}

fn run<G: Gpu>(g: &G, dtype: DType, tol: f64) {
    for (i, case) in CASES.into_iter().enumerate() {
        let (n, h, w, c, k, s, p) = case;
        let d = plan(dtype, case);
        let seed = 100 * i as u64;
        let (x, wt, dy) = (
            uniform(d.input_len(), seed),
            uniform(d.weight_len(), seed + 1),
            uniform(d.output_len(), seed + 2),
        );
        let name = format!("depthwise {dtype:?} case {i} {case:?}");
        type Upload<'a, B> = Box<dyn Fn(&[f32]) -> B + 'a>;
        type Back<'a, B> = Box<dyn Fn(&B, usize) -> Vec<f64> + 'a>;
        let (upload, back, x, wt, dy): (
            Upload<G::Buf>,
            Back<G::Buf>,
            Vec<f32>,
            Vec<f32>,
            Vec<f32>,
        ) = if dtype == DType::BF16 {
            (
                Box::new(|v: &[f32]| g.upload_slice(&to_bf16(v).0).unwrap()),
                Box::new(|b: &G::Buf, n| from_bf16(&g.download_vec::<u16>(b, n).unwrap())),
                to_bf16(&x).1,
                to_bf16(&wt).1,
                to_bf16(&dy).1,
            )
        } else {
            (
                Box::new(|v: &[f32]| g.upload_slice(v).unwrap()),
                Box::new(|b: &G::Buf, n| f64s(&g.download_vec::<f32>(b, n).unwrap())),
                x,
                wt,
                dy,
            )
        };
        let (want_y, want_dx, want_dw) =
            cpu([n, h, w, c, k, s], p, &f64s(&x), &f64s(&wt), &f64s(&dy));
        let (xb, wb, dyb) = (upload(&x), upload(&wt), upload(&dy));
        let esize = dtype.size_in_bytes();
        let yb = g.alloc(d.output_len() * esize).unwrap();
        let dxb = g.alloc(d.input_len() * esize).unwrap();
        let dwb = g.alloc(d.weight_len() * 4).unwrap();
        // The fused epilogue: act(x ⊛ w + b) with SiLU, and with bias alone.
        let bias = {
            let b = uniform(c, seed + 3);
            if dtype == DType::BF16 {
                to_bf16(&b).1
            } else {
                b
            }
        };
        let bb = upload(&bias);
        let (ysb, ybb) = (
            g.alloc(d.output_len() * esize).unwrap(),
            g.alloc(d.output_len() * esize).unwrap(),
        );
        unsafe {
            d.forward(g, g.ptr(&xb), g.ptr(&wb), g.ptr(&yb)).unwrap();
            d.forward_bias_act(
                g,
                g.ptr(&xb),
                g.ptr(&wb),
                Some(g.ptr(&bb)),
                true,
                g.ptr(&ysb),
            )
            .unwrap();
            d.forward_bias_act(
                g,
                g.ptr(&xb),
                g.ptr(&wb),
                Some(g.ptr(&bb)),
                false,
                g.ptr(&ybb),
            )
            .unwrap();
            d.backward_x(g, g.ptr(&dyb), g.ptr(&wb), g.ptr(&dxb))
                .unwrap();
            d.backward_w(g, g.ptr(&xb), g.ptr(&dyb), g.ptr(&dwb), false)
                .unwrap();
        }
        assert_close(
            &format!("{name}: y"),
            &back(&yb, d.output_len()),
            &want_y,
            tol,
        );
        let biased: Vec<f64> = want_y
            .iter()
            .enumerate()
            .map(|(j, y)| y + bias[j % c] as f64)
            .collect();
        let silu: Vec<f64> = biased.iter().map(|z| z / (1.0 + (-z).exp())).collect();
        assert_close(
            &format!("{name}: y + b"),
            &back(&ybb, d.output_len()),
            &biased,
            tol,
        );
        assert_close(
            &format!("{name}: silu(y + b)"),
            &back(&ysb, d.output_len()),
            &silu,
            tol,
        );
        assert_close(
            &format!("{name}: dx"),
            &back(&dxb, d.input_len()),
            &want_dx,
            tol,
        );
        let dw = f64s(&g.download_vec::<f32>(&dwb, d.weight_len()).unwrap());
        // The weight gradient is f32 even for bf16 storage: its only error is f32 summation.
        assert_close(&format!("{name}: dw"), &dw, &want_dw, F32_TOL);
    }
}

pub fn forward_and_backward_f32<G: Gpu>(g: &G) {
    run(g, DType::F32, F32_TOL);
}

pub fn forward_and_backward_bf16<G: Gpu>(g: &G) {
    run(g, DType::BF16, BF16_TOL);
}

pub fn accumulates_weight_gradient<G: Gpu>(g: &G) {
    let case = CASES[1];
    let d = plan(DType::F32, case);
    let (x, dy) = (uniform(d.input_len(), 7), uniform(d.output_len(), 8));
    let start = uniform(d.weight_len(), 9);
    let (xb, dyb) = (g.upload_slice(&x).unwrap(), g.upload_slice(&dy).unwrap());
    let dwb = g.upload_slice(&start).unwrap();
    let fresh = g.alloc(d.weight_len() * 4).unwrap();
    unsafe {
        d.backward_w(g, g.ptr(&xb), g.ptr(&dyb), g.ptr(&dwb), true)
            .unwrap();
        d.backward_w(g, g.ptr(&xb), g.ptr(&dyb), g.ptr(&fresh), false)
            .unwrap();
    }
    let acc = f64s(&g.download_vec::<f32>(&dwb, d.weight_len()).unwrap());
    let only = f64s(&g.download_vec::<f32>(&fresh, d.weight_len()).unwrap());
    let want: Vec<f64> = start
        .iter()
        .zip(&only)
        .map(|(&s, o)| s as f64 + o)
        .collect();
    assert_close("depthwise dw accumulate", &acc, &want, F32_TOL);
}

/// x, y, dy and dx one element past a 16-byte boundary (and channels a multiple of the vector
/// width): the kernels fall back to one channel per thread, with results equal bit for bit to the
/// aligned, vectorised run (the same products summed in the same order).
pub fn unaligned_matches_vectorised<G: Gpu>(g: &G) {
    for dtype in [DType::F32, DType::BF16] {
        let d = plan(dtype, CASES[2]);
        let es = dtype.size_in_bytes();
        let bytes = |n: usize, seed: u64| uniform_bytes(n, seed, dtype);
        let (x, w, dy) = (
            bytes(d.input_len(), 31),
            bytes(d.weight_len(), 32),
            bytes(d.output_len(), 33),
        );
        let wb = g.upload(&w).unwrap();
        let pass = |off: usize| -> [Vec<u8>; 2] {
            let pad = vec![0u8; off * es];
            let xb = g.upload(&[pad.as_slice(), &x].concat()).unwrap();
            let dyb = g.upload(&[pad.as_slice(), &dy].concat()).unwrap();
            let yb = g.alloc((d.output_len() + off) * es).unwrap();
            let dxb = g.alloc((d.input_len() + off) * es).unwrap();
            let at = |b: &G::Buf| g.ptr(b) + (off * es) as u64;
            // SAFETY: every buffer holds the plan's tensor past the offset.
            unsafe {
                d.forward(g, at(&xb), g.ptr(&wb), at(&yb)).unwrap();
                d.backward_x(g, at(&dyb), g.ptr(&wb), at(&dxb)).unwrap();
            }
            let get = |b: &G::Buf, n: usize| {
                let mut v = vec![0u8; (n + off) * es];
                g.download(b, &mut v).unwrap();
                v[off * es..].to_vec()
            };
            [get(&yb, d.output_len()), get(&dxb, d.input_len())]
        };
        let (aligned, shifted) = (pass(0), pass(1));
        assert!(
            aligned[0] == shifted[0],
            "depthwise {dtype:?}: y differs when unaligned"
        );
        assert!(
            aligned[1] == shifted[1],
            "depthwise {dtype:?}: dx differs when unaligned"
        );
    }
}
