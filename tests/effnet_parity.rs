//! EfficientNet-B0 forward parity with torchvision (float64 reference), both padding conventions.
//! Fixture: tests/fixtures/effnet/, made by tests/fixtures/make_effnet_fixture.py (random weights with
//! non-trivial BN statistics, 5-channel stem, 10 classes, two 5 × 128 × 128 crops).

mod common;

use common::{expected, get, load, rel_err, values};
use phenocore::models::efficientnet::Padding;
use phenocore::Tensor;

/// Max |ours − ref| / max |ref| allowed: f32 forward with folded BN against a float64 reference.
const REL_TOL: f32 = 1e-4;

/// Layers the fixture stores (torchvision paths), with their channel counts.
const LAYERS: [(&str, usize); 8] = [
    ("features.0", 32),
    ("features.2.0.block.0", 96),
    ("features.6.0.block.0", 672),
    ("features.6.0.block.1", 672),
    ("features.6.0.block.2", 672),
    ("features.6.0.block.3", 192),
    ("features.5.1", 112),
    ("features.8", 1280),
];

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    let e = rel_err(what, ours, reference);
    assert!(e <= REL_TOL, "{what}: max|ours − ref| / max|ref| = {e:.3e}");
}

fn assert_identical(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.shape(), b.shape(), "{what}: shape");
    let first_diff = values(a)
        .iter()
        .zip(values(b))
        .position(|(x, y)| x.to_bits() != y.to_bits());
    assert!(
        first_diff.is_none(),
        "{what}: differs at flat index {first_diff:?}"
    );
}

fn check_mode(mode: &str, padding: Padding, bn_eps: f32) {
    let exp = expected();
    let input = get(&exp, "input");
    assert_eq!(input.shape(), &[2, 5, 128, 128]);
    let model = load(padding, bn_eps);
    assert_eq!(model.config().in_channels, 5);
    assert_eq!(model.config().num_classes, 10);

    let logits = model
        .logits(input)
        .unwrap_or_else(|e| panic!("{mode} logits: {e}"));
    assert_close(
        &format!("{mode}/logits"),
        &logits,
        get(&exp, &format!("{mode}/logits")),
    );

    let names: Vec<&str> = LAYERS.iter().map(|(n, _)| *n).collect();
    let together = model
        .features(input, &names)
        .unwrap_or_else(|e| panic!("{mode} features: {e}"));
    assert_eq!(together.len(), LAYERS.len());
    for ((name, dim), ours) in LAYERS.iter().zip(&together) {
        assert_eq!(
            model
                .layer_dim(name)
                .unwrap_or_else(|e| panic!("{name}: {e}")),
            *dim,
            "{name}: layer_dim"
        );
        assert_eq!(ours.shape(), &[2, *dim], "{mode}/{name}: shape");
        assert_close(
            &format!("{mode}/{name}"),
            ours,
            get(&exp, &format!("{mode}/{name}")),
        );
    }

    // Several layers in one call = each layer on its own (a pass that stops early computes the same).
    for ((name, _), joint) in LAYERS.iter().zip(&together) {
        let alone = model
            .features(input, &[name])
            .unwrap_or_else(|e| panic!("{mode} {name}: {e}"));
        assert_eq!(alone.len(), 1);
        assert_identical(
            &format!("{mode}/{name} alone vs together"),
            &alone[0],
            joint,
        );
    }

    // DeepProfiler's Keras name for the profiling layer is the same tensor as the torchvision path.
    let keras = model
        .features(input, &["block6a_activation", "features.6.0.block.1"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_identical(
        &format!("{mode} block6a_activation vs features.6.0.block.1"),
        &keras[0],
        &keras[1],
    );
    assert_close(
        &format!("{mode}/block6a_activation"),
        &keras[0],
        get(&exp, &format!("{mode}/features.6.0.block.1")),
    );
}

#[test]
fn symmetric_padding_matches_torchvision() {
    check_mode("symmetric", Padding::Symmetric, 1e-5);
}

#[test]
fn tf_same_padding_matches_torchvision_with_tf_padding() {
    check_mode("tf_same", Padding::TfSame, 1e-3);
}

/// The fixture distinguishes the conventions: loading with the other mode's padding or eps must fail
/// the tolerance, so the two tests above cannot pass with padding or eps ignored.
#[test]
fn fixture_separates_padding_and_eps() {
    let exp = expected();
    let reference = values(get(&exp, "tf_same/logits"));
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (padding, eps) in [(Padding::Symmetric, 1e-3), (Padding::TfSame, 1e-5)] {
        let logits = load(padding, eps)
            .logits(get(&exp, "input"))
            .unwrap_or_else(|e| panic!("{e}"));
        let err = values(&logits)
            .iter()
            .zip(reference)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            err / scale > 10.0 * REL_TOL,
            "{padding:?} eps {eps}: only {:.3e} from tf_same/logits",
            err / scale
        );
    }
}

#[test]
fn batched_features_match_single_pass() {
    let exp = expected();
    let input = get(&exp, "input");
    let model = load(Padding::TfSame, 1e-3);
    let names = ["features.6.0.block.1", "features.8"];
    let whole = model
        .features(input, &names)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut calls = Vec::new();
    let batched = model
        .features_with_progress(input, &names, 1, &mut |done, total| {
            calls.push((done, total));
            true
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(calls.last(), Some(&(2, 2)), "progress calls {calls:?}");
    for ((name, a), b) in names.iter().zip(&whole).zip(&batched) {
        assert_close(&format!("batch 1 vs 2: {name}"), b, a);
    }
}
