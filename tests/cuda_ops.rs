//! CUDA backend against the CPU. The test without `#[ignore]` runs everywhere (CI has no GPU);
//! the others need a GPU, the `cuda` feature and libnvrtc:
//! `scripts/test-cuda-nvrtc.sh --gpu` (or `cargo test --features cuda --test cuda_ops -- --ignored`).

use phenocore::{Device, Error, Tensor};

/// Moving a tensor to CUDA either works (a GPU machine: the copy round-trips exactly) or returns
/// `Error::NoDevice` (no `cuda` feature, no driver, no GPU) — never a panic or another error.
#[test]
fn to_cuda_is_a_round_trip_or_no_device() {
    let x = Tensor::from_f32(&[2, 3], vec![1.0, -2.5, 0.0, 3.25, -0.125, 1e-3]).unwrap();
    match x.to_device(Device::Cuda(0)) {
        Ok(g) => {
            assert_eq!(g.device(), Device::Cuda(0));
            assert_eq!(g.shape(), &[2, 3]);
            let back = g.to_device(Device::Cpu).unwrap();
            assert_eq!(back.as_f32().unwrap(), x.as_f32().unwrap());
        }
        Err(Error::NoDevice(m)) => {
            assert!(
                m.contains("CUDA") || m.contains("cuda") || m.contains("nvrtc"),
                "{m}"
            );
            assert_eq!(
                Error::NoDevice(m).status(),
                phenocore::error::PhenoStatus::PHENO_ERR_NO_DEVICE
            );
        }
        Err(other) => panic!("expected Ok or Error::NoDevice, got {other:?}"),
    }
}

/// The C ABI's EfficientNet on a CUDA device (`PhenoEffnetOptions::device = 0`): without the
/// `cuda` feature PHENO_ERR_UNSUPPORTED, without a usable GPU PHENO_ERR_NO_DEVICE (both with a
/// message, never a crash); on a GPU the features of two layers match the CPU model's.
#[test]
fn ffi_effnet_on_cuda_matches_cpu_or_says_why_not() {
    use phenocore::error::PhenoStatus;
    use phenocore::ffi::*;
    use std::ffi::{c_char, CStr};
    let (n, c, hw) = (3usize, 5usize, 40usize);
    let crops: Vec<f32> = (0..n * c * hw * hw)
        .map(|i| ((i as u64 * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let make = |device: i32| -> (PhenoStatus, *mut PhenoModel) {
        let mut o = pheno_effnet_default_options();
        o.device = device;
        let mut m: *mut PhenoModel = std::ptr::null_mut();
        // SAFETY: o is initialised, m a valid out pointer.
        let st = unsafe { pheno_effnet_new(c, 7, 11, &o, &mut m) };
        (st, m)
    };
    let (st, cpu) = make(-1);
    assert_eq!(st, PhenoStatus::PHENO_OK);
    let (st, gpu) = make(0);
    if st != PhenoStatus::PHENO_OK {
        // SAFETY: the library's last-error string is NUL-terminated.
        let msg = unsafe { CStr::from_ptr(pheno_last_error()) }
            .to_string_lossy()
            .into_owned();
        let want = if cfg!(feature = "cuda") {
            PhenoStatus::PHENO_ERR_NO_DEVICE
        } else {
            PhenoStatus::PHENO_ERR_UNSUPPORTED
        };
        assert_eq!(st, want, "{msg}");
        assert!(!msg.is_empty() && gpu.is_null(), "{msg}");
        // SAFETY: cpu is a live model.
        unsafe { pheno_effnet_free(cpu) };
        return;
    }
    let layers = [c"block6a_activation", c"top_activation"];
    let names: Vec<*const c_char> = layers.iter().map(|l| l.as_ptr()).collect();
    let run = |m: *mut PhenoModel| -> Vec<Vec<f32>> {
        let mut outs: Vec<Vec<f32>> = names
            .iter()
            .map(|&l| {
                let mut d = 0usize;
                // SAFETY: m is live, l a NUL-terminated layer name.
                assert_eq!(
                    unsafe { pheno_effnet_layer_dim(m, l, &mut d) },
                    PhenoStatus::PHENO_OK
                );
                vec![f32::NAN; n * d]
            })
            .collect();
        let ptrs: Vec<*mut f32> = outs.iter_mut().map(|o| o.as_mut_ptr()).collect();
        let lens: Vec<usize> = outs.iter().map(|o| o.len()).collect();
        // SAFETY: every pointer addresses what its length says.
        let st = unsafe {
            pheno_effnet_features(
                m,
                crops.as_ptr(),
                n,
                c,
                hw,
                hw,
                names.as_ptr(),
                names.len(),
                std::ptr::null(),
                ptrs.as_ptr(),
                lens.as_ptr(),
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        outs
    };
    let (want, got) = (run(cpu), run(gpu));
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "layer {i}: GPU features differ from the CPU's by {worst} (scale {scale})"
        );
    }
    // SAFETY: both are live models, freed once.
    unsafe {
        pheno_effnet_free(cpu);
        pheno_effnet_free(gpu);
    }
}

#[path = "gpu/diffusion_device.rs"]
mod diffusion_device;
#[path = "gpu/trainer_device.rs"]
mod trainer_device;

/// `DiffusionTrainer` on CUDA device 0: without the `cuda` feature `Error::Unsupported`, without a
/// GPU `Error::NoDevice`; on a GPU, three steps match the CPU trainer's and checkpoints resume
/// (the suite the emulation runs in `tests/gpu_emu.rs`).
#[test]
fn diffusion_trainer_on_cuda_matches_cpu_or_says_why_not() {
    use phenocore::diffusion::train::{DiffusionTrainOptions, DiffusionTrainer};
    let on_gpu = || {
        DiffusionTrainer::new(
            diffusion_device::model(),
            DiffusionTrainOptions {
                device: Some(0),
                ..diffusion_device::options()
            },
        )
    };
    match on_gpu() {
        Err(e) => {
            let want = if cfg!(feature = "cuda") {
                matches!(e, Error::NoDevice(_))
            } else {
                matches!(&e, Error::Unsupported(m) if m.contains("cuda"))
            };
            assert!(want, "{e:?}");
        }
        Ok(mut dev) => {
            let o = diffusion_device::options();
            let mut cpu = DiffusionTrainer::new(diffusion_device::model(), o).unwrap();
            diffusion_device::matches_cpu(&mut dev, &mut cpu);
            diffusion_device::checkpoint_resumes(&|| on_gpu().unwrap(), &|| {
                DiffusionTrainer::new(diffusion_device::model(), o).unwrap()
            });
        }
    }
    // Compute modes other than f32 need a device.
    let e = DiffusionTrainer::new(
        diffusion_device::model(),
        DiffusionTrainOptions {
            compute: phenocore::train::Compute::Bf16,
            ..diffusion_device::options()
        },
    )
    .err()
    .expect("bf16 on the CPU must be refused");
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("set device")),
        "{e:?}"
    );
}

/// `Trainer` with `TrainerOptions::device = Some(0)`, and the C ABI's `PhenoTrainerOptions::device
/// = 0`: without the `cuda` feature `Error::Unsupported` / PHENO_ERR_UNSUPPORTED, without a usable
/// GPU `Error::NoDevice` / PHENO_ERR_NO_DEVICE, with messages; on a GPU, two epochs of `fit` match
/// the CPU trainer's and checkpoints resume (the suite the emulation runs in `tests/gpu_emu.rs`).
#[test]
fn trainer_on_cuda_matches_cpu_or_says_why_not() {
    use phenocore::error::PhenoStatus;
    use phenocore::ffi::*;
    use phenocore::train::{Trainer, TrainerOptions};
    use std::ffi::CStr;
    let on_gpu = |o: TrainerOptions| {
        Trainer::new(
            trainer_device::model(),
            TrainerOptions {
                device: Some(0),
                ..o
            },
        )
    };
    let mut o = pheno_trainer_default_options();
    o.device = 0;
    let mut t: *mut PhenoTrainer = std::ptr::null_mut();
    // SAFETY: o is initialised, t a valid out pointer.
    let st = unsafe { pheno_trainer_new(&o, 3, 4, 1, std::ptr::null(), &mut t) };
    match on_gpu(trainer_device::sgd_options()) {
        Err(e) => {
            let (want, status) = if cfg!(feature = "cuda") {
                (
                    matches!(e, Error::NoDevice(_)),
                    PhenoStatus::PHENO_ERR_NO_DEVICE,
                )
            } else {
                (
                    matches!(&e, Error::Unsupported(m) if m.contains("cuda")),
                    PhenoStatus::PHENO_ERR_UNSUPPORTED,
                )
            };
            assert!(want, "{e:?}");
            // SAFETY: the library's last-error string is NUL-terminated.
            let msg = unsafe { CStr::from_ptr(pheno_last_error()) }.to_string_lossy();
            assert_eq!(st, status, "{msg}");
            assert!(t.is_null() && !msg.is_empty());
        }
        Ok(mut dev) => {
            assert_eq!(st, PhenoStatus::PHENO_OK);
            // SAFETY: t is a live trainer, freed once.
            unsafe { pheno_trainer_free(t) };
            let mut cpu =
                Trainer::new(trainer_device::model(), trainer_device::sgd_options()).unwrap();
            trainer_device::fit_matches_cpu(&mut dev, &mut cpu);
            trainer_device::checkpoint_resumes(&|o| on_gpu(o).unwrap(), &|o| {
                Trainer::new(trainer_device::model(), o).unwrap()
            });
        }
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use phenocore::backend::cuda::{self, ops as cuda_ops};
    use phenocore::ops::activation::{sigmoid, silu};
    use phenocore::tensor::Storage;
    use phenocore::DType;
    use rand::{Rng, SeedableRng};
    use std::sync::{Mutex, MutexGuard};

    /// The GPU tests share device 0's allocator, whose counters one test asserts: run them one at a time.
    fn exclusive() -> MutexGuard<'static, ()> {
        static GPU: Mutex<()> = Mutex::new(());
        GPU.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Uniform in [-12, 12]; 4099 elements so the 16-byte body and the scalar tail both run.
    fn random(n: usize, seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Tensor::from_f32(
            &[n],
            (0..n).map(|_| rng.gen_range(-12.0f32..12.0)).collect(),
        )
        .unwrap()
    }

    fn on_gpu(x: &Tensor) -> Tensor {
        x.to_device(Device::Cuda(0))
            .expect("CUDA device 0 with libnvrtc")
    }

    fn to_f64(t: &Tensor) -> Vec<f64> {
        t.to_device(Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .as_f64()
            .unwrap()
            .to_vec()
    }

    /// Asserts |got − want| ≤ rel·|want| + abs elementwise, naming the first offender.
    fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64, abs: f64) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= rel * w.abs() + abs,
                "{what}[{i}]: GPU {g:e} vs CPU {w:e}"
            );
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn silu_and_sigmoid_f32_match_the_cpu() {
        let _gpu = exclusive();
        let x = random(4099, 1);
        let g = on_gpu(&x);
        for (name, op) in [
            ("silu", silu as fn(&Tensor) -> phenocore::Result<Tensor>),
            ("sigmoid", sigmoid),
        ] {
            let y = op(&g).unwrap();
            assert_eq!(
                (y.device(), y.dtype(), y.shape()),
                (Device::Cuda(0), DType::F32, x.shape())
            );
            assert_close(name, &to_f64(&y), &to_f64(&op(&x).unwrap()), 1e-6, 0.0);
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn silu_and_sigmoid_f64_f16_bf16_match_the_cpu() {
        let _gpu = exclusive();
        let x32 = random(1027, 2);
        // (dtype, relative tolerance = one ulp of the storage type, absolute floor for subnormals)
        for (dtype, rel, abs) in [
            (DType::F64, 1e-14, 0.0),
            (DType::F16, 2f64.powi(-10), 2f64.powi(-24)),
            (DType::BF16, 2f64.powi(-7), 0.0),
        ] {
            let x = x32.to_dtype(dtype).unwrap();
            let g = on_gpu(&x);
            for (name, op) in [
                ("silu", silu as fn(&Tensor) -> phenocore::Result<Tensor>),
                ("sigmoid", sigmoid),
            ] {
                let y = op(&g).unwrap();
                assert_eq!(y.dtype(), dtype);
                // CPU reference: the op on the same (rounded) inputs in f32 or f64, rounded to dtype.
                let compute = if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                let want = op(&x.to_dtype(compute).unwrap())
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                assert_close(
                    &format!("{name} {dtype:?}"),
                    &to_f64(&y),
                    &to_f64(&want),
                    rel,
                    abs,
                );
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn affine_matches_closed_form() {
        let _gpu = exclusive();
        let x = random(333, 3);
        let g = on_gpu(&x);
        let Storage::Cuda(s) = g.storage() else {
            panic!("not on the GPU: {:?}", g.device())
        };
        let y = cuda_ops::affine(s, -1.5, 0.25).unwrap();
        let got = match y.to_cpu().unwrap() {
            Storage::F32(v) => v,
            other => panic!("affine changed the dtype: {other:?}"),
        };
        let want: Vec<f64> = x
            .as_f32()
            .unwrap()
            .iter()
            .map(|&v| (v * -1.5 + 0.25) as f64)
            .collect();
        let got: Vec<f64> = got.iter().map(|&v| v as f64).collect();
        assert_close("affine", &got, &want, 1e-6, 1e-7);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn repeated_shapes_do_not_call_the_driver_allocator() {
        let _gpu = exclusive();
        let g = on_gpu(&random(10_000, 4));
        let dev = cuda::device(0).unwrap();
        let step = |y: &Tensor| sigmoid(&silu(y).unwrap()).unwrap();
        // Warm-up: one step holds at most three blocks of this size (input, temporary, output).
        let mut y = step(&step(&g));
        let before = dev.alloc_stats();
        for _ in 0..20 {
            y = step(&y);
        }
        let after = dev.alloc_stats();
        assert_eq!(
            after.driver_allocs, before.driver_allocs,
            "{before:?} → {after:?}"
        );
        assert!(after.bytes_in_use >= cuda::bucket_size(40_000).unwrap());
        drop((y, g));
        assert!(dev.alloc_stats().bytes_cached > 0);
        dev.empty_cache().unwrap();
        assert_eq!(dev.alloc_stats().bytes_cached, 0);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn empty_tensors_and_bad_ordinals() {
        let _gpu = exclusive();
        let e = on_gpu(&Tensor::from_f32(&[0, 4], vec![]).unwrap());
        let y = silu(&e).unwrap();
        assert_eq!(
            (
                y.shape(),
                y.to_device(Device::Cpu).unwrap().as_f32().unwrap().len()
            ),
            (&[0usize, 4][..], 0)
        );

        let count = cuda::device_count().unwrap();
        assert!(count >= 1);
        match Tensor::from_f32(&[1], vec![1.0])
            .unwrap()
            .to_device(Device::Cuda(count))
        {
            Err(Error::NoDevice(m)) => {
                assert!(
                    m.contains(&format!("device {count} requested"))
                        && m.contains(&format!("{count} device(s)")),
                    "{m}"
                )
            }
            other => panic!("expected NoDevice for ordinal {count}, got {other:?}"),
        }
        let dev = cuda::device(0).unwrap();
        assert!(dev.arch() >= 75, "{dev:?}");
    }
}
