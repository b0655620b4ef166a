//! Opt-in bf16 GEMM precision of EfficientNet-B0, checked against the float64 torchvision reference
//! (tests/fixtures/effnet/, symmetric padding, BN eps 1e-5), and f32 restored after switching back.
//! Skipped (with a note) on CPUs without AVX512_BF16, where selecting bf16 must fail cleanly instead.

mod common;

use common::{expected, fixture_dir, get, rel_err, values};
use phenocore::models::efficientnet::{EfficientNet, Padding, Precision};
use phenocore::{Error, Tensor};

/// Max |ours − ref| / max |ref| for bf16 GEMM inputs (8-bit mantissa, f32 accumulation).
const BF16_TOL: f32 = 3e-2;
/// The f32 path's tolerance (as tests/effnet_parity.rs).
const F32_TOL: f32 = 1e-4;

fn outputs(model: &EfficientNet, input: &Tensor) -> (Tensor, Tensor) {
    let logits = model
        .logits(input)
        .unwrap_or_else(|e| panic!("logits: {e}"));
    let mut f = model
        .features(input, &["features.6.0.block.1"])
        .unwrap_or_else(|e| panic!("features: {e}"));
    (logits, f.remove(0))
}

#[test]
fn bf16_precision_matches_reference_within_bf16_tolerance() {
    let exp = expected();
    let input = get(&exp, "input");
    let path = fixture_dir().join("weights_f16.safetensors");
    let mut model = EfficientNet::load(&path, Padding::Symmetric, 1e-5)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    assert_eq!(model.precision(), Precision::F32);
    let (ref_logits, ref_feat) = (
        get(&exp, "symmetric/logits"),
        get(&exp, "symmetric/features.6.0.block.1"),
    );
    let (f32_logits, f32_feat) = outputs(&model, input);

    match model.set_precision(Precision::Bf16) {
        Ok(()) => {}
        Err(Error::Unsupported(m)) => {
            eprintln!("skipped: {m}");
            assert_eq!(model.precision(), Precision::F32);
            return;
        }
        Err(e) => panic!("set_precision(Bf16): {e}"),
    }
    assert_eq!(model.precision(), Precision::Bf16);
    let (logits, feat) = outputs(&model, input);
    let e_logits = rel_err("bf16 logits", &logits, ref_logits);
    let e_feat = rel_err("bf16 features.6.0.block.1", &feat, ref_feat);
    assert!(e_logits <= BF16_TOL, "bf16 logits: {e_logits:.3e}");
    assert!(
        e_feat <= BF16_TOL,
        "bf16 features.6.0.block.1: {e_feat:.3e}"
    );
    // The mode really changed the arithmetic: bf16 must differ from f32 by more than f32 noise.
    assert!(
        rel_err("bf16 vs f32 logits", &logits, &f32_logits) > F32_TOL,
        "bf16 mode produced f32 results"
    );

    model
        .set_precision(Precision::F32)
        .unwrap_or_else(|e| panic!("set_precision(F32): {e}"));
    let (logits, feat) = outputs(&model, input);
    assert!(rel_err("f32 logits after bf16", &logits, ref_logits) <= F32_TOL);
    assert!(rel_err("f32 features.6.0.block.1 after bf16", &feat, ref_feat) <= F32_TOL);
    assert_eq!(
        values(&logits),
        values(&f32_logits),
        "f32 after switching back differs from f32 before"
    );
    assert_eq!(
        values(&feat),
        values(&f32_feat),
        "f32 features after switching back differ from before"
    );
}
