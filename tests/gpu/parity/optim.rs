//! Fused optimizer steps and the device gradient norm against src/optim (bit for bit where the
//! CPU's arithmetic is reproduced exactly: every SGD / AdamW weight and state element).

use super::*;
use phenocore::backend::gpu::optim::{
    AdamWPlan, AdamWTensorArgs, GradNormPlan, SgdPlan, SgdTensorArgs,
};
use phenocore::backend::gpu::Gpu;
use phenocore::optim::{
    clip_grad_norm, AdamW, AdamWOptions, Optimizer, ParamView, Sgd, SgdOptions,
};
use phenocore::{DType, Error};

/// Odd lengths, one of a single element, one spanning many chunks.
const LENS: [usize; 5] = [1, 37, 300, 1025, 64];
/// Small chunks: 25 chunks over LENS, more than the emulator's 16 blocks (grid-stride steps).
const CHUNK: usize = 64;
/// Tensor 2 is excluded from weight decay (a no-decay parameter group member).
fn decays(t: usize) -> bool {
    t != 2
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} differs: got {:e} ({:#010x}), want {:e} ({:#010x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

/// Gradients of one step, as (bits uploaded, f32 values the CPU sees).
fn grads(dtype: DType, seed: u64) -> Vec<(Vec<u8>, Vec<f32>)> {
    LENS.iter()
        .enumerate()
        .map(|(t, &n)| {
            let v: Vec<f32> = uniform(n, seed * 31 + t as u64)
                .iter()
                .map(|x| x * 2.0)
                .collect();
            if dtype == DType::BF16 {
                let (bits, vals) = to_bf16(&v);
                (bytemuck::cast_slice(&bits).to_vec(), vals)
            } else {
                (bytemuck::cast_slice(&v).to_vec(), v)
            }
        })
        .collect()
}

fn zeros<G: Gpu>(g: &G, n: usize) -> G::Buf {
    g.upload_slice(&vec![0f32; n.max(1)]).unwrap()
}

/// Tensor 1's weights start one f32 into their buffer and tensor 3's gradient one element into
/// its buffer: those tensors take the kernels' one-element path, the others the 4-wide one.
fn offset_w(t: usize) -> usize {
    usize::from(t == 1)
}

fn upload_w<G: Gpu>(g: &G, t: usize, v: &[f32]) -> G::Buf {
    let mut x = vec![0f32; offset_w(t)];
    x.extend_from_slice(v);
    g.upload_slice(&x).unwrap()
}

fn w_ptr<G: Gpu>(g: &G, b: &G::Buf, t: usize) -> u64 {
    g.ptr(b) + 4 * offset_w(t) as u64
}

fn download_w<G: Gpu>(g: &G, b: &G::Buf, t: usize) -> Vec<f32> {
    let o = offset_w(t);
    g.download_vec::<f32>(b, LENS[t] + o).unwrap()[o..].to_vec()
}

/// Uploads one step's gradients; returns the buffers and each gradient's address.
fn upload_grads<G: Gpu>(
    g: &G,
    dtype: DType,
    gr: &[(Vec<u8>, Vec<f32>)],
) -> (Vec<G::Buf>, Vec<u64>) {
    let esize = dtype.size_in_bytes();
    let mut ptrs = Vec::new();
    let bufs = gr
        .iter()
        .enumerate()
        .map(|(t, (b, _))| {
            let off = if t == 3 { esize } else { 0 };
            let mut x = vec![0u8; off];
            x.extend_from_slice(b);
            let buf = g.upload(&x).unwrap();
            ptrs.push(g.ptr(&buf) + off as u64);
            buf
        })
        .collect();
    (bufs, ptrs)
}

const LRS: [f64; 4] = [0.1, 0.05, 0.2, 0.01];

pub fn optim_sgd_matches_cpu<G: Gpu>(g: &G) {
    let mut combos = Vec::new();
    for momentum in [0.0, 0.9] {
        for dampening in [0.0, 0.3] {
            for nesterov in [false, true] {
                for weight_decay in [0.0, 0.01] {
                    for maximize in [false, true] {
                        let o = SgdOptions {
                            momentum,
                            dampening,
                            nesterov,
                            weight_decay,
                            maximize,
                        };
                        if Sgd::new(o).is_ok() {
                            combos.push(o);
                        }
                    }
                }
            }
        }
    }
    assert_eq!(combos.len(), 20);
    for dtype in [DType::F32, DType::BF16] {
        for (ci, &o) in combos.iter().enumerate() {
            let what = format!("sgd {dtype:?} {o:?}");
            // Odd combos use a chunk that is not a multiple of 4 (the one-element path throughout).
            let chunk = if ci % 2 == 0 { CHUNK } else { CHUNK - 1 };
            let plan = SgdPlan::new(o, dtype, &LENS)
                .unwrap()
                .with_chunk(chunk)
                .unwrap();
            let mut cpu = Sgd::new(o).unwrap();
            let mut w: Vec<Vec<f32>> = LENS
                .iter()
                .enumerate()
                .map(|(t, &n)| uniform(n, 1000 + t as u64))
                .collect();
            let wb: Vec<G::Buf> = w
                .iter()
                .enumerate()
                .map(|(t, v)| upload_w(g, t, v))
                .collect();
            let bufs: Vec<G::Buf> = LENS
                .iter()
                .map(|&n| g.alloc(n.max(1) * 4).unwrap())
                .collect();
            for (s, &lr) in LRS.iter().enumerate() {
                let gr = grads(dtype, (ci * 10 + s) as u64);
                let (_gb, gp) = upload_grads(g, dtype, &gr);
                let args: Vec<SgdTensorArgs> = (0..LENS.len())
                    .map(|t| SgdTensorArgs {
                        param: w_ptr(g, &wb[t], t),
                        grad: gp[t],
                        momentum_buffer: g.ptr(&bufs[t]),
                        first_step: s == 0,
                        weight_decay: decays(t),
                    })
                    .collect();
                unsafe { plan.step(g, &args, lr, None).unwrap() };
                let names: Vec<String> = (0..LENS.len()).map(|t| format!("p{t}")).collect();
                let mut views: Vec<ParamView> = w
                    .iter_mut()
                    .zip(&gr)
                    .enumerate()
                    .map(|(t, (v, (_, gv)))| ParamView {
                        name: &names[t],
                        value: v,
                        grad: gv,
                        weight_decay: decays(t),
                    })
                    .collect();
                cpu.step(&mut views, lr).unwrap();
                for t in 0..LENS.len() {
                    let got = download_w(g, &wb[t], t);
                    assert_bits(&format!("{what} step {s} param {t}"), &got, &w[t]);
                }
            }
            let state = cpu.state();
            if o.momentum != 0.0 {
                for t in 0..LENS.len() {
                    let want = state.tensor(&format!("momentum_buffer/p{t}")).unwrap();
                    let got = g.download_vec::<f32>(&bufs[t], LENS[t]).unwrap();
                    assert_bits(&format!("{what} momentum buffer {t}"), &got, want);
                }
            } else {
                assert!(state.tensors.is_empty());
            }
        }
    }
}

pub fn optim_adamw_matches_cpu<G: Gpu>(g: &G) {
    for dtype in [DType::F32, DType::BF16] {
        let mut ci = 0u64;
        for amsgrad in [false, true] {
            for weight_decay in [0.0, 0.05] {
                // β1 = 0.3: 1 − β1 ≥ 0.5 takes the other lerp branch.
                for betas in [(0.9, 0.999), (0.3, 0.99)] {
                    for eps in [1e-8, 1e-3] {
                        ci += 1;
                        let o = AdamWOptions {
                            betas,
                            eps,
                            weight_decay,
                            amsgrad,
                        };
                        adamw_case(g, dtype, o, ci);
                    }
                }
            }
        }
    }
}

fn adamw_case<G: Gpu>(g: &G, dtype: DType, o: AdamWOptions, seed: u64) {
    let what = format!("adamw {dtype:?} {o:?}");
    let nt = LENS.len();
    let full = AdamWPlan::new(o, dtype, &LENS)
        .unwrap()
        .with_chunk(CHUNK)
        .unwrap();
    // Step 2 updates only tensors 0, 3, 4 (the others had no gradient): per-tensor step counts
    // then differ, and so do their bias corrections.
    let subset = [0usize, 3, 4];
    let sub_lens: Vec<usize> = subset.iter().map(|&t| LENS[t]).collect();
    let part = AdamWPlan::new(o, dtype, &sub_lens)
        .unwrap()
        .with_chunk(CHUNK)
        .unwrap();
    let mut cpu = AdamW::new(o).unwrap();
    let mut w: Vec<Vec<f32>> = LENS
        .iter()
        .enumerate()
        .map(|(t, &n)| uniform(n, 2000 + t as u64))
        .collect();
    let wb: Vec<G::Buf> = w
        .iter()
        .enumerate()
        .map(|(t, v)| upload_w(g, t, v))
        .collect();
    let moments = || -> Vec<G::Buf> { LENS.iter().map(|&n| zeros(g, n)).collect() };
    let (mb, vb, vmb) = (moments(), moments(), moments());
    let mut steps = vec![0u64; nt];
    let names: Vec<String> = (0..nt).map(|t| format!("p{t}")).collect();
    for (s, &lr) in LRS.iter().enumerate() {
        let gr = grads(dtype, seed * 100 + s as u64);
        let (_gb, gp) = upload_grads(g, dtype, &gr);
        let which: Vec<usize> = if s == 2 {
            subset.to_vec()
        } else {
            (0..nt).collect()
        };
        let args: Vec<AdamWTensorArgs> = which
            .iter()
            .map(|&t| {
                steps[t] += 1;
                AdamWTensorArgs {
                    param: w_ptr(g, &wb[t], t),
                    grad: gp[t],
                    exp_avg: g.ptr(&mb[t]),
                    exp_avg_sq: g.ptr(&vb[t]),
                    max_exp_avg_sq: if o.amsgrad { g.ptr(&vmb[t]) } else { 0 },
                    step: steps[t],
                    weight_decay: decays(t),
                }
            })
            .collect();
        let plan = if s == 2 { &part } else { &full };
        unsafe { plan.step(g, &args, lr, None).unwrap() };
        let mut views: Vec<ParamView> = w
            .iter_mut()
            .zip(&gr)
            .enumerate()
            .filter(|(t, _)| which.contains(t))
            .map(|(t, (v, (_, gv)))| ParamView {
                name: &names[t],
                value: v,
                grad: gv,
                weight_decay: decays(t),
            })
            .collect();
        cpu.step(&mut views, lr).unwrap();
        for t in 0..nt {
            let got = download_w(g, &wb[t], t);
            assert_bits(&format!("{what} step {s} param {t}"), &got, &w[t]);
        }
    }
    let state = cpu.state();
    for t in 0..nt {
        assert_eq!(state.scalar(&format!("step/p{t}")), Some(steps[t] as f64));
        let mut bufs = vec![("exp_avg", &mb[t]), ("exp_avg_sq", &vb[t])];
        if o.amsgrad {
            bufs.push(("max_exp_avg_sq", &vmb[t]));
        }
        for (k, b) in bufs {
            let want = state.tensor(&format!("{k}/p{t}")).unwrap();
            let got = g.download_vec::<f32>(b, LENS[t]).unwrap();
            assert_bits(&format!("{what} {k} {t}"), &got, want);
        }
    }
}

/// The device norm (f64, ≤ 1e-12 relative: only the summation order differs), the clip
/// coefficient and the scaled gradients (bit for bit), for every norm kind, clipping or not, and
/// the coefficient fused into an AdamW step as `grad_scale`.
pub fn optim_grad_norm_and_clip<G: Gpu>(g: &G) {
    for dtype in [DType::F32, DType::BF16] {
        for (k, norm_type) in [2.0, 1.0, f64::INFINITY, 3.0].into_iter().enumerate() {
            for max_norm in [0.5, 1e6] {
                let what = format!("grad norm {dtype:?} p={norm_type} max_norm={max_norm}");
                let gr = grads(dtype, 500 + k as u64);
                let gb: Vec<G::Buf> = gr.iter().map(|(b, _)| g.upload(b).unwrap()).collect();
                let ptrs: Vec<u64> = gb.iter().map(|b| g.ptr(b)).collect();
                let plan = GradNormPlan::new(dtype, &LENS, max_norm, norm_type)
                    .unwrap()
                    .with_chunk(CHUNK)
                    .unwrap();
                let out_norm = g.alloc(8).unwrap();
                let out_coef = g.alloc(4).unwrap();
                unsafe {
                    plan.norm(g, &ptrs, g.ptr(&out_norm), g.ptr(&out_coef))
                        .unwrap()
                };
                let norm = g.download_vec::<f64>(&out_norm, 1).unwrap()[0];
                let coef = g.download_vec::<f32>(&out_coef, 1).unwrap()[0];
                let mut want: Vec<Vec<f32>> = gr.iter().map(|(_, v)| v.clone()).collect();
                let mut refs: Vec<&mut [f32]> = want.iter_mut().map(|v| v.as_mut_slice()).collect();
                let want_norm = clip_grad_norm(&mut refs, max_norm, norm_type, true).unwrap();
                assert!(
                    (norm - want_norm).abs() <= 1e-12 * want_norm,
                    "{what}: norm {norm} vs {want_norm}"
                );
                let want_coef = (1.0f32 / (want_norm as f32 + 1e-6f32) * max_norm as f32).min(1.0);
                assert_eq!(
                    coef.to_bits(),
                    want_coef.to_bits(),
                    "{what}: coef {coef} vs {want_coef}"
                );
                assert_eq!(
                    coef < 1.0,
                    max_norm < 1.0,
                    "{what}: the test should clip exactly when max_norm is small"
                );
                if dtype == DType::F32 {
                    unsafe { plan.scale(g, &ptrs, g.ptr(&out_coef)).unwrap() };
                    for t in 0..LENS.len() {
                        let got = g.download_vec::<f32>(&gb[t], LENS[t]).unwrap();
                        assert_bits(&format!("{what}: clipped grad {t}"), &got, &want[t]);
                    }
                }
            }
        }
    }
    // Clip fused into the step: AdamW with grad_scale = the coefficient on the device equals
    // clip_grad_norm then AdamW on the CPU.
    for dtype in [DType::F32, DType::BF16] {
        let o = AdamWOptions {
            amsgrad: true,
            ..Default::default()
        };
        let gr = grads(dtype, 77);
        let gb: Vec<G::Buf> = gr.iter().map(|(b, _)| g.upload(b).unwrap()).collect();
        let ptrs: Vec<u64> = gb.iter().map(|b| g.ptr(b)).collect();
        let norm_plan = GradNormPlan::new(dtype, &LENS, 0.25, 2.0)
            .unwrap()
            .with_chunk(CHUNK)
            .unwrap();
        let (out_norm, out_coef) = (g.alloc(8).unwrap(), g.alloc(4).unwrap());
        let plan = AdamWPlan::new(o, dtype, &LENS)
            .unwrap()
            .with_chunk(CHUNK)
            .unwrap();
        let mut w: Vec<Vec<f32>> = LENS
            .iter()
            .enumerate()
            .map(|(t, &n)| uniform(n, 3000 + t as u64))
            .collect();
        let wb: Vec<G::Buf> = w.iter().map(|v| g.upload_slice(v).unwrap()).collect();
        let st: Vec<[G::Buf; 3]> = LENS
            .iter()
            .map(|&n| [zeros(g, n), zeros(g, n), zeros(g, n)])
            .collect();
        let args: Vec<AdamWTensorArgs> = (0..LENS.len())
            .map(|t| AdamWTensorArgs {
                param: g.ptr(&wb[t]),
                grad: ptrs[t],
                exp_avg: g.ptr(&st[t][0]),
                exp_avg_sq: g.ptr(&st[t][1]),
                max_exp_avg_sq: g.ptr(&st[t][2]),
                step: 1,
                weight_decay: true,
            })
            .collect();
        unsafe {
            norm_plan
                .norm(g, &ptrs, g.ptr(&out_norm), g.ptr(&out_coef))
                .unwrap();
            plan.step(g, &args, 0.1, Some(g.ptr(&out_coef))).unwrap();
        }
        let mut cg: Vec<Vec<f32>> = gr.iter().map(|(_, v)| v.clone()).collect();
        let mut refs: Vec<&mut [f32]> = cg.iter_mut().map(|v| v.as_mut_slice()).collect();
        clip_grad_norm(&mut refs, 0.25, 2.0, true).unwrap();
        let names: Vec<String> = (0..LENS.len()).map(|t| format!("p{t}")).collect();
        let mut views: Vec<ParamView> = w
            .iter_mut()
            .zip(&cg)
            .enumerate()
            .map(|(t, (v, gv))| ParamView {
                name: &names[t],
                value: v,
                grad: gv,
                weight_decay: true,
            })
            .collect();
        let mut cpu = AdamW::new(o).unwrap();
        cpu.step(&mut views, 0.1).unwrap();
        for t in 0..LENS.len() {
            let got = g.download_vec::<f32>(&wb[t], LENS[t]).unwrap();
            assert_bits(&format!("clip + adamw {dtype:?} param {t}"), &got, &w[t]);
        }
    }
}

pub fn optim_rejects_bad_plans<G: Gpu>(g: &G) {
    let inval = |r: Result<(), Error>, what: &str| {
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{what}: {r:?}")
    };
    let nesterov_no_momentum = SgdOptions {
        nesterov: true,
        ..Default::default()
    };
    inval(
        SgdPlan::new(nesterov_no_momentum, DType::F32, &LENS).map(|_| ()),
        "nesterov without momentum",
    );
    inval(
        SgdPlan::new(SgdOptions::default(), DType::F64, &LENS).map(|_| ()),
        "f64 gradients",
    );
    inval(
        SgdPlan::new(SgdOptions::default(), DType::F32, &LENS)
            .unwrap()
            .with_chunk(0)
            .map(|_| ()),
        "chunk 0",
    );
    let bad_betas = AdamWOptions {
        betas: (1.0, 0.999),
        ..Default::default()
    };
    inval(
        AdamWPlan::new(bad_betas, DType::F32, &LENS).map(|_| ()),
        "beta1 = 1",
    );
    inval(
        AdamWPlan::new(AdamWOptions::default(), DType::F16, &LENS).map(|_| ()),
        "f16 gradients",
    );
    inval(
        GradNormPlan::new(DType::F32, &LENS, 1.0, 0.0).map(|_| ()),
        "norm type 0",
    );
    inval(
        GradNormPlan::new(DType::F32, &LENS, -1.0, 2.0).map(|_| ()),
        "negative max_norm",
    );

    let bufs: Vec<G::Buf> = LENS.iter().map(|&n| zeros(g, n)).collect();
    let p: Vec<u64> = bufs.iter().map(|b| g.ptr(b)).collect();
    let sgd = SgdPlan::new(
        SgdOptions {
            momentum: 0.9,
            ..Default::default()
        },
        DType::F32,
        &LENS,
    )
    .unwrap();
    let sargs: Vec<SgdTensorArgs> = (0..LENS.len())
        .map(|t| SgdTensorArgs {
            param: p[t],
            grad: p[t],
            momentum_buffer: p[t],
            first_step: true,
            weight_decay: true,
        })
        .collect();
    unsafe {
        let r = sgd.step(g, &sargs[..4], 0.1, None);
        assert!(
            matches!(r, Err(Error::Shape(_))),
            "4 tensors for a plan of 5: {r:?}"
        );
        inval(sgd.step(g, &sargs, f64::NAN, None), "NaN learning rate");
        let mut no_buf = sargs.clone();
        no_buf[3].momentum_buffer = 0;
        let r = sgd.step(g, &no_buf, 0.1, None);
        assert!(
            matches!(r, Err(Error::NullPointer(_))),
            "null momentum buffer: {r:?}"
        );
    }
    let adam = AdamWPlan::new(AdamWOptions::default(), DType::F32, &LENS).unwrap();
    let aargs: Vec<AdamWTensorArgs> = (0..LENS.len())
        .map(|t| AdamWTensorArgs {
            param: p[t],
            grad: p[t],
            exp_avg: p[t],
            exp_avg_sq: p[t],
            max_exp_avg_sq: 0,
            step: 1,
            weight_decay: true,
        })
        .collect();
    unsafe {
        let r = adam.step(g, &aargs[1..], 0.1, None);
        assert!(
            matches!(r, Err(Error::Shape(_))),
            "4 tensors for a plan of 5: {r:?}"
        );
        let mut zero = aargs.clone();
        zero[0].step = 0;
        inval(adam.step(g, &zero, 0.1, None), "step count 0");
        let ams = AdamWPlan::new(
            AdamWOptions {
                amsgrad: true,
                ..Default::default()
            },
            DType::F32,
            &LENS,
        )
        .unwrap();
        let r = ams.step(g, &aargs, 0.1, None);
        assert!(
            matches!(r, Err(Error::NullPointer(_))),
            "amsgrad without max_exp_avg_sq: {r:?}"
        );
        let norm = GradNormPlan::new(DType::BF16, &LENS, 1.0, 2.0).unwrap();
        inval(
            norm.scale(g, &p, p[0]),
            "in-place scaling of bf16 gradients",
        );
        let norm = GradNormPlan::new(DType::F32, &LENS, 1.0, 2.0).unwrap();
        let r = norm.norm(g, &p[..2], p[0], p[1]);
        assert!(
            matches!(r, Err(Error::Shape(_))),
            "2 gradients for a plan of 5: {r:?}"
        );
    }
}
