//! The LDM paper's diffusion U-Net on a CUDA GPU, phenocore alone (REFERENCE §10: channels
//! 256/512/768, one head per attention block, 512-d context; no confounder tables, as MONAI's has
//! none): forward + backward at BATCH latents of 8 × SIZE × SIZE (`GpuUNet::forward_backward_device`:
//! every parameter gradient, kept on the device; a fixed random upstream gradient stands in for
//! the MSE loss's, which costs the same), and `STEPS`-step DDIM sampling (`gpu_sample::sample`,
//! no guidance). Prints one JSON line; `benches/cuda_unet.py` runs MONAI / PyTorch beside it.
//!
//! `cargo bench --features cuda --bench cuda_unet -- BATCH SIZE REPS STEPS [f32|tf32|bf16]`
//! (bf16: mixed precision, `GpuUNet::set_compute(BF16)`: bf16 activations and GEMM / convolution
//! operands, f32 parameters and gradients, as torch autocast bf16).
use phenocore::backend::cuda::{device, profile};
use phenocore::backend::gpu::{Gpu, Math};
use phenocore::diffusion::gpu::GpuUNet;
use phenocore::diffusion::gpu_sample;
use phenocore::diffusion::scheduler::{SamplerKind, SchedulerConfig};
use phenocore::diffusion::train::SampleOptions;
use phenocore::diffusion::unet::{nchw_to_nhwc, Conditioning, DiffusionUNet, UNetConfig};
use phenocore::tensor::DType;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.len() < 4 {
        eprintln!("usage: cuda_unet BATCH SIZE REPS STEPS [f32|tf32|bf16]");
        std::process::exit(2);
    }
    let n: usize = args[0].parse().expect("BATCH");
    let s: usize = args[1].parse().expect("SIZE");
    let reps: usize = args[2].parse().expect("REPS");
    let steps: usize = args[3].parse().expect("STEPS");
    let mut cfg = UNetConfig::paper(1, 1, 1);
    cfg.confounders.clear();
    cfg.null_embeddings = false;
    let model = DiffusionUNet::<f32>::new(cfg, 1).expect("model");
    let dev = device(0).expect("CUDA device 0");
    let mut net = GpuUNet::new(&dev, &model).expect("upload");
    let mode = args.get(4).map(String::as_str).unwrap_or("f32");
    match mode {
        "f32" => {}
        "tf32" => net.math = Math::Tf32,
        "bf16" => net
            .set_compute(&dev, DType::BF16)
            .expect("bf16 working copy"),
        other => {
            eprintln!("unknown mode {other:?} (f32, tf32 or bf16)");
            std::process::exit(2);
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut randn =
        |len: usize| -> Vec<f32> { (0..len).map(|_| StandardNormal.sample(&mut rng)).collect() };
    let x = nchw_to_nhwc(&randn(n * 8 * s * s), n, 8, s, s);
    let dy = randn(n * 8 * s * s);
    let ctx = randn(n * 512);
    let ts: Vec<f64> = (0..n).map(|i| (100 + 400 * i % 1000) as f64).collect();
    let cond = Conditioning {
        context: Some(&ctx),
        context_len: 1,
        ..Default::default()
    };
    let mut train = Vec::new();
    for i in 0..reps + 1 {
        let t = Instant::now();
        let out = net
            .forward_backward_device(&dev, &x, n, s, s, &ts, &cond, &dy)
            .expect("forward + backward");
        dev.synchronize().expect("sync");
        let dt = t.elapsed().as_secs_f64();
        drop(out);
        eprintln!("forward+backward {i}: {dt:.4} s");
        if i > 0 {
            train.push(dt);
        } else {
            // The per-kernel profile leaves the warm-up out (module loads, first-call costs).
            let _ = profile::report();
        }
    }
    if profile::enabled() {
        eprint!(
            "forward+backward, {reps} passes after the warm-up: {}",
            profile::report()
        );
    }
    let opts = SampleOptions {
        scheduler: SchedulerConfig {
            kind: SamplerKind::Ddim,
            ..SchedulerConfig::default()
        },
        steps,
        guidance_scale: 1.0,
        seed: 3,
    };
    let mut sample = Vec::new();
    for i in 0..2 {
        let t = Instant::now();
        let z = gpu_sample::sample(&dev, &net, &opts, &cond, n, s, s, None).expect("sampling");
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(z);
        eprintln!("DDIM {steps} steps {i}: {dt:.3} s");
        if i > 0 {
            sample.push(dt);
        } else {
            let _ = profile::report();
        }
    }
    if profile::enabled() {
        eprint!(
            "DDIM sampling, one run after the warm-up: {}",
            profile::report()
        );
    }
    println!(
        "{{\"side\": \"phenocore\", \"gpu\": \"{}\", \"mode\": \"{mode}\", \"batch\": {n}, \"size\": {s}, \"train_s\": {}, \"sample_s\": {}, \"steps\": {steps}}}",
        dev.name(),
        median(train),
        median(sample)
    );
}
