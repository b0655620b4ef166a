//! 3 × 3 stride-1 convolution by Winograd's minimal filtering F(2 × 2, 3 × 3) (Lavin & Gray 2016),
//! forward and backward, NHWC f32 on AVX-512.
//!
//! Each 2 × 2 block of outputs ("tile") reads a 4 × 4 input patch d. With
//! Bᵀ = [[1,0,−1,0],[0,1,1,0],[0,−1,1,0],[0,1,0,−1]], G = [[1,0,0],[½,½,½],[½,−½,½],[0,0,1]],
//! Aᵀ = [[1,1,1,0],[0,1,−1,−1]]:
//!   V = Bᵀ d B (per input channel), U = G g Gᵀ (per channel pair),
//!   M[ξ] = V[ξ] · U[ξ] (16 GEMMs [tiles, Cin] · [Cin, Cout]), Y = Aᵀ M A (+ bias).
//! The products take 16 multiplies per tile and channel pair instead of 36 (2.25× fewer).
//! Backward: dM = A dY Aᵀ; dV[ξ] = dM[ξ] · U[ξ]ᵀ, dX += B dV Bᵀ (patches overlap, added in order);
//! dU[ξ] = V[ξ]ᵀ · dM[ξ] summed over tiles, dW = Gᵀ dU G.
//! Tiles are processed in chunks of whole tile rows (V, M of a chunk ≤ [`CHUNK_FLOATS`]), so the
//! scratch memory stays small; every sum runs in a fixed order (deterministic for any thread
//! count).

#![cfg(target_arch = "x86_64")]

use super::sgemm::{self, AView, PackedB, Panels, NR};
use crate::autograd::Buf;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Scratch floats per chunk buffer (16 × tiles × channels).
const CHUNK_FLOATS: usize = 1 << 21;

/// A 3 × 3 stride-1 convolution's shape: x [n, h, w, cin] padded by (pt, pl) on top / left,
/// output [n, oh, ow, cout].
#[derive(Clone, Copy, Debug)]
pub struct WinoGeom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub pt: usize,
    pub pl: usize,
    pub oh: usize,
    pub ow: usize,
}

impl WinoGeom {
    fn th(&self) -> usize {
        self.oh.div_ceil(2)
    }
    fn tw(&self) -> usize {
        self.ow.div_ceil(2)
    }
    /// Tile rows per chunk (over the flattened n × th tile rows) for `floats` per buffer.
    fn chunk_rows(&self, floats: usize) -> usize {
        let per_row = 16 * self.tw() * self.cin.max(self.cout);
        (floats / per_row.max(1)).clamp(1, self.n * self.th())
    }
}

pub fn available() -> bool {
    sgemm::available()
}

/// Seconds per backward phase (tests print them).
#[cfg(test)]
pub(crate) static PHASES: std::sync::Mutex<[f64; 7]> = std::sync::Mutex::new([0.0; 7]);

#[cfg(test)]
fn phase(i: usize, t: &mut std::time::Instant) {
    let now = std::time::Instant::now();
    PHASES.lock().unwrap()[i] += (now - *t).as_secs_f64();
    *t = now;
}
#[cfg(not(test))]
#[inline(always)]
fn phase(_: usize, _: &mut std::time::Instant) {}

struct SendPtr(*mut f32);
// SAFETY: every use writes disjoint elements from different tasks (documented at each use).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Transformed weights packed as GEMM panels: `over_out` — B[ξ] = U[ξ] [Cin, Cout] (panels over
/// Cout, the forward); otherwise B[ξ] = U[ξ]ᵀ [Cout, Cin] (panels over Cin, the input gradient).
/// Layout [panel][ξ][k][32].
pub struct WinoWeights {
    data: Buf<f32>,
    k: usize,
    n: usize,
}

impl WinoWeights {
    /// `w` OIHW [cout, cin, 3, 3].
    pub fn new(w: &[f32], cout: usize, cin: usize, over_out: bool) -> Self {
        assert_eq!(w.len(), cout * cin * 9, "winograd: weight shape");
        assert!(available(), "winograd: AVX-512 required");
        let (k, n) = if over_out { (cin, cout) } else { (cout, cin) };
        let np = n.div_ceil(NR);
        let mut data = Buf::<f32>::alloc(np * 16 * k * NR);
        data.par_chunks_mut(16 * k * NR)
            .enumerate()
            .for_each(|(p, blk)| {
                // SAFETY: AVX-512F present (asserted above); gathers stay inside w (lanes past n are
                // masked off), stores inside blk (asserted in the function).
                unsafe { pack_transformed(blk, w, cin, k, n, p, over_out) }
            });
        WinoWeights { data, k, n }
    }

    fn panels(&self, xi: usize) -> Panels<'_> {
        Panels {
            data: &self.data,
            k: self.k,
            n: self.n,
            offset: xi * self.k * NR,
            stride: 16 * self.k * NR,
            ld: NR,
        }
    }
}

/// The 16 transforms (G g Gᵀ) of 16 kernels, g[t] = tap t of each lane's kernel.
#[target_feature(enable = "avx512f")]
unsafe fn transform_kernel16(g: &[__m512; 9]) -> [__m512; 16] {
    let half = _mm512_set1_ps(0.5);
    let mut q = [[_mm512_setzero_ps(); 3]; 4];
    for j in 0..3 {
        let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
        q[0][j] = g0;
        q[1][j] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(g0, g1), g2));
        q[2][j] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(g0, g1), g2));
        q[3][j] = g2;
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for r in 0..4 {
        let [q0, q1, q2] = q[r];
        u[r * 4] = q0;
        u[r * 4 + 1] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(q0, q1), q2));
        u[r * 4 + 2] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(q0, q1), q2));
        u[r * 4 + 3] = q2;
    }
    u
}

/// Panel `p` of the transformed weights ([ξ][k][32]); see [`WinoWeights::new`].
#[target_feature(enable = "avx512f")]
unsafe fn pack_transformed(
    blk: &mut [f32],
    w: &[f32],
    cin: usize,
    k: usize,
    n: usize,
    p: usize,
    over_out: bool,
) {
    assert!(blk.len() >= 16 * k * NR);
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // Lane l of a half reads kernel (co, ci) = (j0 + l, kk) or (kk, j0 + l).
    let step = if over_out { cin * 9 } else { 9 };
    let idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(step as i32));
    let quarters: Vec<(usize, u16)> = (0..NR / 16)
        .map(|q| {
            let j0 = p * NR + q * 16;
            let cols = n.saturating_sub(j0).min(16);
            (
                cols,
                if cols == 16 {
                    0xFFFF
                } else {
                    ((1u32 << cols) - 1) as u16
                },
            )
        })
        .collect();
    // kk outer: each (ξ, kk) row of the panel (64 floats) is written whole before moving on.
    for kk in 0..k {
        for (q, &(cols, mask)) in quarters.iter().enumerate() {
            let j0 = p * NR + q * 16;
            let mut u = [_mm512_setzero_ps(); 16];
            if cols > 0 {
                let base = if over_out {
                    (j0 * cin + kk) * 9
                } else {
                    (kk * cin + j0) * 9
                };
                let mut g = [_mm512_setzero_ps(); 9];
                for (t, gv) in g.iter_mut().enumerate() {
                    *gv = _mm512_mask_i32gather_ps::<4>(
                        _mm512_setzero_ps(),
                        mask,
                        idx,
                        w.as_ptr().add(base + t),
                    );
                }
                u = transform_kernel16(&g);
            }
            for (xi, &uv) in u.iter().enumerate() {
                _mm512_storeu_ps(blk.as_mut_ptr().add((xi * k + kk) * NR + q * 16), uv);
            }
        }
    }
}

/// dW row co (OIHW, cin × 9 floats) from dUᵀ [16][cout][cin]: Gᵀ dU G, 16 input channels at a time;
/// written (or added to the row when `add`).
#[target_feature(enable = "avx512f")]
unsafe fn weight_grad_row(
    dw: &mut [f32],
    du: &[f32],
    cin: usize,
    cout: usize,
    co: usize,
    add: bool,
) {
    assert!(dw.len() >= cin * 9 && du.len() >= 16 * cin * cout && co < cout);
    let half = _mm512_set1_ps(0.5);
    let idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(9),
    );
    let mut ci = 0;
    while ci < cin {
        let mask = lane_mask(ci, cin);
        let mut d = [_mm512_setzero_ps(); 16];
        for (xi, dv) in d.iter_mut().enumerate() {
            *dv = _mm512_maskz_loadu_ps(mask, du.as_ptr().add((xi * cout + co) * cin + ci));
        }
        let mut h = [[_mm512_setzero_ps(); 4]; 3];
        for b in 0..4 {
            let (d0, d1, d2, d3) = (d[b], d[4 + b], d[8 + b], d[12 + b]);
            let s12 = _mm512_mul_ps(half, _mm512_add_ps(d1, d2));
            h[0][b] = _mm512_add_ps(d0, s12);
            h[1][b] = _mm512_mul_ps(half, _mm512_sub_ps(d1, d2));
            h[2][b] = _mm512_add_ps(s12, d3);
        }
        let mut taps = [_mm512_setzero_ps(); 9];
        for i in 0..3 {
            let [h0, h1, h2, h3] = h[i];
            let s12 = _mm512_mul_ps(half, _mm512_add_ps(h1, h2));
            taps[i * 3] = _mm512_add_ps(h0, s12);
            taps[i * 3 + 1] = _mm512_mul_ps(half, _mm512_sub_ps(h1, h2));
            taps[i * 3 + 2] = _mm512_add_ps(s12, h3);
        }
        // Lane l, tap t → dw[(ci + l)·9 + t] (inside dw: lanes past cin are masked off).
        let base = dw.as_mut_ptr().add(ci * 9);
        for (t, &tv) in taps.iter().enumerate() {
            let v = if add {
                _mm512_add_ps(
                    tv,
                    _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, base.add(t)),
                )
            } else {
                tv
            };
            _mm512_mask_i32scatter_ps::<4>(base.add(t), mask, idx, v);
        }
        ci += 16;
    }
}

/// Lane mask of the 16-channel group starting at `c0` of `c` channels.
#[inline]
fn lane_mask(c0: usize, c: usize) -> u16 {
    let left = c - c0;
    if left >= 16 {
        0xFFFF
    } else {
        ((1u32 << left) - 1) as u16
    }
}

/// V = Bᵀ d B for one tile: `d[r·4 + c]` points at the patch's pixel rows (None in the padding);
/// V[ξ] written at `v + ξ·vs`.
#[target_feature(enable = "avx512f")]
unsafe fn input_tile(d: &[Option<*const f32>; 16], c: usize, v: *mut f32, vs: usize) {
    let mut c0 = 0;
    while c0 < c {
        let m = lane_mask(c0, c);
        let mut x = [_mm512_setzero_ps(); 16];
        for (i, p) in d.iter().enumerate() {
            if let Some(p) = p {
                x[i] = _mm512_maskz_loadu_ps(m, p.add(c0));
            }
        }
        // t = Bᵀ d (over rows), then V = t B (over columns).
        let mut t = [_mm512_setzero_ps(); 16];
        for col in 0..4 {
            let (d0, d1, d2, d3) = (x[col], x[4 + col], x[8 + col], x[12 + col]);
            t[col] = _mm512_sub_ps(d0, d2);
            t[4 + col] = _mm512_add_ps(d1, d2);
            t[8 + col] = _mm512_sub_ps(d2, d1);
            t[12 + col] = _mm512_sub_ps(d1, d3);
        }
        for r in 0..4 {
            let (t0, t1, t2, t3) = (t[r * 4], t[r * 4 + 1], t[r * 4 + 2], t[r * 4 + 3]);
            let o = [
                _mm512_sub_ps(t0, t2),
                _mm512_add_ps(t1, t2),
                _mm512_sub_ps(t2, t1),
                _mm512_sub_ps(t1, t3),
            ];
            for (j, &ov) in o.iter().enumerate() {
                _mm512_mask_storeu_ps(v.add((r * 4 + j) * vs + c0), m, ov);
            }
        }
        c0 += 16;
    }
}

/// Y = Aᵀ M A (+ bias) for one tile: M[ξ] at `mm + ξ·ms`; the 2 × 2 outputs at `y[r·2 + c]`
/// (None outside the output).
#[target_feature(enable = "avx512f")]
unsafe fn output_tile(
    mm: *const f32,
    ms: usize,
    c: usize,
    bias: Option<&[f32]>,
    y: &[Option<*mut f32>; 4],
) {
    let mut c0 = 0;
    while c0 < c {
        let mask = lane_mask(c0, c);
        let mut m = [_mm512_setzero_ps(); 16];
        for (xi, mv) in m.iter_mut().enumerate() {
            *mv = _mm512_maskz_loadu_ps(mask, mm.add(xi * ms + c0));
        }
        // s = Aᵀ M (rows), y = s A (columns).
        let mut s = [_mm512_setzero_ps(); 8];
        for col in 0..4 {
            let (m0, m1, m2, m3) = (m[col], m[4 + col], m[8 + col], m[12 + col]);
            s[col] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
            s[4 + col] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
        }
        let b = match bias {
            Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(c0)),
            None => _mm512_setzero_ps(),
        };
        for r in 0..2 {
            let (s0, s1, s2, s3) = (s[r * 4], s[r * 4 + 1], s[r * 4 + 2], s[r * 4 + 3]);
            let o0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), s2), b);
            let o1 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s1, s2), s3), b);
            if let Some(p) = y[r * 2] {
                _mm512_mask_storeu_ps(p.add(c0), mask, o0);
            }
            if let Some(p) = y[r * 2 + 1] {
                _mm512_mask_storeu_ps(p.add(c0), mask, o1);
            }
        }
        c0 += 16;
    }
}

/// dM = A dY Aᵀ for one tile: dY rows at `dy[r·2 + c]` (None outside the output); dM[ξ] at
/// `dm + ξ·ms`.
#[target_feature(enable = "avx512f")]
unsafe fn output_tile_grad(dy: &[Option<*const f32>; 4], c: usize, dm: *mut f32, ms: usize) {
    let mut c0 = 0;
    while c0 < c {
        let mask = lane_mask(c0, c);
        let mut g = [_mm512_setzero_ps(); 4];
        for (i, p) in dy.iter().enumerate() {
            if let Some(p) = p {
                g[i] = _mm512_maskz_loadu_ps(mask, p.add(c0));
            }
        }
        // e[a][c] = Σ_r Aᵀ[r][a] dY[r][c]
        let mut e = [_mm512_setzero_ps(); 8];
        for col in 0..2 {
            let (y0, y1) = (g[col], g[2 + col]);
            e[col] = y0;
            e[2 + col] = _mm512_add_ps(y0, y1);
            e[4 + col] = _mm512_sub_ps(y0, y1);
            e[6 + col] = _mm512_sub_ps(_mm512_setzero_ps(), y1);
        }
        for a in 0..4 {
            let (e0, e1) = (e[a * 2], e[a * 2 + 1]);
            let o = [
                e0,
                _mm512_add_ps(e0, e1),
                _mm512_sub_ps(e0, e1),
                _mm512_sub_ps(_mm512_setzero_ps(), e1),
            ];
            for (b, &ov) in o.iter().enumerate() {
                _mm512_mask_storeu_ps(dm.add((a * 4 + b) * ms + c0), mask, ov);
            }
        }
        c0 += 16;
    }
}

/// dd = B dV Bᵀ for one tile, channels c0..c1, added to the patch rows `d[r·4 + c]` (None in the
/// padding); dV[ξ] at `dv + ξ·vs`.
#[target_feature(enable = "avx512f")]
unsafe fn input_tile_grad(
    dv: *const f32,
    vs: usize,
    c0: usize,
    c1: usize,
    d: &[Option<*mut f32>; 16],
) {
    let mut cc = c0;
    while cc < c1 {
        let mask = lane_mask(cc, c1);
        let mut v = [_mm512_setzero_ps(); 16];
        for (xi, vv) in v.iter_mut().enumerate() {
            *vv = _mm512_maskz_loadu_ps(mask, dv.add(xi * vs + cc));
        }
        // f[r][b] = Σ_a Bᵀ[a][r] dV[a][b]
        let mut f = [_mm512_setzero_ps(); 16];
        for b in 0..4 {
            let (v0, v1, v2, v3) = (v[b], v[4 + b], v[8 + b], v[12 + b]);
            f[b] = v0;
            f[4 + b] = _mm512_add_ps(_mm512_sub_ps(v1, v2), v3);
            f[8 + b] = _mm512_add_ps(_mm512_sub_ps(v1, v0), v2);
            f[12 + b] = _mm512_sub_ps(_mm512_setzero_ps(), v3);
        }
        for r in 0..4 {
            let (f0, f1, f2, f3) = (f[r * 4], f[r * 4 + 1], f[r * 4 + 2], f[r * 4 + 3]);
            let o = [
                f0,
                _mm512_add_ps(_mm512_sub_ps(f1, f2), f3),
                _mm512_add_ps(_mm512_sub_ps(f1, f0), f2),
                _mm512_sub_ps(_mm512_setzero_ps(), f3),
            ];
            for (j, &ov) in o.iter().enumerate() {
                if let Some(p) = d[r * 4 + j] {
                    let q = p.add(cc);
                    _mm512_mask_storeu_ps(
                        q,
                        mask,
                        _mm512_add_ps(_mm512_maskz_loadu_ps(mask, q), ov),
                    );
                }
            }
        }
        cc += 16;
    }
}

/// Pixel pointers of tile (s, ty, tx)'s input patch (None in the padding).
fn patch<P: Copy>(
    g: &WinoGeom,
    base: P,
    s: usize,
    ty: usize,
    tx: usize,
    at: impl Fn(P, usize) -> P,
) -> [Option<P>; 16] {
    let mut d = [None; 16];
    for r in 0..4 {
        let iy = (2 * ty + r) as isize - g.pt as isize;
        if iy < 0 || iy >= g.h as isize {
            continue;
        }
        for c in 0..4 {
            let ix = (2 * tx + c) as isize - g.pl as isize;
            if ix < 0 || ix >= g.w as isize {
                continue;
            }
            d[r * 4 + c] = Some(at(
                base,
                ((s * g.h + iy as usize) * g.w + ix as usize) * g.cin,
            ));
        }
    }
    d
}

/// Output pixel pointers of tile (s, ty, tx) (None past the output's edge).
fn out_pixels<P: Copy>(
    g: &WinoGeom,
    base: P,
    s: usize,
    ty: usize,
    tx: usize,
    at: impl Fn(P, usize) -> P,
) -> [Option<P>; 4] {
    let mut y = [None; 4];
    for r in 0..2 {
        for c in 0..2 {
            let (oy, ox) = (2 * ty + r, 2 * tx + c);
            if oy < g.oh && ox < g.ow {
                y[r * 2 + c] = Some(at(base, ((s * g.oh + oy) * g.ow + ox) * g.cout));
            }
        }
    }
    y
}

/// V of the chunk's tiles (tile rows r0..r1 of the flattened n × th rows) into v [16][tc][cin].
fn input_transform(g: &WinoGeom, x: &[f32], r0: usize, r1: usize, v: &mut [f32], tc: usize) {
    let (th, tw, cin) = (g.th(), g.tw(), g.cin);
    let vp = SendPtr(v.as_mut_ptr());
    let vp = &vp;
    let xp = x.as_ptr() as usize;
    (r0..r1).into_par_iter().for_each(|r| {
        let (s, ty) = (r / th, r % th);
        for tx in 0..tw {
            let t = (r - r0) * tw + tx;
            let d = patch(g, xp, s, ty, tx, |b, o| b + o * 4).map(|p| p.map(|a| a as *const f32));
            // SAFETY: AVX-512F checked by the caller; the patch pointers are pixels of x; each tile
            // writes its own row t of every V[ξ] (disjoint across tasks), within v's 16·tc·cin.
            unsafe { input_tile(&d, cin, vp.0.add(t * cin), tc * cin) };
        }
    });
}

/// Forward: out [n, oh, ow, cout] = conv(x, w) + bias.
pub fn forward(g: &WinoGeom, x: &[f32], wt: &WinoWeights, bias: Option<&[f32]>, out: &mut [f32]) {
    forward_chunked(g, x, wt, bias, out, CHUNK_FLOATS)
}

fn forward_chunked(
    g: &WinoGeom,
    x: &[f32],
    wt: &WinoWeights,
    bias: Option<&[f32]>,
    out: &mut [f32],
    chunk: usize,
) {
    assert!(
        wt.k == g.cin && wt.n == g.cout,
        "winograd: weights for another shape"
    );
    let (cin, cout) = (g.cin, g.cout);
    forward_driver(g, x, bias, out, chunk, |v, m, tc| {
        m.par_chunks_mut(tc * cout)
            .take(16)
            .enumerate()
            .for_each(|(xi, mx)| {
                let a = AView::rows(&v[xi * tc * cin..(xi + 1) * tc * cin], cin);
                sgemm::gemm_seq(tc, a, wt.panels(xi), mx, cout, false);
            });
    });
}

/// The forward's chunk loop: V of each chunk of tiles, `products(V, M, tiles)` filling
/// M[ξ] = V[ξ] · U[ξ] ([16][tiles][cout]), then Y = Aᵀ M A + bias.
fn forward_driver(
    g: &WinoGeom,
    x: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    chunk: usize,
    products: impl Fn(&[f32], &mut [f32], usize),
) {
    assert!(available(), "winograd: AVX-512 required");
    assert!(
        x.len() >= g.n * g.h * g.w * g.cin && out.len() >= g.n * g.oh * g.ow * g.cout,
        "winograd: buffers too short"
    );
    assert!(
        bias.is_none_or(|b| b.len() == g.cout),
        "winograd: bias length"
    );
    let (th, tw, cin, cout) = (g.th(), g.tw(), g.cin, g.cout);
    let rows = g.chunk_rows(chunk);
    let tcmax = rows * tw;
    let mut v = Buf::<f32>::alloc(16 * tcmax * cin);
    let mut m = Buf::<f32>::alloc(16 * tcmax * cout);
    let op = out.as_mut_ptr() as usize;
    let mut r0 = 0;
    while r0 < g.n * th {
        let r1 = (r0 + rows).min(g.n * th);
        let tc = (r1 - r0) * tw;
        input_transform(g, x, r0, r1, &mut v, tc);
        products(&v, &mut m, tc);
        let mp = m.as_ptr() as usize;
        (r0..r1).into_par_iter().for_each(|r| {
            let (s, ty) = (r / th, r % th);
            for tx in 0..tw {
                let t = (r - r0) * tw + tx;
                let y = out_pixels(g, op, s, ty, tx, |b, o| b + o * 4)
                    .map(|p| p.map(|a| a as *mut f32));
                // SAFETY: AVX-512F checked; M rows of this chunk are inside m; each tile writes
                // its own output pixels (disjoint across tiles), inside out (asserted).
                unsafe { output_tile((mp as *const f32).add(t * cout), tc * cout, cout, bias, &y) };
            }
        });
        r0 = r1;
    }
}

/// Forward from the OIHW weights: out [n, oh, ow, cout] = conv(x, w) + bias. Each task transforms
/// one 64-channel panel of U (16 × cin × 64 floats, L2-sized) and runs its 16 products at once, so
/// the transformed weights never travel to memory (they are 16/9 of the weights, rewritten per call).
pub fn forward_fused(g: &WinoGeom, x: &[f32], w: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    forward_fused_chunked(g, x, w, bias, out, CHUNK_FLOATS)
}

/// Forward from the OIHW weights, fused ([`forward_fused`]) when there are few tiles (each panel
/// task rereads V, 16 × tiles × cin: cheaper than the transformed weights' round trip to memory
/// up to ~128 tiles, e.g. the U-Net's 12 × 12 level at batch 2; measured slower in the model at 288), else with the weights transformed
/// once ([`forward`]).
pub fn forward_from_weights(
    g: &WinoGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    if g.n * g.th() * g.tw() <= FUSED_MAX_TILES {
        forward_fused(g, x, w, bias, out)
    } else {
        let wt = WinoWeights::new(w, g.cout, g.cin, true);
        forward(g, x, &wt, bias, out)
    }
}

/// See [`forward_from_weights`].
const FUSED_MAX_TILES: usize = 128;

fn forward_fused_chunked(
    g: &WinoGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    chunk: usize,
) {
    let (cin, cout) = (g.cin, g.cout);
    assert!(w.len() == cout * cin * 9, "winograd: weight shape");
    let np = cout.div_ceil(NR);
    forward_driver(g, x, bias, out, chunk, |v, m, tc| {
        let mp = SendPtr(m.as_mut_ptr());
        let mp = &mp;
        (0..np).into_par_iter().for_each(|p| {
            let mut blk = Buf::<f32>::alloc(16 * cin * NR);
            // SAFETY: AVX-512F checked; gathers inside w (masked past cout), stores inside blk.
            unsafe { pack_transformed(&mut blk, w, cin, cin, cout, p, true) };
            let cols = (cout - p * NR).min(NR);
            for xi in 0..16 {
                let b = Panels {
                    data: &blk,
                    k: cin,
                    n: cols,
                    offset: xi * cin * NR,
                    stride: 16 * cin * NR,
                    ld: NR,
                };
                let a = AView::rows(&v[xi * tc * cin..(xi + 1) * tc * cin], cin);
                // SAFETY: M[ξ] rows 0..tc, columns p·64..p·64+cols lie inside m; this task is the
                // only writer of panel p's columns.
                unsafe {
                    sgemm::gemm_raw(tc, a, b, mp.0.add(xi * tc * cout + p * NR), cout, false)
                };
            }
        });
    });
}

/// Backward: dx (if given, [n, h, w, cin]) += ∂/∂x, and returns ∂/∂w in OIHW if `want_w`.
pub fn backward(
    g: &WinoGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    want_w: bool,
) -> Option<Vec<f32>> {
    let mut dw = want_w.then(|| vec![0f32; g.cout * g.cin * 9]);
    backward_chunked(
        g,
        x,
        w,
        dy,
        dx,
        dw.as_deref_mut().map(|d| (d, false)),
        CHUNK_FLOATS,
    );
    dw
}

/// Backward into caller buffers: dx (if given) += ∂/∂x; `dw` (OIHW) = ∂/∂w, or += when its flag is
/// set.
pub fn backward_into(
    g: &WinoGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: Option<(&mut [f32], bool)>,
) {
    backward_chunked(g, x, w, dy, dx, dw, CHUNK_FLOATS)
}

fn backward_chunked(
    g: &WinoGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    mut dx: Option<&mut [f32]>,
    dw_out: Option<(&mut [f32], bool)>,
    chunk: usize,
) {
    assert!(available(), "winograd: AVX-512 required");
    let want_w = dw_out.is_some();
    let (th, tw, cin, cout) = (g.th(), g.tw(), g.cin, g.cout);
    assert!(
        x.len() >= g.n * g.h * g.w * cin
            && dy.len() >= g.n * g.oh * g.ow * cout
            && w.len() == cout * cin * 9
            && dx.as_ref().is_none_or(|d| d.len() >= g.n * g.h * g.w * cin)
            && dw_out.as_ref().is_none_or(|d| d.0.len() == cout * cin * 9),
        "winograd: buffers too short"
    );
    let rows = g.chunk_rows(chunk);
    let tcmax = rows * tw;
    let mut clock = std::time::Instant::now();
    let wb = dx.as_ref().map(|_| WinoWeights::new(w, cout, cin, false));
    phase(0, &mut clock);
    let mut v = Buf::<f32>::alloc(16 * tcmax * cin);
    let mut dm = Buf::<f32>::alloc(16 * tcmax * cout);
    let mut du = if want_w {
        Some(Buf::<f32>::alloc(16 * cin * cout))
    } else {
        None
    };
    let threads = crate::threads::num_threads().max(1);
    let cblk = cin.div_ceil(2 * threads).next_multiple_of(16).max(16);
    let dyp = dy.as_ptr() as usize;
    let mut r0 = 0;
    while r0 < g.n * th {
        let r1 = (r0 + rows).min(g.n * th);
        let tc = (r1 - r0) * tw;
        let dmp = SendPtr(dm.as_mut_ptr());
        let dmp = &dmp;
        (r0..r1).into_par_iter().for_each(|r| {
            let (s, ty) = (r / th, r % th);
            for tx in 0..tw {
                let t = (r - r0) * tw + tx;
                let y = out_pixels(g, dyp, s, ty, tx, |b, o| b + o * 4)
                    .map(|p| p.map(|a| a as *const f32));
                // SAFETY: AVX-512F checked; dY pixels inside dy (asserted); row t of every dM[ξ]
                // is this tile's own (disjoint across tasks).
                unsafe { output_tile_grad(&y, cout, dmp.0.add(t * cout), tc * cout) };
            }
        });
        phase(1, &mut clock);
        if let Some(du) = du.as_mut() {
            input_transform(g, x, r0, r1, &mut v, tc);
            phase(2, &mut clock);
            let first = r0 == 0;
            du.par_chunks_mut(cin * cout)
                .enumerate()
                .for_each(|(xi, dux)| {
                    // dUᵀ[ξ] [cout, cin] (+)= dM[ξ]ᵀ · V[ξ]
                    let pb = PackedB::pack(&v[xi * tc * cin..(xi + 1) * tc * cin], tc, cin, cin, 1);
                    let a = AView::t(&dm[xi * tc * cout..(xi + 1) * tc * cout], cout);
                    sgemm::gemm_seq(cout, a, pb.panels(), dux, cin, !first);
                });
            phase(3, &mut clock);
        }
        if let (Some(dx), Some(wb)) = (dx.as_deref_mut(), wb.as_ref()) {
            // dV[ξ] = dM[ξ] · U[ξ]ᵀ into v (V is no longer needed for this chunk).
            v.par_chunks_mut(tc * cin)
                .take(16)
                .enumerate()
                .for_each(|(xi, dvx)| {
                    let a = AView::rows(&dm[xi * tc * cout..(xi + 1) * tc * cout], cout);
                    sgemm::gemm_seq(tc, a, wb.panels(xi), dvx, cin, false);
                });
            phase(4, &mut clock);
            let dxp = dx.as_mut_ptr() as usize;
            let vp = v.as_ptr() as usize;
            (0..cin.div_ceil(cblk)).into_par_iter().for_each(|cb| {
                let (c0, c1) = (cb * cblk, ((cb + 1) * cblk).min(cin));
                for r in r0..r1 {
                    let (s, ty) = (r / th, r % th);
                    for tx in 0..tw {
                        let t = (r - r0) * tw + tx;
                        let d = patch(g, dxp, s, ty, tx, |b, o| b + o * 4)
                            .map(|p| p.map(|a| a as *mut f32));
                        // SAFETY: AVX-512F checked; patch pixels inside dx (asserted); this task
                        // only touches channels c0..c1 (disjoint across tasks), tiles in order.
                        unsafe {
                            input_tile_grad((vp as *const f32).add(t * cin), tc * cin, c0, c1, &d)
                        };
                    }
                }
            });
            phase(5, &mut clock);
        }
        r0 = r1;
    }
    let _ = &mut clock;
    if let (Some(du), Some((dw, add))) = (du, dw_out) {
        let mut clock = clock;
        dw.par_chunks_mut(cin * 9)
            .enumerate()
            .for_each(|(co, row)| {
                // SAFETY: AVX-512F checked; bounds asserted in the function.
                unsafe { weight_grad_row(row, &du, cin, cout, co, add) }
            });
        phase(6, &mut clock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::cpu::test_rnd as rnd_vec;

    /// Direct convolution in f64: y, and the adjoints dx, dw of a given dy.
    fn direct(
        g: &WinoGeom,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        dy: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut y = vec![0f64; g.n * g.oh * g.ow * g.cout];
        let mut dx = vec![0f64; x.len()];
        let mut dw = vec![0f64; w.len()];
        for s in 0..g.n {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for co in 0..g.cout {
                        let o = ((s * g.oh + oy) * g.ow + ox) * g.cout + co;
                        let mut acc = b[co] as f64;
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let iy = (oy + ky) as isize - g.pt as isize;
                                let ix = (ox + kx) as isize - g.pl as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                for ci in 0..g.cin {
                                    let xi =
                                        ((s * g.h + iy as usize) * g.w + ix as usize) * g.cin + ci;
                                    let wi = ((co * g.cin + ci) * 3 + ky) * 3 + kx;
                                    acc += x[xi] as f64 * w[wi] as f64;
                                    dx[xi] += dy[o] as f64 * w[wi] as f64;
                                    dw[wi] += dy[o] as f64 * x[xi] as f64;
                                }
                            }
                        }
                        y[o] = acc;
                    }
                }
            }
        }
        (y, dx, dw)
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
        for (i, (&gv, &wv)) in got.iter().zip(want).enumerate() {
            assert!(
                (gv as f64 - wv).abs() <= 2e-6 * scale,
                "{what}[{i}]: {gv} vs {wv} (scale {scale})"
            );
        }
    }

    #[test]
    fn forward_and_backward_match_direct_convolution() {
        if !available() {
            return;
        }
        // Odd and even sizes, symmetric / asymmetric / no padding, channel tails, several chunks.
        for &(n, h, w, cin, cout, pt, pb, pl, pr) in &[
            (2, 6, 6, 3, 5, 1, 1, 1, 1),
            (1, 7, 5, 17, 33, 1, 1, 1, 1),
            (2, 5, 8, 20, 18, 0, 0, 0, 0),
            (1, 9, 6, 16, 40, 0, 1, 1, 0),
            (3, 4, 4, 40, 7, 2, 0, 0, 2),
        ] {
            let oh = h + pt + pb - 2;
            let ow = w + pl + pr - 2;
            let g = WinoGeom {
                n,
                h,
                w,
                cin,
                cout,
                pt,
                pl,
                oh,
                ow,
            };
            let x = rnd_vec(n * h * w * cin, 1);
            let wt = rnd_vec(cout * cin * 9, 2);
            let b = rnd_vec(cout, 3);
            let dy = rnd_vec(n * oh * ow * cout, 4);
            let (y, dx, dw) = direct(&g, &x, &wt, &b, &dy);
            // One chunk, and chunks of one tile row.
            for chunk in [CHUNK_FLOATS, 1] {
                let mut out = vec![f32::NAN; y.len()];
                let wf = WinoWeights::new(&wt, cout, cin, true);
                forward_chunked(&g, &x, &wf, Some(&b), &mut out, chunk);
                close(&out, &y, "y");
                let mut out2 = vec![f32::NAN; y.len()];
                forward_fused_chunked(&g, &x, &wt, Some(&b), &mut out2, chunk);
                assert_eq!(out, out2, "fused forward");
                let mut gx = vec![0f32; x.len()];
                let mut gw = vec![0f32; wt.len()];
                backward_chunked(
                    &g,
                    &x,
                    &wt,
                    &dy,
                    Some(&mut gx),
                    Some((&mut gw, false)),
                    chunk,
                );
                close(&gx, &dx, "dx");
                close(&gw, &dw, "dw");
                // Without dx, added onto a copy: exactly twice (x + x is exact).
                let mut gw2 = gw.clone();
                backward_chunked(&g, &x, &wt, &dy, None, Some((&mut gw2, true)), chunk);
                let twice: Vec<f32> = gw.iter().map(|v| 2.0 * v).collect();
                assert_eq!(gw2, twice);
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::autograd::Tape;
    use crate::ops::conv::Pad2d;
    use crate::ops::packed::{conv2d_packed, PackedConv};

    /// `cargo test --release --lib winograd_speed -- --ignored --nocapture`: the U-Net's 3 × 3
    /// convolutions at batch 2, Winograd vs the packed im2col kernel (prints; no assertion).
    #[test]
    #[ignore]
    fn winograd_speed() {
        crate::threads::install(|| {
            for &(s, cin, cout) in &[
                (48usize, 256usize, 256usize),
                (48, 768, 256),
                (24, 512, 512),
                (24, 1280, 512),
                (12, 768, 768),
                (12, 1536, 768),
            ] {
                let n = 2;
                let x: Vec<f32> = (0..n * s * s * cin).map(|i| (i % 7) as f32 * 0.1).collect();
                let w: Vec<f32> = (0..cout * cin * 9).map(|i| (i % 5) as f32 * 0.01).collect();
                let b = vec![0.1f32; cout];
                let flops = 2.0 * (n * s * s * cin * cout * 9) as f64;
                let g = WinoGeom {
                    n,
                    h: s,
                    w: s,
                    cin,
                    cout,
                    pt: 1,
                    pl: 1,
                    oh: s,
                    ow: s,
                };
                let mut out = vec![0f32; n * s * s * cout];
                let reps = 5;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    let wt = WinoWeights::new(&w, cout, cin, true);
                    forward(&g, &x, &wt, Some(&b), &mut out);
                }
                let tw = t.elapsed().as_secs_f64() / reps as f64;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    forward_fused(&g, &x, &w, Some(&b), &mut out);
                }
                let tfu = t.elapsed().as_secs_f64() / reps as f64;
                println!("  fused forward {:.2} ms", tfu * 1e3);
                let t = std::time::Instant::now();
                let wt = WinoWeights::new(&w, cout, cin, true);
                let tt = t.elapsed().as_secs_f64();
                let pc = PackedConv::new(&w, Some(&b), cout, cin, 3).unwrap();
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    let mut tape = Tape::<f32>::no_grad();
                    let xv = tape.input(&[n, s, s, cin], x.clone(), false).unwrap();
                    let y = conv2d_packed(&mut tape, &xv, &pc, 1, Pad2d::same(1)).unwrap();
                    std::hint::black_box(tape.data(&y)[0]);
                }
                let td = t.elapsed().as_secs_f64() / reps as f64;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    let mut dx = vec![0f32; x.len()];
                    std::hint::black_box(backward(&g, &x, &w, &out, Some(&mut dx), true));
                }
                let tb = t.elapsed().as_secs_f64() / reps as f64;
                drop(wt);
                let ph = std::mem::take(&mut *PHASES.lock().unwrap());
                println!(
                    "  backward phases (ms): weights {:.2}, dM {:.2}, V {:.2}, dU gemm {:.2}, dV gemm {:.2}, dX scatter {:.2}, dW transform {:.2}",
                    ph[0] * 1e3 / reps as f64, ph[1] * 1e3 / reps as f64, ph[2] * 1e3 / reps as f64, ph[3] * 1e3 / reps as f64,
                    ph[4] * 1e3 / reps as f64, ph[5] * 1e3 / reps as f64, ph[6] * 1e3 / reps as f64
                );
                println!(
                    "{s}x{s} {cin}->{cout}: winograd {:.2} ms ({:.0} eff GFLOP/s; weight transform {:.2} ms), im2col cached {:.2} ms ({:.0}); winograd backward {:.2} ms ({:.0} eff)",
                    tw * 1e3, flops / tw / 1e9, tt * 1e3, td * 1e3, flops / td / 1e9, tb * 1e3, 2.0 * flops / tb / 1e9
                );
            }
        });
    }
}
