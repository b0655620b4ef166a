//! The training loop: exact resume from a checkpoint, non-finite losses stop with an error naming
//! the step and leave the weights and the last checkpoint intact, bad labels, cancel, and learning
//! on synthetic plates.

use phenocore::models::efficientnet::{
    EfficientNetConfig, Padding, Regularisation, TrainableEfficientNet,
};
use phenocore::train::{Dataset, Event, Trainer, TrainerOptions};
use phenocore::Error;
use rand::{Rng, SeedableRng};

fn cfg(classes: usize) -> EfficientNetConfig {
    EfficientNetConfig {
        in_channels: 5,
        num_classes: classes,
        padding: Padding::Symmetric,
        bn_eps: 1e-5,
    }
}

fn batch(n: usize, side: usize, seed: u64, classes: u32) -> (Vec<f32>, Vec<u32>) {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let x = (0..n * 5 * side * side).map(|_| r.gen::<f32>()).collect();
    let y = (0..n).map(|_| r.gen_range(0..classes)).collect();
    (x, y)
}

fn weights(t: &Trainer) -> Vec<Vec<f32>> {
    t.model()
        .params()
        .iter()
        .map(|(_, _, _, v)| v.to_vec())
        .collect()
}

fn opts() -> TrainerOptions {
    TrainerOptions {
        lr: 0.05,
        label_smoothing: 0.1,
        augment_in_step: true,
        batch_size: 4,
        seed: 3,
        ..Default::default()
    }
}

#[test]
fn resume_reproduces_the_next_step_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck.safetensors");
    let (x, y) = batch(4, 32, 1, 3);
    let mut a = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), opts()).unwrap();
    for _ in 0..2 {
        a.step(&x, 4, 32, 32, &y).unwrap();
    }
    a.save_checkpoint(&ck).unwrap();
    let la = a.step(&x, 4, 32, 32, &y).unwrap();
    // A fresh trainer from another initialisation, restored from the checkpoint: the same third step
    // (same momentum buffers, BN statistics, dropout / drop-connect / augmentation randomness).
    let mut b = Trainer::new(TrainableEfficientNet::new(cfg(3), 99).unwrap(), opts()).unwrap();
    b.load_checkpoint(&ck).unwrap();
    assert_eq!(b.steps(), 2);
    let lb = b.step(&x, 4, 32, 32, &y).unwrap();
    assert_eq!(la, lb);
    assert_eq!(weights(&a), weights(&b));
    // A checkpoint from a model with another class count is refused, naming the tensor.
    let mut c = Trainer::new(TrainableEfficientNet::new(cfg(4), 1).unwrap(), opts()).unwrap();
    let e = c.load_checkpoint(&ck).unwrap_err().to_string();
    assert!(e.contains("classifier.1"), "{e}");
}

#[test]
fn non_finite_loss_names_the_step_and_keeps_weights_and_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck.safetensors");
    let (x, y) = batch(4, 32, 2, 3);
    let o = TrainerOptions {
        lr: 1e30,
        augment_in_step: false,
        ..opts()
    };
    let mut t = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), o).unwrap();
    t.save_checkpoint(&ck).unwrap();
    let saved = std::fs::read(&ck).unwrap();
    let mut failed = None;
    for i in 1..=6 {
        let before = weights(&t);
        match t.step(&x, 4, 32, 32, &y) {
            Ok(_) => {}
            Err(e) => {
                assert!(matches!(e, Error::NonFinite(_)), "{e}");
                assert!(e.to_string().contains(&format!("step {i}")), "{e}");
                assert_eq!(weights(&t), before, "a failed step changed the weights");
                failed = Some(i);
                break;
            }
        }
    }
    assert!(failed.is_some(), "lr 1e30 never produced a non-finite loss");
    assert_eq!(std::fs::read(&ck).unwrap(), saved);
    let mut r = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), opts()).unwrap();
    r.load_checkpoint(&ck).unwrap();
}

#[test]
fn bad_inputs_are_errors() {
    let mut t = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), opts()).unwrap();
    let (x, _) = batch(2, 32, 3, 3);
    let e = t.step(&x, 2, 32, 32, &[0, 3]).unwrap_err().to_string();
    assert!(
        e.contains("label 3 of crop 1") && e.contains("3 classes"),
        "{e}"
    );
    let mut xn = x.clone();
    xn[5 * 32 * 32 + 7] = f32::NAN;
    let e = t.step(&xn, 2, 32, 32, &[0, 1]).unwrap_err();
    assert!(
        matches!(e, Error::NonFinite(_)) && e.to_string().contains("crop 1"),
        "{e}"
    );
    assert!(t.step(&x, 3, 32, 32, &[0, 1, 2]).is_err());
    let bad = TrainerOptions {
        regularisation: Regularisation {
            dropout: 1.5,
            ..Default::default()
        },
        ..opts()
    };
    let e = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), bad)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("dropout"), "{e}");
    // Empty classes: fit with a class that has no training crop still runs (the class is absent from
    // balanced epochs); labels beyond the model's classes are refused before any step.
    let d = Dataset::new(x.clone(), 5, 32, 32, vec![0, 7]).unwrap();
    let e = t
        .fit(&d, &[0, 1], &[], None, None, &mut |_| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 7"), "{e}");
    assert_eq!(t.steps(), 0);
}

#[test]
fn fit_cancel_leaves_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck.safetensors");
    let (x, y) = batch(8, 32, 4, 2);
    let d = Dataset::new(x, 5, 32, 32, y).unwrap();
    let o = TrainerOptions {
        epochs: 3,
        batch_size: 4,
        ..opts()
    };
    let mut t = Trainer::new(TrainableEfficientNet::new(cfg(2), 7).unwrap(), o.clone()).unwrap();
    let mut epochs = 0;
    let r = t.fit(
        &d,
        &(0..8).collect::<Vec<_>>(),
        &[],
        Some(&ck),
        None,
        &mut |e| {
            if let Event::Epoch(_) = e {
                epochs += 1;
            }
            // Cancel in the middle of the second epoch.
            !(epochs == 1 && matches!(e, Event::Step { step: 1, .. }))
        },
    );
    assert!(matches!(r, Err(Error::Cancelled)));
    let mut back = Trainer::new(TrainableEfficientNet::new(cfg(2), 1).unwrap(), o).unwrap();
    back.load_checkpoint(&ck).unwrap();
    assert_eq!(back.epochs_done(), 1);
}

#[test]
fn imagenet_initialisation_expands_the_stem_and_replaces_the_classifier() {
    // A torchvision-format 3-channel, 1000-class state dict (random here: no weights are downloaded).
    let src_cfg = EfficientNetConfig {
        in_channels: 3,
        num_classes: 1000,
        ..cfg(3)
    };
    let src = TrainableEfficientNet::<f32>::new(src_cfg, 5)
        .unwrap()
        .state_dict()
        .unwrap();
    let m = TrainableEfficientNet::<f32>::from_pretrained(&src, cfg(12), 9).unwrap();
    let s = m.state_dict().unwrap();
    let (a, b) = (
        src["features.0.0.weight"].as_f32().unwrap(),
        s["features.0.0.weight"].as_f32().unwrap(),
    );
    assert_eq!(s["features.0.0.weight"].shape(), &[32, 5, 3, 3]);
    for o in 0..32 {
        for i in 0..5 {
            assert_eq!(&b[(o * 5 + i) * 9..][..9], &a[(o * 3 + i % 3) * 9..][..9]);
        }
    }
    assert_eq!(s["classifier.1.weight"].shape(), &[12, 1280]);
    assert_eq!(
        s["features.6.0.block.1.0.weight"].as_f32().unwrap(),
        src["features.6.0.block.1.0.weight"].as_f32().unwrap()
    );
    // torchvision's classifier init: uniform(±1/√classes), bias 0.
    let bound = 1.0 / (12f32).sqrt();
    assert!(s["classifier.1.weight"]
        .as_f32()
        .unwrap()
        .iter()
        .all(|v| v.abs() <= bound));
    assert!(s["classifier.1.bias"]
        .as_f32()
        .unwrap()
        .iter()
        .all(|&v| v == 0.0));
}

#[test]
fn fit_is_deterministic_given_the_seed_whatever_the_worker_count() {
    let (x, y) = batch(12, 32, 5, 3);
    let d = Dataset::new(x, 5, 32, 32, y).unwrap();
    let run = |workers: usize, seed: u64| {
        let o = TrainerOptions {
            epochs: 2,
            batch_size: 4,
            workers,
            seed,
            lr: 0.005,
            ..opts()
        };
        let mut t = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), o).unwrap();
        let r = t
            .fit(
                &d,
                &(0..8).collect::<Vec<_>>(),
                &[8, 9, 10, 11],
                None,
                None,
                &mut |_| true,
            )
            .unwrap();
        assert_eq!(r.len(), 2);
        assert!(r
            .iter()
            .all(|e| e.validation.is_some() && e.train_loss.is_finite()));
        weights(&t)
    };
    let a = run(1, 3);
    assert_eq!(a, run(3, 3), "worker count changed the result");
    assert_ne!(a, run(1, 4), "the seed did not matter");
}

#[test]
fn steps_are_bitwise_reproducible_at_realistic_sizes() {
    // 128×128 crops: BN statistics span many row chunks and weight gradients many sample groups, so
    // any reduction whose order depended on rayon's work stealing would show up here.
    let (x, y) = batch(8, 128, 6, 3);
    let run = || {
        let mut t = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), opts()).unwrap();
        let l: Vec<f64> = (0..2)
            .map(|_| t.step(&x, 8, 128, 128, &y).unwrap())
            .collect();
        (l, weights(&t))
    };
    let (a, b) = (run(), run());
    assert_eq!(a.0, b.0);
    assert!(a.1 == b.1, "weights differ between identical runs");
}

#[test]
fn online_label_smoothing() {
    use phenocore::train::trainer::OnlineLabelSmoothing;
    let (x, y) = batch(4, 32, 8, 3);
    let base = TrainerOptions {
        augment_in_step: false,
        lr: 0.005,
        label_smoothing: 0.1,
        ..opts()
    };
    // α = 1: the soft part has no weight, so the loss is the plain label-smoothed loss.
    let mut plain =
        Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), base.clone()).unwrap();
    let o1 = TrainerOptions {
        online_label_smoothing: Some(OnlineLabelSmoothing {
            alpha: 1.0,
            smoothing: 0.1,
        }),
        ..base.clone()
    };
    let mut ols1 = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), o1).unwrap();
    let (a, b) = (
        plain.step(&x, 4, 32, 32, &y).unwrap(),
        ols1.step(&x, 4, 32, 32, &y).unwrap(),
    );
    assert!((a - b).abs() < 1e-6 * a.abs(), "{a} vs {b}");
    // Default α = 0.03, smoothing 0.1: the first-epoch target of class y is
    // 0.03·((1−ε)·onehot + ε/K) + 0.97·(0.9 on y, 0.05 elsewhere): its loss differs from plain.
    let o = TrainerOptions {
        online_label_smoothing: Some(OnlineLabelSmoothing::default()),
        ..base.clone()
    };
    let mut t = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), o.clone()).unwrap();
    let c = t.step(&x, 4, 32, 32, &y).unwrap();
    assert!((a - c).abs() > 1e-4, "{a} vs {c}");
    // Checkpoints carry the soft-label statistics: resume reproduces the next step exactly.
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck.safetensors");
    t.save_checkpoint(&ck).unwrap();
    let next = t.step(&x, 4, 32, 32, &y).unwrap();
    let mut r = Trainer::new(TrainableEfficientNet::new(cfg(3), 1).unwrap(), o).unwrap();
    r.load_checkpoint(&ck).unwrap();
    assert_eq!(r.step(&x, 4, 32, 32, &y).unwrap(), next);
    assert_eq!(weights(&r), weights(&t));
    // A trainer with online label smoothing refuses a checkpoint without its statistics.
    let ck2 = dir.path().join("plain.safetensors");
    plain.save_checkpoint(&ck2).unwrap();
    let e = r.load_checkpoint(&ck2).unwrap_err().to_string();
    assert!(e.contains("online label smoothing"), "{e}");
}

#[test]
fn eval_mode_logits_match_the_folded_inference_model_after_training() {
    // After a few steps (BN running statistics moved, weights changed), the tape's eval-mode forward
    // and the independent BN-folded inference path compute the same logits.
    let (x, y) = batch(6, 64, 9, 3);
    let o = TrainerOptions {
        lr: 0.01,
        augment_in_step: false,
        ..opts()
    };
    let mut t = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), o).unwrap();
    for _ in 0..3 {
        t.step(&x, 6, 64, 64, &y).unwrap();
    }
    let ours = t.predict(&x, 6, 64, 64).unwrap();
    let m = t.inference_model().unwrap();
    let crops = phenocore::Tensor::from_f32(&[6, 5, 64, 64], x.clone()).unwrap();
    let theirs = m.logits(&crops).unwrap();
    let theirs = theirs.as_f32().unwrap();
    let scale = theirs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let err = ours
        .iter()
        .zip(theirs)
        .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
    assert!(err <= 1e-4 * scale, "max |diff| {err} vs scale {scale}");
}
