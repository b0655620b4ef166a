//! `Trainer` with its steps on a device (`Trainer::with_device` / `TrainerOptions::device`)
//! against the same `Trainer` on the CPU: the whole `fit` loop (class-balanced epochs,
//! augmentation on worker threads, the learning-rate schedule, dropout and drop-connect from the
//! trainer's RNG, validation through the device's inference model, checkpoints), not one step.
//! Shared by the emulation (`tests/gpu_emu.rs`) and a GPU (`tests/cuda_ops.rs`).

use phenocore::models::efficientnet::{EfficientNetConfig, Padding, TrainableEfficientNet};
use phenocore::optim::Schedule;
use phenocore::train::{Dataset, EpochReport, Event, OptimizerKind, Trainer, TrainerOptions};
use rand::{Rng, SeedableRng};

pub const C: usize = 3;
pub const SIDE: usize = 32;
pub const CLASSES: usize = 3;
const CROPS: usize = 16;

/// BN ε of 0.1: with 4 crops of 32 × 32 the last stages normalise over 4 values per channel, and
/// with ε = 1e-3 the step is chaotic (a 1e-6 relative change of the weights changes the loss three
/// steps later by 2×, on the CPU alone), so no two implementations could agree; at 0.1 the same
/// change moves the losses by < 1e-6.
pub fn config() -> EfficientNetConfig {
    EfficientNetConfig {
        in_channels: C,
        num_classes: CLASSES,
        padding: Padding::Symmetric,
        bn_eps: 0.1,
    }
}

pub fn model() -> TrainableEfficientNet<f32> {
    TrainableEfficientNet::<f32>::new(config(), 3).unwrap()
}

/// Crops whose class shifts the mean of one channel, so the labels are learnable.
pub fn dataset() -> Dataset {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let labels: Vec<u32> = (0..CROPS).map(|i| (i % CLASSES) as u32).collect();
    let per = C * SIDE * SIDE;
    let mut data = Vec::with_capacity(CROPS * per);
    for &y in &labels {
        for ch in 0..C {
            let shift = if ch == y as usize { 0.8 } else { 0.0 };
            data.extend((0..SIDE * SIDE).map(|_| r.gen::<f32>() - 0.5 + shift));
        }
    }
    Dataset::new(data, C, SIDE, SIDE, labels).unwrap()
}

/// SGD with Nesterov momentum and weight decay, a step schedule that halves the rate every epoch
/// (a device that missed the schedule drifts from epoch 2), dropout and drop-connect on, the
/// default augmentation, batches of 4, two workers.
pub fn sgd_options() -> TrainerOptions {
    TrainerOptions {
        lr: 1e-2,
        schedule: Schedule::Step {
            step_size: 1,
            gamma: 0.5,
        },
        label_smoothing: 0.1,
        batch_size: 4,
        epochs: 2,
        seed: 5,
        workers: 2,
        ..Default::default()
    }
}

pub fn adamw_options() -> TrainerOptions {
    TrainerOptions {
        optimizer: OptimizerKind::AdamW,
        lr: 1e-3,
        weight_decay: 1e-2,
        ..sgd_options()
    }
}

pub const TRAIN: [usize; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
pub const VAL: [usize; 4] = [12, 13, 14, 15];

/// Runs `fit`, returning the per-step losses and the epoch reports.
pub fn fit(t: &mut Trainer, ck: Option<&std::path::Path>) -> (Vec<f64>, Vec<EpochReport>) {
    let data = dataset();
    let mut losses = Vec::new();
    let reports = t
        .fit(&data, &TRAIN, &VAL, ck, None, &mut |e| {
            if let Event::Step { loss, .. } = e {
                losses.push(loss);
            }
            true
        })
        .unwrap();
    (losses, reports)
}

fn weights(t: &mut Trainer) -> Vec<(String, Vec<f32>)> {
    t.model()
        .unwrap()
        .params()
        .iter()
        .map(|(n, _, _, v)| (n.to_string(), v.to_vec()))
        .collect()
}

/// ‖a − b‖ / ‖b‖ over every value of two lists of tensors (the same names in the same order).
fn rel_l2(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d2, mut n2) = (0f64, 0f64);
    for ((n, x), (m, y)) in a.iter().zip(b) {
        assert_eq!(n, m);
        assert_eq!(x.len(), y.len(), "{n}");
        for (&p, &q) in x.iter().zip(y) {
            d2 += (p as f64 - q as f64).powi(2);
            n2 += (q as f64).powi(2);
        }
    }
    (d2 / n2.max(1e-300)).sqrt()
}

/// ‖a − b‖ / ‖b‖ of two vectors.
fn rel_l2_vec(a: &[f32], b: &[f32]) -> f64 {
    rel_l2(
        &[(String::new(), a.to_vec())],
        &[(String::new(), b.to_vec())],
    )
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-6)
}

/// Two epochs of `fit` on the device and on the CPU from the same model and seed: every step's
/// loss, the epoch reports, the final weights and BN statistics, and the validation logits agree
/// to f32 rounding (summation orders differ; seen on the emulation: 1e-7 relative). A step that
/// ignored the schedule's learning rate, or a validation on stale weights, fails it.
pub fn fit_matches_cpu(device: &mut Trainer, cpu: &mut Trainer) {
    assert!(device.on_device() && !cpu.on_device());
    let w0 = weights(cpu);
    let data = dataset();
    let val: Vec<f32> = VAL.iter().flat_map(|&i| data.crop(i).to_vec()).collect();
    let z0 = cpu.predict(&val, VAL.len(), SIDE, SIDE).unwrap();
    let (ld, rd) = fit(device, None);
    let (lc, rc) = fit(cpu, None);
    assert_eq!(ld.len(), lc.len());
    assert_eq!(ld.len(), 6, "3 steps per epoch × 2 epochs");
    let loss_err = ld
        .iter()
        .zip(&lc)
        .map(|(&a, &b)| rel(a, b))
        .fold(0f64, f64::max);
    eprintln!(
        "device losses {ld:?}\nCPU losses    {lc:?}\nworst relative loss error {loss_err:.2e}"
    );
    assert!(loss_err < 1e-5, "losses differ by {loss_err:.2e}");
    for (a, b) in rd.iter().zip(&rc) {
        assert_eq!(a.lr, b.lr);
        assert_eq!(a.steps, b.steps);
        assert!(rel(a.train_loss, b.train_loss) < 1e-5);
        let (va, vb) = (
            a.validation.as_ref().unwrap(),
            b.validation.as_ref().unwrap(),
        );
        assert_eq!(
            va.accuracy,
            vb.accuracy,
            "validation after epoch {}",
            a.epoch + 1
        );
        assert_eq!(
            va.macro_f1,
            vb.macro_f1,
            "validation after epoch {}",
            a.epoch + 1
        );
    }
    // Before anything reads the weights back: predict must not use a stale host copy.
    let zd = device.predict(&val, VAL.len(), SIDE, SIDE).unwrap();
    let zc = cpu.predict(&val, VAL.len(), SIDE, SIDE).unwrap();
    let (ze, zmoved) = (rel_l2_vec(&zd, &zc), rel_l2_vec(&zc, &z0));
    eprintln!("validation logits: device vs CPU {ze:.2e}; training moved them {zmoved:.2e}");
    assert!(
        ze < 1e-4 && ze < zmoved / 100.0,
        "validation logits differ by {ze:.2e}"
    );
    let (wd, wc) = (weights(device), weights(cpu));
    let (we, moved) = (rel_l2(&wd, &wc), rel_l2(&wc, &w0));
    eprintln!("weights and statistics: device vs CPU {we:.2e}; training moved them {moved:.2e}");
    assert!(
        we < 1e-5 && we < moved / 100.0,
        "weights differ by {we:.2e}"
    );
}

/// A run interrupted after epoch 1 and resumed from its checkpoint in a fresh device trainer ends
/// exactly where the uninterrupted device run ends (AdamW: the moments travel through the
/// checkpoint); the same checkpoint resumed on the CPU ends close to it (the format is shared).
pub fn checkpoint_resumes(
    make_device: &dyn Fn(TrainerOptions) -> Trainer,
    make_cpu: &dyn Fn(TrainerOptions) -> Trainer,
) {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck.safetensors");
    let opts = adamw_options();
    let mut whole = make_device(opts.clone());
    let (lw, _) = fit(&mut whole, None);
    let mut first = make_device(TrainerOptions {
        epochs: 1,
        ..opts.clone()
    });
    let (l1, _) = fit(&mut first, Some(&ck));
    assert_eq!(l1[..], lw[..3], "epoch 1 of the two runs");
    let mut resumed = make_device(opts.clone());
    resumed.load_checkpoint(&ck).unwrap();
    assert_eq!((resumed.steps(), resumed.epochs_done()), (3, 1));
    let (l2, _) = fit(&mut resumed, None);
    assert_eq!(l2[..], lw[3..], "epoch 2 resumed on the device");
    assert_eq!(weights(&mut resumed), weights(&mut whole));
    let mut on_cpu = make_cpu(opts);
    on_cpu.load_checkpoint(&ck).unwrap();
    let (lc, _) = fit(&mut on_cpu, None);
    let e = lc
        .iter()
        .zip(&lw[3..])
        .map(|(&a, &b)| rel(a, b))
        .fold(0f64, f64::max);
    eprintln!("epoch 2 resumed on the CPU: worst relative loss error {e:.2e}");
    assert!(
        e < 1e-5,
        "CPU resume from a device checkpoint: losses off by {e:.2e}"
    );
    let we = rel_l2(&weights(&mut on_cpu), &weights(&mut whole));
    eprintln!("epoch 2 resumed on the CPU: weights off by {we:.2e}");
    assert!(we < 1e-2, "CPU resume: weights off by {we:.2e}");
}
