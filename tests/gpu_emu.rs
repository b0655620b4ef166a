//! The CUDA kernels' parity suite (`tests/gpu/parity/`) on the CPU emulation of `kernels/*.cu`
//! (`tests/gpu/cuda_emu.hpp`, built with g++): kernel logic and launch geometry checked against the
//! CPU backend on every CI run. The same suite runs on a GPU in `tests/cuda_parity.rs`.

#[path = "gpu/diffusion_device.rs"]
mod diffusion_device;
#[path = "gpu/emu.rs"]
mod emu;
#[path = "gpu/parity/mod.rs"]
mod parity;
#[path = "gpu/trainer_device.rs"]
mod trainer_device;

use parity::*;

macro_rules! emu_tests {
    ($($module:ident :: $name:ident),* $(,)?) => {
        mod emulated {
            use super::*;
            $(
                #[test]
                fn $name() {
                    $module::$name(emu::emu());
                }
            )*
        }
    };
}
for_each_parity_test!(emu_tests);

#[test]
fn every_listed_entry_point_exists() {
    for m in phenocore::backend::gpu::kernels::MODULES {
        emu::emu().check_entries(m).unwrap();
    }
}

/// A block-sum kernel with its barriers switchable: with them the emulation gets the sums right,
/// without them it must not (the first thread to run reads partner slots nobody has written yet)
/// — the emulation catches a missing `__syncthreads`. Also: a warp-shuffle sum over a partial
/// last warp, and threads waiting at different barriers (half a warp at `__syncthreads`, the rest at
/// `__syncwarp`) reported as an error rather than hanging.
#[test]
fn emulation_catches_missing_barriers_and_divergence() {
    use phenocore::backend::gpu::kernels::KernelModule;
    use phenocore::backend::gpu::{Arg, Gpu, Launch};
    static PROBE: KernelModule = KernelModule {
        name: "emu_probe",
        source: r#"
#include "common.cuh"
KERNEL(block_sum, const float* x, float* out, int sync) {
    __shared__ float s[256];
    s[threadIdx.x] = x[blockIdx.x * 256 + threadIdx.x];
    if (sync) __syncthreads();
    for (int st = 128; st > 0; st >>= 1) {
        if ((int)threadIdx.x < st) s[threadIdx.x] += s[threadIdx.x + st];
        if (sync) __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}
KERNEL(warp_sum, const float* x, float* out) {
    float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) out[blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32] = v;
}
KERNEL(divergent, float* out) {
    if (threadIdx.x < 16) __syncthreads();
    else __syncwarp();
    out[threadIdx.x] = 1.f;
}
"#,
        entries: &["block_sum", "warp_sum", "divergent"],
    };
    let g = emu::emu();
    let blocks = 6usize;
    let x: Vec<f32> = (0..256 * blocks)
        .map(|i| ((i * 7919) % 13) as f32)
        .collect();
    let want: Vec<f32> = x.chunks(256).map(|c| c.iter().sum()).collect();
    let xb = g.upload_slice(&x).unwrap();
    let launch = |entry: &str, grid: u32, block: u32, args: Vec<Arg>| Launch {
        module: &PROBE,
        entry: entry.into(),
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_bytes: 0,
        args,
    };
    for sync in [1, 0] {
        let out = g.alloc(blocks * 4).unwrap();
        let l = launch(
            "block_sum",
            blocks as u32,
            256,
            vec![Arg::Ptr(g.ptr(&xb)), Arg::Ptr(g.ptr(&out)), Arg::I32(sync)],
        );
        unsafe { g.launch(&l) }.unwrap();
        let got: Vec<f32> = g.download_vec(&out, blocks).unwrap();
        let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        if sync == 1 {
            assert_eq!(wrong, 0, "with barriers: {got:?} vs {want:?}");
        } else {
            assert!(
                wrong >= blocks / 2,
                "without barriers only {wrong} of {blocks} sums were wrong"
            );
        }
    }
    // 96 threads: three warps per block.
    let out = g.alloc(4 * 3 * 4).unwrap();
    unsafe {
        g.launch(&launch(
            "warp_sum",
            4,
            96,
            vec![Arg::Ptr(g.ptr(&xb)), Arg::Ptr(g.ptr(&out))],
        ))
    }
    .unwrap();
    let got: Vec<f32> = g.download_vec(&out, 12).unwrap();
    let want: Vec<f32> = x[..384].chunks(32).map(|c| c.iter().sum()).collect();
    assert_eq!(got, want);
    let out = g.alloc(64 * 4).unwrap();
    let err = unsafe { g.launch(&launch("divergent", 1, 64, vec![Arg::Ptr(g.ptr(&out))])) };
    assert!(
        err.is_err(),
        "threads waiting at different barriers must be reported"
    );
}

/// `Trainer::fit` with its steps on the emulated device against the CPU trainer.
#[test]
fn trainer_fit_on_device_matches_cpu() {
    use phenocore::train::Trainer;
    let opts = trainer_device::sgd_options();
    let mut dev = Trainer::with_device(trainer_device::model(), opts.clone(), emu::emu()).unwrap();
    let mut cpu = Trainer::new(trainer_device::model(), opts).unwrap();
    trainer_device::fit_matches_cpu(&mut dev, &mut cpu);
}

/// Checkpoints of a device trainer: resumed on the device exactly, on the CPU closely.
#[test]
fn trainer_checkpoint_on_device_resumes() {
    use phenocore::train::Trainer;
    trainer_device::checkpoint_resumes(
        &|o| Trainer::with_device(trainer_device::model(), o, emu::emu()).unwrap(),
        &|o| Trainer::new(trainer_device::model(), o).unwrap(),
    );
}

/// What the device path refuses, with messages: CPU-only options, tf32 / bf16 on the CPU.
#[test]
fn trainer_device_refusals() {
    use phenocore::train::{Compute, OnlineLabelSmoothing, Trainer, TrainerOptions};
    use phenocore::Error;
    let with_ols = TrainerOptions {
        online_label_smoothing: Some(OnlineLabelSmoothing {
            alpha: 0.5,
            smoothing: 0.1,
        }),
        ..trainer_device::sgd_options()
    };
    match Trainer::with_device(trainer_device::model(), with_ols, emu::emu()) {
        Err(Error::Unsupported(m)) => assert!(m.contains("online label smoothing"), "{m}"),
        Err(e) => panic!("expected Unsupported, got {e:?}"),
        Ok(_) => panic!("expected Unsupported, got a trainer"),
    }
    let bf16_on_cpu = TrainerOptions {
        compute: Compute::Bf16,
        ..trainer_device::sgd_options()
    };
    match Trainer::new(trainer_device::model(), bf16_on_cpu) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("device"), "{m}"),
        Err(e) => panic!("expected InvalidArgument, got {e:?}"),
        Ok(_) => panic!("expected InvalidArgument, got a trainer"),
    }
}

/// `DiffusionTrainer` with its steps on the emulated device against the CPU trainer.
#[test]
fn diffusion_trainer_on_device_matches_cpu() {
    use phenocore::diffusion::train::DiffusionTrainer;
    let o = diffusion_device::options();
    let mut dev = DiffusionTrainer::with_device(diffusion_device::model(), o, emu::emu()).unwrap();
    let mut cpu = DiffusionTrainer::new(diffusion_device::model(), o).unwrap();
    diffusion_device::matches_cpu(&mut dev, &mut cpu);
}

/// A device diffusion trainer's checkpoints: resumed on the device exactly, on the CPU closely.
#[test]
fn diffusion_trainer_checkpoint_on_device_resumes() {
    use phenocore::diffusion::train::DiffusionTrainer;
    let o = diffusion_device::options();
    diffusion_device::checkpoint_resumes(
        &|| DiffusionTrainer::with_device(diffusion_device::model(), o, emu::emu()).unwrap(),
        &|| DiffusionTrainer::new(diffusion_device::model(), o).unwrap(),
    );
}
