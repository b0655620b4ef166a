//! Multi-head scaled-dot-product attention with backward, computed in tiles (flash-attention style).
//!
//! `attention(q [N, Lq, H·D], k [N, Lk, H·D], v [N, Lk, H·Dv], heads, scale)` is
//! `torch.nn.functional.scaled_dot_product_attention` on q, k, v viewed as `[N, H, L, D]` (head h =
//! channels h·D..(h+1)·D of the last axis, no mask, no dropout) with the result viewed back as
//! `[N, Lq, H·Dv]`: `softmax(q kᵀ · scale) v` per sample and head, scale 1/√D unless given.
//!
//! **Memory.** No `Lq × Lk` buffer exists at any point. The forward walks tiles of [`BQ`] query rows
//! × blocks of [`BK`] keys with an online softmax (running row maximum and sum, the output
//! accumulator rescaled when the maximum grows) and keeps, besides the output, only the per-row
//! log-sum-exp `[N, Lq, H]` for backward (q, k, v and the output are shared with the tape, not
//! copied). The backward recomputes the probabilities of each tile from the log-sum-exp. Peak scratch
//! is O(threads × (BQ·BK + (BQ + BK)·max(D, Dv))) (e.g. 2 threads × ~0.6 MB in f32 at D = 512),
//! plus, in the fused backward, per-(sample, head) gradient buffers that add up to the size of the
//! gradients themselves (O(L·C)).
//!
//! **Parallelism and determinism.** The forward runs one task per (sample, query tile). The
//! backward runs one task per (sample, head) ("fused": 5 tile products per tile pair) when all three
//! gradients are wanted and there are at least [`FUSED_MIN_TASKS`] such pairs; otherwise (a single
//! head, as in the VAE's mid-block, or some gradients not wanted) it runs a dQ pass with one task
//! per (sample, query tile) and a dK/dV pass with one task per (sample, key block) (7 tile products).
//! Every task owns its output elements and adds its partial products in a fixed order (key blocks
//! ascending, resp. query tiles ascending); the tile sizes and the choice of path depend on the
//! shapes only, so results are bit-identical for any thread count.
//!
//! Tile products go through faer's matmul for f32 and f64 (AVX-512 where the CPU has it).
//!
//! Backward (per head, P = softmax(S), S = scale · Q Kᵀ, O = P V):
//! Δ = rowsum(dO ⊙ O), dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − Δ), dQ = scale · dS K,
//! dK = scale · dSᵀ Q.

use crate::autograd::{Buf, Float, Tape, Var};
use crate::backend::cpu::gemm::{gemm_t, View};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::any::TypeId;
use std::sync::{Arc, OnceLock};

/// Query rows per tile.
pub const BQ: usize = 64;
/// Keys per block.
pub const BK: usize = 128;
/// The backward runs fused per (sample, head) when all three gradients are wanted and there are at
/// least this many (sample, head) pairs; otherwise (e.g. the VAE's single head) as two passes that
/// parallelise over query tiles (dQ) and key blocks (dK, dV). The choice depends on shapes only.
const FUSED_MIN_TASKS: usize = 4;

/// Problem geometry (per sample: q rows `lq`, key rows `lk`; per head: `d` query/key channels,
/// `dv` value channels).
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    lq: usize,
    lk: usize,
    h: usize,
    d: usize,
    dv: usize,
}

impl Geom {
    fn hd(&self) -> usize {
        self.h * self.d
    }
    fn hdv(&self) -> usize {
        self.h * self.dv
    }
}

/// Scaled-dot-product attention, see the module docs. `q` `[N, Lq, H·D]`, `k` `[N, Lk, H·D]`,
/// `v` `[N, Lk, H·Dv]` → `[N, Lq, H·Dv]`; `scale` None = 1/√D.
pub fn attention<T: Float>(
    tape: &mut Tape<T>,
    q: &Var,
    k: &Var,
    v: &Var,
    heads: usize,
    scale: Option<f64>,
) -> Result<Var> {
    let g = geometry(q.shape(), k.shape(), v.shape(), heads)?;
    let scale = scale.unwrap_or(1.0 / (g.d as f64).sqrt());
    if !scale.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "attention: scale must be finite, got {scale}"
        )));
    }
    let sc = T::from_f64(scale);
    let (qv, kv, vv) = (tape.value(q), tape.value(k), tape.value(v));
    let out_len = g.n * g.lq * g.hdv();
    let mut out = Buf::alloc(out_len);
    let mut lse = Buf::alloc(g.n * g.lq * g.h);
    if out_len > 0 {
        forward(&g, sc, &qv, &kv, &vv, &mut out, &mut lse);
    }
    let (qid, kid, vid) = (q.id(), k.id(), v.id());
    let need = tape.requires_grad(q) || tape.requires_grad(k) || tape.requires_grad(v);
    if !need {
        return Ok(tape.push(&[g.n, g.lq, g.hdv()], out, false, |_, _| Ok(())));
    }
    // The output is shared with the tape (no copy): the backward reads it through this cell, set
    // right after the push.
    let saved_out: Arc<OnceLock<Arc<Buf<T>>>> = Arc::new(OnceLock::new());
    let cell = saved_out.clone();
    let var = tape.push(&[g.n, g.lq, g.hdv()], out, true, move |out_id, gr| {
        let Some(d_out) = gr.take(out_id) else {
            return Ok(());
        };
        let o = cell
            .get()
            .ok_or_else(|| Error::Internal("attention: saved output missing".into()))?;
        let (wq, wk, wv) = (gr.wants(qid), gr.wants(kid), gr.wants(vid));
        if out_len == 0 {
            return Ok(());
        }
        let delta = row_dot(&g, &d_out, o);
        let grads = Saved {
            g,
            scale: sc,
            q: &qv,
            k: &kv,
            v: &vv,
            d_out: &d_out,
            lse: &lse,
            delta: &delta,
        };
        if wq && wk && wv && g.n * g.h >= FUSED_MIN_TASKS {
            let (mut dq, mut dk, mut dvb) = (
                Buf::alloc(qv.len()),
                Buf::alloc(kv.len()),
                Buf::alloc(vv.len()),
            );
            grads.fused(&mut dq, &mut dk, &mut dvb);
            gr.add(qid, dq);
            gr.add(kid, dk);
            gr.add(vid, dvb);
            return Ok(());
        }
        if wq {
            let mut dq = Buf::alloc(qv.len());
            grads.dq(&mut dq);
            gr.add(qid, dq);
        }
        if wk || wv {
            let mut dk = Buf::alloc(if wk { kv.len() } else { 0 });
            let mut dvb = Buf::alloc(vv.len());
            grads.dkv(&mut dk, &mut dvb, wk);
            if wk {
                gr.add(kid, dk);
            }
            if wv {
                gr.add(vid, dvb);
            }
        }
        Ok(())
    });
    // Cannot fail: the cell was created empty just above.
    let _ = saved_out.set(tape.value(&var));
    Ok(var)
}

fn geometry(qs: &[usize], ks: &[usize], vs: &[usize], heads: usize) -> Result<Geom> {
    let bad = |why: &str| {
        Error::Shape(format!(
            "attention: q {qs:?}, k {ks:?}, v {vs:?} with {heads} heads: {why}"
        ))
    };
    if heads == 0 {
        return Err(Error::InvalidArgument(
            "attention: heads must be at least 1".into(),
        ));
    }
    let (&[n, lq, cq], &[nk, lk, ck], &[nv, lv, cv]) = (qs, ks, vs) else {
        return Err(bad("q, k and v must be [N, L, C]"));
    };
    if nk != n || nv != n {
        return Err(bad("q, k and v need the same batch size N"));
    }
    if lv != lk {
        return Err(bad("k and v need the same length"));
    }
    if ck != cq {
        return Err(bad("q and k need the same channel count"));
    }
    if lk == 0 {
        return Err(bad("no keys (Lk = 0)"));
    }
    if cq == 0 || cv == 0 || cq % heads != 0 || cv % heads != 0 {
        return Err(bad(
            "the channels of q/k and of v must be non-zero multiples of heads",
        ));
    }
    Ok(Geom {
        n,
        lq,
        lk,
        h: heads,
        d: cq / heads,
        dv: cv / heads,
    })
}

/// View of the `cols` channels of head `h` of row `r` onwards of a `[rows, width]` matrix (row-major).
fn head<T>(data: &[T], r: usize, width: usize, h: usize, cols: usize) -> View<'_, T> {
    View {
        data: &data[r * width + h * cols..],
        rs: width,
        cs: 1,
    }
}

/// The transpose of [`head`].
fn head_t<T>(data: &[T], r: usize, width: usize, h: usize, cols: usize) -> View<'_, T> {
    View {
        data: &data[r * width + h * cols..],
        rs: 1,
        cs: width,
    }
}

/// dst (m × n, contiguous) = [dst if `accumulate`] + a (m × k) · b (k × n), sequential. f32 and f64
/// go to faer's matmul (AVX-512 kernels where the CPU has them: 2–5× the `gemm` crate's AVX2
/// kernels at these tile shapes), other types to [`gemm_t`]. Panics (a bug: shapes are checked by
/// the op) if the views do not fit.
#[allow(clippy::too_many_arguments)]
fn mm<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    a: View<T>,
    b: View<T>,
) {
    let fits = |v: &View<T>, r: usize, c: usize| {
        r == 0 || c == 0 || v.data.len() > (r - 1) * v.rs + (c - 1) * v.cs
    };
    assert!(
        dst.len() >= m * n && fits(&a, m, k) && fits(&b, k, n),
        "attention: tile views out of bounds"
    );
    if m == 0 || n == 0 || k == 0 {
        return gemm_t(m, n, k, dst, accumulate, a, b, false);
    }
    macro_rules! faer_mm {
        ($t:ty) => {{
            // SAFETY: T is $t (checked by the caller's TypeId test), so the casts are identities;
            // every element the views address lies inside their slices (checked above) and dst is
            // an exclusive borrow that aliases neither input.
            unsafe {
                let d = faer::MatMut::from_raw_parts_mut(
                    dst.as_mut_ptr() as *mut $t,
                    m,
                    n,
                    n as isize,
                    1,
                );
                let av = faer::MatRef::from_raw_parts(
                    a.data.as_ptr() as *const $t,
                    m,
                    k,
                    a.rs as isize,
                    a.cs as isize,
                );
                let bv = faer::MatRef::from_raw_parts(
                    b.data.as_ptr() as *const $t,
                    k,
                    n,
                    b.rs as isize,
                    b.cs as isize,
                );
                let beta = if accumulate {
                    faer::Accum::Add
                } else {
                    faer::Accum::Replace
                };
                faer::linalg::matmul::matmul(d, beta, av, bv, 1.0 as $t, faer::Par::Seq);
            }
        }};
    }
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        faer_mm!(f32)
    } else if TypeId::of::<T>() == TypeId::of::<f64>() {
        faer_mm!(f64)
    } else {
        gemm_t(m, n, k, dst, accumulate, a, b, false)
    }
}

/// Per-task scratch of the forward.
struct FwdScratch<T> {
    s: Vec<T>,
    acc: Vec<T>,
    m: Vec<T>,
    l: Vec<T>,
}

fn forward<T: Float>(g: &Geom, sc: T, q: &[T], k: &[T], v: &[T], out: &mut [T], lse: &mut [T]) {
    let (hd, hdv, h) = (g.hd(), g.hdv(), g.h);
    let g = *g;
    out.par_chunks_mut(g.lq * hdv)
        .zip(lse.par_chunks_mut(g.lq * h))
        .enumerate()
        .flat_map(|(n, (o, l))| {
            o.par_chunks_mut(BQ * hdv)
                .zip(l.par_chunks_mut(BQ * h))
                .enumerate()
                .map(move |(t, x)| (n, t, x))
        })
        .for_each_init(
            || FwdScratch {
                s: vec![T::ZERO; BQ * BK.min(g.lk)],
                acc: vec![T::ZERO; BQ * g.dv],
                m: vec![T::ZERO; BQ],
                l: vec![T::ZERO; BQ],
            },
            |sc_buf, (n, t, (o, l))| {
                let i0 = n * g.lq + t * BQ;
                let bq = o.len() / hdv;
                let FwdScratch { s, acc, m, l: sum } = sc_buf;
                for hh in 0..h {
                    for (b, j0) in (0..g.lk).step_by(BK).enumerate() {
                        let bk = BK.min(g.lk - j0);
                        let kr = n * g.lk + j0;
                        mm(
                            bq,
                            bk,
                            g.d,
                            s,
                            false,
                            head(q, i0, hd, hh, g.d),
                            head_t(k, kr, hd, hh, g.d),
                        );
                        online_softmax(&mut s[..bq * bk], bk, sc, m, sum, acc, g.dv, b == 0);
                        mm(
                            bq,
                            g.dv,
                            bk,
                            acc,
                            b > 0,
                            View::rows(&s[..], bk),
                            head(v, kr, hdv, hh, g.dv),
                        );
                    }
                    finish_rows(o, l, acc, m, sum, g.dv, hh, h);
                }
            },
        );
}

/// One key block of the online softmax: `s` (bq × bk logits before scaling) becomes
/// exp(scale·s − m_new); m, l (running max, running sum) are updated and the accumulator rows
/// rescaled by exp(m_old − m_new). `first`: the block starts the row (no previous state).
#[allow(clippy::too_many_arguments)]
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn online_softmax<T: Float>(
    s: &mut [T],
    bk: usize,
    sc: T,
    m: &mut [T],
    l: &mut [T],
    acc: &mut [T],
    dv: usize,
    first: bool,
) {
    for (r, row) in s.chunks_exact_mut(bk).enumerate() {
        // Lane-wise max and sum (LANES independent accumulators, combined in a fixed order) so the
        // reductions vectorise.
        let mut mx = [row[0] * sc; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (x, m) in c.iter_mut().zip(mx.iter_mut()) {
                *x *= sc;
                *m = m.max(*x);
            }
        }
        for (x, m) in chunks.into_remainder().iter_mut().zip(mx.iter_mut()) {
            *x *= sc;
            *m = m.max(*x);
        }
        let mx = mx.iter().fold(mx[0], |a, &b| a.max(b));
        let m_new = if first { mx } else { m[r].max(mx) };
        let mut sums = [T::ZERO; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (x, s) in c.iter_mut().zip(sums.iter_mut()) {
                *x = (*x - m_new).exp_act();
                *s += *x;
            }
        }
        for (x, s) in chunks.into_remainder().iter_mut().zip(sums.iter_mut()) {
            *x = (*x - m_new).exp_act();
            *s += *x;
        }
        let sum = sums.iter().fold(T::ZERO, |a, &b| a + b);
        if first {
            l[r] = sum;
        } else {
            let alpha = (m[r] - m_new).exp_act();
            l[r] = l[r] * alpha + sum;
            if alpha != T::ONE {
                acc[r * dv..(r + 1) * dv]
                    .iter_mut()
                    .for_each(|a| *a *= alpha);
            }
        }
        m[r] = m_new;
    }
}

/// Independent accumulators of the vectorised row reductions.
const LANES: usize = 16;

/// Writes head `hh` of the finished tile: output rows acc / l and lse = m + ln l.
#[allow(clippy::too_many_arguments)]
fn finish_rows<T: Float>(
    o: &mut [T],
    lse: &mut [T],
    acc: &[T],
    m: &[T],
    l: &[T],
    dv: usize,
    hh: usize,
    h: usize,
) {
    let hdv = h * dv;
    for (r, orow) in o.chunks_exact_mut(hdv).enumerate() {
        let inv = T::ONE / l[r];
        orow[hh * dv..(hh + 1) * dv]
            .iter_mut()
            .zip(&acc[r * dv..(r + 1) * dv])
            .for_each(|(o, &a)| *o = a * inv);
        lse[r * h + hh] = m[r] + l[r].ln();
    }
}

/// Δ[n, i, h] = Σ_c dO[n, i, h·Dv + c] · O[n, i, h·Dv + c].
fn row_dot<T: Float>(g: &Geom, d_out: &[T], o: &[T]) -> Buf<T> {
    let (dv, hdv) = (g.dv, g.hdv());
    let rows_per = (1 << 14) / hdv + 1;
    let mut delta = Buf::alloc(g.n * g.lq * g.h);
    delta
        .par_chunks_mut(rows_per * g.h)
        .zip(d_out.par_chunks(rows_per * hdv))
        .zip(o.par_chunks(rows_per * hdv))
        .for_each(|((dl, dr), or)| {
            for ((dl, dr), or) in dl
                .chunks_exact_mut(g.h)
                .zip(dr.chunks_exact(hdv))
                .zip(or.chunks_exact(hdv))
            {
                for (hh, x) in dl.iter_mut().enumerate() {
                    *x = dot(&dr[hh * dv..(hh + 1) * dv], &or[hh * dv..(hh + 1) * dv]);
                }
            }
        });
    delta
}

/// Σ a ⊙ b with [`LANES`] independent partial sums (vectorises; fixed order).
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    for ((s, &x), &y) in acc.iter_mut().zip(ra).zip(rb) {
        *s += x * y;
    }
    acc.iter().fold(T::ZERO, |s, &x| s + x)
}

/// What the backward passes read.
struct Saved<'a, T: Float> {
    g: Geom,
    scale: T,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    d_out: &'a [T],
    lse: &'a [T],
    delta: &'a [T],
}

/// Per-task scratch of the backward passes.
struct BwdScratch<T> {
    s: Vec<T>,
    dp: Vec<T>,
    acc: Vec<T>,
    acc2: Vec<T>,
    row_lse: Vec<T>,
    row_delta: Vec<T>,
}

impl<T: Float> Saved<'_, T> {
    /// All three gradients in one pass (5 tile products and one exp per tile instead of 7 and two):
    /// one task per (sample, head) walks query tiles (outer) × key blocks (inner), accumulating its
    /// head's dQ rows, dK and dV in task-local buffers (O(L·D) per task, the size of the gradients
    /// in all), which are then scattered into the [N, L, H·D] layout.
    fn fused(&self, dq: &mut [T], dk: &mut [T], dv: &mut [T]) {
        let g = self.g;
        let (hd, hdv, h) = (g.hd(), g.hdv(), g.h);
        let bkm = BK.min(g.lk);
        let parts: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..g.n * h)
            .into_par_iter()
            .map_init(
                || BwdScratch {
                    s: vec![T::ZERO; BQ * bkm],
                    dp: vec![T::ZERO; BQ * bkm],
                    acc: Vec::new(),
                    acc2: Vec::new(),
                    row_lse: vec![T::ZERO; BQ],
                    row_delta: vec![T::ZERO; BQ],
                },
                |scr, task| {
                    let (n, hh) = (task / h, task % h);
                    let mut dq_h = vec![T::ZERO; g.lq * g.d];
                    let mut dk_h = vec![T::ZERO; g.lk * g.d];
                    let mut dv_h = vec![T::ZERO; g.lk * g.dv];
                    for i in (0..g.lq).step_by(BQ) {
                        let bq = BQ.min(g.lq - i);
                        let i0 = n * g.lq + i;
                        for r in 0..bq {
                            scr.row_lse[r] = self.lse[(i0 + r) * h + hh];
                            scr.row_delta[r] = self.delta[(i0 + r) * h + hh];
                        }
                        for (b, j) in (0..g.lk).step_by(BK).enumerate() {
                            let bk = BK.min(g.lk - j);
                            let kr = n * g.lk + j;
                            let (s, dp) = (&mut scr.s[..bq * bk], &mut scr.dp[..bq * bk]);
                            mm(
                                bq,
                                bk,
                                g.d,
                                s,
                                false,
                                head(self.q, i0, hd, hh, g.d),
                                head_t(self.k, kr, hd, hh, g.d),
                            );
                            p_rows(s, bk, self.scale, &scr.row_lse[..bq]);
                            // dV += Pᵀ dO.
                            mm(
                                bk,
                                g.dv,
                                bq,
                                &mut dv_h[j * g.dv..],
                                true,
                                View::t(&s[..], bk),
                                head(self.d_out, i0, hdv, hh, g.dv),
                            );
                            mm(
                                bq,
                                bk,
                                g.dv,
                                dp,
                                false,
                                head(self.d_out, i0, hdv, hh, g.dv),
                                head_t(self.v, kr, hdv, hh, g.dv),
                            );
                            ds_from_p(s, dp, bk, &scr.row_delta[..bq]);
                            mm(
                                bq,
                                g.d,
                                bk,
                                &mut dq_h[i * g.d..],
                                b > 0,
                                View::rows(&s[..], bk),
                                head(self.k, kr, hd, hh, g.d),
                            );
                            mm(
                                bk,
                                g.d,
                                bq,
                                &mut dk_h[j * g.d..],
                                true,
                                View::t(&s[..], bk),
                                head(self.q, i0, hd, hh, g.d),
                            );
                        }
                    }
                    (dq_h, dk_h, dv_h)
                },
            )
            .collect();
        let (mut pq, mut pk, mut pv) = (Vec::new(), Vec::new(), Vec::new());
        for (a, b, c) in parts {
            pq.push(a);
            pk.push(b);
            pv.push(c);
        }
        scatter_heads(dq, &pq, g.lq, g.d, h, self.scale);
        scatter_heads(dk, &pk, g.lk, g.d, h, self.scale);
        scatter_heads(dv, &pv, g.lk, g.dv, h, T::ONE);
    }

    /// dQ: one task per (sample, query tile), key blocks in ascending order.
    fn dq(&self, dq: &mut [T]) {
        let g = self.g;
        let (hd, hdv, h) = (g.hd(), g.hdv(), g.h);
        let bkm = BK.min(g.lk);
        dq.par_chunks_mut(g.lq * hd)
            .enumerate()
            .flat_map(|(n, d)| {
                d.par_chunks_mut(BQ * hd)
                    .enumerate()
                    .map(move |(t, x)| (n, t, x))
            })
            .for_each_init(
                || BwdScratch {
                    s: vec![T::ZERO; BQ * bkm],
                    dp: vec![T::ZERO; BQ * bkm],
                    acc: vec![T::ZERO; BQ * g.d],
                    acc2: Vec::new(),
                    row_lse: vec![T::ZERO; BQ],
                    row_delta: vec![T::ZERO; BQ],
                },
                |scr, (n, t, dqt)| {
                    let i0 = n * g.lq + t * BQ;
                    let bq = dqt.len() / hd;
                    for hh in 0..h {
                        for r in 0..bq {
                            scr.row_lse[r] = self.lse[(i0 + r) * h + hh];
                            scr.row_delta[r] = self.delta[(i0 + r) * h + hh];
                        }
                        for (b, j0) in (0..g.lk).step_by(BK).enumerate() {
                            let bk = BK.min(g.lk - j0);
                            let kr = n * g.lk + j0;
                            let (s, dp) = (&mut scr.s[..bq * bk], &mut scr.dp[..bq * bk]);
                            mm(
                                bq,
                                bk,
                                g.d,
                                s,
                                false,
                                head(self.q, i0, hd, hh, g.d),
                                head_t(self.k, kr, hd, hh, g.d),
                            );
                            mm(
                                bq,
                                bk,
                                g.dv,
                                dp,
                                false,
                                head(self.d_out, i0, hdv, hh, g.dv),
                                head_t(self.v, kr, hdv, hh, g.dv),
                            );
                            ds_rows(s, dp, bk, self.scale, &scr.row_lse, &scr.row_delta);
                            mm(
                                bq,
                                g.d,
                                bk,
                                &mut scr.acc,
                                b > 0,
                                View::rows(&s[..], bk),
                                head(self.k, kr, hd, hh, g.d),
                            );
                        }
                        write_head(dqt, &scr.acc, g.d, hh, h, self.scale);
                    }
                },
            );
    }

    /// dK (when `want_k`) and dV: one task per (sample, key block), query tiles in ascending order.
    fn dkv(&self, dk: &mut [T], dv: &mut [T], want_k: bool) {
        let g = self.g;
        let (hd, hdv, h) = (g.hd(), g.hdv(), g.h);
        let bqm = BQ.min(g.lq);
        let tasks: Vec<(usize, usize)> = (0..g.n)
            .flat_map(|n| (0..g.lk.div_ceil(BK)).map(move |b| (n, b)))
            .collect();
        // dV rows of task (n, b) are one contiguous chunk; so are dK rows (when wanted).
        let mut dk_parts: Vec<&mut [T]> = Vec::with_capacity(tasks.len());
        if want_k {
            for s in dk.chunks_mut(g.lk * hd) {
                dk_parts.extend(s.chunks_mut(BK * hd));
            }
        }
        let mut dv_parts: Vec<&mut [T]> = Vec::with_capacity(tasks.len());
        for s in dv.chunks_mut(g.lk * hdv) {
            dv_parts.extend(s.chunks_mut(BK * hdv));
        }
        let mut dk_iter = dk_parts.into_iter();
        let work: Vec<_> = tasks
            .into_iter()
            .zip(dv_parts)
            .map(|(t, dvp)| (t, dvp, if want_k { dk_iter.next() } else { None }))
            .collect();
        work.into_par_iter().for_each_init(
            || BwdScratch {
                s: vec![T::ZERO; BK * bqm],
                dp: vec![T::ZERO; BK * bqm],
                acc: vec![T::ZERO; BK * g.d],
                acc2: vec![T::ZERO; BK * g.dv],
                row_lse: vec![T::ZERO; BQ],
                row_delta: vec![T::ZERO; BQ],
            },
            |scr, ((n, b), dvp, mut dkp)| {
                let j0 = b * BK;
                let kr = n * g.lk + j0;
                let bk = dvp.len() / hdv;
                for hh in 0..h {
                    for (t, i) in (0..g.lq).step_by(BQ).enumerate() {
                        let bq = BQ.min(g.lq - i);
                        let i0 = n * g.lq + i;
                        for c in 0..bq {
                            scr.row_lse[c] = self.lse[(i0 + c) * h + hh];
                            scr.row_delta[c] = self.delta[(i0 + c) * h + hh];
                        }
                        let (st, dpt) = (&mut scr.s[..bk * bq], &mut scr.dp[..bk * bq]);
                        // Sᵀ = K Qᵀ (bk × bq), then Pᵀ in place.
                        mm(
                            bk,
                            bq,
                            g.d,
                            st,
                            false,
                            head(self.k, kr, hd, hh, g.d),
                            head_t(self.q, i0, hd, hh, g.d),
                        );
                        p_cols(st, bq, self.scale, &scr.row_lse[..bq]);
                        // dV += Pᵀ dO.
                        mm(
                            bk,
                            g.dv,
                            bq,
                            &mut scr.acc2,
                            t > 0,
                            View::rows(&st[..], bq),
                            head(self.d_out, i0, hdv, hh, g.dv),
                        );
                        if dkp.is_none() {
                            continue;
                        }
                        // dPᵀ = V dOᵀ; dSᵀ = Pᵀ ⊙ (dPᵀ − Δ); dK += dSᵀ Q.
                        mm(
                            bk,
                            bq,
                            g.dv,
                            dpt,
                            false,
                            head(self.v, kr, hdv, hh, g.dv),
                            head_t(self.d_out, i0, hdv, hh, g.dv),
                        );
                        ds_cols(st, dpt, bq, &scr.row_delta[..bq]);
                        mm(
                            bk,
                            g.d,
                            bq,
                            &mut scr.acc,
                            t > 0,
                            View::rows(&st[..], bq),
                            head(self.q, i0, hd, hh, g.d),
                        );
                    }
                    write_head(dvp, &scr.acc2[..bk * g.dv], g.dv, hh, h, T::ONE);
                    if let Some(dkp) = dkp.as_deref_mut() {
                        write_head(dkp, &scr.acc[..bk * g.d], g.d, hh, h, self.scale);
                    }
                }
            },
        );
    }
}

/// Row-broadcast dS: s (logits) → P = exp(scale·s − lse[r]), then s = P ⊙ (dp − Δ[r]).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn ds_rows<T: Float>(s: &mut [T], dp: &[T], bk: usize, sc: T, lse: &[T], delta: &[T]) {
    for (r, (sr, dr)) in s.chunks_exact_mut(bk).zip(dp.chunks_exact(bk)).enumerate() {
        let (m, dl) = (lse[r], delta[r]);
        for (x, &d) in sr.iter_mut().zip(dr) {
            *x = (*x * sc - m).exp_act() * (d - dl);
        }
    }
}

/// dst [N·len, h·cols] row (n, r), head hh ← mul · parts[n·h + hh] row r (parts: [len, cols] each).
fn scatter_heads<T: Float>(
    dst: &mut [T],
    parts: &[Vec<T>],
    len: usize,
    cols: usize,
    h: usize,
    mul: T,
) {
    dst.par_chunks_mut(h * cols)
        .enumerate()
        .for_each(|(row, d)| {
            let (n, r) = (row / len, row % len);
            for (hh, dh) in d.chunks_exact_mut(cols).enumerate() {
                let src = &parts[n * h + hh][r * cols..(r + 1) * cols];
                dh.iter_mut().zip(src).for_each(|(d, &s)| *d = s * mul);
            }
        });
}

/// Row-broadcast P: s (bq × bk logits) → exp(scale·s − lse[r]).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn p_rows<T: Float>(s: &mut [T], bk: usize, sc: T, lse: &[T]) {
    for (row, &m) in s.chunks_exact_mut(bk).zip(lse) {
        row.iter_mut().for_each(|x| *x = (*x * sc - m).exp_act());
    }
}

/// Row-broadcast dS from P: s (P) ← P ⊙ (dp − Δ[r]).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn ds_from_p<T: Float>(s: &mut [T], dp: &[T], bk: usize, delta: &[T]) {
    for ((row, dr), &dl) in s.chunks_exact_mut(bk).zip(dp.chunks_exact(bk)).zip(delta) {
        row.iter_mut().zip(dr).for_each(|(x, &d)| *x *= d - dl);
    }
}

/// Column-broadcast P: st (bk × bq logits) → exp(scale·st − lse[c]).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn p_cols<T: Float>(st: &mut [T], bq: usize, sc: T, lse: &[T]) {
    for row in st.chunks_exact_mut(bq) {
        for (x, &m) in row.iter_mut().zip(lse) {
            *x = (*x * sc - m).exp_act();
        }
    }
}

/// Column-broadcast dS: st (Pᵀ) ← Pᵀ ⊙ (dPᵀ − Δ[c]).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn ds_cols<T: Float>(st: &mut [T], dpt: &[T], bq: usize, delta: &[T]) {
    for (row, dr) in st.chunks_exact_mut(bq).zip(dpt.chunks_exact(bq)) {
        for ((x, &d), &dl) in row.iter_mut().zip(dr).zip(delta) {
            *x *= d - dl;
        }
    }
}

/// Writes `acc` (rows × cols) times `mul` into head `hh` of the rows of `dst` ([rows, h·cols]).
fn write_head<T: Float>(dst: &mut [T], acc: &[T], cols: usize, hh: usize, h: usize, mul: T) {
    for (drow, arow) in dst.chunks_exact_mut(h * cols).zip(acc.chunks_exact(cols)) {
        drow[hh * cols..(hh + 1) * cols]
            .iter_mut()
            .zip(arow)
            .for_each(|(d, &a)| *d = a * mul);
    }
}
