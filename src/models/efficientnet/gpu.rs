//! Inference on a [`Gpu`]: the CPU pass of `forward.rs` (BN folded into the convolutions) composed
//! from the launch layer's kernels and GEMMs, f32. Stem: im2col + GEMM; MBConv: expand GEMM, bias,
//! SiLU, depthwise, bias, SiLU, squeeze-excite (pool, two small GEMMs, SiLU / sigmoid, channel
//! scale), project GEMM, bias, residual; taps are spatial means, as on the CPU. Runs on a CUDA device
//! (`backend::cuda`) and, in the tests, on the CPU emulation of the kernels.

use super::config::{BlockSpec, BLOCKS, STEM_CH, TOP_CH};
use super::forward::fold;
use super::layers::{resolve, TapPoint};
use super::weights::block_keys;
use super::EfficientNet;
use crate::backend::gpu::elementwise::{bias_act, suffix, Unary};
use crate::backend::gpu::shape::{add, SampleChannels};
use crate::backend::gpu::{depthwise::Depthwise, Arg, Gemm, Gpu, Launch, Math, BLOCK};
use crate::backend::gpu::{dim, grid_stride_blocks, kernels::CONV};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

const F32: DType = DType::F32;

/// A convolution with BN folded in, on the device: w [out, in·k·k], b [out].
struct Conv<B> {
    w: B,
    b: B,
    out: usize,
    inner: usize,
}

struct Block<B> {
    spec: BlockSpec,
    expand: Option<Conv<B>>,
    dw: Conv<B>,
    se1: Conv<B>,
    se2: Conv<B>,
    project: Conv<B>,
}

/// An [`EfficientNet`]'s inference weights on one device.
pub struct GpuEfficientNet<G: Gpu> {
    stem: Conv<G::Buf>,
    blocks: Vec<Block<G::Buf>>,
    top: Conv<G::Buf>,
    /// The classifier (`classifier.1`): logits = pooled top features · wᵀ + b.
    cls: Conv<G::Buf>,
    in_channels: usize,
    padding: super::Padding,
    /// GEMM arithmetic: `Math::F32` (default) or TF32 tensor cores.
    pub math: Math,
}

fn upload<G: Gpu>(g: &G, w: &[f32], b: &[f32]) -> Result<Conv<G::Buf>> {
    Ok(Conv {
        w: g.upload_slice(w)?,
        b: g.upload_slice(b)?,
        out: b.len(),
        inner: w.len() / b.len().max(1),
    })
}

/// The device activations of one pass: a buffer and its [rows, channels] shape.
struct Act<B> {
    buf: B,
    rows: usize,
    ch: usize,
}

impl<G: Gpu> GpuEfficientNet<G> {
    /// Folds the model's BN into its convolutions (as the CPU pass does) and uploads everything.
    pub fn new(g: &G, model: &EfficientNet) -> Result<Self> {
        let s = model.state_dict();
        let cfg = model.config();
        let eps = cfg.bn_eps;
        let get = |k: &str| -> Result<Vec<f32>> {
            Ok(s.get(k)
                .ok_or_else(|| Error::MissingKey(format!("missing key {k:?}")))?
                .as_f32()?
                .to_vec())
        };
        let conv = |w: &str, bn: &str| -> Result<Conv<G::Buf>> {
            let f = fold(s, w, bn, eps)?;
            upload(g, &f.w, &f.b)
        };
        let stem = conv("features.0.0.weight", "features.0.1")?;
        let mut blocks = Vec::with_capacity(BLOCKS.len());
        for spec in BLOCKS {
            let k = block_keys(&spec);
            let expand = match &k.expand {
                Some(p) => Some(conv(&format!("{p}.0.weight"), &format!("{p}.1"))?),
                None => None,
            };
            blocks.push(Block {
                spec,
                expand,
                dw: conv(&format!("{}.0.weight", k.dw), &format!("{}.1", k.dw))?,
                se1: upload(
                    g,
                    &get(&format!("{}.fc1.weight", k.se))?,
                    &get(&format!("{}.fc1.bias", k.se))?,
                )?,
                se2: upload(
                    g,
                    &get(&format!("{}.fc2.weight", k.se))?,
                    &get(&format!("{}.fc2.bias", k.se))?,
                )?,
                project: conv(
                    &format!("{}.0.weight", k.project),
                    &format!("{}.1", k.project),
                )?,
            });
        }
        let top = conv("features.8.0.weight", "features.8.1")?;
        let cls = upload(g, &get("classifier.1.weight")?, &get("classifier.1.bias")?)?;
        Ok(GpuEfficientNet {
            stem,
            blocks,
            top,
            cls,
            in_channels: cfg.in_channels,
            padding: cfg.padding,
            math: Math::F32,
        })
    }

    /// y [rows, conv.out] = x [rows, conv.inner] · wᵀ + b, then `act`.
    fn linear(
        &self,
        g: &G,
        x: &Act<G::Buf>,
        c: &Conv<G::Buf>,
        act: Option<Unary>,
    ) -> Result<Act<G::Buf>> {
        if x.ch != c.inner {
            return Err(Error::Internal(format!(
                "GPU EfficientNet: {} input channels for a layer of {}",
                x.ch, c.inner
            )));
        }
        let y = g.alloc(x.rows * c.out * 4)?;
        // SAFETY: x holds rows × inner f32, w out × inner, y rows × out (fresh); b out.
        unsafe {
            g.gemm(&Gemm {
                m: x.rows,
                n: c.out,
                k: c.inner,
                a: g.ptr(&x.buf),
                lda: c.inner,
                trans_a: false,
                b: g.ptr(&c.w),
                ldb: c.inner,
                trans_b: true,
                c: g.ptr(&y),
                ldc: c.out,
                alpha: 1.0,
                beta: 0.0,
                dtype: F32,
                c_dtype: F32,
                math: self.math,
            })?;
        }
        let y = Act {
            buf: y,
            rows: x.rows,
            ch: c.out,
        };
        self.bias_act(g, y, &c.b, act)
    }

    /// y = act(y + b[channel]), in place, one pass.
    fn bias_act(
        &self,
        g: &G,
        y: Act<G::Buf>,
        b: &G::Buf,
        act: Option<Unary>,
    ) -> Result<Act<G::Buf>> {
        // SAFETY: y holds rows × ch f32, b ch f32.
        unsafe { bias_act(g, F32, g.ptr(&y.buf), g.ptr(b), y.rows, y.ch, act)? };
        Ok(y)
    }

    /// Spatial mean per sample: [n · hw, ch] → device [n, ch].
    fn pooled(&self, g: &G, x: &Act<G::Buf>, n: usize) -> Result<G::Buf> {
        let sc = SampleChannels::new(F32, [n, x.rows / n, x.ch])?;
        let p = g.alloc(sc.pooled_len() * 4)?;
        // SAFETY: x holds n · hw · ch f32, p n · ch (distinct).
        unsafe { sc.global_avg_pool(g, g.ptr(&x.buf), g.ptr(&p))? };
        Ok(p)
    }

    /// The spatial mean of layer `layer` (a Keras or torchvision name, see `EfficientNet::features`)
    /// for crops (N, C, H, W) f32: an (N, D) tensor.
    pub fn features(&self, g: &G, crops: &Tensor, layer: &str) -> Result<Tensor> {
        let tap = resolve(layer)?;
        let [n, h, w] = self.check_crops(crops)?;
        let x = g.upload_slice(crops.as_f32()?)?;
        let (p, d) = self.pooled_features(g, &x, n, h, w, tap.point)?;
        Tensor::from_f32(&[n, d], g.download_vec(&p, n * d)?)
    }

    /// The spatial means of several layers (as [`Self::features`] for each, `"logits"` included)
    /// from one pass: the trunk runs once, up to the deepest layer asked for.
    pub fn features_multi(&self, g: &G, crops: &Tensor, layers: &[&str]) -> Result<Vec<Tensor>> {
        let points = layers
            .iter()
            .map(|l| resolve(l).map(|t| t.point))
            .collect::<Result<Vec<_>>>()?;
        if points.is_empty() {
            return Err(Error::InvalidArgument(
                "GPU EfficientNet: no layer asked for".into(),
            ));
        }
        let [n, h, w] = self.check_crops(crops)?;
        let x = g.upload_slice(crops.as_f32()?)?;
        self.pooled_taps(g, &x, n, h, w, &points)?
            .into_iter()
            .map(|(p, d)| Tensor::from_f32(&[n, d], g.download_vec(&p, n * d)?))
            .collect()
    }

    /// [`Self::features`] in batches of `batch` crops, pipelined: while the device computes batch
    /// i, the host stages batch i + 1 through pinned memory on the copy stream and reads back the
    /// features of batch i − 1 (double-buffered device inputs and outputs). Same result as
    /// `features` over all crops at once.
    pub fn features_batched(
        &self,
        g: &G,
        crops: &Tensor,
        layer: &str,
        batch: usize,
    ) -> Result<Tensor> {
        let tap = resolve(layer)?;
        let [n, h, w] = self.check_crops(crops)?;
        if batch == 0 {
            return Err(Error::InvalidArgument(
                "features_batched: batch must be positive".into(),
            ));
        }
        let per = self.in_channels * h * w;
        let x = crops.as_f32()?;
        let chunks: Vec<(usize, usize)> = (0..n)
            .step_by(batch)
            .map(|s| (s, batch.min(n - s)))
            .collect();
        let inputs = [g.alloc(batch * per * 4)?, g.alloc(batch * per * 4)?];
        let mut staged: [Option<G::Event>; 2] = [None, None];
        let mut freed: [Option<G::Event>; 2] = [None, None];
        // Device features of the batch before, its event, its place in the output and its width.
        let mut pending: Option<(G::Buf, G::Event, usize, usize, usize)> = None;
        let mut out: Vec<f32> = Vec::new();
        let mut width = 0;
        let stage = |i: usize, freed: &[Option<G::Event>; 2]| -> Result<G::Event> {
            let (s, m) = chunks[i];
            let bytes = bytemuck::cast_slice(&x[s * per..(s + m) * per]);
            // SAFETY: inputs[i % 2] holds batch · per f32 ≥ m · per; the batch that last read it
            // is ordered before `freed[i % 2]`.
            unsafe { g.upload_async(bytes, g.ptr(&inputs[i % 2]), freed[i % 2].as_ref()) }
        };
        staged[0] = Some(stage(0, &freed)?);
        for (i, &(s, m)) in chunks.iter().enumerate() {
            if i + 1 < chunks.len() {
                staged[(i + 1) % 2] = Some(stage(i + 1, &freed)?);
            }
            if let Some(e) = staged[i % 2].take() {
                g.wait(&e)?;
            }
            let (p, d) = self.pooled_features(g, &inputs[i % 2], m, h, w, tap.point)?;
            let done = g.record()?;
            freed[i % 2] = Some(g.record()?);
            if let Some(prev) = pending.replace((p, done, s, m, d)) {
                read_back(g, prev, &mut out, n)?;
            }
            width = d;
        }
        if let Some(prev) = pending.take() {
            read_back(g, prev, &mut out, n)?;
        }
        Tensor::from_f32(&[n, width], out)
    }

    /// Captures the pass for batches of exactly `n` crops of `h` × `w` up to `layer` as a graph
    /// (a CUDA graph on a GPU): [`FeatureGraph::run`] then replays every launch and GEMM at once,
    /// without the host cost of queuing them one by one.
    pub fn capture_features(
        &self,
        g: &G,
        n: usize,
        h: usize,
        w: usize,
        layer: &str,
    ) -> Result<FeatureGraph<'_, G>> {
        let tap = resolve(layer)?;
        if n == 0 || h == 0 || w == 0 {
            return Err(Error::Shape(format!(
                "capture_features: empty batch {n} × {h} × {w}"
            )));
        }
        let input = g.alloc(n * self.in_channels * h * w * 4)?;
        // Run once outside the capture: the width of the output, and a warm allocator cache.
        let (_, d) = self.pooled_features(g, &input, n, h, w, tap.point)?;
        g.synchronize()?;
        let output = g.alloc(n * d * 4)?;
        let graph = g.capture(&mut || {
            let (p, _) = self.pooled_features(g, &input, n, h, w, tap.point)?;
            // SAFETY: both hold n · d f32.
            unsafe { g.copy(g.ptr(&p), g.ptr(&output), n * d * 4) }
        })?;
        Ok(FeatureGraph {
            graph,
            input,
            output,
            shape: [n, self.in_channels, h, w],
            width: d,
            _weights: std::marker::PhantomData,
        })
    }

    fn check_crops(&self, crops: &Tensor) -> Result<[usize; 3]> {
        let s = crops.shape();
        if s.len() != 4 || s[1] != self.in_channels || s[0] == 0 || s[2] == 0 || s[3] == 0 {
            return Err(Error::Shape(format!(
                "crops must be a non-empty (N, {}, H, W) float32, got shape {s:?}",
                self.in_channels
            )));
        }
        crops.check_finite("crops")?;
        Ok([s[0], s[2], s[3]])
    }

    /// Queues the pass for crops `x` (n, C, h, w) f32 on the device up to `point` and its spatial
    /// mean: a device buffer of n × D f32, and D. Nothing waits for the device.
    fn pooled_features(
        &self,
        g: &G,
        x: &G::Buf,
        n: usize,
        h: usize,
        w: usize,
        point: TapPoint,
    ) -> Result<(G::Buf, usize)> {
        self.pooled_taps(g, x, n, h, w, &[point])?
            .pop()
            .ok_or_else(|| Error::Internal("GPU EfficientNet: no tap".into()))
    }

    /// [`Self::pooled_features`] for every point of `points` from one pass (in their order; the
    /// pass stops at the deepest). Logits are the classifier on the pooled top features.
    fn pooled_taps(
        &self,
        g: &G,
        x: &G::Buf,
        n: usize,
        h: usize,
        w: usize,
        points: &[TapPoint],
    ) -> Result<Vec<(G::Buf, usize)>> {
        let c = self.in_channels;
        let mut outs: Vec<Option<(G::Buf, usize)>> = points.iter().map(|_| None).collect();
        // Pools `act` into every slot asking for `point`; true once every slot is filled.
        let mut tap = |point: TapPoint, act: &Act<G::Buf>| -> Result<bool> {
            for (slot, _) in outs
                .iter_mut()
                .zip(points)
                .filter(|(o, &p)| p == point && o.is_none())
            {
                *slot = Some((self.pooled(g, act, n)?, act.ch));
            }
            Ok(outs.iter().all(Option::is_some))
        };
        macro_rules! tap {
            ($point:expr, $act:expr) => {
                if points.contains(&$point) && tap($point, $act)? {
                    return Ok(outs.into_iter().flatten().collect());
                }
            };
        }

        // Stem: one direct convolution with the bias and SiLU fused where its weights fit the
        // kernel's shared memory (c ≤ 42), else im2col + GEMM + bias + SiLU.
        let (oh, _) = self.padding.out_and_pad(h, 3, 2);
        let (ow, _) = self.padding.out_and_pad(w, 3, 2);
        let rows = n * oh * ow;
        let mut cur = if c * 9 * STEM_CH * 4 <= STEM_DIRECT_SHARED {
            let y = g.alloc(rows * STEM_CH * 4)?;
            // SAFETY: x holds n·c·h·w f32 (checked by the callers), the stem's weights
            // STEM_CH·c·9 and bias STEM_CH f32, y the output (fresh).
            unsafe {
                stem_direct(
                    g,
                    g.ptr(x),
                    [n, c, h, w],
                    self.padding,
                    [g.ptr(&self.stem.w), g.ptr(&self.stem.b)],
                    g.ptr(&y),
                )?
            };
            Act {
                buf: y,
                rows,
                ch: STEM_CH,
            }
        } else {
            // SAFETY: x holds n·c·h·w f32 (checked by the callers).
            let (cols, _, _) =
                unsafe { stem_im2col(g, F32, g.ptr(x), [n, c, h, w], self.padding)? };
            self.linear(
                g,
                &Act {
                    buf: cols,
                    rows,
                    ch: c * 9,
                },
                &self.stem,
                Some(Unary::Silu),
            )?
        };
        debug_assert_eq!(cur.ch, STEM_CH);
        tap!(TapPoint::Stem, &cur);
        let (mut hh, mut ww) = (oh, ow);
        for (bi, blk) in self.blocks.iter().enumerate() {
            let spec = &blk.spec;
            let hid = spec.hidden();
            let expanded = match &blk.expand {
                Some(e) => {
                    let a = self.linear(g, &cur, e, Some(Unary::Silu))?;
                    tap!(TapPoint::Expand(bi), &a);
                    Some(a)
                }
                None => None,
            };
            let xin = expanded.as_ref().unwrap_or(&cur);
            let (d, oh, ow) = depthwise_plan(F32, self.padding, [n, hh, ww, hid], spec)?;
            let y = g.alloc(d.output_len() * 4)?;
            // Depthwise, bias and SiLU in one kernel.
            // SAFETY: xin holds n·hh·ww·hid f32, the weights hid·k·k, the bias hid, y the output
            // (fresh).
            unsafe {
                d.forward_bias_act(
                    g,
                    g.ptr(&xin.buf),
                    g.ptr(&blk.dw.w),
                    Some(g.ptr(&blk.dw.b)),
                    true,
                    g.ptr(&y),
                )?
            };
            let a = Act {
                buf: y,
                rows: n * oh * ow,
                ch: hid,
            };
            drop(expanded);
            tap!(TapPoint::Depthwise(bi), &a);
            // Squeeze-excite.
            let p = self.pooled(g, &a, n)?;
            let pooled = Act {
                buf: p,
                rows: n,
                ch: hid,
            };
            let mid = self.linear(g, &pooled, &blk.se1, Some(Unary::Silu))?;
            let scale = self.linear(g, &mid, &blk.se2, Some(Unary::Sigmoid))?;
            let sc = SampleChannels::new(F32, [n, oh * ow, hid])?;
            // SAFETY: a holds n·oh·ow·hid f32 (scaled in place), scale n·hid.
            unsafe { sc.scale_channels(g, g.ptr(&a.buf), g.ptr(&scale.buf), g.ptr(&a.buf))? };
            tap!(TapPoint::SeExcite(bi), &a);
            let proj = self.linear(g, &a, &blk.project, None)?;
            tap!(TapPoint::Project(bi), &proj);
            if spec.residual() {
                // SAFETY: both hold rows × out_ch f32; the sum goes into proj in place.
                unsafe {
                    add(
                        g,
                        F32,
                        g.ptr(&proj.buf),
                        g.ptr(&cur.buf),
                        g.ptr(&proj.buf),
                        proj.rows * proj.ch,
                    )?
                };
            }
            cur = proj;
            tap!(TapPoint::Output(bi), &cur);
            hh = oh;
            ww = ow;
        }
        let top = self.linear(g, &cur, &self.top, Some(Unary::Silu))?;
        debug_assert_eq!(top.ch, TOP_CH);
        tap!(TapPoint::Top, &top);
        // Logits: the classifier on the pooled top features (dropout is the identity here).
        let pooled = Act {
            buf: self.pooled(g, &top, n)?,
            rows: n,
            ch: TOP_CH,
        };
        let logits = self.linear(g, &pooled, &self.cls, None)?;
        tap!(TapPoint::Logits, &logits);
        Err(Error::Internal(format!(
            "GPU EfficientNet: taps {points:?} not all reached"
        )))
    }
}

/// Shared memory of `stem_conv3x3_f32` (the weights, f32) that no launch may exceed.
const STEM_DIRECT_SHARED: usize = 48 << 10;

/// SiLU(stem convolution + bias) of f32 crops `x` ([n, c, h, w]) into `y` ([n·oh·ow, STEM_CH]
/// f32) in one kernel (`stem_conv3x3_f32`); `[w, b]` are the folded stem weights [STEM_CH, c·9]
/// and bias. Needs c·9·STEM_CH·4 ≤ [`STEM_DIRECT_SHARED`].
///
/// # Safety
/// The addresses hold what the shapes say.
unsafe fn stem_direct<G: Gpu>(
    g: &G,
    x: u64,
    [n, c, h, w]: [usize; 4],
    padding: super::Padding,
    [wt, b]: [u64; 2],
    y: u64,
) -> Result<()> {
    let (oh, pt) = padding.out_and_pad(h, 3, 2);
    let (ow, pl) = padding.out_and_pad(w, 3, 2);
    let geom = [n, c, h, w, 3, 2, pt, pl, oh, ow]
        .iter()
        .map(|&v| dim(v, "stem geometry"))
        .collect::<Result<Vec<i32>>>()?;
    dim(oh * ow, "stem output pixels per crop")?;
    let shared = c * 9 * STEM_CH * 4;
    if shared > STEM_DIRECT_SHARED {
        return Err(Error::Internal(format!(
            "direct stem: {c} channels need {shared} B of shared memory"
        )));
    }
    // SAFETY: the caller's buffers; the kernel reads x as [n, c, h, w] and writes n·oh·ow·32.
    unsafe {
        g.launch(&Launch {
            module: &CONV,
            entry: "stem_conv3x3_f32".into(),
            grid: [grid_stride_blocks(g, n * oh * ow), 1, 1],
            block: [128, 1, 1],
            shared_bytes: shared as u32,
            args: vec![
                Arg::Ptr(x),
                Arg::Ptr(wt),
                Arg::Ptr(b),
                Arg::Ptr(y),
                Arg::pod(&ColGeom(
                    geom.try_into()
                        .map_err(|_| Error::Internal("stem geometry".into()))?,
                )),
                Arg::I32(1),
            ],
        })
    }
}

/// The stem's im2col (3 × 3, stride 2) of crops `x` ([n, c, h, w] of `dtype`, f32 or bf16, on the
/// device) into a fresh [n·oh·ow, c·9] buffer of `dtype`: (cols, oh, ow).
///
/// # Safety
/// `x` addresses n·c·h·w elements of `dtype`.
pub(super) unsafe fn stem_im2col<G: Gpu>(
    g: &G,
    dtype: DType,
    x: u64,
    [n, c, h, w]: [usize; 4],
    padding: super::Padding,
) -> Result<(G::Buf, usize, usize)> {
    let (oh, pt) = padding.out_and_pad(h, 3, 2);
    let (ow, pl) = padding.out_and_pad(w, 3, 2);
    let items = n * oh * ow * c * 9;
    let cols = g.alloc(items * dtype.size_in_bytes())?;
    let geom = [n, c, h, w, 3, 2, pt, pl, oh, ow]
        .iter()
        .map(|&v| dim(v, "stem geometry"))
        .collect::<Result<Vec<i32>>>()?;
    // SAFETY: x holds n·c·h·w elements (the caller), cols the output (im2col's ColGeom is these
    // ten ints).
    unsafe {
        g.launch(&Launch {
            module: &CONV,
            entry: format!("im2col_nchw_{}", suffix(dtype)),
            grid: [grid_stride_blocks(g, items), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(x),
                Arg::Ptr(g.ptr(&cols)),
                Arg::pod(&ColGeom(
                    geom.try_into()
                        .map_err(|_| Error::Internal("stem geometry".into()))?,
                )),
            ],
        })?;
    }
    Ok((cols, oh, ow))
}

/// The depthwise plan of block `spec` on an input [n, h, w, hidden] of `dtype` under `padding`,
/// and its output height and width.
pub(super) fn depthwise_plan(
    dtype: DType,
    padding: super::Padding,
    [n, h, w, hid]: [usize; 4],
    spec: &BlockSpec,
) -> Result<(Depthwise, usize, usize)> {
    let (oh, pt) = padding.out_and_pad(h, spec.kernel, spec.stride);
    let (ow, pl) = padding.out_and_pad(w, spec.kernel, spec.stride);
    let d = Depthwise::new(
        dtype,
        [n, h, w, hid],
        spec.kernel,
        spec.stride,
        pt,
        pl,
        [oh, ow],
    )?;
    Ok((d, oh, ow))
}

/// kernels/conv.cu's `ColGeom`: n, c, h, w, k, stride, pad_top, pad_left, oh, ow.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ColGeom([i32; 10]);

/// Copies one batch's features (device buffer, its event, first crop, crops, width) into `out`.
fn read_back<G: Gpu>(
    g: &G,
    (p, done, s, m, d): (G::Buf, G::Event, usize, usize, usize),
    out: &mut Vec<f32>,
    n: usize,
) -> Result<()> {
    if out.is_empty() {
        out.resize(n * d, 0.0);
    }
    let dst = &mut out[s * d..(s + m) * d];
    // SAFETY: p holds m · d f32 written by work ordered before `done`; nothing writes it later.
    unsafe { g.download_after(g.ptr(&p), bytemuck::cast_slice_mut(dst), &done) }
}

/// A captured features pass for one batch shape (see [`GpuEfficientNet::capture_features`]). It
/// owns its input and output buffers and borrows the model (the graph reads its weights).
pub struct FeatureGraph<'m, G: Gpu> {
    graph: G::Graph,
    input: G::Buf,
    output: G::Buf,
    shape: [usize; 4],
    width: usize,
    _weights: std::marker::PhantomData<&'m GpuEfficientNet<G>>,
}

impl<G: Gpu> FeatureGraph<'_, G> {
    /// The features of `crops`, which must have exactly the captured shape.
    pub fn run(&self, g: &G, crops: &Tensor) -> Result<Tensor> {
        if crops.shape() != self.shape {
            return Err(Error::Shape(format!(
                "this features graph was captured for crops {:?}, got {:?}",
                self.shape,
                crops.shape()
            )));
        }
        crops.check_finite("crops")?;
        let after = g.record()?;
        // SAFETY: input holds the captured shape's f32; the last replay that read it is ordered
        // before `after`.
        let staged = unsafe {
            g.upload_async(
                bytemuck::cast_slice(crops.as_f32()?),
                g.ptr(&self.input),
                Some(&after),
            )?
        };
        g.wait(&staged)?;
        // SAFETY: the graph's buffers live in it and in self; the borrow keeps the weights.
        unsafe { g.replay(&self.graph)? };
        let n = self.shape[0];
        Tensor::from_f32(
            &[n, self.width],
            g.download_vec(&self.output, n * self.width)?,
        )
    }
}
