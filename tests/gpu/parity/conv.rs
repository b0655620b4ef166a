//! Dense convolution (`backend::gpu::conv::Conv2d`): forward with and without bias and the three
//! gradients against `ops::conv::conv2d_pad` on a Tape<f64>, for the U-Net / VAE shapes (3 × 3
//! stride 1 pad 1, 3 × 3 stride 2 with the VAE's asymmetric padding or pad 1, 1 × 1 shortcuts), odd
//! sizes, channel counts across the im2col tile, and workspace bounds that force several chunks.

use super::*;
use phenocore::autograd::{Params, Tape};
use phenocore::backend::gpu::conv::Conv2d;
use phenocore::backend::gpu::{Gpu, Math};
use phenocore::ops::conv::{conv2d_pad, Pad2d};
use phenocore::DType;

/// ([n, h, w, cin], cout, k, stride, pad).
type Case = ([usize; 4], usize, usize, usize, Pad2d);

const VAE_DOWN: Pad2d = Pad2d {
    top: 0,
    bottom: 1,
    left: 0,
    right: 1,
};

fn cases() -> Vec<Case> {
    vec![
        // 3 × 3 stride 1 pad 1, odd sizes.
        ([2, 7, 5, 3], 6, 3, 1, Pad2d::same(1)),
        // VAE downsample: 3 × 3 stride 2, pad (0, 1, 0, 1); even and odd sides.
        ([2, 8, 6, 5], 4, 3, 2, VAE_DOWN),
        ([1, 7, 9, 4], 3, 3, 2, VAE_DOWN),
        // U-Net downsample: 3 × 3 stride 2 pad 1.
        ([1, 7, 9, 4], 7, 3, 2, Pad2d::same(1)),
        // 1 × 1 shortcut (pointwise GEMM path).
        ([2, 5, 3, 6], 5, 1, 1, Pad2d::same(0)),
        // 1 × 1 stride 2 (im2col path with k = 1).
        ([2, 5, 5, 3], 4, 1, 2, Pad2d::same(0)),
        // 37 channels (odd: 2-byte bf16 / 4-byte f32 copy units, one channel per col2im thread),
        // a 5 × 5 kernel with asymmetric padding.
        ([1, 4, 5, 37], 3, 3, 1, Pad2d::same(1)),
        // 16 and 8 channels: 16-byte im2col units and four channels per col2im thread; 6 channels:
        // 4-byte bf16 units; 4 channels: 8-byte bf16 units.
        ([2, 6, 5, 16], 8, 3, 1, Pad2d::same(1)),
        ([1, 7, 6, 8], 5, 3, 2, VAE_DOWN),
        ([2, 5, 4, 6], 3, 3, 2, Pad2d::same(1)),
        (
            [2, 6, 5, 2],
            3,
            5,
            1,
            Pad2d {
                top: 2,
                bottom: 1,
                left: 0,
                right: 3,
            },
        ),
    ]
}

struct Want {
    y: Vec<f64>,
    y_nobias: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

/// CPU forward (with and without bias) and gradients in f64.
fn cpu((shape, cout, k, s, p): Case, x: &[f64], wt: &[f64], b: &[f64], dy: &[f64]) -> Want {
    let y_nobias = {
        let mut tape = Tape::<f64>::new(false);
        let xv = tape.input(&shape, x.to_vec(), false).unwrap();
        let wv = tape
            .input(&[cout, shape[3], k, k], wt.to_vec(), false)
            .unwrap();
        let y = conv2d_pad(&mut tape, &xv, &wv, None, s, p).unwrap();
        tape.data(&y).to_vec()
    };
    let mut tape = Tape::<f64>::new(true);
    let xv = tape.input(&shape, x.to_vec(), true).unwrap();
    let wv = tape
        .input(&[cout, shape[3], k, k], wt.to_vec(), true)
        .unwrap();
    let bv = tape.input(&[cout], b.to_vec(), true).unwrap();
    let y = conv2d_pad(&mut tape, &xv, &wv, Some(&bv), s, p).unwrap();
    let out = tape.data(&y).to_vec();
    let grads = tape
        .backward_with(&y, dy.to_vec(), &mut Params::new())
        .unwrap();
    Want {
        y: out,
        y_nobias,
        dx: grads.get(&xv).unwrap().to_vec(),
        dw: grads.get(&wv).unwrap().to_vec(),
        db: grads.get(&bv).unwrap().to_vec(),
    }
}

fn plan(dtype: DType, (shape, cout, k, s, p): Case) -> Conv2d {
    Conv2d::new(dtype, shape, cout, k, s, p).unwrap()
}

/// Runs every pass of `c` on the GPU and checks it against the CPU reference.
fn check<G: Gpu>(g: &G, c: &Conv2d, case: Case, seed: u64, name: &str, math: Math) {
    let dtype = c.dtype();
    let tol = if dtype == DType::BF16 {
        BF16_TOL
    } else {
        F32_TOL
    };
    let cout = case.1;
    let (x, wt, b, dy) = (
        uniform(c.input_len(), seed),
        uniform(c.weight_len(), seed + 1),
        uniform(cout, seed + 2),
        uniform(c.output_len(), seed + 3),
    );
    type Upload<'a, B> = Box<dyn Fn(&[f32]) -> B + 'a>;
    type Back<'a, B> = Box<dyn Fn(&B, usize) -> Vec<f64> + 'a>;
    let round = |v: Vec<f32>| {
        if dtype == DType::BF16 {
            to_bf16(&v).1
        } else {
            v
        }
    };
    let (upload, back): (Upload<G::Buf>, Back<G::Buf>) = if dtype == DType::BF16 {
        (
            Box::new(|v: &[f32]| g.upload_slice(&to_bf16(v).0).unwrap()),
            Box::new(|b: &G::Buf, n| from_bf16(&g.download_vec::<u16>(b, n).unwrap())),
        )
    } else {
        (
            Box::new(|v: &[f32]| g.upload_slice(v).unwrap()),
            Box::new(|b: &G::Buf, n| f64s(&g.download_vec::<f32>(b, n).unwrap())),
        )
    };
    let (x, wt, b, dy) = (round(x), round(wt), round(b), round(dy));
    let want = cpu(case, &f64s(&x), &f64s(&wt), &f64s(&b), &f64s(&dy));
    let (xb, wb, bb, dyb) = (upload(&x), upload(&wt), upload(&b), upload(&dy));
    // Outputs start as garbage (NaN for f32, a large value for bf16): every pass must overwrite.
    let junk = |n: usize| upload(&vec![f32::NAN; n]);
    let yb = junk(c.output_len());
    let y2b = junk(c.output_len());
    let dxb = junk(c.input_len());
    let dwb = junk(c.weight_len());
    let dbb = junk(cout);
    unsafe {
        let p = |b: &G::Buf| g.ptr(b);
        c.forward(g, p(&xb), p(&wb), Some(p(&bb)), p(&yb), math)
            .unwrap();
        c.forward(g, p(&xb), p(&wb), None, p(&y2b), math).unwrap();
        c.backward_x(g, p(&dyb), p(&wb), p(&dxb), math).unwrap();
        c.backward_w(g, p(&xb), p(&dyb), p(&dwb), math).unwrap();
        c.backward_b(g, p(&dyb), p(&dbb)).unwrap();
    }
    assert_close(
        &format!("{name}: y"),
        &back(&yb, c.output_len()),
        &want.y,
        tol,
    );
    assert_close(
        &format!("{name}: y (no bias)"),
        &back(&y2b, c.output_len()),
        &want.y_nobias,
        tol,
    );
    assert_close(
        &format!("{name}: dx"),
        &back(&dxb, c.input_len()),
        &want.dx,
        tol,
    );
    assert_close(
        &format!("{name}: dw"),
        &back(&dwb, c.weight_len()),
        &want.dw,
        tol,
    );
    assert_close(&format!("{name}: db"), &back(&dbb, cout), &want.db, tol);
    // The f32 weight gradient (f32 master gradients) from the same storage: f32 products summed in
    // f32 and never rounded to the storage dtype, so within the f32 bound even for bf16 storage.
    if math == Math::F32 {
        let dwf = g.upload_slice(&vec![f32::NAN; c.weight_len()]).unwrap();
        // SAFETY: x, dy hold the plan's input and output of its dtype, dwf weight_len f32.
        unsafe {
            c.backward_w_f32(g, g.ptr(&xb), g.ptr(&dyb), g.ptr(&dwf), math)
                .unwrap()
        };
        let got = f64s(&g.download_vec::<f32>(&dwf, c.weight_len()).unwrap());
        assert_close(&format!("{name}: dw (f32)"), &got, &want.dw, F32_TOL);
    }
}

fn run<G: Gpu>(g: &G, dtype: DType) {
    for (i, case) in cases().into_iter().enumerate() {
        let c = plan(dtype, case);
        let (shape, cout, k, s, p) = case;
        let want_hw = [
            (shape[1] + p.top + p.bottom - k) / s + 1,
            (shape[2] + p.left + p.right - k) / s + 1,
        ];
        assert_eq!(c.out_hw(), want_hw, "case {i}: out_hw");
        assert_eq!(c.input_len(), shape.iter().product::<usize>());
        assert_eq!(c.output_len(), shape[0] * want_hw[0] * want_hw[1] * cout);
        assert_eq!(c.weight_len(), cout * shape[3] * k * k);
        assert_eq!(c.is_pointwise(), k == 1 && s == 1 && p == Pad2d::same(0));
        let name = format!("conv {dtype:?} case {i} {case:?}");
        check(g, &c, case, 1000 + 10 * i as u64, &name, Math::F32);
        // Split-K weight gradients (the pointwise path included).
        let name = format!("{name}, weight gradient in 3 slices");
        let split = c.with_weight_grad_splits(3);
        check(g, &split, case, 1000 + 10 * i as u64, &name, Math::F32);
    }
}

pub fn conv_f32<G: Gpu>(g: &G) {
    run(g, DType::F32);
}

pub fn conv_bf16<G: Gpu>(g: &G) {
    run(g, DType::BF16);
}

/// Tf32 math (on a GPU: 10-bit products) stays within the bf16 bound with f32 storage.
pub fn conv_tf32<G: Gpu>(g: &G) {
    let case = cases()[1];
    let c = plan(DType::F32, case);
    let (x, wt) = (uniform(c.input_len(), 5), uniform(c.weight_len(), 6));
    let want = cpu(
        case,
        &f64s(&x),
        &f64s(&wt),
        &vec![0.0; case.1],
        &vec![0.0; c.output_len()],
    );
    let (xb, wb) = (g.upload_slice(&x).unwrap(), g.upload_slice(&wt).unwrap());
    let yb = g.alloc(c.output_len() * 4).unwrap();
    unsafe {
        c.forward(g, g.ptr(&xb), g.ptr(&wb), None, g.ptr(&yb), Math::Tf32)
            .unwrap()
    };
    let y = f64s(&g.download_vec::<f32>(&yb, c.output_len()).unwrap());
    assert_close("conv tf32 forward", &y, &want.y_nobias, BF16_TOL);
}

/// Bounded workspaces: chunks of whole samples, and chunks of output rows inside a sample (whose
/// input gradients overlap and accumulate), for every case shape that uses im2col.
fn chunked<G: Gpu>(g: &G, dtype: DType) {
    let mut partial_seen = false;
    let mut whole_seen = false;
    let bigger: Vec<Case> = vec![
        ([3, 7, 5, 3], 6, 3, 1, Pad2d::same(1)),
        ([3, 8, 6, 5], 4, 3, 2, VAE_DOWN),
        ([2, 9, 7, 4], 5, 3, 2, Pad2d::same(1)),
        ([2, 5, 5, 3], 4, 1, 2, Pad2d::same(0)),
    ];
    for (i, case) in bigger.into_iter().enumerate() {
        let base = plan(dtype, case);
        let [oh, ow] = base.out_hw();
        let row = case.0[3] * case.2 * case.2 * dtype.size_in_bytes();
        assert_eq!(base.chunk_count(), 1, "default bound: one chunk");
        assert_eq!(base.workspace_bytes(), case.0[0] * oh * ow * row);
        // One sample per chunk; two output rows per chunk; one output row (the minimum) per chunk,
        // even under a bound smaller than one row.
        for (j, bytes) in [oh * ow * row, 2 * ow * row + row, 1]
            .into_iter()
            .enumerate()
        {
            let c = base.with_max_workspace(bytes);
            let chunks = c.chunk_count();
            let want_chunks = match j {
                0 => case.0[0],
                1 => case.0[0] * oh.div_ceil(2),
                _ => case.0[0] * oh,
            };
            assert_eq!(chunks, want_chunks, "case {i} bound {bytes}: chunks");
            assert!(c.workspace_bytes() <= bytes.max(ow * row));
            whole_seen |= j == 0;
            partial_seen |= j > 0;
            let name = format!("conv {dtype:?} chunked case {i} {case:?}, bound {bytes} B");
            check(g, &c, case, 2000 + 10 * i as u64, &name, Math::F32);
            // Split-K weight gradients: 3 slices (a shorter last one) and one row per slice.
            for slices in [3, usize::MAX] {
                let name = format!("{name}, weight gradient in {slices} slices");
                let split = c.with_weight_grad_splits(slices);
                check(g, &split, case, 2000 + 10 * i as u64, &name, Math::F32);
            }
        }
    }
    assert!(whole_seen && partial_seen);
}

pub fn conv_chunked_f32<G: Gpu>(g: &G) {
    chunked(g, DType::F32);
}

pub fn conv_chunked_bf16<G: Gpu>(g: &G) {
    chunked(g, DType::BF16);
}

/// Unsupported or impossible plans are errors, not panics.
pub fn conv_rejects_unsupported_plans<G: Gpu>(_g: &G) {
    let ok = Conv2d::new(DType::F32, [1, 4, 4, 2], 3, 3, 1, Pad2d::same(1));
    assert!(ok.is_ok());
    let bad: Vec<(&str, phenocore::Result<Conv2d>)> = vec![
        (
            "f16",
            Conv2d::new(DType::F16, [1, 4, 4, 2], 3, 3, 1, Pad2d::same(1)),
        ),
        (
            "f64",
            Conv2d::new(DType::F64, [1, 4, 4, 2], 3, 3, 1, Pad2d::same(1)),
        ),
        (
            "k = 0",
            Conv2d::new(DType::F32, [1, 4, 4, 2], 3, 0, 1, Pad2d::same(1)),
        ),
        (
            "stride 0",
            Conv2d::new(DType::F32, [1, 4, 4, 2], 3, 3, 0, Pad2d::same(1)),
        ),
        (
            "one output row's cols over 2³¹ elements",
            Conv2d::new(DType::F32, [1, 4, 1 << 20, 256], 3, 3, 1, Pad2d::same(1)),
        ),
        (
            "no output",
            Conv2d::new(DType::F32, [1, 2, 4, 2], 3, 3, 1, Pad2d::same(0)),
        ),
        (
            "empty batch",
            Conv2d::new(DType::F32, [0, 4, 4, 2], 3, 3, 1, Pad2d::same(1)),
        ),
        (
            "no output channels",
            Conv2d::new(DType::BF16, [1, 4, 4, 2], 0, 3, 1, Pad2d::same(1)),
        ),
        (
            "too many elements",
            Conv2d::new(
                DType::F32,
                [1 << 12, 1 << 10, 1 << 10, 4],
                3,
                3,
                1,
                Pad2d::same(1),
            ),
        ),
        (
            "kdim overflow",
            Conv2d::new(DType::F32, [1, 4, 4, 1 << 28], 3, 3, 1, Pad2d::same(1)),
        ),
        (
            "padding overflow",
            Conv2d::new(
                DType::F32,
                [1, 4, 4, 2],
                3,
                3,
                1,
                Pad2d::same(usize::MAX / 2),
            ),
        ),
    ];
    for (what, r) in bad {
        let err = r.err().unwrap_or_else(|| panic!("{what}: plan accepted"));
        assert!(!err.to_string().is_empty(), "{what}");
    }
}

/// x and dx one element past an aligned address: im2col falls back to element-sized copy units
/// and col2im to one channel per thread, with results equal bit for bit to the aligned run (the
/// same copies, the same sums in the same order).
pub fn conv_unaligned<G: Gpu>(g: &G) {
    let case: Case = ([2, 5, 4, 16], 6, 3, 1, Pad2d::same(1));
    for dtype in [DType::F32, DType::BF16] {
        let c = plan(dtype, case);
        let es = dtype.size_in_bytes();
        let data = |n: usize, seed: u64| uniform_bytes(n, seed, dtype);
        let (x, w, dy) = (
            data(c.input_len(), 71),
            data(c.weight_len(), 72),
            data(c.output_len(), 73),
        );
        let wb = g.upload(&w).unwrap();
        let dyb = g.upload(&dy).unwrap();
        // Returns (y, dx, dw) bytes with x and dx `off` elements into their buffers.
        let pass = |off: usize| -> [Vec<u8>; 3] {
            let mut xs = vec![0u8; off * es];
            xs.extend_from_slice(&x);
            let xb = g.upload(&xs).unwrap();
            let yb = g.alloc(c.output_len() * es).unwrap();
            let dxb = g.alloc((c.input_len() + off) * es).unwrap();
            let dwb = g.alloc(c.weight_len() * es).unwrap();
            let (xp, dxp) = (
                g.ptr(&xb) + (off * es) as u64,
                g.ptr(&dxb) + (off * es) as u64,
            );
            // SAFETY: every buffer holds what the plan reads or writes past the offsets.
            unsafe {
                c.forward(g, xp, g.ptr(&wb), None, g.ptr(&yb), Math::F32)
                    .unwrap();
                c.backward_x(g, g.ptr(&dyb), g.ptr(&wb), dxp, Math::F32)
                    .unwrap();
                c.backward_w(g, xp, g.ptr(&dyb), g.ptr(&dwb), Math::F32)
                    .unwrap();
            }
            let get = |b: &G::Buf, n: usize| {
                let mut v = vec![0u8; n];
                g.download(b, &mut v).unwrap();
                v
            };
            let dx = get(&dxb, (c.input_len() + off) * es)[off * es..].to_vec();
            [
                get(&yb, c.output_len() * es),
                dx,
                get(&dwb, c.weight_len() * es),
            ]
        };
        let (aligned, shifted) = (pass(0), pass(1));
        for (i, what) in ["y", "dx", "dw"].iter().enumerate() {
            assert!(
                aligned[i] == shifted[i],
                "conv {dtype:?}: {what} with x and dx one element off alignment differs"
            );
        }
    }
}
