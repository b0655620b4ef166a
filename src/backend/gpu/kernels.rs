//! The CUDA C sources in `kernels/`, embedded in the binary. The CUDA backend compiles them with
//! NVRTC for the device's architecture; the tests also build them for the CPU emulation
//! (`tests/gpu/cuda_emu.hpp`). Always compiled (no CUDA dependency): the tables are plain strings.

/// One `kernels/<name>.cu` file and the entry points the launch layer ([`super`]) calls in it.
#[derive(Debug)]
pub struct KernelModule {
    pub name: &'static str,
    pub source: &'static str,
    /// Every `extern "C"` entry point `backend::gpu` launches from this module; the NVRTC check
    /// fails when one is missing from the compiled cubin.
    pub entries: &'static [&'static str],
}

macro_rules! module {
    ($static:ident, $name:literal, [$($entry:literal),* $(,)?]) => {
        pub static $static: KernelModule = KernelModule {
            name: $name,
            source: include_str!(concat!("../../../kernels/", $name, ".cu")),
            entries: &[$($entry),*],
        };
    };
}

module!(
    UNARY,
    "unary",
    [
        "silu_f32",
        "silu_f64",
        "silu_f16",
        "silu_bf16",
        "sigmoid_f32",
        "sigmoid_f64",
        "sigmoid_f16",
        "sigmoid_bf16",
        "cast_f32_to_bf16",
        "cast_bf16_to_f32",
        "bias_act_f32",
        "bias_act_f32_v",
        "bias_act_bf16",
        "bias_act_bf16_v",
    ]
);
module!(
    AFFINE,
    "affine",
    ["affine_f32", "affine_f64", "affine_f16", "affine_bf16"]
);

module!(
    DEPTHWISE,
    "depthwise",
    [
        "depthwise_forward_k3_f32",
        "depthwise_forward_k3_f32_v",
        "depthwise_backward_x_k3_f32",
        "depthwise_backward_x_k3_f32_v",
        "depthwise_backward_w_k3_f32",
        "depthwise_forward_k5_f32",
        "depthwise_forward_k5_f32_v",
        "depthwise_backward_x_k5_f32",
        "depthwise_backward_x_k5_f32_v",
        "depthwise_backward_w_k5_f32",
        "depthwise_forward_k3_bf16",
        "depthwise_forward_k3_bf16_v",
        "depthwise_backward_x_k3_bf16",
        "depthwise_backward_x_k3_bf16_v",
        "depthwise_backward_w_k3_bf16",
        "depthwise_forward_k5_bf16",
        "depthwise_forward_k5_bf16_v",
        "depthwise_backward_x_k5_bf16",
        "depthwise_backward_x_k5_bf16_v",
        "depthwise_backward_w_k5_bf16",
        "depthwise_weight_taps_f32",
        "depthwise_weight_taps_bf16",
        "depthwise_backward_w_reduce",
    ]
);

module!(
    NORM,
    "norm",
    [
        "norm_stats_partial_f32",
        "norm_apply_f32",
        "norm_backward_partial_f32",
        "norm_backward_dx_f32",
        "layer_norm_forward_f32",
        "layer_norm_backward_dx_f32",
        "layer_norm_backward_params_f32",
        "norm_stats_partial_bf16",
        "norm_apply_bf16",
        "norm_backward_partial_bf16",
        "norm_backward_dx_bf16",
        "layer_norm_forward_bf16",
        "layer_norm_backward_dx_bf16",
        "layer_norm_backward_params_bf16",
        "norm_stats_combine",
        "norm_stats_finalize",
        "batch_norm_eval_invstd",
        "norm_sum_splits",
        "norm_backward_finalize",
    ]
);
module!(
    ATTENTION,
    "attention",
    [
        "attention_forward_d32_f32",
        "attention_backward_dq_d32_f32",
        "attention_backward_dkv_d32_f32",
        "attention_forward_d64_f32",
        "attention_backward_dq_d64_f32",
        "attention_backward_dkv_d64_f32",
        "attention_forward_d128_f32",
        "attention_backward_dq_d128_f32",
        "attention_backward_dkv_d128_f32",
        "attention_forward_d32_bf16",
        "attention_backward_dq_d32_bf16",
        "attention_backward_dkv_d32_bf16",
        "attention_forward_d64_bf16",
        "attention_backward_dq_d64_bf16",
        "attention_backward_dkv_d64_bf16",
        "attention_forward_d128_bf16",
        "attention_backward_dq_d128_bf16",
        "attention_backward_dkv_d128_bf16",
        "attention_softmax_rows_f32",
        "attention_ds_rows_f32",
        "attention_softmax_rows_bf16",
        "attention_ds_rows_bf16",
        "attention_backward_delta_f32",
        "attention_backward_delta_bf16",
    ]
);
module!(
    LOSS,
    "loss",
    [
        "loss_ce_forward_f32",
        "loss_ce_backward_f32",
        "loss_soft_forward_f32",
        "loss_soft_backward_f32",
        "loss_ce_forward_bf16",
        "loss_ce_backward_bf16",
        "loss_soft_forward_bf16",
        "loss_soft_backward_bf16",
        "loss_mean",
        "mse_partial_f32",
        "mse_finish",
    ]
);
module!(
    GEGLU,
    "geglu",
    [
        "geglu_forward_f32",
        "geglu_backward_f32",
        "geglu_forward_bf16",
        "geglu_backward_bf16"
    ]
);
module!(
    SHAPE,
    "shape",
    [
        "silu_backward_f32",
        "silu_backward_bf16",
        "silu_backward_vec_f32",
        "silu_backward_vec_bf16",
        "sigmoid_backward_f32",
        "sigmoid_backward_bf16",
        "sigmoid_backward_vec_f32",
        "sigmoid_backward_vec_bf16",
        "add_f32",
        "add_bf16",
        "add_vec_f32",
        "add_vec_bf16",
        "add_per_sample_f32",
        "add_per_sample_bf16",
        "add_per_sample_vec_f32",
        "add_per_sample_vec_bf16",
        "scale_channels_f32",
        "scale_channels_bf16",
        "scale_channels_vec_f32",
        "scale_channels_vec_bf16",
        "scale_channels_backward_pooled_f32",
        "scale_channels_backward_pooled_bf16",
        "scale_channels_backward_pooled_vec_f32",
        "scale_channels_backward_pooled_vec_bf16",
        "global_avg_pool_backward_f32",
        "global_avg_pool_backward_bf16",
        "global_avg_pool_backward_vec_f32",
        "global_avg_pool_backward_vec_bf16",
        "position_sum_f32",
        "position_sum_bf16",
        "position_dot_f32",
        "position_dot_bf16",
        "position_reduce_f32",
        "position_reduce_bf16",
        "upsample2x_forward_w16",
        "upsample2x_forward_w8",
        "upsample2x_forward_w4",
        "upsample2x_forward_w2",
        "copy_rows_w16",
        "copy_rows_w8",
        "copy_rows_w4",
        "copy_rows_w2",
        "embedding_forward_w16",
        "embedding_forward_w8",
        "embedding_forward_w4",
        "embedding_forward_w2",
        "upsample2x_backward_f32",
        "upsample2x_backward_bf16",
        "upsample2x_backward_vec_f32",
        "upsample2x_backward_vec_bf16",
        "embedding_backward_f32",
        "embedding_backward_bf16",
        "sum_partial_f32",
        "sum_partial_vec_f32",
        "sum_final_f32",
    ]
);
module!(
    OPTIM,
    "optim",
    [
        "sgd_step_f32",
        "sgd_step_bf16",
        "adamw_step_f32",
        "adamw_step_bf16",
        "grad_norm_partial_f32",
        "grad_norm_partial_bf16",
        "grad_norm_finish",
        "grad_scale_f32",
        "ema_update_f32",
    ]
);
module!(
    CROP,
    "crop",
    [
        "crop_extract_u8",
        "crop_extract_u16",
        "crop_extract_f32",
        "crop_augment"
    ]
);

module!(
    CONV,
    "conv",
    [
        "im2col_nchw_f32",
        "im2col_nchw_bf16",
        "stem_conv3x3_f32",
        "im2col_taps_b16",
        "im2col_taps_b8",
        "im2col_taps_b4",
        "im2col_taps_b2",
        "col2im_taps_f32",
        "col2im_taps_f32_v4",
        "col2im_taps_f32_bf16",
        "col2im_taps_f32_bf16_v4",
        "conv_weight_to_taps_f32",
        "conv_weight_to_taps_bf16",
        "conv_weight_from_taps_f32",
        "conv_weight_from_taps_f32_bf16",
    ]
);

module!(SAMPLER, "sampler", ["sampler_step_f32"]);

/// Every kernel module; `tests/nvrtc_check.rs` fails when a `kernels/*.cu` file is missing here.
pub static MODULES: &[&KernelModule] = &[
    &UNARY, &AFFINE, &DEPTHWISE, &NORM, &ATTENTION, &LOSS, &GEGLU, &SHAPE, &OPTIM, &CROP, &CONV,
    &SAMPLER,
];

/// Headers the modules may `#include "<name>"`, handed to NVRTC in memory.
pub const HEADERS: &[(&str, &str)] = &[("common.cuh", include_str!("../../../kernels/common.cuh"))];
