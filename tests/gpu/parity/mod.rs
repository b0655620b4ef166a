//! Parity of the CUDA kernels with the CPU backend, written once over `backend::gpu::Gpu`: run on
//! the CPU emulation by `tests/gpu_emu.rs` (every CI run) and on a real GPU by
//! `tests/cuda_parity.rs` (`--ignored`, feature `cuda`). References are the CPU ops on the tape in
//! f64 from the same (rounded) inputs; errors are normwise, max |gpu − cpu| / max |cpu|, against
//! the bounds: 1e-5 for f32 storage, 1e-2 for bf16.

#![allow(dead_code)]

pub mod attention;
pub mod conv;
pub mod crop;
pub mod depthwise;
pub mod effnet;
pub mod effnet_train;
pub mod elementwise;
pub mod geglu;
pub mod gemm;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod sample;
pub mod shape;
pub mod unet;
pub mod vae;

use half::bf16;
use phenocore::DType;
use rand::{Rng, SeedableRng};

pub const F32_TOL: f64 = 1e-5;
pub const BF16_TOL: f64 = 1e-2;

/// Every parity test, by function name: `$m!(name, ...)` makes the test functions of a runner.
#[macro_export]
macro_rules! for_each_parity_test {
    ($m:ident) => {
        // One line per module. Names must be unique across modules (the runners flatten them).
        $m!(
            elementwise::unary_f32,
            elementwise::unary_bf16,
            elementwise::affine_f32,
            elementwise::cast_f32_bf16,
            elementwise::bias_act_matches_cpu,
            depthwise::forward_and_backward_f32,
            depthwise::forward_and_backward_bf16,
            depthwise::accumulates_weight_gradient,
            depthwise::unaligned_matches_vectorised,
            gemm::gemm_f32_bf16_tf32_transposes,
            effnet::effnet_features_match_cpu,
            effnet::effnet_features_batched_match_one_shot,
            effnet::effnet_features_graph_replays,
            norm::batch_norm_train_f32,
            norm::batch_norm_train_bf16,
            norm::batch_norm_eval,
            norm::batch_norm_accumulates_and_repeats,
            norm::group_norm_f32,
            norm::group_norm_bf16,
            norm::layer_norm_f32,
            norm::layer_norm_bf16,
            norm::norm_rejects_unsupported_plans,
            attention::attention_f32,
            attention::attention_bf16,
            attention::attention_wide_f32,
            attention::attention_wide_bf16,
            attention::attention_wide_chunked,
            attention::attention_wide_tf32,
            attention::attention_deterministic,
            attention::attention_rejects_unsupported_plans,
            geglu::geglu_f32,
            geglu::geglu_bf16,
            geglu::geglu_rejects_unsupported_plans,
            loss::cross_entropy_f32,
            loss::cross_entropy_bf16,
            loss::soft_target_cross_entropy_f32,
            loss::soft_target_cross_entropy_bf16,
            loss::cross_entropy_bad_label_is_nan,
            loss::cross_entropy_rejects_unsupported_plans,
            shape::shape_activation_backward_and_add,
            shape::shape_pooling_and_squeeze_excite,
            shape::shape_per_sample_accumulate_and_in_place,
            shape::shape_upsample_nearest2x,
            shape::shape_concat_last,
            shape::shape_embedding_gather_scatter,
            shape::shape_deterministic_sum,
            shape::shape_rejects_unsupported_plans,
            shape::shape_tests_cover_every_entry_point,
            optim::optim_sgd_matches_cpu,
            optim::optim_adamw_matches_cpu,
            optim::optim_grad_norm_and_clip,
            optim::optim_rejects_bad_plans,
            crop::crop_extract_matches_cpu,
            crop::crop_augment_matches_cpu,
            crop::crop_rejects_bad_plans,
            conv::conv_f32,
            conv::conv_bf16,
            conv::conv_tf32,
            conv::conv_chunked_f32,
            conv::conv_chunked_bf16,
            conv::conv_rejects_unsupported_plans,
            conv::conv_unaligned,
            sample::sample_ddim_ddpm_match_cpu,
            unet::unet_forward_matches_cpu,
            unet::unet_null_context_only,
            unet::unet_backward_matches_cpu,
            unet::unet_bf16_matches_cpu,
            unet::unet_bf16_error_within_torch_autocast,
            vae::vae_encode_decode_match_cpu,
            vae::vae_encode5_decode5_and_rejects,
            effnet_train::effnet_train_sgd_matches_cpu,
            effnet_train::effnet_train_adamw_matches_cpu,
            effnet_train::effnet_train_bf16_matches_cpu,
            effnet_train::effnet_train_rejects_and_restores,
        );
    };
}

/// `n` values uniform in [−1, 1), fixed by `seed`.
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
}

/// `n` uniform values (seed `seed`) stored as `dtype` (f32, or bf16 rounded to nearest even), as
/// the bytes a buffer holds.
pub fn uniform_bytes(n: usize, seed: u64, dtype: DType) -> Vec<u8> {
    let v = uniform(n, seed);
    if dtype == DType::BF16 {
        bytemuck::cast_slice(&to_bf16(&v).0).to_vec()
    } else {
        bytemuck::cast_slice(&v).to_vec()
    }
}

/// Rounds to bf16 (to nearest even), as the bits and as the f32 value they hold.
pub fn to_bf16(v: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    (
        b.iter().map(|x| x.to_bits()).collect(),
        b.iter().map(|x| x.to_f32()).collect(),
    )
}

pub fn from_bf16(bits: &[u16]) -> Vec<f64> {
    bits.iter().map(|&b| bf16::from_bits(b).to_f64()).collect()
}

pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// max |got − want| / max |want|, asserted ≤ tol (and finite), with the worst index in the message;
/// returns it.
// `!(e <= worst)` on purpose: a NaN error must win.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-30);
    let (mut worst, mut at) = (0f64, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs();
        if !(e <= worst) {
            worst = e;
            at = i;
            if e.is_nan() {
                break;
            }
        }
    }
    let rel = worst / scale;
    assert!(
        rel <= tol,
        "{what}: relative error {rel:.3e} > {tol:.0e} (index {at}: got {}, want {}; scale {scale:.3e})",
        got[at],
        want[at]
    );
    rel
}
