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

fn weights(t: &mut Trainer) -> Vec<Vec<f32>> {
    t.model()
        .unwrap()
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
    assert_eq!(weights(&mut a), weights(&mut b));
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
        let before = weights(&mut t);
        match t.step(&x, 4, 32, 32, &y) {
            Ok(_) => {}
            Err(e) => {
                assert!(matches!(e, Error::NonFinite(_)), "{e}");
                assert!(e.to_string().contains(&format!("step {i}")), "{e}");
                assert_eq!(weights(&mut t), before, "a failed step changed the weights");
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
        weights(&mut t)
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
        (l, weights(&mut t))
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
    assert_eq!(weights(&mut r), weights(&mut t));
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

// ---- Domain-adversarial branch (gradient reversal) and attention MIL (REFERENCE §2 alternatives).

fn domain_opts(lambda: f64, weight: f64) -> TrainerOptions {
    TrainerOptions {
        domain_adversarial: Some(phenocore::train::DomainAdversarial {
            domains: 2,
            lambda: phenocore::train::GrlLambda::Constant(lambda),
            weight,
            ..Default::default()
        }),
        ..opts()
    }
}

#[test]
fn domain_branch_trains_resumes_exactly_and_stays_out_of_the_exported_model() {
    let (x, y) = batch(4, 32, 1, 3);
    let d = [0u32, 1, 1, 0];
    let o = domain_opts(1.0, 1.0);
    let mut t = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), o.clone()).unwrap();
    // The paper's head: 1280 → 1024 → 512 → 128 → 2 domains, in the trainer's parameters.
    let full = t.model().unwrap().full_state_dict().unwrap();
    for (name, shape) in [
        ("domain_head.0.weight", vec![1024, 1280]),
        ("domain_head.1.weight", vec![512, 1024]),
        ("domain_head.2.weight", vec![128, 512]),
        ("domain_head.3.weight", vec![2, 128]),
        ("domain_head.3.bias", vec![2]),
    ] {
        assert_eq!(full[name].shape(), &shape[..], "{name}");
    }
    // A plain step is refused (it would skip the branch), naming the right call.
    let e = t.step(&x, 4, 32, 32, &y).unwrap_err().to_string();
    assert!(e.contains("step_with_domains"), "{e}");
    // Bad domain labels: an error naming the crop, nothing changed.
    let before = weights(&mut t);
    let e = t
        .step_with_domains(&x, 4, 32, 32, &y, &[0, 1, 2, 0])
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
    assert!(e.to_string().contains("domain label 2 of crop 2"), "{e}");
    assert_eq!(weights(&mut t), before);
    assert_eq!(t.steps(), 0);
    let mut losses = Vec::new();
    for _ in 0..2 {
        losses.push(t.step_with_domains(&x, 4, 32, 32, &y, &d).unwrap());
        // total = treatment CE + 1 · domain CE, the domain CE near ln 2 for an untrained head.
        let (cls, dom) = t.last_losses();
        let dom = dom.unwrap();
        assert!(
            (losses.last().unwrap() - (cls + dom)).abs() < 1e-5,
            "{losses:?} {cls} {dom}"
        );
        assert!(dom > 0.3 && dom < 1.5, "{dom}");
    }
    let head = t
        .model()
        .unwrap()
        .params()
        .index("domain_head.0.weight")
        .unwrap();
    assert_ne!(weights(&mut t)[head], before[head], "the head is optimised");
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck.safetensors");
    t.save_checkpoint(&ck).unwrap();
    let next = t.step_with_domains(&x, 4, 32, 32, &y, &d).unwrap();
    let mut r = Trainer::new(TrainableEfficientNet::new(cfg(3), 99).unwrap(), o.clone()).unwrap();
    r.load_checkpoint(&ck).unwrap();
    assert_eq!(r.step_with_domains(&x, 4, 32, 32, &y, &d).unwrap(), next);
    assert_eq!(weights(&mut r), weights(&mut t));
    // The exported model is EfficientNet-B0 only.
    let sd = t.model().unwrap().state_dict().unwrap();
    assert!(sd.keys().all(|k| !k.starts_with("domain_head")));
    let plain = TrainableEfficientNet::<f32>::new(cfg(3), 7).unwrap();
    assert_eq!(sd.len(), plain.state_dict().unwrap().len());
    let m = t.inference_model().unwrap();
    let crops = phenocore::Tensor::from_f32(&[4, 5, 32, 32], x.clone()).unwrap();
    assert_eq!(m.logits(&crops).unwrap().shape(), &[4, 3]);
    // A checkpoint without the head does not load into a trainer with one (error names it).
    let mut p = Trainer::new(TrainableEfficientNet::new(cfg(3), 7).unwrap(), opts()).unwrap();
    p.step(&x, 4, 32, 32, &y).unwrap();
    let ck2 = dir.path().join("plain.safetensors");
    p.save_checkpoint(&ck2).unwrap();
    let e = r.load_checkpoint(&ck2).unwrap_err().to_string();
    assert!(e.contains("domain_head.0.weight"), "{e}");
}

#[test]
fn reversed_domain_gradient_reaches_the_trunk_only_when_lambda_and_weight_are_nonzero() {
    let (x, y) = batch(4, 32, 2, 3);
    let d = [0u32, 0, 1, 1];
    let base = {
        let mut p = Trainer::new(TrainableEfficientNet::new(cfg(3), 5).unwrap(), opts()).unwrap();
        let l = p.step(&x, 4, 32, 32, &y).unwrap();
        (l, weights(&mut p))
    };
    let trunk = TrainableEfficientNet::<f32>::new(cfg(3), 5)
        .unwrap()
        .num_base_params();
    for (lambda, weight, same) in [(0.0, 1.0, true), (1.0, 0.0, true), (1.0, 1.0, false)] {
        let mut t = Trainer::new(
            TrainableEfficientNet::new(cfg(3), 5).unwrap(),
            domain_opts(lambda, weight),
        )
        .unwrap();
        t.step_with_domains(&x, 4, 32, 32, &y, &d).unwrap();
        assert_eq!(t.last_losses().0, base.0, "same treatment loss");
        let w = weights(&mut t);
        // λ = 0 blocks the domain gradient at the GRL; weight 0 removes it: the trunk and the
        // classifier take exactly the plain step. Otherwise the reversed gradient changes them.
        assert_eq!(
            w[..trunk] == base.1[..],
            same,
            "λ {lambda}, weight {weight}"
        );
    }
}

fn mil_dataset(per_class: usize, side: usize, seed: u64) -> Dataset {
    // Class 0 = control (noise), class 1 bright channel 0 blobs, class 2 bright channel 3.
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let per = 5 * side * side;
    let mut data = Vec::new();
    let mut labels = Vec::new();
    for c in 0..3u32 {
        for _ in 0..per_class {
            let mut crop: Vec<f32> = (0..per).map(|_| r.gen::<f32>() * 0.3).collect();
            if c > 0 {
                let ch = if c == 1 { 0 } else { 3 };
                for p in 0..side * side {
                    let (py, px) = (p / side, p % side);
                    if py.abs_diff(side / 2) < side / 4 && px.abs_diff(side / 2) < side / 4 {
                        crop[ch * side * side + p] += 2.0;
                    }
                }
            }
            data.extend(crop);
            labels.push(c);
        }
    }
    Dataset::new(data, 5, side, side, labels).unwrap()
}

fn mil_opts() -> TrainerOptions {
    TrainerOptions {
        mil: Some(phenocore::train::MilOptions {
            bag_size: 8,
            min_treated: 2,
            max_treated: 6,
            control_classes: vec![0],
            attention_dim: 32,
        }),
        lr: 0.01,
        clip_grad_norm: Some(1.0),
        batch_size: 6,
        augment_in_step: false,
        augmentation: phenocore::train::augment::Augmentation::none(),
        regularisation: Regularisation {
            dropout: 0.0,
            drop_connect_rate: 0.0,
            ..Default::default()
        },
        seed: 1,
        ..Default::default()
    }
}

#[test]
fn mil_bags_lower_the_bag_loss_and_fit_runs_on_bags_with_domains() {
    use phenocore::train::mil::mil_epoch;
    let data = mil_dataset(12, 32, 3);
    let o = mil_opts();
    let m = o.mil.clone().unwrap();
    let mut t = Trainer::new(TrainableEfficientNet::new(cfg(3), 2).unwrap(), o.clone()).unwrap();
    assert!(t.step(&[0.0; 5 * 32 * 32], 1, 32, 32, &[0]).is_err());
    // Bags of one epoch, fixed, trained on repeatedly: the bag loss falls.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let bags = mil_epoch(&data.labels, 3, &m, &mut rng).unwrap();
    let bags = &bags[..6];
    let per = 5 * 32 * 32;
    let mut crops = Vec::new();
    for b in bags {
        for &i in &b.items {
            crops.extend_from_slice(&data.data[i * per..(i + 1) * per]);
        }
    }
    let labels: Vec<u32> = bags.iter().map(|b| b.label).collect();
    let losses: Vec<f64> = (0..8)
        .map(|_| t.step_bags(&crops, 6, 32, 32, &labels, None).unwrap())
        .collect();
    eprintln!("bag losses {losses:?}");
    assert!(
        losses[7] < 0.5 * losses[0],
        "bag loss did not fall: {losses:?}"
    );
    // Bad bag input names the problem.
    let e = t
        .step_bags(&crops, 6, 32, 32, &labels[..5], None)
        .unwrap_err();
    assert!(e.to_string().contains("5 bag labels for 6 bags"), "{e}");
    let e = t
        .step_bags(&crops, 6, 32, 32, &labels, Some(&[0; 48]))
        .unwrap_err();
    assert!(
        e.to_string().contains("domain_adversarial is not set"),
        "{e}"
    );

    // fit on bags, with the domain branch too (two plates), checkpointing; then resume.
    let o2 = TrainerOptions {
        domain_adversarial: Some(phenocore::train::DomainAdversarial {
            domains: 2,
            hidden: vec![64, 32],
            ..Default::default()
        }),
        epochs: 1,
        ..o
    };
    let plates: Vec<u32> = (0..data.n as u32).map(|i| i % 2).collect();
    let ds = mil_dataset(12, 32, 3).with_domains(plates).unwrap();
    let all: Vec<usize> = (0..ds.n).collect();
    let mut f = Trainer::new(TrainableEfficientNet::new(cfg(3), 2).unwrap(), o2.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck.safetensors");
    let reports = f
        .fit(&ds, &all, &[], Some(&ck), None, &mut |_| true)
        .unwrap();
    // median 12 crops / 4 treated on average = 3 bags per class, 9 bags in batches of 6 → 2 steps.
    assert_eq!(reports[0].steps, 2);
    assert!(reports[0].train_loss.is_finite());
    assert!(f.last_losses().1.is_some());
    let mut g = Trainer::new(TrainableEfficientNet::new(cfg(3), 9).unwrap(), o2.clone()).unwrap();
    g.load_checkpoint(&ck).unwrap();
    assert_eq!(weights(&mut g), weights(&mut f));
    // Without domain labels, or without control crops in the training set: errors naming them.
    let e = Trainer::new(TrainableEfficientNet::new(cfg(3), 2).unwrap(), o2.clone())
        .unwrap()
        .fit(
            &mil_dataset(4, 32, 3),
            &all[..12],
            &[],
            None,
            None,
            &mut |_| true,
        )
        .unwrap_err();
    assert!(e.to_string().contains("no domain labels"), "{e}");
    let mut h = Trainer::new(TrainableEfficientNet::new(cfg(3), 2).unwrap(), o2).unwrap();
    let e = h
        .fit(&ds, &all[12..], &[], None, None, &mut |_| true)
        .unwrap_err();
    assert!(e.to_string().contains("MIL needs control crops"), "{e}");
}
