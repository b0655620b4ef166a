//! The training data path (src/train/{augment,sampler,split,validation,prefetch}.rs) against the
//! fixtures of tests/fixtures/make_train_data_fixture.py (torch bilinear = TF half-pixel bilinear,
//! numpy flips/rot90/contrast, scikit-learn 1.9.1 metrics), closed forms, invariants and the
//! statistics of the random draws.

use phenocore::io::npz::{read_npz, NpyArray};
use phenocore::train::augment::*;
use phenocore::train::prefetch::*;
use phenocore::train::sampler::*;
use phenocore::train::split::*;
use phenocore::train::validation::*;
use phenocore::Error;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Npz = BTreeMap<String, NpyArray>;

fn load(name: &str) -> Npz {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/train_data/{name}.npz"));
    read_npz(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s<'a>(z: &'a Npz, key: &str) -> (&'a [usize], &'a [f32]) {
    match z.get(key) {
        Some(NpyArray::F32 { shape, data }) => (shape, data),
        other => panic!("{key}: expected f32, got {other:?}"),
    }
}

fn f64s<'a>(z: &'a Npz, key: &str) -> &'a [f64] {
    match z.get(key) {
        Some(NpyArray::F64 { data, .. }) => data,
        other => panic!("{key}: expected f64, got {other:?}"),
    }
}

fn i64s<'a>(z: &'a Npz, key: &str) -> &'a [i64] {
    match z.get(key) {
        Some(NpyArray::I64 { data, .. }) => data,
        other => panic!("{key}: expected integers, got {other:?}"),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn bilinear_resize_matches_torch_and_tf_half_pixel() {
    let z = load("resize");
    let count = i64s(&z, "r_count")[0] as usize;
    assert_eq!(count, 6);
    for i in 0..count {
        let (ss, src) = f32s(&z, &format!("r{i}_src"));
        let (ds, want) = f32s(&z, &format!("r{i}_out"));
        let mut got = vec![0f32; want.len()];
        resize_bilinear(src, ss[0], ss[1], ss[2], &mut got, ds[1], ds[2]).unwrap();
        let err = max_abs_diff(&got, want);
        eprintln!("resize {ss:?} → {ds:?}: max |Δ| = {err:.2e}");
        assert!(err <= 2e-6, "case {i}: {err}");
    }
    let mut out = vec![0f32; 4];
    assert!(matches!(
        resize_bilinear(&[0.0; 3], 1, 2, 2, &mut out, 2, 2),
        Err(Error::Shape(_))
    ));
}

#[test]
fn augmentation_with_given_parameters_matches_numpy() {
    let z = load("augment");
    let (c, h, w) = (5, 32, 32);
    let mut scratch = Vec::new();
    for i in 0..i64s(&z, "a_count")[0] as usize {
        let (_, x) = f32s(&z, &format!("a{i}_x"));
        let (_, want) = f32s(&z, &format!("a{i}_out"));
        let p = i64s(&z, &format!("a{i}_params"));
        let params = AugmentParams {
            crop: (p[0] == 1).then_some((
                p[1] as usize,
                p[2] as usize,
                p[3] as usize,
                p[3] as usize,
            )),
            flip: p[4] == 1,
            rot_k: p[5] as u8,
            brightness: f32s(&z, &format!("a{i}_brightness")).1.to_vec(),
            contrast: f32s(&z, &format!("a{i}_contrast")).1.to_vec(),
        };
        let mut got = x.to_vec();
        apply(&params, &mut got, c, h, w, &mut scratch).unwrap();
        let err = max_abs_diff(&got, want);
        eprintln!("augment case {i} {p:?}: max |Δ| = {err:.2e}");
        assert!(err <= 1e-5, "case {i}: {err}");
    }
}

#[test]
fn brightness_and_contrast_closed_form() {
    // x' = (x − m)·f + m + b per channel: mean moves by b, deviations scale by f
    let (c, h, w) = (3, 8, 6);
    let x: Vec<f32> = (0..c * h * w)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0)
        .collect();
    let params = AugmentParams {
        crop: None,
        flip: false,
        rot_k: 0,
        brightness: vec![0.05, -0.08, 0.0],
        contrast: vec![1.2, 0.8, 1.0],
    };
    let mut y = x.clone();
    apply(&params, &mut y, c, h, w, &mut Vec::new()).unwrap();
    for ch in 0..c {
        let (xs, ys) = (
            &x[ch * h * w..(ch + 1) * h * w],
            &y[ch * h * w..(ch + 1) * h * w],
        );
        let m = xs.iter().map(|&v| v as f64).sum::<f64>() / xs.len() as f64;
        for (a, b) in xs.iter().zip(ys) {
            let want =
                (*a as f64 - m) * params.contrast[ch] as f64 + m + params.brightness[ch] as f64;
            assert!(
                (*b as f64 - want).abs() < 1e-6,
                "channel {ch}: {b} vs {want}"
            );
        }
    }
}

#[test]
fn augment_is_deterministic_and_none_is_identity() {
    let (c, n) = (5, 24);
    let x: Vec<f32> = (0..c * n * n).map(|i| (i as f32 * 0.01).cos()).collect();
    let a = Augmentation::default();
    let run = |seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut s = Vec::new();
        let mut outs = Vec::new();
        for _ in 0..6 {
            let mut y = x.clone();
            a.augment(&mut y, c, n, n, &mut rng, &mut s).unwrap();
            outs.push(y);
        }
        outs
    };
    assert_eq!(run(11), run(11));
    assert_ne!(run(11), run(12));
    let mut y = x.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    Augmentation::none()
        .augment(&mut y, c, n, n, &mut rng, &mut Vec::new())
        .unwrap();
    assert_eq!(y, x);
    // draw then apply == augment
    let mut r1 = ChaCha8Rng::seed_from_u64(5);
    let mut r2 = ChaCha8Rng::seed_from_u64(5);
    let mut y1 = x.clone();
    a.augment(&mut y1, c, n, n, &mut r1, &mut Vec::new())
        .unwrap();
    let p = a.draw(c, n, n, &mut r2).unwrap();
    let mut y2 = x.clone();
    apply(&p, &mut y2, c, n, n, &mut Vec::new()).unwrap();
    assert_eq!(y1, y2);
    // augment_batch == augment on each crop in turn
    let mut batch: Vec<f32> = x.iter().chain(&x).chain(&x).copied().collect();
    a.augment_batch(
        &mut batch,
        3,
        c,
        n,
        n,
        &mut ChaCha8Rng::seed_from_u64(11),
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(batch, run(11)[..3].concat());
    assert!(matches!(
        a.augment_batch(
            &mut batch,
            2,
            c,
            n,
            n,
            &mut ChaCha8Rng::seed_from_u64(11),
            &mut Vec::new()
        ),
        Err(Error::Shape(_))
    ));
}

#[test]
fn drawn_parameters_have_the_reference_distribution() {
    let a = Augmentation::default();
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let (c, n, draws) = (5, 128, 8000);
    let (mut crops, mut flips) = (0usize, 0usize);
    let mut sides = [0usize; 129];
    let mut ks = [0usize; 4];
    let (mut bsum, mut bsq, mut csum) = (0f64, 0f64, 0f64);
    for _ in 0..draws {
        let p = a.draw(c, n, n, &mut rng).unwrap();
        if let Some((y0, x0, sh, sw)) = p.crop {
            crops += 1;
            assert_eq!(sh, sw);
            assert!(y0 + sh <= n && x0 + sw <= n);
            sides[sh] += 1;
        }
        flips += p.flip as usize;
        ks[p.rot_k as usize] += 1;
        assert_eq!((p.brightness.len(), p.contrast.len()), (c, c));
        for (&b, &f) in p.brightness.iter().zip(&p.contrast) {
            assert!((-0.1..0.1).contains(&b) && (0.8..1.2).contains(&f));
            bsum += b as f64;
            bsq += (b * b) as f64;
            csum += f as f64;
        }
    }
    // binomial(8000, 0.5): sd 44.7; allow 5 sd
    assert!((crops as f64 - 4000.0).abs() < 224.0, "crops {crops}");
    assert!((flips as f64 - 4000.0).abs() < 224.0, "flips {flips}");
    for &k in &ks {
        assert!((k as f64 - 2000.0).abs() < 200.0, "rot90 counts {ks:?}");
    }
    // DeepProfiler: integer side in [int(0.8·128), 128) = 102..=127, uniform
    assert!(sides[..102].iter().all(|&s| s == 0) && sides[128] == 0);
    let per_side = crops as f64 / 26.0;
    for (side, &cnt) in sides.iter().enumerate().take(128).skip(102) {
        assert!(
            (cnt as f64 - per_side).abs() < 5.0 * per_side.sqrt(),
            "side {side}: {cnt} vs {per_side:.0}"
        );
    }
    let m = (draws * c) as f64;
    assert!((bsum / m).abs() < 0.002, "brightness mean {}", bsum / m);
    let var = bsq / m - (bsum / m).powi(2);
    assert!((var - 0.01 / 3.0).abs() < 1e-4, "brightness var {var}");
    assert!((csum / m - 1.0).abs() < 0.002, "contrast mean {}", csum / m);
}

#[test]
fn balanced_epochs_resample_uniformly_and_deterministically() {
    // classes of 3, 10, 50, 200 → median (10 + 50) / 2 = 30
    let mut labels = Vec::new();
    for (c, n) in [(0u32, 3usize), (1, 10), (2, 50), (3, 200)] {
        labels.extend(std::iter::repeat_n(c, n));
    }
    let epochs = 400;
    let mut hits = vec![0usize; labels.len()];
    for e in 0..epochs {
        let mut rng = epoch_rng(9, e);
        let (order, info) = balanced_epoch_with_info(&labels, 4, &mut rng).unwrap();
        assert_eq!(info.per_class, 30);
        assert!(info.empty_classes.is_empty());
        assert_eq!(order.len(), 120);
        assert_eq!(
            order,
            balanced_epoch(&labels, 4, &mut epoch_rng(9, e)).unwrap()
        );
        for &i in &order {
            hits[i] += 1;
        }
    }
    // class 0: exactly 10 per epoch; class 1: exactly 3; class 2: 30/50; class 3: 30/200
    for (i, &l) in labels.iter().enumerate() {
        let expect = epochs as f64
            * match l {
                0 => 10.0,
                1 => 3.0,
                2 => 0.6,
                _ => 0.15,
            };
        let sd = (epochs as f64 * 0.25).sqrt();
        assert!(
            (hits[i] as f64 - expect).abs() <= 5.0 * sd,
            "item {i} (class {l}): {} vs {expect}",
            hits[i]
        );
        if l < 2 {
            assert_eq!(hits[i] as f64, expect, "item {i}");
        }
    }
}

#[test]
fn splits() {
    let groups: Vec<u32> = (0..300).map(|i| (i % 7) as u32).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let s = leave_cells_out(&groups, 0.6, &mut rng).unwrap();
    for g in 0..7 {
        let n = groups.iter().filter(|&&x| x == g).count();
        let t = s.train.iter().filter(|&&i| groups[i] == g).count();
        assert_eq!(t, (0.6 * n as f64).round() as usize, "well {g}");
    }
    assert_eq!(s.train.len() + s.val.len(), 300);
    // leave-plates-out on a 4-plate layout: 6 treatments, one well each per plate
    let (mut p, mut t, mut w) = (vec![], vec![], vec![]);
    for plate in 0..4u32 {
        for tr in 0..6u32 {
            for _ in 0..2 {
                p.push(plate);
                t.push(tr);
                w.push(tr + 10);
            }
        }
    }
    let chosen = choose_val_plates(&p, &t, &w, 2).unwrap();
    assert_eq!(chosen, vec![0, 1]);
    let ps = leave_plates_out(&p, &t, &w, &chosen).unwrap();
    assert!(
        ps.val_wells.iter().all(|&(_, n)| n == 2),
        "{:?}",
        ps.val_wells
    );
    assert!(ps.missing_in_val.is_empty() && ps.missing_in_train.is_empty());
    assert_eq!(ps.split.val.len(), 24);
    let e = leave_plates_out(&p, &t, &w, &[2, 17, 19]).unwrap_err();
    assert!(e.to_string().contains("[17, 19]"), "{e}");
}

#[test]
fn validation_matches_sklearn() {
    let z = load("validation");
    for i in 0..i64s(&z, "v_count")[0] as usize {
        let key = |s: &str| format!("v{i}_{s}");
        let (shape, logits) = f32s(&z, &key("logits"));
        let (n, k) = (shape[0], shape[1]);
        let labels: Vec<u32> = i64s(&z, &key("labels")).iter().map(|&v| v as u32).collect();
        let ks: Vec<usize> = i64s(&z, &key("ks")).iter().map(|&v| v as usize).collect();
        let r = evaluate(logits, n, k, &labels, &ks).unwrap();
        let close = |what: &str, a: f64, b: f64| {
            assert!(
                (a - b).abs() <= 1e-12,
                "case {i} {what}: {a} vs sklearn {b}"
            )
        };
        for c in 0..k {
            let s = r.per_class[c];
            close("precision", s.precision, f64s(&z, &key("precision"))[c]);
            close("recall", s.recall, f64s(&z, &key("recall"))[c]);
            close("f1", s.f1, f64s(&z, &key("f1"))[c]);
            assert_eq!(s.support as i64, i64s(&z, &key("support"))[c]);
        }
        let m = f64s(&z, &key("macro"));
        close("macro precision", r.macro_precision, m[0]);
        close("macro recall", r.macro_recall, m[1]);
        close("macro f1", r.macro_f1, m[2]);
        close(
            "weighted f1",
            r.weighted_f1,
            f64s(&z, &key("weighted_f1"))[0],
        );
        close("accuracy", r.accuracy, f64s(&z, &key("accuracy"))[0]);
        for (j, &(kk, acc)) in r.top_k.iter().enumerate() {
            assert_eq!(kk, ks[j]);
            close(&format!("top-{kk}"), acc, f64s(&z, &key("top_k"))[j]);
        }
        let conf: Vec<u64> = i64s(&z, &key("confusion"))
            .iter()
            .map(|&v| v as u64)
            .collect();
        assert_eq!(r.confusion, conf, "case {i} confusion");
    }
}

#[test]
fn prefetch_is_ordered_and_independent_of_worker_count() {
    let make = |workers: usize| -> Vec<Vec<f32>> {
        let p = Prefetcher::new(12, workers, 4, move |i| -> phenocore::Result<Vec<f32>> {
            let mut rng = batch_rng(77, 3, i as u64);
            let mut crop: Vec<f32> = (0..2 * 16 * 16).map(|v| v as f32 / 512.0).collect();
            Augmentation::default().augment(&mut crop, 2, 16, 16, &mut rng, &mut Vec::new())?;
            // uneven work so that threads finish out of order
            std::thread::sleep(Duration::from_millis((i as u64 * 7) % 5));
            Ok(crop)
        })
        .unwrap();
        p.map(|r| r.unwrap()).collect()
    };
    let one = make(1);
    assert_eq!(one.len(), 12);
    assert_eq!(one, make(3));
    assert_ne!(one[0], one[1]);
}

#[test]
fn prefetch_propagates_errors_and_panics() {
    let mut p = Prefetcher::new(10, 3, 3, |i| {
        if i == 4 {
            Err(Error::InvalidArgument(format!("bad crop in batch {i}")))
        } else {
            Ok(i)
        }
    })
    .unwrap();
    for want in 0..4 {
        assert_eq!(p.next().unwrap().unwrap(), want);
    }
    let e = p.next().unwrap().unwrap_err();
    assert!(e.to_string().contains("batch 4"), "{e}");
    assert!(p.next().is_none());

    let mut p = Prefetcher::new(3, 2, 2, |i| -> phenocore::Result<usize> {
        if i == 1 {
            panic!("producer bug");
        }
        Ok(i)
    })
    .unwrap();
    assert_eq!(p.next().unwrap().unwrap(), 0);
    assert!(matches!(p.next(), Some(Err(Error::Internal(_)))));
    assert!(p.next().is_none());
    assert!(Prefetcher::new(3, 0, 2, Ok::<usize, Error>).is_err());
}

#[test]
fn dropping_the_prefetcher_stops_workers_promptly() {
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let mut p = Prefetcher::new(1000, 3, 4, move |i| {
        s.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        Ok(i)
    })
    .unwrap();
    assert_eq!(p.next().unwrap().unwrap(), 0);
    assert_eq!(p.next().unwrap().unwrap(), 1);
    let t = Instant::now();
    drop(p);
    let waited = t.elapsed();
    assert!(waited < Duration::from_millis(500), "drop took {waited:?}");
    let n = started.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        started.load(Ordering::SeqCst),
        n,
        "workers kept running after drop"
    );
    assert!(n <= 2 + 4, "{n} batches started with a window of 4");
}
