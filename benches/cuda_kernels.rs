//! Achieved memory bandwidth of the elementwise and depthwise kernels on a CUDA GPU against the
//! device's own copy bandwidth (`cuMemcpyDtoD`), issue 6's ≥ 70 % target. Bytes counted are the
//! minimum each kernel must move (every input read once, every output written once).
//!
//! `cargo bench --features cuda --bench cuda_kernels [-- REPS]`
use phenocore::backend::cuda::device;
use phenocore::backend::gpu::depthwise::Depthwise;
use phenocore::backend::gpu::elementwise::{affine, unary, Unary};
use phenocore::backend::gpu::Gpu;
use phenocore::DType;
use std::time::Instant;

fn median_seconds(g: &impl Gpu, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    g.synchronize().expect("sync");
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            g.synchronize().expect("sync");
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn main() {
    let reps: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let g = device(0).expect("CUDA device 0");
    println!(
        "{} ({} SMs), median of {reps}",
        g.name(),
        g.multiprocessors()
    );
    let n: usize = 256 << 20; // 1 GiB of f32
    let a = g.alloc(n * 4).expect("alloc");
    let b = g.alloc(n * 4).expect("alloc");
    unsafe { g.memset_zero(g.ptr(&a), n * 4).expect("memset") };
    let (pa, pb) = (g.ptr(&a), g.ptr(&b));
    let copy = median_seconds(&g, reps, || unsafe { g.copy(pa, pb, n * 4).expect("copy") });
    let copy_bw = 2.0 * (n * 4) as f64 / copy / 1e9;
    println!(
        "{:40} {:8.1} GB/s",
        "cuMemcpyDtoD 1 GiB (read + write)", copy_bw
    );
    let report = |name: &str, bytes: f64, s: f64| {
        let bw = bytes / s / 1e9;
        println!(
            "{name:40} {bw:8.1} GB/s  {:5.1} % of copy",
            100.0 * bw / copy_bw
        );
    };
    for (dtype, label) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        let m = n * 4 / dtype.size_in_bytes();
        let bytes = 2.0 * (m * dtype.size_in_bytes()) as f64;
        let s = median_seconds(&g, reps, || unsafe {
            unary(&g, Unary::Silu, dtype, pa, pb, m).expect("silu")
        });
        report(&format!("silu {label} 1 GiB"), bytes, s);
        let s = median_seconds(&g, reps, || unsafe {
            affine(&g, dtype, pa, pb, m, 1.5, 0.25).expect("affine")
        });
        report(&format!("affine {label} 1 GiB"), bytes, s);
    }
    // EfficientNet-B0 depthwise layers at batch 1024 of 128 × 128 crops (NHWC, symmetric padding).
    for (name, h, c, k, stride) in [
        ("block2a dw 64x64x96 k3 s2", 64, 96, 3, 2),
        ("block2b dw 32x32x144 k3 s1", 32, 144, 3, 1),
        ("block3a dw 32x32x144 k5 s2", 32, 144, 5, 2),
        ("block6a dw 8x8x672 k5 s2", 8, 672, 5, 2),
    ] {
        let batch = 1024;
        let pad = (k - 1) / 2;
        let oh = (h + 2 * pad - k) / stride + 1;
        for (dtype, label) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
            let d = Depthwise::new(dtype, [batch, h, h, c], k, stride, pad, pad, [oh, oh])
                .expect("plan");
            let es = dtype.size_in_bytes();
            let (x, w, y) = (
                g.alloc(d.input_len() * es).expect("x"),
                g.alloc(d.weight_len() * es).expect("w"),
                g.alloc(d.output_len() * es).expect("y"),
            );
            unsafe {
                g.memset_zero(g.ptr(&x), d.input_len() * es).expect("zero");
                g.memset_zero(g.ptr(&w), d.weight_len() * es).expect("zero");
            }
            let s = median_seconds(&g, reps, || unsafe {
                d.forward(&g, g.ptr(&x), g.ptr(&w), g.ptr(&y)).expect("dw")
            });
            report(
                &format!("{name} {label} fwd"),
                ((d.input_len() + d.output_len()) * es) as f64,
                s,
            );
            let dx = g.alloc(d.input_len() * es).expect("dx");
            let s = median_seconds(&g, reps, || unsafe {
                d.backward_x(&g, g.ptr(&y), g.ptr(&w), g.ptr(&dx))
                    .expect("dx")
            });
            report(
                &format!("{name} {label} dx"),
                ((d.input_len() + d.output_len()) * es) as f64,
                s,
            );
            let dw = g.alloc(d.weight_len() * 4).expect("dw");
            let s = median_seconds(&g, reps, || unsafe {
                d.backward_w(&g, g.ptr(&x), g.ptr(&y), g.ptr(&dw), false)
                    .expect("dw")
            });
            report(
                &format!("{name} {label} dw"),
                ((d.input_len() + d.output_len()) * es) as f64,
                s,
            );
        }
    }
}
