//! One EfficientNet-B0 training step on a CUDA GPU, phenocore alone (`GpuEfficientNetTrainer`):
//! BATCH random crops 5 × 128 × 128 with random labels over CLASSES classes, forward in training
//! mode (batch-statistics BN, dropout 0.2, drop-connect 0.2), cross-entropy, backward, SGD
//! (lr 0.005, momentum 0.9, Nesterov, weight decay 1e-5), as `benches/train_step.py` does on the
//! CPU. Prints one JSON line; `benches/cuda_train.py` runs PyTorch beside it.
//!
//! `cargo bench --features cuda --bench cuda_train -- BATCH CLASSES STEPS [f32|tf32|bf16]`
//! (bf16: mixed precision with f32 master weights, `GpuTrainOptions::compute`).
use phenocore::backend::cuda::{device, profile};
use phenocore::backend::gpu::Math;
use phenocore::models::efficientnet::{
    EfficientNetConfig, GpuEfficientNetTrainer, GpuOptimizer, GpuTrainOptions, Padding,
    Regularisation, TrainableEfficientNet,
};
use phenocore::optim::SgdOptions;
use phenocore::train::DecayScope;
use phenocore::DType;
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.len() < 3 {
        eprintln!("usage: cuda_train BATCH CLASSES STEPS [f32|tf32|bf16]");
        std::process::exit(2);
    }
    let n: usize = args[0].parse().expect("BATCH");
    let classes: usize = args[1].parse().expect("CLASSES");
    let steps: usize = args[2].parse().expect("STEPS");
    let mode = args.get(3).map_or("f32", |a| a.as_str()).to_string();
    let (math, compute) = match mode.as_str() {
        "f32" => (Math::F32, DType::F32),
        "tf32" => (Math::Tf32, DType::F32),
        "bf16" => (Math::F32, DType::BF16),
        m => {
            eprintln!("unknown mode {m:?} (f32, tf32 or bf16)");
            std::process::exit(2);
        }
    };
    let cfg = EfficientNetConfig {
        in_channels: 5,
        num_classes: classes,
        padding: Padding::Symmetric,
        bn_eps: 1e-3,
    };
    let model = TrainableEfficientNet::<f32>::new(cfg, 1).expect("model");
    let dev = device(0).expect("CUDA device 0");
    let opts = GpuTrainOptions {
        optimizer: GpuOptimizer::Sgd(SgdOptions {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 1e-5,
            maximize: false,
        }),
        lr: 0.005,
        label_smoothing: 0.0,
        decay_scope: DecayScope::All,
        clip_grad_norm: None,
        math,
        compute,
    };
    let mut trainer = GpuEfficientNetTrainer::new(&dev, &model, opts).expect("upload");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20241121);
    let (h, w) = (128, 128);
    let crops: Vec<f32> = (0..n * 5 * h * w).map(|_| rng.gen::<f32>()).collect();
    let labels: Vec<u32> = (0..n).map(|_| rng.gen_range(0..classes as u32)).collect();
    let reg = Regularisation::default();
    let mut times = Vec::new();
    let mut loss = 0.0;
    for i in 0..steps + 1 {
        let t = Instant::now();
        // step() reads the loss back, which waits for the device.
        loss = trainer
            .step(&dev, &crops, n, h, w, &labels, &reg, &mut rng)
            .expect("training step");
        let dt = t.elapsed().as_secs_f64();
        eprintln!("step {i}: {dt:.4} s, loss {loss:.4}");
        if i > 0 {
            times.push(dt);
        } else {
            // The per-kernel profile leaves the warm-up out (module loads, first-call costs).
            let _ = profile::report();
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    if profile::enabled() {
        eprint!("training steps: {}", profile::report());
    }
    println!(
        "{{\"side\": \"phenocore\", \"gpu\": \"{}\", \"math\": \"{}\", \"batch\": {n}, \"step_s\": {med}, \"crops_per_s\": {}, \"loss\": {loss}}}",
        dev.name(),
        mode,
        n as f64 / med
    );
}
