//! f32 GEMM on AVX-512: C [m, n] (+)= A [m, k] · B [k, n], A given through any strides (row-major
//! or transposed; blocks are copied into strips of 6 rows), B packed into 64-column panels
//! ([panel][k][64], zero-padded) or used in place. The 6 × 64 register tile (24 zmm accumulators)
//! needs one broadcast per 4 FMAs, and both operands stream through contiguous memory.
//!
//! The backward passes (weight gradients dW = dYᵀ · X with K = pixels, input gradients
//! dX = dY · W) and the Winograd convolution's batched products run here. Work is split over
//! disjoint blocks of C, each summed over the whole K in a fixed order, so results do not depend on
//! the thread count or on work stealing. Only built for x86-64; callers check [`available`].

#![cfg(target_arch = "x86_64")]

use crate::autograd::Buf;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Columns per panel of B (4 zmm registers).
pub const NR: usize = 64;
/// Rows per register tile (6 × 64: 24 zmm accumulators).
const MR: usize = 6;
/// Rows of A per block (packed into strips of MR rows; stays in L2 across the panels).
const MB: usize = 96;
/// Panels per group (see `gemm_block`).
const NG: usize = 4;
/// Depth of a K block (a panel's block, KC × 64 floats, stays in L1/L2 across a row block).
pub(crate) const KC: usize = 128;

/// True when the CPU runs the AVX-512 kernel.
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Panels of B: panel p (columns 32p..32p+32) starts at `offset + p · stride` and holds k rows of
/// 32 floats, `ld` apart (32 when packed; a row-major B is used in place with ld = its row length,
/// the floats past column n of the last panel are never read).
#[derive(Clone, Copy)]
pub struct Panels<'a> {
    pub data: &'a [f32],
    pub k: usize,
    pub n: usize,
    pub offset: usize,
    pub stride: usize,
    pub ld: usize,
}

impl Panels<'_> {
    fn check(&self) {
        let np = self.n.div_ceil(NR);
        let last = (self.n - (np.max(1) - 1) * NR).min(NR);
        assert!(
            np == 0
                || self.k == 0
                || self.data.len()
                    >= self.offset + (np - 1) * self.stride + (self.k - 1) * self.ld + last,
            "sgemm: panels out of bounds"
        );
    }
}

/// B [k, n] (element (kk, j) at `b[kk·rs + j·cs]`) packed into contiguous panels.
pub struct PackedB {
    pub data: Buf<f32>,
    pub k: usize,
    pub n: usize,
}

impl PackedB {
    pub fn pack(b: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Self {
        assert!(
            k == 0 || n == 0 || b.len() > (k - 1) * rs + (n - 1) * cs,
            "sgemm: B out of bounds"
        );
        let np = n.div_ceil(NR);
        let mut data = Buf::<f32>::alloc(np * k * NR);
        data.par_chunks_mut((k * NR).max(1))
            .enumerate()
            .for_each(|(p, panel)| pack_panel(panel, b, k, n, rs, cs, p));
        PackedB { data, k, n }
    }

    pub fn panels(&self) -> Panels<'_> {
        Panels {
            data: &self.data,
            k: self.k,
            n: self.n,
            offset: 0,
            stride: self.k * NR,
            ld: NR,
        }
    }
}

/// A row-major B [k, n] (row stride `ldb`) as panels, without copying.
pub fn row_major(b: &[f32], k: usize, n: usize, ldb: usize) -> Panels<'_> {
    Panels {
        data: b,
        k,
        n,
        offset: 0,
        stride: NR,
        ld: ldb,
    }
}

/// Writes panel `p` of B (k rows × 32, zero-padded past n).
pub fn pack_panel(
    panel: &mut [f32],
    b: &[f32],
    k: usize,
    n: usize,
    rs: usize,
    cs: usize,
    p: usize,
) {
    let j0 = p * NR;
    let cols = (n - j0).min(NR);
    if cs == 1 {
        for (kk, row) in panel.chunks_exact_mut(NR).enumerate().take(k) {
            row[..cols].copy_from_slice(&b[kk * rs + j0..][..cols]);
            row[cols..].fill(0.0);
        }
    } else {
        if cols < NR {
            panel[..k * NR].fill(0.0);
        }
        if rs == 1 && cs <= (i32::MAX as usize) / 16 && available() {
            // SAFETY: AVX-512F present; every gathered element (kk, j0 + q·16 + l) with
            // l < the quarter's columns is inside b (asserted by `PackedB::pack`), the other
            // lanes are masked off; stores stay inside the panel (k rows of 64).
            unsafe { pack_panel_t(panel, b, k, cs, j0, cols) };
            return;
        }
        if rs == 1 {
            // Blocks of 64 rows: the block of the panel (8 KB) stays in L1 across the 32 columns.
            for kb in (0..k).step_by(64) {
                let ke = (kb + 64).min(k);
                for j in 0..cols {
                    let col = (j0 + j) * cs;
                    for (kk, &v) in (kb..ke).zip(&b[col + kb..col + ke]) {
                        panel[kk * NR + j] = v;
                    }
                }
            }
            return;
        }
        for j in 0..cols {
            let col = (j0 + j) * cs;
            {
                for kk in 0..k {
                    panel[kk * NR + j] = b[kk * rs + col];
                }
            }
        }
    }
}

/// A panel of a column-major B (element (kk, j) at `b[j·cs + kk]`): 16 columns at a time by
/// gathers, 16 consecutive kk of the same 16 source lines staying in L1.
///
/// # Safety
/// AVX-512F; b holds columns j0..j0+cols over k rows; panel holds k·64 floats.
#[target_feature(enable = "avx512f")]
unsafe fn pack_panel_t(panel: &mut [f32], b: &[f32], k: usize, cs: usize, j0: usize, cols: usize) {
    assert!(
        panel.len() >= k * NR && (k == 0 || cols == 0 || b.len() > (j0 + cols - 1) * cs + k - 1)
    );
    let idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(cs as i32),
    );
    for (q, &mask) in quarter_masks(cols).iter().enumerate() {
        if mask == 0 {
            break; // the panel was zero-filled
        }
        let base = b.as_ptr().add((j0 + q * 16) * cs);
        let dst = panel.as_mut_ptr().add(q * 16);
        for kk in 0..k {
            let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, base.add(kk));
            _mm512_storeu_ps(dst.add(kk * NR), v);
        }
    }
}

/// A [m, k] with element (i, kk) at `a[i·rs + kk·cs]`.
#[derive(Clone, Copy)]
pub struct AView<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl AView<'_> {
    pub fn rows(data: &[f32], ld: usize) -> AView<'_> {
        AView {
            data,
            rs: ld,
            cs: 1,
        }
    }
    /// Aᵀ of a row-major [k, m] matrix with leading dimension `ld`.
    pub fn t(data: &[f32], ld: usize) -> AView<'_> {
        AView {
            data,
            rs: 1,
            cs: ld,
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint blocks of C through the pointer (see `gemm`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// C [m, n] (row stride `ldc`) (+)= A · B, single-threaded.
pub fn gemm_seq(m: usize, a: AView, b: Panels, c: &mut [f32], ldc: usize, accumulate: bool) {
    assert!(available(), "sgemm: AVX-512 required");
    check(m, &a, &b, c.len(), ldc);
    // SAFETY: AVX-512F present; bounds checked above.
    unsafe {
        gemm_block(
            m,
            0,
            b.n.div_ceil(NR),
            a,
            b,
            c.as_mut_ptr(),
            ldc,
            accumulate,
        )
    }
}

/// C (+)= A · B, single-threaded, through a raw C pointer (row stride `ldc`).
///
/// # Safety
/// `c` must be valid for writes of rows 0..m × columns 0..b.n (row stride ldc), and no other
/// thread may touch those elements during the call.
pub unsafe fn gemm_raw(m: usize, a: AView, b: Panels, c: *mut f32, ldc: usize, accumulate: bool) {
    assert!(available(), "sgemm: AVX-512 required");
    b.check();
    assert!(
        m == 0 || b.k == 0 || a.data.len() > (m - 1) * a.rs + (b.k - 1) * a.cs,
        "sgemm: A out of bounds"
    );
    assert!(ldc >= b.n, "sgemm: C row stride");
    gemm_block(m, 0, b.n.div_ceil(NR), a, b, c, ldc, accumulate)
}

/// C [m, n] (+)= A · B across the pool (rows split when there are enough, else panels).
pub fn gemm(m: usize, a: AView, b: Panels, c: &mut [f32], ldc: usize, accumulate: bool) {
    assert!(available(), "sgemm: AVX-512 required");
    check(m, &a, &b, c.len(), ldc);
    let np = b.n.div_ceil(NR);
    if m == 0 || np == 0 {
        return;
    }
    let threads = crate::threads::num_threads().max(1);
    // Row blocks (multiples of 8) and panel groups: about 4 tasks per thread.
    let want = 4 * threads;
    let row_tasks = m.div_ceil(MB).min(want).max(1);
    let panel_tasks = (want / row_tasks).clamp(1, np);
    let rows = m.div_ceil(row_tasks).next_multiple_of(8);
    let pans = np.div_ceil(panel_tasks);
    let cp = SendPtr(c.as_mut_ptr());
    let cp = &cp;
    let tasks: Vec<(usize, usize)> = (0..m.div_ceil(rows))
        .flat_map(|r| (0..np.div_ceil(pans)).map(move |p| (r, p)))
        .collect();
    tasks.into_par_iter().for_each(|(r, p)| {
        let (m0, m1) = (r * rows, ((r + 1) * rows).min(m));
        let (p0, p1) = (p * pans, ((p + 1) * pans).min(np));
        let a = AView {
            data: &a.data[m0 * a.rs..],
            ..a
        };
        // SAFETY: AVX-512F present; each task writes rows m0..m1 × panels p0..p1 of C, disjoint
        // from every other task's block; bounds checked above.
        unsafe { gemm_block(m1 - m0, p0, p1, a, b, cp.0.add(m0 * ldc), ldc, accumulate) }
    });
}

fn check(m: usize, a: &AView, b: &Panels, clen: usize, ldc: usize) {
    b.check();
    let k = b.k;
    assert!(
        m == 0 || k == 0 || a.data.len() > (m - 1) * a.rs + (k - 1) * a.cs,
        "sgemm: A out of bounds"
    );
    assert!(
        m == 0 || b.n == 0 || (ldc >= b.n && clen >= (m - 1) * ldc + b.n),
        "sgemm: C out of bounds"
    );
}

/// Lane masks of the four 16-lane quarters of a 64-column panel with `cols` valid columns.
fn quarter_masks(cols: usize) -> [u16; 4] {
    let mut m = [0u16; 4];
    for (q, mq) in m.iter_mut().enumerate() {
        let c = cols.saturating_sub(q * 16).min(16);
        *mq = if c == 16 {
            0xFFFF
        } else {
            ((1u32 << c) - 1) as u16
        };
    }
    m
}

/// C rows 0..rows (≤ MR) × one panel (+)= A rows · B panel (kc rows, `ldb` apart); A is a packed
/// strip [kc][MR] (`PACKED`) or rows `rs` apart with columns `cs` apart (MR rows readable).
///
/// # Safety
/// AVX-512F; the strip holds kc·MR floats, the panel kc rows of the masked columns, C `rows` rows.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const PACKED: bool>(
    kc: usize,
    a: *const f32,
    (rs, cs): (usize, usize),
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    masks: [u16; 4],
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; MR];
    let (mut ap, mut bp) = (a, b);
    for _ in 0..kc {
        let bv = [
            _mm512_maskz_loadu_ps(masks[0], bp),
            _mm512_maskz_loadu_ps(masks[1], bp.add(16)),
            _mm512_maskz_loadu_ps(masks[2], bp.add(32)),
            _mm512_maskz_loadu_ps(masks[3], bp.add(48)),
        ];
        for (r, accr) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ap.add(if PACKED { r } else { r * rs }));
            for (q, aq) in accr.iter_mut().enumerate() {
                *aq = _mm512_fmadd_ps(av, bv[q], *aq);
            }
        }
        ap = ap.add(if PACKED { MR } else { cs });
        bp = bp.add(ldb);
    }
    for (r, accr) in acc.iter().enumerate().take(rows) {
        let cr = c.add(r * ldc);
        for (q, &aq) in accr.iter().enumerate() {
            let v = if accumulate {
                _mm512_add_ps(_mm512_maskz_loadu_ps(masks[q], cr.add(q * 16)), aq)
            } else {
                aq
            };
            _mm512_mask_storeu_ps(cr.add(q * 16), masks[q], v);
        }
    }
}

/// Copies rows m0..m0+mb, columns k0..k0+kc of A into strips [strip][kc][MR] (rows past mb zero).
///
/// # Safety
/// A holds every element read; `buf` holds ceil(mb/MR)·MR·kc floats.
unsafe fn pack_a(a: &AView, m0: usize, mb: usize, k0: usize, kc: usize, buf: &mut [f32]) {
    let ap = a.data.as_ptr();
    for (s, strip) in buf
        .chunks_exact_mut(kc * MR)
        .take(mb.div_ceil(MR))
        .enumerate()
    {
        let r0 = m0 + s * MR;
        let rows = (mb - s * MR).min(MR);
        if rows < MR {
            strip.fill(0.0);
        }
        if a.cs == 1 {
            for r in 0..rows {
                let src = std::slice::from_raw_parts(ap.add((r0 + r) * a.rs + k0), kc);
                for (kk, &v) in src.iter().enumerate() {
                    strip[kk * MR + r] = v;
                }
            }
        } else {
            for kk in 0..kc {
                let base = ap.add(r0 * a.rs + (k0 + kk) * a.cs);
                let dst = &mut strip[kk * MR..kk * MR + rows];
                for (r, d) in dst.iter_mut().enumerate() {
                    *d = *base.add(r * a.rs);
                }
            }
        }
    }
}

/// Rows 0..m of A against panels p0..p1, written to C at `c` (row stride ldc).
///
/// # Safety
/// AVX-512F present; A, the panels and C hold every element touched.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block(
    m: usize,
    p0: usize,
    p1: usize,
    a: AView,
    b: Panels,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let k = b.k;
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for p in p0..p1 {
                    let cols = (b.n - p * NR).min(NR);
                    std::ptr::write_bytes(c.add(r * ldc + p * NR), 0, cols);
                }
            }
        }
        return;
    }
    // Row-major A is read in place (a few integer ops per step); strided rows are copied into
    // strips first so the broadcasts stream through contiguous memory, all of them once (every
    // panel group reuses them).
    let packed = a.cs != 1;
    let (nkb, nmb) = (k.div_ceil(KC), m.div_ceil(MB));
    let ablk = MB.next_multiple_of(MR) * KC;
    // Pooled and uninitialised: `pack_a` writes every float the kernel reads.
    let mut abuf = Buf::<f32>::alloc(if packed { nkb * nmb * ablk } else { 0 });
    if packed {
        for kb in 0..nkb {
            let (k0, kc) = (kb * KC, KC.min(k - kb * KC));
            for mbi in 0..nmb {
                let (m0, mb) = (mbi * MB, MB.min(m - mbi * MB));
                pack_a(
                    &a,
                    m0,
                    mb,
                    k0,
                    kc,
                    &mut abuf[(kb * nmb + mbi) * ablk..][..ablk],
                );
            }
        }
    }
    let mut tail = Vec::new();
    // Groups of NG panels: a group's K block of B (NG × 32 KB) and its C rows stay in L2 across
    // the row blocks and K blocks (wide B would otherwise stream B and C from L3 every block).
    let mut g0 = p0;
    while g0 < p1 {
        let g1 = (g0 + NG).min(p1);
        let strips = packed.then_some((&abuf[..], ablk));
        gemm_group(m, g0, g1, &a, &b, c, ldc, accumulate, strips, &mut tail);
        g0 = g1;
    }
}

/// [`gemm_block`] on panels p0..p1 (one group). `strips`: A packed by [`gemm_block`] (block
/// (k block, row block) at (kb · row blocks + mb) · stride); None: A read in place.
///
/// # Safety
/// As [`gemm_block`].
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_group(
    m: usize,
    p0: usize,
    p1: usize,
    a: &AView,
    b: &Panels,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    strips: Option<(&[f32], usize)>,
    tail: &mut Vec<f32>,
) {
    let k = b.k;
    let nmb = m.div_ceil(MB);
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        let acc = accumulate || k0 > 0;
        let mut m0 = 0;
        while m0 < m {
            let mb = MB.min(m - m0);
            let ablk = strips.map(|(buf, stride)| {
                let at = ((k0 / KC) * nmb + m0 / MB) * stride;
                buf[at..at + stride].as_ptr()
            });
            for p in p0..p1 {
                let masks = quarter_masks((b.n - p * NR).min(NR));
                let bp = b.data.as_ptr().add(b.offset + p * b.stride + k0 * b.ld);
                let mut s = 0;
                while s * MR < mb {
                    let rows = (mb - s * MR).min(MR);
                    let cp = c.add((m0 + s * MR) * ldc + p * NR);
                    if let Some(ab) = ablk {
                        let ap = ab.add(s * kc * MR);
                        kernel::<true>(kc, ap, (1, MR), bp, b.ld, cp, ldc, rows, masks, acc);
                    } else if rows == MR {
                        let ap = a.data.as_ptr().add((m0 + s * MR) * a.rs + k0);
                        kernel::<false>(kc, ap, (a.rs, 1), bp, b.ld, cp, ldc, rows, masks, acc);
                    } else {
                        // The last rows: a strip zero-padded to MR (the kernel reads MR rows).
                        pack_a(a, m0 + s * MR, rows, k0, kc, abuf_tail(tail, kc));
                        let ap = tail.as_ptr();
                        kernel::<true>(kc, ap, (1, MR), bp, b.ld, cp, ldc, rows, masks, acc);
                    }
                    s += 1;
                }
            }
            m0 += mb;
        }
        k0 += kc;
    }
}

/// A buffer of at least one strip (kc × MR floats), grown on first use.
fn abuf_tail(buf: &mut Vec<f32>, kc: usize) -> &mut [f32] {
    if buf.len() < kc * MR {
        buf.resize(kc * MR, 0.0);
    }
    &mut buf[..kc * MR]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: &AView,
        b: &[f32],
        brs: usize,
        bcs: usize,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    c[i * n + j] +=
                        a.data[i * a.rs + kk * a.cs] as f64 * b[kk * brs + j * bcs] as f64;
                }
            }
        }
        c
    }

    #[test]
    fn matches_naive_for_layouts_tails_and_k_blocks() {
        if !available() {
            return;
        }
        let mut s = 1u64;
        let mut rnd = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 45, 7),
            (70, 33, 400),
            (9, 64, 800),
            (130, 100, 50),
        ] {
            for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
                let av: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                let bv: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
                let a = if at {
                    AView::t(&av, m)
                } else {
                    AView::rows(&av, k)
                };
                let (brs, bcs) = if bt { (1, k) } else { (n, 1) };
                let pb = PackedB::pack(&bv, k, n, brs, bcs);
                let want = naive(m, n, k, &a, &bv, brs, bcs);
                if !bt {
                    // In place (row-major B, no packing) gives the same bits.
                    let mut c1 = vec![0f32; m * n];
                    let mut c2 = vec![0f32; m * n];
                    gemm(m, a, pb.panels(), &mut c1, n, false);
                    gemm(m, a, row_major(&bv, k, n, n), &mut c2, n, false);
                    assert_eq!(c1, c2, "packed and in-place B differ");
                }
                let init: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
                for acc in [false, true] {
                    let mut c = init.clone();
                    gemm(m, a, pb.panels(), &mut c, n, acc);
                    let mut c2 = init.clone();
                    gemm_seq(m, a, pb.panels(), &mut c2, n, acc);
                    assert_eq!(c, c2, "parallel and sequential differ");
                    for i in 0..m * n {
                        let w = want[i] + if acc { init[i] as f64 } else { 0.0 };
                        assert!(
                            (c[i] as f64 - w).abs() <= 1e-5 * (1.0 + k as f64).sqrt(),
                            "{m}x{n}x{k} at={at} bt={bt} acc={acc}: {} vs {w}",
                            c[i]
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::backend::cpu::pointwise::PackedPointwise;

    /// `cargo test --release --lib sgemm_speed -- --ignored --nocapture` (prints GFLOP/s; no assertion).
    #[test]
    #[ignore]
    fn sgemm_speed() {
        for &(m, k, n) in &[
            (96usize, 128usize, 64usize),
            (256, 768, 768),
            (576, 512, 512),
            (576, 2048, 512),
            (576, 512, 4096),
            (144, 768, 768),
            (144, 3072, 768),
            (144, 768, 6144),
            (72, 768, 768),
            (504, 256, 256),
            (256, 6912, 768),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
            let pp = PackedPointwise::new(&w, &vec![0.0; n], n, k);
            let pb = PackedB::pack(&w, k, n, 1, k);
            let mut c = vec![0f32; m * n];
            let reps = (2e9 / (2.0 * (m * n * k) as f64)).ceil() as usize;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                pp.forward(&a, m, &mut c, false, false);
            }
            let g1 = 2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                gemm_seq(m, AView::rows(&a, k), pb.panels(), &mut c, n, false);
            }
            let g2 = 2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
            println!("{m}x{k}x{n}: pointwise {g1:.1} GFLOP/s, sgemm {g2:.1} GFLOP/s (1 thread)");
        }
    }
}

#[cfg(test)]
mod speed_linear {
    use super::*;

    /// `cargo test --release --lib sgemm_linear_speed -- --ignored --nocapture`: a linear layer's
    /// three products on the pool (prints GFLOP/s; no assertion).
    #[test]
    #[ignore]
    fn sgemm_linear_speed() {
        crate::threads::install(|| {
            for &(m, nin, nout) in &[
                (1152usize, 512usize, 4096usize),
                (1152, 2048, 512),
                (1152, 512, 512),
                (288, 768, 768),
                (288, 768, 6144),
                (288, 3072, 768),
            ] {
                let x: Vec<f32> = (0..m * nin).map(|i| (i % 7) as f32 * 0.1).collect();
                let w: Vec<f32> = (0..nout * nin).map(|i| (i % 5) as f32 * 0.1).collect();
                let dy: Vec<f32> = (0..m * nout).map(|i| (i % 3) as f32 * 0.1).collect();
                let fl = 2.0 * (m * nin * nout) as f64;
                let reps = 10;
                let mut out = vec![0f32; m * nout];
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    let pb = PackedB::pack(&w, nin, nout, 1, nin);
                    gemm(m, AView::rows(&x, nin), pb.panels(), &mut out, nout, false);
                }
                let tf = t.elapsed().as_secs_f64() / reps as f64;
                let mut dw = vec![0f32; nout * nin];
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    gemm(
                        nout,
                        AView::t(&dy, nout),
                        row_major(&x, m, nin, nin),
                        &mut dw,
                        nin,
                        true,
                    );
                }
                let tw = t.elapsed().as_secs_f64() / reps as f64;
                let mut dwt = vec![0f32; nout * nin];
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    let pb = PackedB::pack(&dy, m, nout, nout, 1);
                    gemm(nin, AView::t(&x, nin), pb.panels(), &mut dwt, nout, true);
                }
                let tw2 = t.elapsed().as_secs_f64() / reps as f64;
                let mut dx = vec![0f32; m * nin];
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    gemm(
                        m,
                        AView::rows(&dy, nout),
                        row_major(&w, nout, nin, nin),
                        &mut dx,
                        nin,
                        false,
                    );
                }
                let tx = t.elapsed().as_secs_f64() / reps as f64;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    let pb = PackedB::pack(&w, nout, nin, nin, 1);
                    gemm(m, AView::rows(&dy, nout), pb.panels(), &mut dx, nin, false);
                }
                let tx2 = t.elapsed().as_secs_f64() / reps as f64;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    let pb = PackedB::pack(&x, m, nin, nin, 1);
                    gemm(nout, AView::t(&dy, nout), pb.panels(), &mut dw, nin, true);
                }
                let tw3 = t.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "m {m} in {nin} out {nout}: forward {:.0}, dW (dYt.X) {:.0} (B packed {:.0}), dWt (Xt.dY) {:.0}, dX {:.0} (B packed {:.0}) GFLOP/s",
                    fl / tf / 1e9, fl / tw / 1e9, fl / tw3 / 1e9, fl / tw2 / 1e9, fl / tx / 1e9, fl / tx2 / 1e9
                );
            }
        });
    }
}
