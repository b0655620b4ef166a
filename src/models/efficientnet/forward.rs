//! Inference forward pass on the CPU, BN folded into the convolutions.
//!
//! Activations are NHWC (rows = pixels of a group of samples, columns = channels), so 1 × 1 convs
//! are single GEMMs over the whole group and the depthwise conv vectorises across channels. The
//! batch is split into groups of a few samples, each run start to finish by one thread with its own
//! scratch buffers (allocated once per thread, reused across groups): no synchronisation and no
//! allocation inside the layer loop. Depthwise conv + bias + SiLU + SE pooling is one kernel; the SE
//! scale is applied in place before the project GEMM; the residual is accumulated by that GEMM.
//! The pass stops after the deepest requested layer.

use super::config::{BlockSpec, EfficientNetConfig, BLOCKS, STEM_CH, TOP_CH};
use super::layers::{LayerTap, TapPoint};
use super::weights::{block_keys, StateDict};
use super::Progress;
use crate::backend::cpu::activation::{scale_rows, sigmoid, silu, sum_rows};
use crate::backend::cpu::conv::{depthwise_bias_silu, im2col_nchw, ConvGeom};
use crate::backend::cpu::gemm::{matmul, MatRef};
use crate::backend::cpu::pointwise::PackedPointwise;
use crate::backend::cpu::pointwise_bf16::Pointwise;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::cell::RefCell;

/// A convolution with BN folded in: `w` is [out, in·k·k] (OIHW flattened), `b` [out].
pub struct FoldedConv {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

pub struct FoldedBlock {
    pub spec: BlockSpec,
    pub expand: Option<Pointwise>,
    /// Depthwise weights tap-major [k·k, hidden], BN folded.
    pub dw_w: Vec<f32>,
    pub dw_b: Vec<f32>,
    pub se1_w: Vec<f32>,
    pub se1_b: Vec<f32>,
    pub se2_w: Vec<f32>,
    pub se2_b: Vec<f32>,
    pub project: Pointwise,
}

pub struct Folded {
    pub stem: Pointwise,
    pub blocks: Vec<FoldedBlock>,
    pub top: Pointwise,
    pub cls_w: Vec<f32>,
    pub cls_b: Vec<f32>,
    pub num_classes: usize,
}

fn get<'a>(s: &'a StateDict, k: &str) -> Result<&'a [f32]> {
    s.get(k)
        .ok_or_else(|| Error::MissingKey(format!("missing key {k:?}")))?
        .as_f32()
}

/// Folds BN `{bn}.{weight,bias,running_mean,running_var}` into conv weight `conv` ([out, …]).
pub(crate) fn fold(s: &StateDict, conv: &str, bn: &str, eps: f32) -> Result<FoldedConv> {
    let w = get(s, conv)?;
    let (gamma, beta, mean, var) = (
        get(s, &format!("{bn}.weight"))?,
        get(s, &format!("{bn}.bias"))?,
        get(s, &format!("{bn}.running_mean"))?,
        get(s, &format!("{bn}.running_var"))?,
    );
    let out = gamma.len();
    let inp = w.len() / out;
    let mut fw = w.to_vec();
    let mut fb = vec![0f32; out];
    for o in 0..out {
        let scale = gamma[o] as f64 / (var[o] as f64 + eps as f64).sqrt();
        for x in &mut fw[o * inp..(o + 1) * inp] {
            *x = (*x as f64 * scale) as f32;
        }
        fb[o] = (beta[o] as f64 - mean[o] as f64 * scale) as f32;
    }
    Ok(FoldedConv { w: fw, b: fb })
}

fn packed(c: FoldedConv) -> Pointwise {
    let n = c.b.len();
    Pointwise::new(PackedPointwise::new(&c.w, &c.b, n, c.w.len() / n))
}

impl Folded {
    pub fn build(s: &StateDict, cfg: &EfficientNetConfig) -> Result<Self> {
        let eps = cfg.bn_eps;
        let stem = packed(fold(s, "features.0.0.weight", "features.0.1", eps)?);
        let mut blocks = Vec::with_capacity(BLOCKS.len());
        for spec in BLOCKS {
            let k = block_keys(&spec);
            let expand = match &k.expand {
                Some(p) => Some(packed(fold(
                    s,
                    &format!("{p}.0.weight"),
                    &format!("{p}.1"),
                    eps,
                )?)),
                None => None,
            };
            let dw = fold(
                s,
                &format!("{}.0.weight", k.dw),
                &format!("{}.1", k.dw),
                eps,
            )?;
            let (hid, kk) = (spec.hidden(), spec.kernel * spec.kernel);
            let mut dw_w = vec![0f32; kk * hid];
            for c in 0..hid {
                for t in 0..kk {
                    dw_w[t * hid + c] = dw.w[c * kk + t];
                }
            }
            blocks.push(FoldedBlock {
                spec,
                expand,
                dw_w,
                dw_b: dw.b,
                se1_w: get(s, &format!("{}.fc1.weight", k.se))?.to_vec(),
                se1_b: get(s, &format!("{}.fc1.bias", k.se))?.to_vec(),
                se2_w: get(s, &format!("{}.fc2.weight", k.se))?.to_vec(),
                se2_b: get(s, &format!("{}.fc2.bias", k.se))?.to_vec(),
                project: packed(fold(
                    s,
                    &format!("{}.0.weight", k.project),
                    &format!("{}.1", k.project),
                    eps,
                )?),
            });
        }
        let top = packed(fold(s, "features.8.0.weight", "features.8.1", eps)?);
        Ok(Folded {
            stem,
            blocks,
            top,
            cls_w: get(s, "classifier.1.weight")?.to_vec(),
            cls_b: get(s, "classifier.1.bias")?.to_vec(),
            num_classes: cfg.num_classes,
        })
    }
}

thread_local! {
    /// Per-thread working memory, grown on first use and kept for later calls (pool threads persist).
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Working memory of one thread.
#[derive(Default)]
struct Scratch {
    cur: Vec<f32>,
    expanded: Vec<f32>,
    dw: Vec<f32>,
    next: Vec<f32>,
    cols: Vec<f32>,
    pool: Vec<f32>,
    pool2: Vec<f32>,
    se_mid: Vec<f32>,
    se_scale: Vec<f32>,
}

fn ensure(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// Computes the requested taps for `x` (N, C, H, W): one (N, D) tensor per tap.
pub fn run(
    f: &Folded,
    cfg: &EfficientNetConfig,
    x: &Tensor,
    taps: &[LayerTap],
    batch: usize,
    progress: Progress,
) -> Result<Vec<Tensor>> {
    let s = x.shape();
    if s.len() != 4 || s[1] != cfg.in_channels {
        return Err(Error::Shape(format!(
            "crops must be (N, {}, H, W) float32, got shape {s:?}",
            cfg.in_channels
        )));
    }
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    if h == 0 || w == 0 {
        return Err(Error::Shape(format!(
            "crops have an empty spatial size {h} × {w}"
        )));
    }
    let data = x.as_f32()?;
    x.check_finite("crops")?;
    let dims: Vec<usize> = taps
        .iter()
        .map(|t| {
            if t.point == TapPoint::Logits {
                f.num_classes
            } else {
                t.channels()
            }
        })
        .collect();
    let mut outs: Vec<Vec<f32>> = dims.iter().map(|d| vec![0f32; n * d]).collect();
    let deepest = taps.iter().map(|t| t.point.order()).max().unwrap_or((0, 0));
    let per = c * h * w;
    let batch = if batch == 0 { n.max(1) } else { batch };
    let threads = crate::threads::num_threads().max(1);
    let mut done = 0;
    while done < n {
        let nb = batch.min(n - done);
        // Groups of up to 8 samples, at least one group per thread when the batch allows.
        let group = nb.div_ceil(threads).clamp(1, 8);
        let input = &data[done * per..(done + nb) * per];
        let results: Vec<Vec<Vec<f32>>> = crate::threads::install(|| {
            input
                .par_chunks(group * per)
                .map(|chunk| {
                    SCRATCH.with(|s| {
                        run_group(
                            f,
                            chunk,
                            chunk.len() / per,
                            c,
                            h,
                            w,
                            cfg,
                            taps,
                            &dims,
                            deepest,
                            &mut s.borrow_mut(),
                        )
                    })
                })
                .collect()
        });
        let mut row = done;
        for r in results {
            let g = r[0].len() / dims[0].max(1);
            for (t, v) in r.into_iter().enumerate() {
                outs[t][row * dims[t]..row * dims[t] + v.len()].copy_from_slice(&v);
            }
            row += if dims[0] == 0 { 0 } else { g };
        }
        done += nb;
        if !progress(done, n) {
            return Err(Error::Cancelled);
        }
    }
    outs.into_iter()
        .zip(&dims)
        .map(|(v, &d)| Tensor::from_f32(&[n, d], v))
        .collect()
}

/// Writes the spatial mean of `act` ([g·hw, ch]) for every tap at `point` into `outs`.
fn tap_mean(
    point: TapPoint,
    act: &[f32],
    g: usize,
    hw: usize,
    ch: usize,
    taps: &[LayerTap],
    outs: &mut [Vec<f32>],
) {
    for (t, tap) in taps.iter().enumerate() {
        if tap.point == point {
            for s in 0..g {
                let dst = &mut outs[t][s * ch..(s + 1) * ch];
                dst.fill(0.0);
                sum_rows(&act[s * hw * ch..(s + 1) * hw * ch], dst);
                let inv = 1.0 / hw as f32;
                dst.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }
}

/// Writes already-pooled per-sample vectors ([g, ch]) for taps at `point`.
fn tap_pooled(
    point: TapPoint,
    pooled: &[f32],
    g: usize,
    ch: usize,
    taps: &[LayerTap],
    outs: &mut [Vec<f32>],
) {
    for (t, tap) in taps.iter().enumerate() {
        if tap.point == point {
            outs[t][..g * ch].copy_from_slice(&pooled[..g * ch]);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_group(
    f: &Folded,
    input: &[f32],
    g: usize,
    c: usize,
    h: usize,
    w: usize,
    cfg: &EfficientNetConfig,
    taps: &[LayerTap],
    dims: &[usize],
    deepest: (usize, usize),
    sc: &mut Scratch,
) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = dims.iter().map(|d| vec![0f32; g * d]).collect();
    let past = |p: TapPoint| p.order() >= deepest;

    // Stem: 3×3 stride-2 conv as im2col + GEMM, bias, SiLU.
    let (oh, pt) = cfg.padding.out_and_pad(h, 3, 2);
    let (ow, pl) = cfg.padding.out_and_pad(w, 3, 2);
    let geom = ConvGeom {
        h,
        w,
        k: 3,
        stride: 2,
        pad_top: pt,
        pad_left: pl,
        oh,
        ow,
    };
    let (hw, kdim) = (oh * ow, c * 9);
    ensure(&mut sc.cols, g * hw * kdim);
    for s in 0..g {
        im2col_nchw(
            &input[s * c * h * w..(s + 1) * c * h * w],
            c,
            &geom,
            &mut sc.cols[s * hw * kdim..(s + 1) * hw * kdim],
        );
    }
    ensure(&mut sc.cur, g * hw * STEM_CH);
    f.stem.forward(&sc.cols, g * hw, &mut sc.cur, false, true);
    tap_mean(TapPoint::Stem, &sc.cur, g, hw, STEM_CH, taps, &mut outs);
    if past(TapPoint::Stem) {
        return outs;
    }

    let (mut hh, mut ww) = (oh, ow);
    for (bi, blk) in f.blocks.iter().enumerate() {
        let spec = &blk.spec;
        let (cin, hid, cout) = (spec.in_ch, spec.hidden(), spec.out_ch);
        let hw_in = hh * ww;
        // Expand 1×1 + bias + SiLU.
        if let Some(e) = &blk.expand {
            ensure(&mut sc.expanded, g * hw_in * hid);
            e.forward(
                &sc.cur[..g * hw_in * cin],
                g * hw_in,
                &mut sc.expanded,
                false,
                true,
            );
            tap_mean(
                TapPoint::Expand(bi),
                &sc.expanded,
                g,
                hw_in,
                hid,
                taps,
                &mut outs,
            );
            if past(TapPoint::Expand(bi)) {
                return outs;
            }
        }
        let x_exp: &[f32] = if blk.expand.is_some() {
            &sc.expanded
        } else {
            &sc.cur
        };
        // Depthwise + bias + SiLU, pooled sums for SE.
        let (oh, pt) = cfg.padding.out_and_pad(hh, spec.kernel, spec.stride);
        let (ow, pl) = cfg.padding.out_and_pad(ww, spec.kernel, spec.stride);
        let geom = ConvGeom {
            h: hh,
            w: ww,
            k: spec.kernel,
            stride: spec.stride,
            pad_top: pt,
            pad_left: pl,
            oh,
            ow,
        };
        let hw_out = oh * ow;
        ensure(&mut sc.dw, g * hw_out * hid);
        ensure(&mut sc.pool, g * hid);
        sc.pool[..g * hid].fill(0.0);
        for s in 0..g {
            depthwise_bias_silu(
                &x_exp[s * hw_in * hid..(s + 1) * hw_in * hid],
                &blk.dw_w,
                &blk.dw_b,
                &mut sc.dw[s * hw_out * hid..(s + 1) * hw_out * hid],
                &mut sc.pool[s * hid..(s + 1) * hid],
                &geom,
            );
        }
        let inv = 1.0 / hw_out as f32;
        sc.pool[..g * hid].iter_mut().for_each(|v| *v *= inv);
        tap_pooled(TapPoint::Depthwise(bi), &sc.pool, g, hid, taps, &mut outs);
        if past(TapPoint::Depthwise(bi)) {
            return outs;
        }
        // Squeeze-excite: per sample s = σ(W2 · silu(W1 · mean + b1) + b2), then x *= s.
        let sq = spec.se_width();
        ensure(&mut sc.se_mid, g * sq);
        ensure(&mut sc.se_scale, g * hid);
        for v in sc.se_mid[..g * sq].chunks_exact_mut(sq) {
            v.copy_from_slice(&blk.se1_b);
        }
        matmul(
            &mut sc.se_mid,
            MatRef::rows(&sc.pool, g, hid),
            MatRef::transposed(&blk.se1_w, hid, sq),
            true,
        );
        sc.se_mid[..g * sq].iter_mut().for_each(|v| *v = silu(*v));
        for v in sc.se_scale[..g * hid].chunks_exact_mut(hid) {
            v.copy_from_slice(&blk.se2_b);
        }
        matmul(
            &mut sc.se_scale,
            MatRef::rows(&sc.se_mid, g, sq),
            MatRef::transposed(&blk.se2_w, sq, hid),
            true,
        );
        sc.se_scale[..g * hid]
            .iter_mut()
            .for_each(|v| *v = sigmoid(*v));
        for s in 0..g {
            scale_rows(
                &mut sc.dw[s * hw_out * hid..(s + 1) * hw_out * hid],
                &sc.se_scale[s * hid..(s + 1) * hid],
            );
        }
        if taps.iter().any(|t| t.point == TapPoint::SeExcite(bi)) {
            for (p, s) in sc.pool[..g * hid].iter_mut().zip(&sc.se_scale) {
                *p *= *s;
            }
            tap_pooled(TapPoint::SeExcite(bi), &sc.pool, g, hid, taps, &mut outs);
        }
        if past(TapPoint::SeExcite(bi)) {
            return outs;
        }
        // Project 1×1 + bias (no activation), residual accumulated by the GEMM.
        let want_project = taps.iter().any(|t| t.point == TapPoint::Project(bi));
        if spec.residual() {
            if want_project {
                ensure(&mut sc.pool2, g * cout);
                sc.pool2[..g * cout].fill(0.0);
                for s in 0..g {
                    sum_rows(
                        &sc.cur[s * hw_in * cout..(s + 1) * hw_in * cout],
                        &mut sc.pool2[s * cout..(s + 1) * cout],
                    );
                }
            }
            blk.project
                .forward(&sc.dw, g * hw_out, &mut sc.cur, true, false);
            if want_project {
                tap_mean(
                    TapPoint::Project(bi),
                    &sc.cur,
                    g,
                    hw_out,
                    cout,
                    taps,
                    &mut outs,
                );
                let inv = 1.0 / hw_out as f32;
                for (t, tap) in taps.iter().enumerate() {
                    if tap.point == TapPoint::Project(bi) {
                        for (o, p) in outs[t].iter_mut().zip(&sc.pool2) {
                            *o -= *p * inv;
                        }
                    }
                }
            }
        } else {
            ensure(&mut sc.next, g * hw_out * cout);
            blk.project
                .forward(&sc.dw, g * hw_out, &mut sc.next, false, false);
            std::mem::swap(&mut sc.cur, &mut sc.next);
            tap_mean(
                TapPoint::Project(bi),
                &sc.cur,
                g,
                hw_out,
                cout,
                taps,
                &mut outs,
            );
        }
        tap_mean(
            TapPoint::Output(bi),
            &sc.cur,
            g,
            hw_out,
            cout,
            taps,
            &mut outs,
        );
        if past(TapPoint::Output(bi)) {
            return outs;
        }
        hh = oh;
        ww = ow;
    }

    // Head: 1×1 conv to 1280 + bias + SiLU, mean pool, classifier.
    let hw = hh * ww;
    let cin = BLOCKS[BLOCKS.len() - 1].out_ch;
    ensure(&mut sc.expanded, g * hw * TOP_CH);
    f.top.forward(
        &sc.cur[..g * hw * cin],
        g * hw,
        &mut sc.expanded,
        false,
        true,
    );
    ensure(&mut sc.pool, g * TOP_CH);
    sc.pool[..g * TOP_CH].fill(0.0);
    for s in 0..g {
        sum_rows(
            &sc.expanded[s * hw * TOP_CH..(s + 1) * hw * TOP_CH],
            &mut sc.pool[s * TOP_CH..(s + 1) * TOP_CH],
        );
    }
    let inv = 1.0 / hw as f32;
    sc.pool[..g * TOP_CH].iter_mut().for_each(|v| *v *= inv);
    tap_pooled(TapPoint::Top, &sc.pool, g, TOP_CH, taps, &mut outs);
    if past(TapPoint::Top) {
        return outs;
    }
    let k = f.num_classes;
    let mut logits = vec![0f32; g * k];
    for v in logits.chunks_exact_mut(k) {
        v.copy_from_slice(&f.cls_b);
    }
    matmul(
        &mut logits,
        MatRef::rows(&sc.pool, g, TOP_CH),
        MatRef::transposed(&f.cls_w, TOP_CH, k),
        true,
    );
    tap_pooled(TapPoint::Logits, &logits, g, k, taps, &mut outs);
    outs
}
