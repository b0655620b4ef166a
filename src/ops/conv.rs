//! Convolutions with backward, on NHWC activations ([N, H, W, C] row-major) and torch OIHW weights:
//! dense k × k (im2col + GEMM, any stride, `symmetric` or TF `same` padding), 1 × 1 (one GEMM over
//! the batch) and depthwise (per-channel k × k, vectorised across channels).

use crate::autograd::{Buf, Float, Tape, Var};
use crate::backend::cpu::gemm::{gemm_t, View};
use crate::error::{Error, Result};
use crate::models::efficientnet::Padding;
use rayon::prelude::*;

/// Geometry of a 2-D convolution over one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geom {
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geom {
    pub fn new(h: usize, w: usize, k: usize, stride: usize, padding: Padding) -> Result<Self> {
        if k == 0 || stride == 0 {
            return Err(Error::InvalidArgument(format!(
                "convolution kernel {k} / stride {stride} must be positive"
            )));
        }
        let (oh, pad_top) = padding.out_and_pad(h, k, stride);
        let (ow, pad_left) = padding.out_and_pad(w, k, stride);
        if oh == 0 || ow == 0 {
            return Err(Error::Shape(format!(
                "a {k}×{k} stride-{stride} convolution of a {h}×{w} input has no output"
            )));
        }
        Ok(Geom {
            h,
            w,
            k,
            stride,
            pad_top,
            pad_left,
            oh,
            ow,
        })
    }

    /// Valid input row / tap range of output row `o` along one axis: (origin, first tap, end tap).
    #[inline(always)]
    fn span(&self, o: usize, pad: usize, size: usize) -> (isize, usize, usize) {
        let origin = (o * self.stride) as isize - pad as isize;
        let lo = (-origin).max(0) as usize;
        let hi = (size as isize - origin).clamp(0, self.k as isize) as usize;
        (origin, lo, hi.max(lo))
    }
}

fn nhwc(x: &Var, what: &str) -> Result<(usize, usize, usize, usize)> {
    match x.shape() {
        &[n, h, w, c] => Ok((n, h, w, c)),
        s => Err(Error::Shape(format!(
            "{what}: input must be NHWC (N, H, W, C), got shape {s:?}"
        ))),
    }
}

/// im2col of one NHWC sample: cols[p, ci·k² + ky·k + kx] (matches OIHW weights flattened).
fn im2col<T: Float>(x: &[T], c: usize, g: &Geom, cols: &mut [T]) {
    let (k, kdim) = (g.k, c * g.k * g.k);
    for oy in 0..g.oh {
        let (iy0, ky0, ky1) = g.span(oy, g.pad_top, g.h);
        for ox in 0..g.ow {
            let (ix0, kx0, kx1) = g.span(ox, g.pad_left, g.w);
            let row = &mut cols[(oy * g.ow + ox) * kdim..][..kdim];
            row.iter_mut().for_each(|v| *v = T::ZERO);
            for ky in ky0..ky1 {
                let iy = (iy0 + ky as isize) as usize;
                for kx in kx0..kx1 {
                    let ix = (ix0 + kx as isize) as usize;
                    let px = &x[(iy * g.w + ix) * c..][..c];
                    for (ci, &v) in px.iter().enumerate() {
                        row[ci * k * k + ky * k + kx] = v;
                    }
                }
            }
        }
    }
}

/// Adjoint of [`im2col`]: dx += col2im(dcols).
fn col2im<T: Float>(dcols: &[T], c: usize, g: &Geom, dx: &mut [T]) {
    let (k, kdim) = (g.k, c * g.k * g.k);
    for oy in 0..g.oh {
        let (iy0, ky0, ky1) = g.span(oy, g.pad_top, g.h);
        for ox in 0..g.ow {
            let (ix0, kx0, kx1) = g.span(ox, g.pad_left, g.w);
            let row = &dcols[(oy * g.ow + ox) * kdim..][..kdim];
            for ky in ky0..ky1 {
                let iy = (iy0 + ky as isize) as usize;
                for kx in kx0..kx1 {
                    let ix = (ix0 + kx as isize) as usize;
                    let px = &mut dx[(iy * g.w + ix) * c..][..c];
                    for (ci, v) in px.iter_mut().enumerate() {
                        *v += row[ci * k * k + ky * k + kx];
                    }
                }
            }
        }
    }
}

/// Dense convolution without bias: x [N, H, W, Cin], w [Cout, Cin, k, k] → [N, OH, OW, Cout].
pub fn conv2d<T: Float>(
    tape: &mut Tape<T>,
    x: &Var,
    w: &Var,
    stride: usize,
    padding: Padding,
) -> Result<Var> {
    let (n, h, wd, cin) = nhwc(x, "conv2d")?;
    let (cout, k) = match w.shape() {
        &[o, i, kh, kw] if i == cin && kh == kw => (o, kh),
        s => {
            return Err(Error::Shape(format!(
                "conv2d: weight must be (Cout, {cin}, k, k), got {s:?}"
            )))
        }
    };
    let g = Geom::new(h, wd, k, stride, padding)?;
    if k == 1 && stride == 1 && g.pad_top == 0 && g.pad_left == 0 {
        return pointwise(tape, x, w);
    }
    let (xv, wv) = (tape.value(x), tape.value(w));
    let (p, kdim) = (g.oh * g.ow, cin * k * k);
    let mut out = Buf::alloc(n * p * cout);
    out.par_chunks_mut(p * cout)
        .zip(xv.par_chunks(h * wd * cin))
        .for_each(|(o, xs)| {
            let mut cols = Buf::<T>::alloc(p * kdim);
            im2col(xs, cin, &g, &mut cols);
            gemm_t(
                p,
                cout,
                kdim,
                o,
                false,
                View::rows(&cols, kdim),
                View::t(&wv, kdim),
                false,
            );
        });
    let (xid, wid) = (x.id(), w.id());
    let need = tape.requires_grad(x) || tape.requires_grad(w);
    Ok(
        tape.push(&[n, g.oh, g.ow, cout], out, need, move |out_id, gr| {
            let Some(dy) = gr.take(out_id) else {
                return Ok(());
            };
            let (want_x, want_w) = (gr.wants(xid), gr.wants(wid));
            let per_in = h * wd * cin;
            if want_w {
                let dw = in_sample_groups(n, cout * kdim, |range, dwp| {
                    let mut cols = Buf::<T>::alloc(p * kdim);
                    for s in range {
                        im2col(&xv[s * per_in..(s + 1) * per_in], cin, &g, &mut cols);
                        // dW [Cout, kdim] += dYᵀ [Cout, P] · cols [P, kdim]
                        gemm_t(
                            cout,
                            kdim,
                            p,
                            dwp,
                            true,
                            View::t(&dy[s * p * cout..(s + 1) * p * cout], cout),
                            View::rows(&cols, kdim),
                            false,
                        );
                    }
                });
                gr.add(wid, dw);
            }
            if want_x {
                let mut dx = Buf::zeros(n * per_in);
                dx.par_chunks_mut(per_in).enumerate().for_each(|(s, dxs)| {
                    // dcols [P, kdim] = dY [P, Cout] · W [Cout, kdim]
                    let mut cols = Buf::<T>::alloc(p * kdim);
                    gemm_t(
                        p,
                        kdim,
                        cout,
                        &mut cols,
                        false,
                        View::rows(&dy[s * p * cout..(s + 1) * p * cout], cout),
                        View::rows(&wv, kdim),
                        false,
                    );
                    col2im(&cols, cin, &g, dxs);
                });
                gr.add(xid, dx);
            }
            Ok(())
        }),
    )
}

/// 1 × 1 convolution without bias (one GEMM over all pixels): x [N, H, W, Cin], w [Cout, Cin, 1, 1].
pub fn pointwise<T: Float>(tape: &mut Tape<T>, x: &Var, w: &Var) -> Result<Var> {
    let (n, h, wd, cin) = nhwc(x, "1×1 conv")?;
    let cout = match w.shape() {
        &[o, i, 1, 1] | &[o, i] if i == cin => o,
        s => {
            return Err(Error::Shape(format!(
                "1×1 conv: weight must be (Cout, {cin}, 1, 1), got {s:?}"
            )))
        }
    };
    let m = n * h * wd;
    let (xv, wv) = (tape.value(x), tape.value(w));
    let mut out = Buf::alloc(m * cout);
    par_rows_gemm(&mut out, &xv, &wv, m, cin, cout);
    let (xid, wid) = (x.id(), w.id());
    let need = tape.requires_grad(x) || tape.requires_grad(w);
    Ok(tape.push(&[n, h, wd, cout], out, need, move |out_id, gr| {
        let Some(dy) = gr.take(out_id) else {
            return Ok(());
        };
        gr.accumulate_uninit(wid, cout * cin, |acc, fresh| {
            // dW [Cout, Cin] (+)= dYᵀ [Cout, M] · X [M, Cin]
            if m == 0 {
                if fresh {
                    acc.fill(T::ZERO);
                }
                return;
            }
            if sgemm_weight_grad(acc, &dy, &xv, m, cout, cin, !fresh) {
                return;
            }
            gemm_t(
                cout,
                cin,
                m,
                acc,
                !fresh,
                View::t(&dy, cout),
                View::rows(&xv, cin),
                true,
            );
        });
        // dX [M, Cin] (+)= dY [M, Cout] · W [Cout, Cin], into the gradient in place.
        gr.accumulate_uninit(xid, m * cin, |acc, fresh| {
            par_rows_gemm_nn(acc, &dy, &wv, m, cout, cin, !fresh)
        });
        Ok(())
    }))
}

/// Reinterprets a slice of `T` as f32 when `T` is f32.
pub(crate) fn as_f32<T: Float>(v: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (same type id), so the layout is identical.
        .then(|| unsafe { std::slice::from_raw_parts(v.as_ptr() as *const f32, v.len()) })
}

pub(crate) fn as_f32_mut<T: Float>(v: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (same type id), so the layout is identical.
        .then(|| unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut f32, v.len()) })
}

/// f32 on AVX-512: out [M, N] = a [M, K] · wᵀ (w [N, K]) with the inference path's packed
/// register-tile kernel, over row blocks across the pool. False (nothing done) otherwise.
fn packed_rows_gemm<T: Float>(
    out: &mut [T],
    a: &[T],
    w: &[T],
    m: usize,
    k: usize,
    n: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        if let (Some(out), Some(a), Some(w)) = (as_f32_mut(out), as_f32(a), as_f32(w)) {
            let zero = vec![0f32; n];
            let packed = crate::backend::cpu::pointwise::PackedPointwise::new(w, &zero, n, k);
            let rows = row_block(m);
            out[..m * n]
                .par_chunks_mut(rows * n)
                .zip(a[..m * k].par_chunks(rows * k))
                .for_each(|(o, a)| packed.forward(a, o.len() / n, o, false, false));
            return true;
        }
    }
    let _ = (out, a, w, m, k, n);
    false
}

/// out [M, N] = a [M, K] · wᵀ (w [N, K]), split over row blocks across the pool.
pub(crate) fn par_rows_gemm<T: Float>(
    out: &mut [T],
    a: &[T],
    w: &[T],
    m: usize,
    k: usize,
    n: usize,
) {
    if packed_rows_gemm(out, a, w, m, k, n) {
        return;
    }
    let rows = row_block(m);
    out.par_chunks_mut(rows * n)
        .zip(a.par_chunks(rows * k))
        .for_each(|(o, a)| {
            let r = o.len() / n;
            gemm_t(r, n, k, o, false, View::rows(a, k), View::t(w, k), false);
        });
}

/// f32 on AVX-512: acc [n_out, n_in] (+)= dyᵀ · x (dy [m, n_out], x [m, n_in]; added when
/// `accumulate`, else overwritten) with the strided AVX-512 GEMM (x packed once). False (nothing
/// done) otherwise.
pub(crate) fn sgemm_weight_grad<T: Float>(
    acc: &mut [T],
    dy: &[T],
    x: &[T],
    m: usize,
    n_out: usize,
    n_in: usize,
    accumulate: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::backend::cpu::sgemm;
        if sgemm::available() {
            if let (Some(acc), Some(dy), Some(x)) = (as_f32_mut(acc), as_f32(dy), as_f32(x)) {
                let pb = sgemm::PackedB::pack(x, m, n_in, n_in, 1);
                let b = pb.panels();
                sgemm::gemm(n_out, sgemm::AView::t(dy, n_out), b, acc, n_in, accumulate);
                return true;
            }
        }
    }
    let _ = (acc, dy, x, m, n_out, n_in);
    false
}

/// f32 on AVX-512: out [m, n_out] = x [m, n_in] · wᵀ (+ bias) (w [n_out, n_in]) with the strided
/// AVX-512 GEMM (wᵀ packed per call into pooled memory). False (nothing done) otherwise.
pub(crate) fn sgemm_linear<T: Float>(
    out: &mut [T],
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    m: usize,
    n_in: usize,
    n_out: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::backend::cpu::sgemm;
        if sgemm::available() {
            if let (Some(out), Some(x), Some(w)) = (as_f32_mut(out), as_f32(x), as_f32(w)) {
                let b = match bias.map(as_f32) {
                    Some(None) => return false,
                    Some(Some(b)) => Some(b),
                    None => None,
                };
                let pb = sgemm::PackedB::pack(w, n_in, n_out, 1, n_in);
                sgemm_bias(out, x, pb.panels(), b, m, n_in, n_out);
                return true;
            }
        }
    }
    let _ = (out, x, w, bias, m, n_in, n_out);
    false
}

/// out [m, n_out] = x [m, n_in] · B (+ bias) on the AVX-512 GEMM (B as panels, e.g. a packed Wᵀ).
#[cfg(target_arch = "x86_64")]
pub(crate) fn sgemm_bias(
    out: &mut [f32],
    x: &[f32],
    b: crate::backend::cpu::sgemm::Panels,
    bias: Option<&[f32]>,
    m: usize,
    n_in: usize,
    n_out: usize,
) {
    use crate::backend::cpu::sgemm;
    if let Some(bias) = bias {
        out[..m * n_out].par_chunks_mut(n_out * 64).for_each(|o| {
            o.chunks_exact_mut(n_out)
                .for_each(|r| r.copy_from_slice(bias))
        });
    }
    sgemm::gemm(
        m,
        sgemm::AView::rows(x, n_in),
        b,
        out,
        n_out,
        bias.is_some(),
    );
}

/// out [M, N] (+ out when `accumulate`) = a [M, K] · w (w [K, N]), split over row blocks across
/// the pool; with `accumulate` false every element of out is written.
pub(crate) fn par_rows_gemm_nn<T: Float>(
    out: &mut [T],
    a: &[T],
    w: &[T],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    if m * n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(T::ZERO);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use crate::backend::cpu::sgemm;
        if sgemm::available() {
            if let (Some(out), Some(a), Some(w)) = (as_f32_mut(out), as_f32(a), as_f32(w)) {
                let pb = sgemm::PackedB::pack(w, k, n, n, 1);
                sgemm::gemm(m, sgemm::AView::rows(a, k), pb.panels(), out, n, accumulate);
                return;
            }
        }
    }
    let rows = row_block(m);
    out.par_chunks_mut(rows * n)
        .zip(a.par_chunks(rows * k))
        .for_each(|(o, a)| {
            let r = o.len() / n;
            gemm_t(
                r,
                n,
                k,
                o,
                accumulate,
                View::rows(a, k),
                View::rows(w, n),
                false,
            );
        });
}

pub(crate) fn row_block(m: usize) -> usize {
    let t = crate::threads::num_threads().max(1);
    m.div_ceil(4 * t).clamp(64, 4096).min(m.max(1))
}

/// Depthwise convolution without bias: x [N, H, W, C], w [C, 1, k, k] → [N, OH, OW, C].
pub fn depthwise<T: Float>(
    tape: &mut Tape<T>,
    x: &Var,
    w: &Var,
    stride: usize,
    padding: Padding,
) -> Result<Var> {
    let (n, h, wd, c) = nhwc(x, "depthwise conv")?;
    let k = match w.shape() {
        &[cc, 1, kh, kw] if cc == c && kh == kw => kh,
        s => {
            return Err(Error::Shape(format!(
                "depthwise conv: weight must be ({c}, 1, k, k), got {s:?}"
            )))
        }
    };
    let g = Geom::new(h, wd, k, stride, padding)?;
    let kk = k * k;
    let wv = tape.value(w);
    // Tap-major copy [k², C] so the inner loop runs over contiguous channels.
    let mut wt = vec![T::ZERO; kk * c];
    for ch in 0..c {
        for t in 0..kk {
            wt[t * c + ch] = wv[ch * kk + t];
        }
    }
    let xv = tape.value(x);
    let (per_in, per_out) = (h * wd * c, g.oh * g.ow * c);
    let mut out = Buf::alloc(n * per_out);
    out.par_chunks_mut(per_out)
        .zip(xv.par_chunks(per_in))
        .for_each(|(o, xs)| dw_forward(xs, &wt, o, &g, c));
    let (xid, wid) = (x.id(), w.id());
    let need = tape.requires_grad(x) || tape.requires_grad(w);
    Ok(
        tape.push(&[n, g.oh, g.ow, c], out, need, move |out_id, gr| {
            let Some(dy) = gr.take(out_id) else {
                return Ok(());
            };
            let (want_x, want_w) = (gr.wants(xid), gr.wants(wid));
            let mut dx = Buf::alloc(if want_x { n * per_in } else { 0 });
            if want_x {
                dx.par_chunks_mut(per_in).enumerate().for_each(|(s, dxs)| {
                    dw_backward_x(&wt, &dy[s * per_out..(s + 1) * per_out], dxs, &g, c)
                });
            }
            let dwt = if want_w {
                in_sample_groups(n, kk * c, |range, acc| {
                    for s in range {
                        dw_backward_w(
                            &xv[s * per_in..(s + 1) * per_in],
                            &dy[s * per_out..(s + 1) * per_out],
                            acc,
                            &g,
                            c,
                        );
                    }
                })
            } else {
                Vec::new()
            };
            if want_w {
                gr.accumulate(wid, c * kk, |acc, _| {
                    for ch in 0..c {
                        for t in 0..kk {
                            acc[ch * kk + t] += dwt[t * c + ch];
                        }
                    }
                });
            }
            if want_x {
                gr.add(xid, dx);
            }
            Ok(())
        }),
    )
}

/// Samples per partial sum of a weight gradient.
const SAMPLE_GROUP: usize = 4;

/// Σ over samples of a weight gradient of `len` values: `f(samples, acc)` accumulates a fixed
/// group of samples into a zeroed partial, the groups run across the pool and their partials are
/// added in group order, so the result does not depend on the thread count or work stealing.
fn in_sample_groups<T: Float>(
    n: usize,
    len: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync,
) -> Vec<T> {
    let parts: Vec<Vec<T>> = (0..n.div_ceil(SAMPLE_GROUP))
        .into_par_iter()
        .map(|gi| {
            let mut acc = vec![T::ZERO; len];
            f(
                gi * SAMPLE_GROUP..((gi + 1) * SAMPLE_GROUP).min(n),
                &mut acc,
            );
            acc
        })
        .collect();
    let mut parts = parts.into_iter();
    let first = parts.next().unwrap_or_else(|| vec![T::ZERO; len]);
    parts.fold(first, |mut a, b| {
        a.iter_mut().zip(&b).for_each(|(x, y)| *x += *y);
        a
    })
}

/// Channels per register-resident accumulator block of the depthwise kernels.
const LANES: usize = 16;

/// acc[l] += a[l] · b[l] over one block of `LANES` channels.
#[inline(always)]
fn fma_block<T: Float>(acc: &mut [T; LANES], a: &[T], b: &[T]) {
    let (a, b) = (&a[..LANES], &b[..LANES]);
    for l in 0..LANES {
        acc[l] += a[l] * b[l];
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn dw_forward<T: Float>(x: &[T], wt: &[T], out: &mut [T], g: &Geom, c: usize) {
    let full = c - c % LANES;
    for oy in 0..g.oh {
        let (iy0, ky0, ky1) = g.span(oy, g.pad_top, g.h);
        for ox in 0..g.ow {
            let (ix0, kx0, kx1) = g.span(ox, g.pad_left, g.w);
            let o = &mut out[(oy * g.ow + ox) * c..][..c];
            // Blocks of LANES channels accumulate over all taps in registers.
            for c0 in (0..full).step_by(LANES) {
                let mut acc = [T::ZERO; LANES];
                for ky in ky0..ky1 {
                    let iy = (iy0 + ky as isize) as usize;
                    for kx in kx0..kx1 {
                        let ix = (ix0 + kx as isize) as usize;
                        let at = (iy * g.w + ix) * c + c0;
                        fma_block(&mut acc, &x[at..], &wt[(ky * g.k + kx) * c + c0..]);
                    }
                }
                o[c0..c0 + LANES].copy_from_slice(&acc);
            }
            let o = &mut o[full..];
            o.iter_mut().for_each(|v| *v = T::ZERO);
            for ky in ky0..ky1 {
                let iy = (iy0 + ky as isize) as usize;
                for kx in kx0..kx1 {
                    let ix = (ix0 + kx as isize) as usize;
                    let xr = &x[(iy * g.w + ix) * c + full..][..c - full];
                    let wr = &wt[(ky * g.k + kx) * c + full..][..c - full];
                    for ((o, &a), &b) in o.iter_mut().zip(xr).zip(wr) {
                        *o += a * b;
                    }
                }
            }
        }
    }
}

/// Input-gradient of one sample, gathered per input pixel (every element of `dx` is written):
/// dx[iy, ix] = Σ over the taps (ky, kx) that reach it of dy[oy, ox] · w[ky, kx].
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn dw_backward_x<T: Float>(wt: &[T], dy: &[T], dx: &mut [T], g: &Geom, c: usize) {
    let full = c - c % LANES;
    let s = g.stride as isize;
    // Output row / column reached from input coordinate i through tap t, if any.
    let src = |i: usize, t: usize, pad: usize, o_len: usize| -> Option<usize> {
        let num = i as isize + pad as isize - t as isize;
        (num >= 0 && num % s == 0 && ((num / s) as usize) < o_len).then(|| (num / s) as usize)
    };
    let mut taps: Vec<(usize, usize)> = Vec::with_capacity(g.k * g.k);
    for iy in 0..g.h {
        for ix in 0..g.w {
            taps.clear();
            for ky in 0..g.k {
                let Some(oy) = src(iy, ky, g.pad_top, g.oh) else {
                    continue;
                };
                for kx in 0..g.k {
                    if let Some(ox) = src(ix, kx, g.pad_left, g.ow) {
                        taps.push(((oy * g.ow + ox) * c, (ky * g.k + kx) * c));
                    }
                }
            }
            let d = &mut dx[(iy * g.w + ix) * c..][..c];
            for c0 in (0..full).step_by(LANES) {
                let mut acc = [T::ZERO; LANES];
                for &(po, pw) in &taps {
                    fma_block(&mut acc, &dy[po + c0..], &wt[pw + c0..]);
                }
                d[c0..c0 + LANES].copy_from_slice(&acc);
            }
            for ch in full..c {
                d[ch] = taps
                    .iter()
                    .fold(T::ZERO, |a, &(po, pw)| a + dy[po + ch] * wt[pw + ch]);
            }
        }
    }
}

/// Weight-gradient of one sample: dwt[t, ch] += Σ over output pixels of x · dy.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn dw_backward_w<T: Float>(x: &[T], dy: &[T], dwt: &mut [T], g: &Geom, c: usize) {
    for oy in 0..g.oh {
        let (iy0, ky0, ky1) = g.span(oy, g.pad_top, g.h);
        for ox in 0..g.ow {
            let (ix0, kx0, kx1) = g.span(ox, g.pad_left, g.w);
            let d = &dy[(oy * g.ow + ox) * c..][..c];
            for ky in ky0..ky1 {
                let iy = (iy0 + ky as isize) as usize;
                for kx in kx0..kx1 {
                    let ix = (ix0 + kx as isize) as usize;
                    let xr = &x[(iy * g.w + ix) * c..][..c];
                    let dr = &mut dwt[(ky * g.k + kx) * c..][..c];
                    for ((o, &a), &b) in dr.iter_mut().zip(d).zip(xr) {
                        *o += a * b;
                    }
                }
            }
        }
    }
}

/// Explicit zero padding of a 2-D convolution's input (torch `F.pad(x, (left, right, top, bottom))`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pad2d {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Pad2d {
    /// `p` on every side (torch `padding=p`).
    pub fn same(p: usize) -> Self {
        Pad2d {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

impl Geom {
    /// Geometry with explicit (possibly asymmetric) padding: OH = (H + top + bottom − k) / stride + 1.
    pub fn explicit(h: usize, w: usize, k: usize, stride: usize, pad: Pad2d) -> Result<Self> {
        if k == 0 || stride == 0 {
            return Err(Error::InvalidArgument(format!(
                "convolution kernel {k} / stride {stride} must be positive"
            )));
        }
        let (ph, pw) = (h + pad.top + pad.bottom, w + pad.left + pad.right);
        if h == 0 || w == 0 || ph < k || pw < k {
            return Err(Error::Shape(format!(
                "a {k}×{k} stride-{stride} convolution of a {h}×{w} input padded by {pad:?} has no output"
            )));
        }
        Ok(Geom {
            h,
            w,
            k,
            stride,
            pad_top: pad.top,
            pad_left: pad.left,
            oh: (ph - k) / stride + 1,
            ow: (pw - k) / stride + 1,
        })
    }
}

/// Elements of one im2col block (output rows are processed in blocks of about this size).
const COLS_BLOCK: usize = 1 << 20;

/// Tap-major im2col of output rows `oy0..oy1` of one NHWC sample:
/// cols[p, (ky·k + kx)·C + ci] (contiguous channel runs; zeros where the tap falls in the padding).
pub(crate) fn im2col_taps<T: Float>(
    x: &[T],
    c: usize,
    g: &Geom,
    oy0: usize,
    oy1: usize,
    cols: &mut [T],
) {
    let (k, kdim) = (g.k, c * g.k * g.k);
    for oy in oy0..oy1 {
        let (iy0, ky0, ky1) = g.span(oy, g.pad_top, g.h);
        for ox in 0..g.ow {
            let (ix0, kx0, kx1) = g.span(ox, g.pad_left, g.w);
            let row = &mut cols[((oy - oy0) * g.ow + ox) * kdim..][..kdim];
            for ky in 0..k {
                let seg = &mut row[ky * k * c..][..k * c];
                if ky < ky0 || ky >= ky1 {
                    seg.iter_mut().for_each(|v| *v = T::ZERO);
                    continue;
                }
                let iy = (iy0 + ky as isize) as usize;
                seg[..kx0 * c].iter_mut().for_each(|v| *v = T::ZERO);
                seg[kx1 * c..].iter_mut().for_each(|v| *v = T::ZERO);
                if kx1 > kx0 {
                    let ix = (ix0 + kx0 as isize) as usize;
                    seg[kx0 * c..kx1 * c]
                        .copy_from_slice(&x[(iy * g.w + ix) * c..][..(kx1 - kx0) * c]);
                }
            }
        }
    }
}

/// Adjoint of [`im2col_taps`]: dx += col2im(dcols) for output rows `oy0..oy1`.
fn col2im_taps<T: Float>(dcols: &[T], c: usize, g: &Geom, oy0: usize, oy1: usize, dx: &mut [T]) {
    let (k, kdim) = (g.k, c * g.k * g.k);
    for oy in oy0..oy1 {
        let (iy0, ky0, ky1) = g.span(oy, g.pad_top, g.h);
        for ox in 0..g.ow {
            let (ix0, kx0, kx1) = g.span(ox, g.pad_left, g.w);
            if kx1 <= kx0 {
                continue;
            }
            let row = &dcols[((oy - oy0) * g.ow + ox) * kdim..][..kdim];
            for ky in ky0..ky1 {
                let iy = (iy0 + ky as isize) as usize;
                let ix = (ix0 + kx0 as isize) as usize;
                let src = &row[(ky * k + kx0) * c..(ky * k + kx1) * c];
                let dst = &mut dx[(iy * g.w + ix) * c..][..src.len()];
                dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
            }
        }
    }
}

/// Output rows per im2col block of a geometry with `kdim` columns.
pub(crate) fn block_rows(g: &Geom, kdim: usize) -> usize {
    (COLS_BLOCK / (g.ow * kdim).max(1)).clamp(1, g.oh)
}

/// Dense convolution with explicit padding and optional bias (torch
/// `F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride)`): x [N, H, W, Cin],
/// w [Cout, Cin, k, k], b [Cout] → [N, OH, OW, Cout]. 1 × 1 stride-1 unpadded convolutions take the
/// pointwise GEMM path; others an im2col (in blocks of output rows) + GEMM.
pub fn conv2d_pad<T: Float>(
    tape: &mut Tape<T>,
    x: &Var,
    w: &Var,
    b: Option<&Var>,
    stride: usize,
    pad: Pad2d,
) -> Result<Var> {
    let (n, h, wd, cin) = nhwc(x, "conv2d_pad")?;
    let (cout, k) = match w.shape() {
        &[o, i, kh, kw] if i == cin && kh == kw => (o, kh),
        s => {
            return Err(Error::Shape(format!(
                "conv2d_pad: weight must be (Cout, {cin}, k, k) for input {:?}, got {s:?}",
                x.shape()
            )))
        }
    };
    if x.numel() == 0 || cout == 0 {
        return Err(Error::Shape(format!(
            "conv2d_pad: empty input {:?} or weight {:?}",
            x.shape(),
            w.shape()
        )));
    }
    if let Some(b) = b {
        if b.shape() != [cout] {
            return Err(Error::Shape(format!(
                "conv2d_pad: bias must be [{cout}], got {:?}",
                b.shape()
            )));
        }
    }
    let g = Geom::explicit(h, wd, k, stride, pad)?;
    if k == 1 && stride == 1 && pad == Pad2d::same(0) {
        let y = pointwise(tape, x, w)?;
        return match b {
            Some(b) => bias_add(tape, &y, b),
            None => Ok(y),
        };
    }
    #[cfg(target_arch = "x86_64")]
    if k == 3 && stride == 1 && as_f32(&[T::ZERO]).is_some() && winograd::available() {
        return conv3x3_winograd(tape, x, w, b, &g, n, cin, cout);
    }
    let threads = crate::threads::num_threads().max(1);
    let kk = k * k;
    let kdim = cin * kk;
    let wv = tape.value(w);
    // Tap-major weight [Cout, k·k·Cin] matching the im2col layout.
    let mut wp = Buf::<T>::alloc(cout * kdim);
    wp.par_chunks_mut(kdim).enumerate().for_each(|(o, row)| {
        for ci in 0..cin {
            for t in 0..kk {
                row[t * cin + ci] = wv[(o * cin + ci) * kk + t];
            }
        }
    });
    let bv = b.map(|b| tape.value(b));
    let packed = packed_weights(&wp, bv.as_deref().map(|b| &b[..]), cout, kdim);
    let xv = tape.value(x);
    let (p, per_in) = (g.oh * g.ow, h * wd * cin);
    let rows = block_rows(&g, kdim);
    let blocks = g.oh.div_ceil(rows);
    let mut out = Buf::alloc(n * p * cout);
    {
        let tasks: Vec<(usize, usize, &mut [T])> = out
            .chunks_mut(p * cout)
            .enumerate()
            .flat_map(|(s, o)| {
                o.chunks_mut(rows * g.ow * cout)
                    .enumerate()
                    .map(move |(bi, ob)| (s, bi, ob))
            })
            .collect();
        let inner = n * blocks < threads;
        tasks.into_par_iter().for_each(|(s, bi, ob)| {
            let (oy0, oy1) = (bi * rows, ((bi + 1) * rows).min(g.oh));
            let m = (oy1 - oy0) * g.ow;
            let mut cols = Buf::<T>::alloc(m * kdim);
            im2col_taps(
                &xv[s * per_in..(s + 1) * per_in],
                cin,
                &g,
                oy0,
                oy1,
                &mut cols,
            );
            if let (Some(pk), Some(c32), Some(o32)) = (&packed, as_f32(&cols), as_f32_mut(ob)) {
                pk.forward(c32, m, o32, false, false);
                return;
            }
            if let Some(bv) = &bv {
                for r in ob.chunks_exact_mut(cout) {
                    r.copy_from_slice(bv);
                }
            }
            gemm_t(
                m,
                cout,
                kdim,
                ob,
                bv.is_some(),
                View::rows(&cols, kdim),
                View::t(&wp, kdim),
                inner,
            );
        });
    }
    let (xid, wid, bid) = (x.id(), w.id(), b.map(|b| b.id()));
    let need =
        tape.requires_grad(x) || tape.requires_grad(w) || b.is_some_and(|b| tape.requires_grad(b));
    Ok(
        tape.push(&[n, g.oh, g.ow, cout], out, need, move |out_id, gr| {
            let Some(dy) = gr.take(out_id) else {
                return Ok(());
            };
            let per_out = p * cout;
            if let Some(bid) = bid {
                if gr.wants(bid) {
                    let db = row_sums(&dy, cout);
                    gr.accumulate(bid, cout, |acc, _| {
                        acc.iter_mut().zip(&db).for_each(|(a, &v)| *a += v)
                    });
                }
            }
            if gr.wants(wid) {
                let inner = n.div_ceil(SAMPLE_GROUP) < threads;
                let dwp = in_sample_groups(n, cout * kdim, |range, acc| {
                    let mut cols = Buf::<T>::alloc(rows * g.ow * kdim);
                    for s in range {
                        let xs = &xv[s * per_in..(s + 1) * per_in];
                        for bi in 0..blocks {
                            let (oy0, oy1) = (bi * rows, ((bi + 1) * rows).min(g.oh));
                            let m = (oy1 - oy0) * g.ow;
                            im2col_taps(xs, cin, &g, oy0, oy1, &mut cols);
                            let d = &dy[s * per_out + oy0 * g.ow * cout..][..m * cout];
                            // dWp [Cout, kdim] += dYᵀ [Cout, m] · cols [m, kdim]
                            gemm_t(
                                cout,
                                kdim,
                                m,
                                acc,
                                true,
                                View::t(d, cout),
                                View::rows(&cols, kdim),
                                inner,
                            );
                        }
                    }
                });
                gr.accumulate(wid, cout * kdim, |acc, _| {
                    acc.par_chunks_mut(cin * kk)
                        .enumerate()
                        .for_each(|(o, row)| {
                            for ci in 0..cin {
                                for t in 0..kk {
                                    row[ci * kk + t] += dwp[o * kdim + t * cin + ci];
                                }
                            }
                        })
                });
            }
            if gr.wants(xid) {
                let inner = n < threads;
                // f32 / AVX-512 with a task per core: Wpᵀ [kdim, Cout] packed once for the
                // register-tile kernel.
                let packed_t = if inner || as_f32(&wp).is_none() {
                    None
                } else {
                    let mut wpt = Buf::<T>::alloc(kdim * cout);
                    wpt.par_chunks_mut(cout).enumerate().for_each(|(j, row)| {
                        for (o, v) in row.iter_mut().enumerate() {
                            *v = wp[o * kdim + j];
                        }
                    });
                    packed_weights(&wpt, None, kdim, cout)
                };
                let mut dx = Buf::zeros(n * per_in);
                dx.par_chunks_mut(per_in).enumerate().for_each(|(s, dxs)| {
                    let mut cols = Buf::<T>::alloc(rows * g.ow * kdim);
                    for bi in 0..blocks {
                        let (oy0, oy1) = (bi * rows, ((bi + 1) * rows).min(g.oh));
                        let m = (oy1 - oy0) * g.ow;
                        let d = &dy[s * per_out + oy0 * g.ow * cout..][..m * cout];
                        // dcols [m, kdim] = dY [m, Cout] · Wp [Cout, kdim]
                        if let (Some(pk), Some(d32), Some(c32)) =
                            (&packed_t, as_f32(d), as_f32_mut(&mut cols))
                        {
                            pk.forward(d32, m, c32, false, false);
                            col2im_taps(&cols, cin, &g, oy0, oy1, dxs);
                            continue;
                        }
                        gemm_t(
                            m,
                            kdim,
                            cout,
                            &mut cols,
                            false,
                            View::rows(d, cout),
                            View::rows(&wp, kdim),
                            inner,
                        );
                        col2im_taps(&cols, cin, &g, oy0, oy1, dxs);
                    }
                });
                gr.add(xid, dx);
            }
            Ok(())
        }),
    )
}

#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::winograd;

/// f32 on AVX-512: a 3 × 3 stride-1 convolution (any padding) by Winograd F(2 × 2, 3 × 3) or F(4 × 4, 3 × 3)
/// ([`winograd`]), forward and backward.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn conv3x3_winograd<T: Float>(
    tape: &mut Tape<T>,
    x: &Var,
    w: &Var,
    b: Option<&Var>,
    g: &Geom,
    n: usize,
    cin: usize,
    cout: usize,
) -> Result<Var> {
    let wg = winograd::WinoGeom {
        n,
        h: g.h,
        w: g.w,
        cin,
        cout,
        pt: g.pad_top,
        pl: g.pad_left,
        oh: g.oh,
        ow: g.ow,
    };
    let (xv, wv) = (tape.value(x), tape.value(w));
    let bv = b.map(|b| tape.value(b));
    fn f<T: Float>(v: &[T]) -> &[f32] {
        as_f32(v).expect("winograd: f32 only (checked by the caller)")
    }
    let mut out = Buf::<T>::alloc(n * g.oh * g.ow * cout);
    {
        let o = as_f32_mut(&mut out).expect("f32");
        winograd::forward_from_weights(&wg, f(&xv), f(&wv), bv.as_deref().map(|b| f(b)), o);
    }
    let (xid, wid, bid) = (x.id(), w.id(), b.map(|b| b.id()));
    let need =
        tape.requires_grad(x) || tape.requires_grad(w) || b.is_some_and(|b| tape.requires_grad(b));
    Ok(
        tape.push(&[n, g.oh, g.ow, cout], out, need, move |out_id, gr| {
            let Some(dy) = gr.take(out_id) else {
                return Ok(());
            };
            if let Some(bid) = bid {
                if gr.wants(bid) {
                    let db = row_sums(&dy, cout);
                    gr.accumulate(bid, cout, |acc, _| {
                        acc.iter_mut().zip(&db).for_each(|(a, &v)| *a += v)
                    });
                }
            }
            let (want_x, want_w) = (gr.wants(xid), gr.wants(wid));
            if !want_x && !want_w {
                return Ok(());
            }
            let mut dx = want_x.then(|| Buf::<T>::zeros(xv.len()));
            let dxs = dx.as_mut().map(|d| as_f32_mut(d).expect("f32"));
            if want_w {
                gr.accumulate_uninit(wid, cout * cin * 9, |acc, fresh| {
                    let acc = as_f32_mut(acc).expect("f32");
                    winograd::backward_into(&wg, f(&xv), f(&wv), f(&dy), dxs, Some((acc, !fresh)));
                });
            } else {
                winograd::backward_into(&wg, f(&xv), f(&wv), f(&dy), dxs, None);
            }
            drop(dy);
            if let Some(dx) = dx {
                gr.add(xid, dx);
            }
            Ok(())
        }),
    )
}

/// f32 on AVX-512: `w` [N, K] (and the bias, zeros if none) packed for the inference path's
/// register-tile kernel; None otherwise (the `gemm` crate is used).
pub(crate) fn packed_weights<T: Float>(
    w: &[T],
    bias: Option<&[T]>,
    n: usize,
    k: usize,
) -> Option<crate::backend::cpu::pointwise::PackedPointwise> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let w = as_f32(w)?;
        let zero = vec![0f32; n];
        let b = match bias {
            Some(b) => as_f32(b)?,
            None => &zero,
        };
        return Some(crate::backend::cpu::pointwise::PackedPointwise::new(
            w, b, n, k,
        ));
    }
    let _ = (w, bias, n, k);
    None
}

/// Rows per partial sum of a per-column reduction.
const SUM_ROWS: usize = 256;

/// Σ over the rows of a [M, C] matrix, per column: fixed chunks of rows summed across the pool,
/// the partials added in chunk order (independent of thread count and work stealing).
pub(crate) fn row_sums<T: Float>(x: &[T], c: usize) -> Vec<T> {
    let parts: Vec<Vec<T>> = x
        .par_chunks(SUM_ROWS * c.max(1))
        .map(|rows| {
            let mut acc = vec![T::ZERO; c];
            for r in rows.chunks_exact(c) {
                acc.iter_mut().zip(r).for_each(|(a, &v)| *a += v);
            }
            acc
        })
        .collect();
    let mut acc = vec![T::ZERO; c];
    for p in parts {
        acc.iter_mut().zip(&p).for_each(|(a, &v)| *a += v);
    }
    acc
}

/// y = x + b over the last axis (b [C]).
fn bias_add<T: Float>(tape: &mut Tape<T>, x: &Var, b: &Var) -> Result<Var> {
    let c = *x.shape().last().unwrap_or(&0);
    if b.shape() != [c] {
        return Err(Error::Shape(format!(
            "bias add: bias must be [{c}] for {:?}, got {:?}",
            x.shape(),
            b.shape()
        )));
    }
    let (xv, bv) = (tape.value(x), tape.value(b));
    let mut out = Buf::alloc(xv.len());
    out.par_chunks_mut(SUM_ROWS * c.max(1))
        .zip(xv.par_chunks(SUM_ROWS * c.max(1)))
        .for_each(|(o, xs)| {
            for (or, xr) in o.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                for ((o, &x), &b) in or.iter_mut().zip(xr).zip(bv.iter()) {
                    *o = x + b;
                }
            }
        });
    let (xid, bid) = (x.id(), b.id());
    let need = tape.requires_grad(x) || tape.requires_grad(b);
    Ok(tape.push(x.shape(), out, need, move |out_id, gr| {
        if let Some(d) = gr.take(out_id) {
            if gr.wants(bid) {
                let db = row_sums(&d, c);
                gr.accumulate(bid, c, |acc, _| {
                    acc.iter_mut().zip(&db).for_each(|(a, &v)| *a += v)
                });
            }
            gr.add(xid, d);
        }
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive depthwise forward / input-gradient / weight-gradient of one sample (OIHW-free: tap-major w).
    fn naive(x: &[f64], wt: &[f64], dy: &[f64], g: &Geom, c: usize) -> [Vec<f64>; 3] {
        let (mut y, mut dx, mut dw) = (
            vec![0.0; g.oh * g.ow * c],
            vec![0.0; g.h * g.w * c],
            vec![0.0; g.k * g.k * c],
        );
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                        let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                        if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                            continue;
                        }
                        let (pi, po, t) = (
                            (iy as usize * g.w + ix as usize) * c,
                            (oy * g.ow + ox) * c,
                            (ky * g.k + kx) * c,
                        );
                        for ch in 0..c {
                            y[po + ch] += x[pi + ch] * wt[t + ch];
                            dx[pi + ch] += dy[po + ch] * wt[t + ch];
                            dw[t + ch] += dy[po + ch] * x[pi + ch];
                        }
                    }
                }
            }
        }
        [y, dx, dw]
    }

    #[test]
    fn depthwise_kernels_match_naive_with_full_and_tail_channel_blocks() {
        let c = LANES + 5;
        for (k, s, pad, h, w) in [
            (3, 1, Padding::Symmetric, 5, 6),
            (3, 2, Padding::Symmetric, 7, 6),
            (5, 2, Padding::TfSame, 8, 9),
            (5, 1, Padding::TfSame, 4, 5),
        ] {
            let g = Geom::new(h, w, k, s, pad).unwrap();
            let val = |i: usize, m: usize| ((i * 37 + m) % 101) as f64 / 50.0 - 1.0;
            let x: Vec<f64> = (0..h * w * c).map(|i| val(i, 1)).collect();
            let wt: Vec<f64> = (0..k * k * c).map(|i| val(i, 2)).collect();
            let dy: Vec<f64> = (0..g.oh * g.ow * c).map(|i| val(i, 3)).collect();
            let [ey, edx, edw] = naive(&x, &wt, &dy, &g, c);
            let mut y = vec![f64::NAN; ey.len()];
            dw_forward(&x, &wt, &mut y, &g, c);
            let mut dx = vec![f64::NAN; edx.len()];
            dw_backward_x(&wt, &dy, &mut dx, &g, c);
            let mut dw = vec![0.0; edw.len()];
            dw_backward_w(&x, &dy, &mut dw, &g, c);
            for (name, got, want) in [("y", &y, &ey), ("dx", &dx, &edx), ("dw", &dw, &edw)] {
                let err = got
                    .iter()
                    .zip(want.iter())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(
                    err < 1e-12,
                    "k{k} s{s} {pad:?} {h}×{w}: {name} off by {err}"
                );
            }
        }
    }
}
