//! 3 × 3 stride-1 convolution by Winograd's minimal filtering (Lavin & Gray 2016), F(2 × 2, 3 × 3)
//! and F(4 × 4, 3 × 3), forward and backward, NHWC f32 on AVX-512.
//!
//! Each O × O block of outputs ("tile") reads a T × T input patch d (T = O + 2). With the scheme's
//! Bᵀ [T, T], G [T, 3] and Aᵀ [O, T]:
//!   V = Bᵀ d B (per input channel), U = G g Gᵀ (per channel pair),
//!   M[ξ] = V[ξ] · U[ξ] (T² GEMMs [tiles, Cin] · [Cin, Cout]), Y = Aᵀ M A (+ bias).
//! F(2 × 2, 3 × 3) (points 0, ±1; exact in binary) takes 16 multiplies per 4 outputs and channel
//! pair instead of 36 (2.25× fewer); F(4 × 4, 3 × 3) (points 0, ±1, ±2) 36 per 16 (4× fewer), at the
//! price of transformed weights 4× the weights and a slightly larger rounding error (≈ 1e-6
//! relative). F(4 × 4) is used when there are enough tiles to amortise its weights
//! ([`F4_MIN_TILES`]: the U-Net's 48 × 48 and 24 × 24 levels at batch 2), F(2 × 2) otherwise.
//! Backward: dM = A dY Aᵀ; dV[ξ] = dM[ξ] · U[ξ]ᵀ, dX += B dV Bᵀ (patches overlap, added in order);
//! dU[ξ] = V[ξ]ᵀ · dM[ξ] summed over tiles, dW = Gᵀ dU G.
//! Tiles are processed in chunks of whole tile rows (V, M of a chunk ≤ [`CHUNK_FLOATS`]), so the
//! scratch memory stays small; every sum runs in a fixed order (deterministic for any thread
//! count).

#![cfg(target_arch = "x86_64")]
// The tile loops index 2-D register arrays and flat T² buffers with the same (r, c).
#![allow(clippy::needless_range_loop)]

use super::sgemm::{self, AView, PackedB, Panels, NR};
use crate::autograd::Buf;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Scratch floats per chunk buffer (T² × tiles × channels).
const CHUNK_FLOATS: usize = 1 << 21;

/// A transform matrix (the scheme's rows × columns in the top-left corner).
type Mat = [[f32; 6]; 6];

/// A Winograd scheme F(O × O, 3 × 3).
pub(crate) trait Scheme: Sync {
    /// Outputs per tile side.
    const O: usize;
    /// Input patch side (O + 2); T² transformed elements per tile.
    const T: usize;
    /// Bᵀ [T, T].
    const BT: Mat;
    /// G [T, 3].
    const G: Mat;
    /// Aᵀ [O, T].
    const AT: Mat;
    /// [`input_tile`] etc. at this scheme's sizes.
    unsafe fn input_tile(x: *const f32, d: &Win, c: usize, v: *mut f32, vs: usize);
    unsafe fn output_tile(
        mm: *const f32,
        ms: usize,
        c: usize,
        b: Option<&[f32]>,
        y: *mut f32,
        yw: &Win,
    );
    unsafe fn output_tile_grad(dy: *const f32, yw: &Win, c: usize, dm: *mut f32, ms: usize);
    unsafe fn input_tile_grad(
        dv: *const f32,
        vs: usize,
        c0: usize,
        c1: usize,
        dx: *mut f32,
        d: &Win,
    );
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack_transformed(
        blk: &mut [f32],
        w: &[f32],
        cin: usize,
        rows: (usize, usize),
        n: usize,
        p: usize,
        over_out: bool,
    );
    unsafe fn weight_grad_row(
        dw: &mut [f32],
        du: &[f32],
        cin: usize,
        cout: usize,
        co: usize,
        add: bool,
    );
}

/// The [`Scheme`] methods: the generic tile functions at sizes T × T in, O × O out.
macro_rules! tile_fns {
    ($s:ty, $t:literal, $o:literal) => {
        unsafe fn input_tile(x: *const f32, d: &Win, c: usize, v: *mut f32, vs: usize) {
            input_tile::<$s, $t>(x, d, c, v, vs)
        }
        unsafe fn output_tile(
            mm: *const f32,
            ms: usize,
            c: usize,
            b: Option<&[f32]>,
            y: *mut f32,
            yw: &Win,
        ) {
            output_tile::<$s, $t, $o>(mm, ms, c, b, y, yw)
        }
        unsafe fn output_tile_grad(dy: *const f32, yw: &Win, c: usize, dm: *mut f32, ms: usize) {
            output_tile_grad::<$s, $t, $o>(dy, yw, c, dm, ms)
        }
        unsafe fn input_tile_grad(
            dv: *const f32,
            vs: usize,
            c0: usize,
            c1: usize,
            dx: *mut f32,
            d: &Win,
        ) {
            input_tile_grad::<$s, $t>(dv, vs, c0, c1, dx, d)
        }
        unsafe fn pack_transformed(
            blk: &mut [f32],
            w: &[f32],
            cin: usize,
            rows: (usize, usize),
            n: usize,
            p: usize,
            over_out: bool,
        ) {
            pack_transformed::<$s, $t>(blk, w, cin, rows, n, p, over_out)
        }
        unsafe fn weight_grad_row(
            dw: &mut [f32],
            du: &[f32],
            cin: usize,
            cout: usize,
            co: usize,
            add: bool,
        ) {
            weight_grad_row::<$s, $t>(dw, du, cin, cout, co, add)
        }
    };
}

/// F(2 × 2, 3 × 3).
pub(crate) struct F2;
impl Scheme for F2 {
    const O: usize = 2;
    const T: usize = 4;
    const BT: Mat = pad6(&[
        &[1.0, 0.0, -1.0, 0.0],
        &[0.0, 1.0, 1.0, 0.0],
        &[0.0, -1.0, 1.0, 0.0],
        &[0.0, 1.0, 0.0, -1.0],
    ]);
    const G: Mat = pad6(&[
        &[1.0, 0.0, 0.0],
        &[0.5, 0.5, 0.5],
        &[0.5, -0.5, 0.5],
        &[0.0, 0.0, 1.0],
    ]);
    const AT: Mat = pad6(&[&[1.0, 1.0, 1.0, 0.0], &[0.0, 1.0, -1.0, -1.0]]);
    tile_fns!(F2, 4, 2);
}

/// F(4 × 4, 3 × 3).
pub(crate) struct F4;
impl Scheme for F4 {
    const O: usize = 4;
    const T: usize = 6;
    const BT: Mat = pad6(&[
        &[4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        &[0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        &[0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        &[0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        &[0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        &[0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ]);
    const G: Mat = pad6(&[
        &[1.0 / 4.0, 0.0, 0.0],
        &[-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        &[-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        &[1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        &[1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        &[0.0, 0.0, 1.0],
    ]);
    const AT: Mat = pad6(&[
        &[1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        &[0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        &[0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        &[0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ]);
    tile_fns!(F4, 6, 4);
}

const fn pad6(rows: &[&[f32]]) -> Mat {
    let mut m = [[0.0; 6]; 6];
    let mut i = 0;
    while i < rows.len() {
        let mut j = 0;
        while j < rows[i].len() {
            m[i][j] = rows[i][j];
            j += 1;
        }
        i += 1;
    }
    m
}

/// Fewest F(4 × 4) tiles for which [`forward_from_weights`] / [`backward_into`] use F(4 × 4, 3 × 3)
/// (`winograd_speed`: F(4 × 4) is faster from the U-Net's 24 × 24 level at batch 2, 72 tiles, and
/// slower on its 12 × 12 level, 18 tiles, where its 36/16 larger transformed weights dominate).
pub const F4_MIN_TILES: usize = 64;

/// Whether `g` runs F(4 × 4, 3 × 3).
fn use_f4(g: &WinoGeom) -> bool {
    g.tiles::<F4>() >= F4_MIN_TILES
}

/// `body` for `$i` = 0, 1, …, min(n, 6) − 1, written out with literal indices (so every matrix
/// coefficient is a constant where it is used, whatever the loop unroller decides).
macro_rules! unroll6 {
    ($i:ident < $n:expr => $body:block) => {{
        let n = $n;
        { let $i = 0usize; if $i < n $body }
        { let $i = 1usize; if $i < n $body }
        { let $i = 2usize; if $i < n $body }
        { let $i = 3usize; if $i < n $body }
        { let $i = 4usize; if $i < n $body }
        { let $i = 5usize; if $i < n $body }
    }};
}

/// One column or row of a separable transform: out [NO] = m · x (`TR`: mᵀ · x) for x [NI]; zeros
/// skipped and ±1 as adds, so this is straight adds and FMAs.
#[inline(always)]
unsafe fn lin<const NI: usize, const NO: usize, const TR: bool>(
    m: &Mat,
    x: &[__m512; NI],
) -> [__m512; NO] {
    let mut out = [_mm512_setzero_ps(); NO];
    unroll6!(i < NO => {
        let mut acc: Option<__m512> = None;
        unroll6!(j < NI => {
            let c = if TR { m[j][i] } else { m[i][j] };
            if let (Some(&xj), true) = (x.get(j), c != 0.0) {
                acc = Some(match acc {
                    None if c == 1.0 => xj,
                    None if c == -1.0 => _mm512_sub_ps(_mm512_setzero_ps(), xj),
                    None => _mm512_mul_ps(_mm512_set1_ps(c), xj),
                    Some(a) if c == 1.0 => _mm512_add_ps(a, xj),
                    Some(a) if c == -1.0 => _mm512_sub_ps(a, xj),
                    Some(a) => _mm512_fmadd_ps(_mm512_set1_ps(c), xj, a),
                });
            }
        });
        if let Some(o) = out.get_mut(i) {
            *o = acc.unwrap_or(_mm512_setzero_ps());
        }
    });
    out
}

/// m · X · mᵀ (`TR`: mᵀ · X · m) of a square block X [NI, NI] of 16-lane vectors → [NO, NO].
#[inline(always)]
unsafe fn sandwich<const NI: usize, const NO: usize, const TR: bool>(
    m: &Mat,
    x: &[[__m512; NI]; NI],
) -> [[__m512; NO]; NO] {
    // No closures here: they would not inherit the caller's target features (the intrinsics
    // would become calls).
    let mut t = [[_mm512_setzero_ps(); NI]; NO];
    unroll6!(b < NI => {
        let mut col = [_mm512_setzero_ps(); NI];
        unroll6!(a < NI => {
            if let (Some(c), Some(xa)) = (col.get_mut(a), x.get(a)) {
                *c = xa[b];
            }
        });
        let o: [__m512; NO] = lin::<NI, NO, TR>(m, &col);
        unroll6!(i < NO => {
            if let (Some(ti), Some(&ov)) = (t.get_mut(i), o.get(i)) {
                ti[b] = ov;
            }
        });
    });
    let mut out = [[_mm512_setzero_ps(); NO]; NO];
    unroll6!(i < NO => {
        if let (Some(oi), Some(ti)) = (out.get_mut(i), t.get(i)) {
            *oi = lin::<NI, NO, TR>(m, ti);
        }
    });
    out
}

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
    fn th<S: Scheme>(&self) -> usize {
        self.oh.div_ceil(S::O)
    }
    fn tw<S: Scheme>(&self) -> usize {
        self.ow.div_ceil(S::O)
    }
    fn tiles<S: Scheme>(&self) -> usize {
        self.n * self.th::<S>() * self.tw::<S>()
    }
    /// Tile rows per chunk (over the flattened n × th tile rows) for `floats` per buffer.
    fn chunk_rows<S: Scheme>(&self, floats: usize) -> usize {
        let per_row = S::T * S::T * self.tw::<S>() * self.cin.max(self.cout);
        (floats / per_row.max(1)).clamp(1, self.n * self.th::<S>())
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
/// Layout [panel][ξ][k][64].
pub(crate) struct WinoWeights {
    data: Buf<f32>,
    k: usize,
    n: usize,
    e: usize,
}

impl WinoWeights {
    /// `w` OIHW [cout, cin, 3, 3].
    pub(crate) fn new<S: Scheme>(w: &[f32], cout: usize, cin: usize, over_out: bool) -> Self {
        assert_eq!(w.len(), cout * cin * 9, "winograd: weight shape");
        assert!(available(), "winograd: AVX-512 required");
        let (k, n) = if over_out { (cin, cout) } else { (cout, cin) };
        let e = S::T * S::T;
        let np = n.div_ceil(NR);
        let mut data = Buf::<f32>::alloc(np * e * k * NR);
        data.par_chunks_mut(e * k * NR)
            .enumerate()
            .for_each(|(p, blk)| {
                // SAFETY: AVX-512F present (asserted above); gathers stay inside w (lanes past n are
                // masked off), stores inside blk (asserted in the function).
                unsafe { S::pack_transformed(blk, w, cin, (0, k), n, p, over_out) }
            });
        WinoWeights { data, k, n, e }
    }

    fn panels(&self, xi: usize) -> Panels<'_> {
        Panels {
            data: &self.data,
            k: self.k,
            n: self.n,
            offset: xi * self.k * NR,
            stride: self.e * self.k * NR,
            ld: NR,
        }
    }
}

/// Panel `p` of the transformed weights ([ξ][k][64]); see [`WinoWeights::new`].
#[target_feature(enable = "avx512f")]
unsafe fn pack_transformed<S: Scheme, const T: usize>(
    blk: &mut [f32],
    w: &[f32],
    cin: usize,
    (k0, k1): (usize, usize),
    n: usize,
    p: usize,
    over_out: bool,
) {
    let t = T;
    let k = k1 - k0;
    assert!(blk.len() >= t * t * k * NR);
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // Lane l of a quarter reads kernel (co, ci) = (j0 + l, kk) or (kk, j0 + l).
    let step = if over_out { cin * 9 } else { 9 };
    let idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(step as i32));
    let quarters: Vec<(usize, u16)> = (0..NR / 16)
        .map(|q| {
            let j0 = p * NR + q * 16;
            let cols = n.saturating_sub(j0).min(16);
            (cols, lane_mask(0, cols))
        })
        .collect();
    // kk outer: each (ξ, kk) row of the panel (64 floats) is written whole before moving on.
    for kk in k0..k1 {
        for (q, &(cols, mask)) in quarters.iter().enumerate() {
            let j0 = p * NR + q * 16;
            let mut u = [[_mm512_setzero_ps(); T]; T];
            if cols > 0 {
                let base = if over_out {
                    (j0 * cin + kk) * 9
                } else {
                    (kk * cin + j0) * 9
                };
                let mut g = [[_mm512_setzero_ps(); 3]; 3];
                for tap in 0..9 {
                    g[tap / 3][tap % 3] = _mm512_mask_i32gather_ps::<4>(
                        _mm512_setzero_ps(),
                        mask,
                        idx,
                        w.as_ptr().add(base + tap),
                    );
                }
                u = sandwich::<_, _, false>(&S::G, &g);
            }
            for r in 0..t {
                for c in 0..t {
                    let xi = r * t + c;
                    let at = (xi * k + kk - k0) * NR + q * 16;
                    _mm512_storeu_ps(blk.as_mut_ptr().add(at), u[r][c]);
                }
            }
        }
    }
}

/// dW row co (OIHW, cin × 9 floats) from dUᵀ [T²][cout][cin]: Gᵀ dU G, 16 input channels at a
/// time; written (or added to the row when `add`).
#[target_feature(enable = "avx512f")]
unsafe fn weight_grad_row<S: Scheme, const T: usize>(
    dw: &mut [f32],
    du: &[f32],
    cin: usize,
    cout: usize,
    co: usize,
    add: bool,
) {
    let t = T;
    assert!(dw.len() >= cin * 9 && du.len() >= t * t * cin * cout && co < cout);
    let idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(9),
    );
    let mut ci = 0;
    while ci < cin {
        let mask = lane_mask(ci, cin);
        let mut d = [[_mm512_setzero_ps(); T]; T];
        for r in 0..t {
            for c in 0..t {
                let xi = r * t + c;
                d[r][c] = _mm512_maskz_loadu_ps(mask, du.as_ptr().add((xi * cout + co) * cin + ci));
            }
        }
        let taps: [[__m512; 3]; 3] = sandwich::<_, _, true>(&S::G, &d);
        // Lane l, tap (i, j) → dw[(ci + l)·9 + 3i + j] (inside dw: lanes past cin are masked off).
        let base = dw.as_mut_ptr().add(ci * 9);
        for i in 0..3 {
            for j in 0..3 {
                let p = base.add(i * 3 + j);
                let v = if add {
                    _mm512_add_ps(
                        taps[i][j],
                        _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, p),
                    )
                } else {
                    taps[i][j]
                };
                _mm512_mask_i32scatter_ps::<4>(p, mask, idx, v);
            }
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

/// A tile's window of pixels in an NHWC buffer: pixel (r, c) of the window is at element
/// `off + r·rs + c·cs` when rows.0 ≤ r < rows.1 and cols.0 ≤ c < cols.1 (else it lies in the
/// padding or past the edge).
#[derive(Clone, Copy)]
pub(crate) struct Win {
    off: isize,
    rs: usize,
    cs: usize,
    rows: (usize, usize),
    cols: (usize, usize),
}

impl Win {
    /// The element offsets of the window's `n` × `n` pixels (`[r·n + c]`), None outside.
    #[inline(always)]
    fn offsets<const N2: usize>(&self, n: usize) -> [Option<usize>; N2] {
        let mut o = [None; N2];
        for r in self.rows.0..self.rows.1 {
            for c in self.cols.0..self.cols.1 {
                o[r * n + c] = Some((self.off + (r * self.rs + c * self.cs) as isize) as usize);
            }
        }
        o
    }
}

/// V = Bᵀ d B for one tile: the patch's pixels in `xb` at window `win`; V[ξ] written at
/// `v + ξ·vs`.
#[target_feature(enable = "avx512f")]
unsafe fn input_tile<S: Scheme, const T: usize>(
    xb: *const f32,
    win: &Win,
    c: usize,
    v: *mut f32,
    vs: usize,
) {
    transform_window::<T, T, false>(&S::BT, xb, win, c, v, vs)
}

/// The transform of one tile's N × N window of pixels (`src` at `win`, None outside read as
/// zeros): m · X · mᵀ (`TR`: mᵀ · X · m), the T² results written at `dst + ξ·ds`, 16 channels
/// at a time.
#[inline(always)]
unsafe fn transform_window<const N: usize, const T: usize, const TR: bool>(
    m: &Mat,
    src: *const f32,
    win: &Win,
    c: usize,
    dst: *mut f32,
    ds: usize,
) {
    let d: [Option<usize>; 36] = win.offsets(N);
    let mut c0 = 0;
    while c0 < c {
        let mask = lane_mask(c0, c);
        let mut x = [[_mm512_setzero_ps(); N]; N];
        for r in 0..N {
            for cc in 0..N {
                if let Some(p) = d[r * N + cc] {
                    x[r][cc] = _mm512_maskz_loadu_ps(mask, src.add(p + c0));
                }
            }
        }
        let o: [[__m512; T]; T] = sandwich::<_, _, TR>(m, &x);
        for r in 0..T {
            for cc in 0..T {
                _mm512_mask_storeu_ps(dst.add((r * T + cc) * ds + c0), mask, o[r][cc]);
            }
        }
        c0 += 16;
    }
}

/// Y = Aᵀ M A (+ bias) for one tile: M[ξ] at `mm + ξ·ms`; the outputs in `yb` at window `yw`.
#[target_feature(enable = "avx512f")]
unsafe fn output_tile<S: Scheme, const T: usize, const O: usize>(
    mm: *const f32,
    ms: usize,
    c: usize,
    bias: Option<&[f32]>,
    yb: *mut f32,
    yw: &Win,
) {
    let y: [Option<usize>; 16] = yw.offsets(O);
    let (t, o) = (T, O);
    let mut c0 = 0;
    while c0 < c {
        let mask = lane_mask(c0, c);
        let mut m = [[_mm512_setzero_ps(); T]; T];
        for r in 0..t {
            for cc in 0..t {
                m[r][cc] = _mm512_maskz_loadu_ps(mask, mm.add((r * t + cc) * ms + c0));
            }
        }
        let s: [[__m512; O]; O] = sandwich::<_, _, false>(&S::AT, &m);
        let b = match bias {
            Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(c0)),
            None => _mm512_setzero_ps(),
        };
        for r in 0..o {
            for cc in 0..o {
                if let Some(p) = y[r * o + cc] {
                    _mm512_mask_storeu_ps(yb.add(p + c0), mask, _mm512_add_ps(s[r][cc], b));
                }
            }
        }
        c0 += 16;
    }
}

/// dM = A dY Aᵀ for one tile: dY in `dyb` at window `yw`; dM[ξ] at `dm + ξ·ms`.
#[target_feature(enable = "avx512f")]
unsafe fn output_tile_grad<S: Scheme, const T: usize, const O: usize>(
    dyb: *const f32,
    yw: &Win,
    c: usize,
    dm: *mut f32,
    ms: usize,
) {
    transform_window::<O, T, true>(&S::AT, dyb, yw, c, dm, ms)
}

/// dd = B dV Bᵀ for one tile, channels c0..c1, added to the patch pixels of `dx` at window
/// `win`; dV[ξ] at `dv + ξ·vs`.
#[target_feature(enable = "avx512f")]
unsafe fn input_tile_grad<S: Scheme, const T: usize>(
    dv: *const f32,
    vs: usize,
    c0: usize,
    c1: usize,
    dx: *mut f32,
    win: &Win,
) {
    let d: [Option<usize>; 36] = win.offsets(T);
    let t = T;
    let mut cc = c0;
    while cc < c1 {
        let mask = lane_mask(cc, c1);
        let mut v = [[_mm512_setzero_ps(); T]; T];
        for r in 0..t {
            for c in 0..t {
                v[r][c] = _mm512_maskz_loadu_ps(mask, dv.add((r * t + c) * vs + cc));
            }
        }
        let f: [[__m512; T]; T] = sandwich::<_, _, true>(&S::BT, &v);
        for r in 0..t {
            for c in 0..t {
                if let Some(p) = d[r * t + c] {
                    let q = dx.add(p + cc);
                    _mm512_mask_storeu_ps(
                        q,
                        mask,
                        _mm512_add_ps(_mm512_maskz_loadu_ps(mask, q), f[r][c]),
                    );
                }
            }
        }
        cc += 16;
    }
}

/// Tile (s, ty, tx)'s input patch (T × T pixels of x [n, h, w, cin], from row O·ty − pt and
/// column O·tx − pl).
fn patch<S: Scheme>(g: &WinoGeom, s: usize, ty: usize, tx: usize) -> Win {
    let (y0, x0) = (S::O * ty, S::O * tx);
    let span = |p: usize, pad: usize, len: usize| {
        (
            pad.saturating_sub(p),
            (len + pad).saturating_sub(p).min(S::T),
        )
    };
    Win {
        off: (((s * g.h) as isize + y0 as isize - g.pt as isize) * g.w as isize + x0 as isize
            - g.pl as isize)
            * g.cin as isize,
        rs: g.w * g.cin,
        cs: g.cin,
        rows: span(y0, g.pt, g.h),
        cols: span(x0, g.pl, g.w),
    }
}

/// Tile (s, ty, tx)'s O × O outputs in [n, oh, ow, cout] (those inside the output).
fn out_pixels<S: Scheme>(g: &WinoGeom, s: usize, ty: usize, tx: usize) -> Win {
    let (y0, x0) = (S::O * ty, S::O * tx);
    Win {
        off: (((s * g.oh + y0) * g.ow + x0) * g.cout) as isize,
        rs: g.ow * g.cout,
        cs: g.cout,
        rows: (0, (g.oh - y0).min(S::O)),
        cols: (0, (g.ow - x0).min(S::O)),
    }
}

/// V of the chunk's tiles (tile rows r0..r1 of the flattened n × th rows) into v [T²][tc][cin].
fn input_transform<S: Scheme>(
    g: &WinoGeom,
    x: &[f32],
    r0: usize,
    r1: usize,
    v: &mut [f32],
    tc: usize,
) {
    let (th, tw, cin) = (g.th::<S>(), g.tw::<S>(), g.cin);
    let vp = SendPtr(v.as_mut_ptr());
    let vp = &vp;
    let xp = x.as_ptr() as usize;
    (r0..r1).into_par_iter().for_each(|r| {
        let (s, ty) = (r / th, r % th);
        for tx in 0..tw {
            let t = (r - r0) * tw + tx;
            let d = patch::<S>(g, s, ty, tx);
            // SAFETY: AVX-512F checked by the caller; the patch's pixels lie in x (asserted by the
            // callers); each tile writes its own row t of every V[ξ] (disjoint across tasks),
            // within v's T²·tc·cin.
            unsafe { S::input_tile(xp as *const f32, &d, cin, vp.0.add(t * cin), tc * cin) };
        }
    });
}

/// Forward with weights transformed once: out [n, oh, ow, cout] = conv(x, w) + bias.
pub(crate) fn forward<S: Scheme>(
    g: &WinoGeom,
    x: &[f32],
    wt: &WinoWeights,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    forward_chunked::<S>(g, x, wt, bias, out, CHUNK_FLOATS)
}

fn forward_chunked<S: Scheme>(
    g: &WinoGeom,
    x: &[f32],
    wt: &WinoWeights,
    bias: Option<&[f32]>,
    out: &mut [f32],
    chunk: usize,
) {
    assert!(
        wt.k == g.cin && wt.n == g.cout && wt.e == S::T * S::T,
        "winograd: weights for another shape"
    );
    let (cin, cout, e) = (g.cin, g.cout, S::T * S::T);
    forward_driver::<S>(g, x, bias, out, chunk, |v, m, tc| {
        m.par_chunks_mut(tc * cout)
            .take(e)
            .enumerate()
            .for_each(|(xi, mx)| {
                let a = AView::rows(&v[xi * tc * cin..(xi + 1) * tc * cin], cin);
                sgemm::gemm_seq(tc, a, wt.panels(xi), mx, cout, false);
            });
    });
}

/// The forward's chunk loop: V of each chunk of tiles, `products(V, M, tiles)` filling
/// M[ξ] = V[ξ] · U[ξ] ([T²][tiles][cout]), then Y = Aᵀ M A + bias.
fn forward_driver<S: Scheme>(
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
    let (th, tw, cin, cout, e) = (g.th::<S>(), g.tw::<S>(), g.cin, g.cout, S::T * S::T);
    let rows = g.chunk_rows::<S>(chunk);
    let tcmax = rows * tw;
    let mut v = Buf::<f32>::alloc(e * tcmax * cin);
    let mut m = Buf::<f32>::alloc(e * tcmax * cout);
    let op = out.as_mut_ptr() as usize;
    let mut r0 = 0;
    while r0 < g.n * th {
        let r1 = (r0 + rows).min(g.n * th);
        let tc = (r1 - r0) * tw;
        input_transform::<S>(g, x, r0, r1, &mut v, tc);
        products(&v, &mut m, tc);
        let mp = m.as_ptr() as usize;
        (r0..r1).into_par_iter().for_each(|r| {
            let (s, ty) = (r / th, r % th);
            for tx in 0..tw {
                let t = (r - r0) * tw + tx;
                let y = out_pixels::<S>(g, s, ty, tx);
                // SAFETY: AVX-512F checked; M rows of this chunk are inside m; each tile writes
                // its own output pixels (disjoint across tiles), inside out (asserted).
                unsafe {
                    let m = (mp as *const f32).add(t * cout);
                    S::output_tile(m, tc * cout, cout, bias, op as *mut f32, &y)
                };
            }
        });
        r0 = r1;
    }
}

/// Forward from the OIHW weights: out [n, oh, ow, cout] = conv(x, w) + bias. Each task transforms
/// one 64-channel panel of U (T² × cin × 64 floats, L2-sized) and runs its T² products at once, so
/// the transformed weights never travel to memory (they are T²/9 of the weights, rewritten per call).
pub(crate) fn forward_fused<S: Scheme>(
    g: &WinoGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    forward_fused_chunked::<S>(g, x, w, bias, out, CHUNK_FLOATS)
}

/// Forward from the OIHW weights: F(4 × 4, 3 × 3) when there are at least [`F4_MIN_TILES`] of its
/// tiles, else F(2 × 2, 3 × 3); fused ([`forward_fused`]) when there are at most
/// [`FUSED_MAX_TILES`] tiles (each panel task rereads V, T² × tiles × cin: cheaper than the
/// transformed weights' round trip to memory while there are few tiles), otherwise with the
/// weights transformed once ([`forward`]).
pub fn forward_from_weights(
    g: &WinoGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    fn run<S: Scheme>(g: &WinoGeom, x: &[f32], w: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        if g.tiles::<S>() <= FUSED_MAX_TILES {
            forward_fused::<S>(g, x, w, bias, out)
        } else {
            let wt = WinoWeights::new::<S>(w, g.cout, g.cin, true);
            forward::<S>(g, x, &wt, bias, out)
        }
    }
    if use_f4(g) {
        run::<F4>(g, x, w, bias, out)
    } else {
        run::<F2>(g, x, w, bias, out)
    }
}

/// See [`forward_from_weights`] (measured: fused is faster on the U-Net's 12 × 12 level at batch 2,
/// 72 F(2 × 2) tiles, and its 24 × 24 level, 72 F(4 × 4) tiles; slower at 288).
const FUSED_MAX_TILES: usize = 128;

fn forward_fused_chunked<S: Scheme>(
    g: &WinoGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    chunk: usize,
) {
    let (cin, cout, e) = (g.cin, g.cout, S::T * S::T);
    assert!(w.len() == cout * cin * 9, "winograd: weight shape");
    forward_driver::<S>(g, x, bias, out, chunk, |v, m, tc| {
        assert!(v.len() >= e * tc * cin && m.len() >= e * tc * cout);
        // SAFETY: v holds V [T²][tc][cin] and m has room for M [T²][tc][cout] (asserted).
        unsafe { fused_products::<S>(w, cin, (cin, cout), true, v, tc, m.as_mut_ptr()) }
    });
}

/// Floats of transformed weights per task of [`fused_products`] (about 1 MB: stays in L2).
const FUSED_BLOCK_FLOATS: usize = 1 << 18;

/// C[ξ] [tc, n] = A[ξ] [tc, k] · B[ξ] for every ξ, B[ξ] the transformed weights U[ξ] (`over_out`:
/// k = cin, n = cout) or U[ξ]ᵀ (k = cout, n = cin), made one 64-column panel and one block of
/// k at a time (multiples of the GEMM's K block, so the sums run in the same order as with
/// [`WinoWeights`]) right before their products, so they never leave L2.
///
/// # Safety
/// `c` must be valid for writes of T² × tc × n floats, touched by no one else during the call;
/// a holds T² × tc × k floats.
unsafe fn fused_products<S: Scheme>(
    w: &[f32],
    cin: usize,
    (k, n): (usize, usize),
    over_out: bool,
    a: &[f32],
    tc: usize,
    c: *mut f32,
) {
    let e = S::T * S::T;
    let kch = (FUSED_BLOCK_FLOATS / (e * NR * sgemm::KC)).max(1) * sgemm::KC;
    let cp = SendPtr(c);
    let cp = &cp;
    (0..n.div_ceil(NR)).into_par_iter().for_each(|p| {
        let mut blk = Buf::<f32>::alloc(e * kch.min(k) * NR);
        let cols = (n - p * NR).min(NR);
        let mut k0 = 0;
        while k0 < k {
            let kc = kch.min(k - k0);
            // SAFETY: AVX-512F checked by the callers; gathers inside w (masked past n), stores
            // inside blk (e · kc · 64 floats).
            unsafe { S::pack_transformed(&mut blk, w, cin, (k0, k0 + kc), n, p, over_out) };
            for xi in 0..e {
                let b = Panels {
                    data: &blk,
                    k: kc,
                    n: cols,
                    offset: xi * kc * NR,
                    stride: e * kc * NR,
                    ld: NR,
                };
                let av = AView::rows(&a[xi * tc * k + k0..(xi + 1) * tc * k], k);
                // SAFETY: C[ξ] rows 0..tc, columns p·64..p·64+cols lie inside c; this task is
                // the only writer of panel p's columns.
                unsafe { sgemm::gemm_raw(tc, av, b, cp.0.add(xi * tc * n + p * NR), n, k0 > 0) };
            }
            k0 += kc;
        }
    });
}

/// Backward: dx (if given, [n, h, w, cin]) += ∂/∂x, and returns ∂/∂w in OIHW if `want_w`.
#[cfg(test)]
fn backward<S: Scheme>(
    g: &WinoGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    want_w: bool,
) -> Option<Vec<f32>> {
    let mut dw = want_w.then(|| vec![0f32; g.cout * g.cin * 9]);
    backward_chunked::<S>(
        g,
        x,
        w,
        dy,
        dx,
        dw.as_deref_mut().map(|d| (d, false)),
        backward_chunk::<S>(g),
    );
    dw
}

/// Backward into caller buffers: dx (if given) += ∂/∂x; `dw` (OIHW) = ∂/∂w, or += when its flag is
/// set. The scheme is the forward's ([`forward_from_weights`]).
pub fn backward_into(
    g: &WinoGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: Option<(&mut [f32], bool)>,
) {
    if use_f4(g) {
        backward_chunked::<F4>(g, x, w, dy, dx, dw, backward_chunk::<F4>(g))
    } else {
        backward_chunked::<F2>(g, x, w, dy, dx, dw, backward_chunk::<F2>(g))
    }
}

/// Chunk size of the backward: with few tiles the whole batch in one chunk (up to 4 ×
/// [`CHUNK_FLOATS`] per scratch buffer) so that the fused path applies.
fn backward_chunk<S: Scheme>(g: &WinoGeom) -> usize {
    let whole = S::T * S::T * g.tiles::<S>() * g.cin.max(g.cout);
    if g.tiles::<S>() <= FUSED_MAX_TILES && whole <= 4 * CHUNK_FLOATS {
        whole
    } else {
        CHUNK_FLOATS
    }
}

fn backward_chunked<S: Scheme>(
    g: &WinoGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    mut dx: Option<&mut [f32]>,
    mut dw_out: Option<(&mut [f32], bool)>,
    chunk: usize,
) {
    assert!(available(), "winograd: AVX-512 required");
    let want_w = dw_out.is_some();
    let (th, tw, cin, cout, e) = (g.th::<S>(), g.tw::<S>(), g.cin, g.cout, S::T * S::T);
    assert!(
        x.len() >= g.n * g.h * g.w * cin
            && dy.len() >= g.n * g.oh * g.ow * cout
            && w.len() == cout * cin * 9
            && dx.as_ref().is_none_or(|d| d.len() >= g.n * g.h * g.w * cin)
            && dw_out.as_ref().is_none_or(|d| d.0.len() == cout * cin * 9),
        "winograd: buffers too short"
    );
    let rows = g.chunk_rows::<S>(chunk);
    let tcmax = rows * tw;
    // Few tiles, one chunk: the transformed weights (T²/9 of the weights) and dU are made and used
    // one panel / row block at a time inside L2 instead of travelling to memory and back.
    let fused = g.tiles::<S>() <= FUSED_MAX_TILES && rows >= g.n * th;
    let mut clock = std::time::Instant::now();
    let wb = dx
        .as_ref()
        .filter(|_| !fused)
        .map(|_| WinoWeights::new::<S>(w, cout, cin, false));
    phase(0, &mut clock);
    let mut v = Buf::<f32>::alloc(e * tcmax * cin);
    let mut dm = Buf::<f32>::alloc(e * tcmax * cout);
    let mut du = if want_w && !fused {
        Some(Buf::<f32>::alloc(e * cin * cout))
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
                let y = out_pixels::<S>(g, s, ty, tx);
                // SAFETY: AVX-512F checked; dY pixels inside dy (asserted); row t of every dM[ξ]
                // is this tile's own (disjoint across tasks).
                unsafe {
                    S::output_tile_grad(dyp as *const f32, &y, cout, dmp.0.add(t * cout), tc * cout)
                };
            }
        });
        phase(1, &mut clock);
        if let Some(du) = du.as_mut() {
            input_transform::<S>(g, x, r0, r1, &mut v, tc);
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
        } else if let (true, Some((dw, add))) = (fused, dw_out.take()) {
            input_transform::<S>(g, x, r0, r1, &mut v, tc);
            phase(2, &mut clock);
            weight_grad_fused::<S>(&v, &dm, tc, cin, cout, dw, add);
            phase(3, &mut clock);
        }
        if let Some(dx) = dx.as_deref_mut() {
            // dV[ξ] = dM[ξ] · U[ξ]ᵀ into v (V is no longer needed for this chunk).
            if let Some(wb) = wb.as_ref() {
                v.par_chunks_mut(tc * cin)
                    .take(e)
                    .enumerate()
                    .for_each(|(xi, dvx)| {
                        let a = AView::rows(&dm[xi * tc * cout..(xi + 1) * tc * cout], cout);
                        sgemm::gemm_seq(tc, a, wb.panels(xi), dvx, cin, false);
                    });
            } else {
                // SAFETY: dm holds dM [T²][tc][cout]; v has room for dV [T²][tc][cin].
                unsafe { fused_products::<S>(w, cin, (cout, cin), false, &dm, tc, v.as_mut_ptr()) }
            }
            phase(4, &mut clock);
            let dxp = dx.as_mut_ptr() as usize;
            let vp = v.as_ptr() as usize;
            (0..cin.div_ceil(cblk)).into_par_iter().for_each(|cb| {
                let (c0, c1) = (cb * cblk, ((cb + 1) * cblk).min(cin));
                for r in r0..r1 {
                    let (s, ty) = (r / th, r % th);
                    for tx in 0..tw {
                        let t = (r - r0) * tw + tx;
                        let d = patch::<S>(g, s, ty, tx);
                        // SAFETY: AVX-512F checked; patch pixels inside dx (asserted); this task
                        // only touches channels c0..c1 (disjoint across tasks), tiles in order.
                        unsafe {
                            S::input_tile_grad(
                                (vp as *const f32).add(t * cin),
                                tc * cin,
                                c0,
                                c1,
                                dxp as *mut f32,
                                &d,
                            )
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
                unsafe { S::weight_grad_row(row, &du, cin, cout, co, add) }
            });
        phase(6, &mut clock);
    }
}

/// Rows of output channels per task of [`weight_grad_fused`] (its dU block, T² × rows × cin,
/// stays in L2).
const DW_ROWS: usize = 24;

/// dW (OIHW; written, or added when `add`) from all tiles at once: V[ξ] packed, then per block of
/// output channels dUᵀ[ξ][rows] = dM[ξ]ᵀ[rows] · V[ξ] and its Gᵀ dU G, while the block is in L2.
fn weight_grad_fused<S: Scheme>(
    v: &[f32],
    dm: &[f32],
    tc: usize,
    cin: usize,
    cout: usize,
    dw: &mut [f32],
    add: bool,
) {
    let e = S::T * S::T;
    let pbs: Vec<PackedB> = (0..e)
        .into_par_iter()
        .map(|xi| PackedB::pack(&v[xi * tc * cin..(xi + 1) * tc * cin], tc, cin, cin, 1))
        .collect();
    dw.par_chunks_mut(DW_ROWS * cin * 9)
        .enumerate()
        .for_each(|(blk, dwb)| {
            let co0 = blk * DW_ROWS;
            let rows = dwb.len() / (cin * 9);
            let mut du = Buf::<f32>::alloc(e * rows * cin);
            for (xi, pb) in pbs.iter().enumerate() {
                let dmx = &dm[xi * tc * cout..(xi + 1) * tc * cout];
                let a = AView::t(&dmx[co0..], cout);
                sgemm::gemm_seq(rows, a, pb.panels(), &mut du[xi * rows * cin..], cin, false);
            }
            for (co, row) in dwb.chunks_exact_mut(cin * 9).enumerate() {
                // SAFETY: AVX-512F checked by the caller; bounds asserted in the function.
                unsafe { S::weight_grad_row(row, &du, cin, rows, co, add) }
            }
        });
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

    /// Max |got − want| relative to max |want|, asserted ≤ `tol`.
    fn close(got: &[f32], want: &[f64], tol: f64, what: &str) -> f64 {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
        let mut worst = 0f64;
        for (i, (&gv, &wv)) in got.iter().zip(want).enumerate() {
            let e = (gv as f64 - wv).abs() / scale;
            assert!(e <= tol, "{what}[{i}]: {gv} vs {wv} (scale {scale})");
            worst = worst.max(e);
        }
        worst
    }

    #[test]
    fn forward_and_backward_match_direct_convolution() {
        if !available() {
            return;
        }
        // F(2 × 2) rounds like a direct sum (its transforms are exact in binary); F(4 × 4)'s
        // transforms (1/6, 1/24, 8) lose a few more bits.
        check::<F2>(2e-6);
        check::<F4>(1e-5);
    }

    /// The entry points the ops call, at shapes that pick each scheme and path: F(2 × 2) fused
    /// and unfused, F(4 × 4) fused and unfused (per `F4_MIN_TILES` / `FUSED_MAX_TILES`).
    #[test]
    fn entry_points_match_direct_convolution_on_every_path() {
        if !available() {
            return;
        }
        for &(n, hw, want_f4, want_fused) in &[
            (1usize, 8usize, false, true),
            (2, 20, false, false),
            (1, 34, true, true),
            (2, 40, true, false),
        ] {
            let (cin, cout) = (19, 21);
            let g = WinoGeom {
                n,
                h: hw,
                w: hw,
                cin,
                cout,
                pt: 1,
                pl: 1,
                oh: hw,
                ow: hw,
            };
            assert_eq!(use_f4(&g), want_f4, "{hw}");
            let tiles = if want_f4 {
                g.tiles::<F4>()
            } else {
                g.tiles::<F2>()
            };
            assert_eq!(tiles <= FUSED_MAX_TILES, want_fused, "{hw}");
            let x = rnd_vec(n * hw * hw * cin, 5);
            let w = rnd_vec(cout * cin * 9, 6);
            let b = rnd_vec(cout, 7);
            let dy = rnd_vec(n * hw * hw * cout, 8);
            let (y, dx, dw) = direct(&g, &x, &w, &b, &dy);
            let tol = if want_f4 { 1e-5 } else { 2e-6 };
            let mut out = vec![f32::NAN; y.len()];
            forward_from_weights(&g, &x, &w, Some(&b), &mut out);
            close(&out, &y, tol, "y");
            let mut gx = vec![0f32; x.len()];
            let mut gw = vec![f32::NAN; w.len()];
            backward_into(&g, &x, &w, &dy, Some(&mut gx), Some((&mut gw, false)));
            close(&gx, &dx, tol, "dx");
            close(&gw, &dw, tol, "dw");
        }
    }

    fn check<S: Scheme>(tol: f64) {
        let mut worst = 0f64;
        // Odd and even sizes, symmetric / asymmetric / no padding, channel tails, several chunks.
        for &(n, h, w, cin, cout, pt, pb, pl, pr) in &[
            (2, 6, 6, 3, 5, 1, 1, 1, 1),
            (1, 7, 5, 17, 33, 1, 1, 1, 1),
            (2, 5, 8, 20, 18, 0, 0, 0, 0),
            (1, 9, 6, 16, 40, 0, 1, 1, 0),
            (3, 4, 4, 40, 7, 2, 0, 0, 2),
            (1, 5, 5, 4, 3, 3, 4, 0, 5),
            // Several K blocks in the fused products (forward: cin; input gradient: cout).
            (1, 6, 5, 300, 20, 1, 1, 1, 1),
            (1, 5, 6, 20, 290, 1, 1, 1, 1),
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
                let wf = WinoWeights::new::<S>(&wt, cout, cin, true);
                forward_chunked::<S>(&g, &x, &wf, Some(&b), &mut out, chunk);
                worst = worst.max(close(&out, &y, tol, "y"));
                let mut out2 = vec![f32::NAN; y.len()];
                forward_fused_chunked::<S>(&g, &x, &wt, Some(&b), &mut out2, chunk);
                assert_eq!(out, out2, "fused forward");
                let mut gx = vec![0f32; x.len()];
                let mut gw = vec![0f32; wt.len()];
                backward_chunked::<S>(
                    &g,
                    &x,
                    &wt,
                    &dy,
                    Some(&mut gx),
                    Some((&mut gw, false)),
                    chunk,
                );
                worst = worst.max(close(&gx, &dx, tol, "dx"));
                worst = worst.max(close(&gw, &dw, tol, "dw"));
                // Without dx, added onto a copy: exactly twice (x + x is exact).
                let mut gw2 = gw.clone();
                backward_chunked::<S>(&g, &x, &wt, &dy, None, Some((&mut gw2, true)), chunk);
                let twice: Vec<f32> = gw.iter().map(|v| 2.0 * v).collect();
                assert_eq!(gw2, twice);
            }
        }
        println!(
            "F({o} x {o}, 3 x 3): worst relative error {worst:.2e}",
            o = S::O
        );
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::autograd::Tape;
    use crate::ops::conv::Pad2d;
    use crate::ops::packed::{conv2d_packed, PackedConv};

    /// `cargo test --release --lib winograd_speed -- --ignored --nocapture`: the U-Net's 3 × 3
    /// convolutions at batch 2, F(2 × 2) and F(4 × 4) Winograd vs the packed im2col kernel (prints;
    /// no assertion).
    #[test]
    #[ignore]
    fn winograd_speed() {
        crate::threads::install(|| {
            for &(s, cin, cout) in &[
                (48usize, 256usize, 256usize),
                (48, 512, 256),
                (48, 512, 512),
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
                let reps = 5;
                let pc = PackedConv::new(&w, Some(&b), cout, cin, 3).unwrap();
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    let mut tape = Tape::<f32>::no_grad();
                    let xv = tape.input(&[n, s, s, cin], x.clone(), false).unwrap();
                    let y = conv2d_packed(&mut tape, &xv, &pc, 1, Pad2d::same(1)).unwrap();
                    std::hint::black_box(tape.data(&y)[0]);
                }
                let td = t.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "{s}x{s} {cin}->{cout}: im2col cached {:.2} ms ({:.0} GFLOP/s)",
                    td * 1e3,
                    flops / td / 1e9
                );
                run::<F2>(&g, &x, &w, &b, flops, reps);
                run::<F4>(&g, &x, &w, &b, flops, reps);
            }
        });
    }

    fn run<S: Scheme>(g: &WinoGeom, x: &[f32], w: &[f32], b: &[f32], flops: f64, reps: usize) {
        let (cin, cout) = (g.cin, g.cout);
        let mut out = vec![0f32; g.n * g.oh * g.ow * cout];
        let t = std::time::Instant::now();
        for _ in 0..reps {
            let wt = WinoWeights::new::<S>(w, cout, cin, true);
            forward::<S>(g, x, &wt, Some(b), &mut out);
        }
        let tw = t.elapsed().as_secs_f64() / reps as f64;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            forward_fused::<S>(g, x, w, Some(b), &mut out);
        }
        let tfu = t.elapsed().as_secs_f64() / reps as f64;
        let t = std::time::Instant::now();
        let wt = WinoWeights::new::<S>(w, cout, cin, true);
        let tt = t.elapsed().as_secs_f64();
        drop(wt);
        *PHASES.lock().unwrap() = [0.0; 7];
        let t = std::time::Instant::now();
        for _ in 0..reps {
            let mut dx = vec![0f32; x.len()];
            std::hint::black_box(backward::<S>(g, x, w, &out, Some(&mut dx), true));
        }
        let tb = t.elapsed().as_secs_f64() / reps as f64;
        let ph = std::mem::take(&mut *PHASES.lock().unwrap()).map(|p| p * 1e3 / reps as f64);
        println!(
            "  F({o}x{o}): forward {:.2} ms ({:.0} eff GFLOP/s; weight transform {:.2} ms), fused {:.2} ms; backward {:.2} ms ({:.0} eff)",
            tw * 1e3, flops / tw / 1e9, tt * 1e3, tfu * 1e3, tb * 1e3, 2.0 * flops / tb / 1e9, o = S::O
        );
        println!(
            "    backward phases (ms): weights {:.2}, dM {:.2}, V {:.2}, dU gemm {:.2}, dV gemm {:.2}, dX scatter {:.2}, dW transform {:.2}",
            ph[0], ph[1], ph[2], ph[3], ph[4], ph[5], ph[6]
        );
    }
}
