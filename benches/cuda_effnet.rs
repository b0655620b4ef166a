//! EfficientNet-B0 features on a CUDA GPU, phenocore alone: loads `WEIGHTS` (safetensors,
//! torchvision names), runs `block6a_activation` on BATCH crops read from `CROPS` (raw f32,
//! [BATCH, 5, 128, 128]), REPS timed passes after one warm-up, writes the features (raw f32) to
//! `OUT`. `benches/cuda_effnet.py` runs it beside PyTorch eager and torch.compile and prints ratios.
//!
//! `cargo bench --features cuda --bench cuda_effnet -- WEIGHTS CROPS BATCH REPS OUT [tf32]`
use phenocore::backend::cuda::{device, profile};
use phenocore::backend::gpu::Math;
use phenocore::models::efficientnet::{EfficientNet, GpuEfficientNet, Padding};
use std::time::Instant;

/// The median of `reps` timed calls of `f`.
fn median_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// The largest |a − b| over two feature tensors.
fn max_diff(a: &phenocore::Tensor, b: &phenocore::Tensor) -> f32 {
    let (a, b) = (a.as_f32().expect("f32"), b.as_f32().expect("f32"));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.len() < 5 {
        eprintln!("usage: cuda_effnet WEIGHTS CROPS BATCH REPS OUT [tf32]");
        std::process::exit(2);
    }
    let batch: usize = args[2].parse().expect("BATCH");
    let reps: usize = args[3].parse().expect("REPS");
    let model = EfficientNet::load(args[0].as_ref(), Padding::Symmetric, 1e-5).expect("weights");
    let bytes = std::fs::read(&args[1]).expect("crops file");
    let crops: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
    assert_eq!(crops.len(), batch * 5 * 128 * 128, "crops file size");
    let x = phenocore::Tensor::from_f32(&[batch, 5, 128, 128], crops).expect("tensor");
    let dev = device(0).expect("CUDA device 0");
    let mut net = GpuEfficientNet::new(&dev, &model).expect("upload");
    if args.get(5).is_some_and(|a| a == "tf32") {
        net.math = Math::Tf32;
    }
    let layer = "block6a_activation";
    let feats = net.features(&dev, &x, layer).expect("warm-up");
    // The per-kernel profile leaves the warm-up out (module loads, first-call costs).
    let _ = profile::report();
    // features() ends with a download, which waits for the device.
    let med = median_seconds(reps, || {
        std::hint::black_box(net.features(&dev, &x, layer).expect("features"));
    });
    // The same pass captured once as a CUDA graph and replayed (input staged through pinned
    // memory, output read back, as above).
    let graph = net
        .capture_features(&dev, batch, 128, 128, layer)
        .expect("graph capture");
    let replayed = graph.run(&dev, &x).expect("graph warm-up");
    let gmed = median_seconds(reps, || {
        std::hint::black_box(graph.run(&dev, &x).expect("graph replay"));
    });
    let gdiff = max_diff(&replayed, &feats);
    // The streaming path: the same crops in four sub-batches, each staged through pinned memory on
    // the copy stream while the device computes the one before (`features_batched`).
    let sub = batch.div_ceil(4);
    let piped = net
        .features_batched(&dev, &x, layer, sub)
        .expect("pipelined warm-up");
    let pmed = median_seconds(reps, || {
        std::hint::black_box(
            net.features_batched(&dev, &x, layer, sub)
                .expect("pipelined"),
        );
    });
    let pdiff = max_diff(&piped, &feats);
    std::fs::write(&args[4], bytemuck::cast_slice(feats.as_f32().expect("f32")))
        .expect("write features");
    println!(
        "phenocore-cuda {} {layer} batch {batch}: median {med:.4} s, {:.1} crops/s (incl. host->device copy of the crops)",
        dev.name(),
        batch as f64 / med
    );
    println!(
        "phenocore-cuda graph replay: median {gmed:.4} s, {:.1} crops/s (max |graph − eager pass| {gdiff:.2e})",
        batch as f64 / gmed
    );
    println!(
        "phenocore-cuda pipelined ({sub}-crop sub-batches): median {pmed:.4} s, {:.1} crops/s (max |pipelined − one pass| {pdiff:.2e})",
        batch as f64 / pmed
    );
    if profile::enabled() {
        eprint!(
            "passes after the first (one-shot, the capture's pre-pass, pipelined; graph replays \
             are not timed per kernel): {}",
            profile::report()
        );
    }
    println!("RESULT median_s={med} graph_median_s={gmed} pipelined_median_s={pmed}");
}
