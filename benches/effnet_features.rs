//! Throughput of EfficientNet-B0 `block6a_activation` features on the CPU (phenocore alone).
//! `cargo bench --bench effnet_features [-- BATCH REPS LAYER [bf16]]`. The side-by-side comparison with
//! PyTorch and ONNX Runtime is `benches/effnet_cpu.py`.
use phenocore::models::efficientnet::{EfficientNet, EfficientNetConfig, Precision};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let batch: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(64);
    let reps: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let layer = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "block6a_activation".into());
    let mut model = EfficientNet::new(
        EfficientNetConfig {
            num_classes: 490,
            ..Default::default()
        },
        0,
    )
    .expect("model");
    let bf16 = args.get(3).is_some_and(|a| a == "bf16");
    if bf16 {
        model
            .set_precision(Precision::Bf16)
            .expect("bf16 precision");
    }
    let x: Vec<f32> = (0..batch * 5 * 128 * 128)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let x = phenocore::Tensor::from_f32(&[batch, 5, 128, 128], x).expect("tensor");
    model.features(&x, &[&layer]).expect("warm-up");
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(model.features(&x, &[&layer]).expect("features"));
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    println!(
        "phenocore {layer}{} batch {batch} threads {}: median {:.3} s, {:.1} crops/s",
        if bf16 { " bf16" } else { "" },
        phenocore::threads::num_threads(),
        med,
        batch as f64 / med
    );
}
