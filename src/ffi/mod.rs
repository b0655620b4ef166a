//! The C ABI. The only module with `#[no_mangle]`; `include/phenocore.h` is generated from it by
//! cbindgen (`tests/header_fresh.rs` fails when the committed header is stale).
//!
//! Conventions (DESIGN.md "C ABI conventions"): every fallible function returns `PhenoStatus` and
//! writes results through out-pointers placed last; every body runs inside a panic boundary; every
//! pointer is NULL-checked and every length checked against its shape with overflow-checked
//! products; on failure `pheno_last_error()` names the function and the culprit.

mod boundary;
mod crops;
mod diffusion_train;
mod harmony;
mod metrics;
mod model;
mod options;
mod profiles;
mod scheduler;
mod sphere;
mod stats;
mod status;
mod train;
mod unet;
mod vae;

pub use crate::error::PhenoStatus;
pub use crops::{pheno_crop_cells, pheno_effnet_features_from_image, PhenoImage};
pub use diffusion_train::*;
pub use harmony::{pheno_harmony, pheno_harmony_default_options, PhenoHarmonyOptions};
pub use metrics::{
    pheno_folds_of_enrichment, pheno_folds_of_enrichment_pooled, pheno_mean_average_precision,
    pheno_precision_recall_at_k, pheno_replicate_reproducibility, pheno_retrieval_default_options,
    PhenoInfiniteOdds, PhenoMapMethod, PhenoRetrievalOptions, PhenoUnlabeled,
};
pub use model::{
    pheno_effnet_features, pheno_effnet_free, pheno_effnet_info, pheno_effnet_layer_dim,
    pheno_effnet_load, pheno_effnet_load_from_memory, pheno_effnet_logits, pheno_effnet_new,
    pheno_effnet_save, PhenoModel,
};
pub use options::{
    pheno_crop_default_options, pheno_effnet_default_options, pheno_feature_default_options,
    PhenoCropOptions, PhenoEffnetOptions, PhenoFeatureOptions, PhenoNormalization, PhenoPadding,
    PhenoPixelType, PhenoProgressFn,
};
pub use profiles::{
    pheno_aggregate, pheno_aggregate_default_options, pheno_aggregate_f64, pheno_aggregate_npz_dir,
    pheno_profiles_data, pheno_profiles_empty_group, pheno_profiles_empty_groups,
    pheno_profiles_feature_name, pheno_profiles_feature_names, pheno_profiles_free,
    pheno_profiles_info, pheno_profiles_io_default_options, pheno_profiles_meta_column,
    pheno_profiles_meta_index, pheno_profiles_meta_name, pheno_profiles_meta_value,
    pheno_profiles_new, pheno_profiles_read, pheno_profiles_write, PhenoAggregateLevel,
    PhenoAggregateOptions, PhenoNanPolicy, PhenoProfiles, PhenoProfilesIoOptions, PhenoReduce,
};
pub use scheduler::*;
pub use sphere::{
    pheno_effect_default_options, pheno_sphere_default_options, pheno_sphering_fit,
    pheno_sphering_free, pheno_sphering_info, pheno_sphering_load, pheno_sphering_parameters,
    pheno_sphering_plate, pheno_sphering_save, pheno_sphering_transform, pheno_treatment_effect,
    PhenoEffectOptions, PhenoEffectTier, PhenoSphereMethod, PhenoSphereOptions,
    PhenoSphereRegularization, PhenoSphering,
};
pub use stats::{
    pheno_anova_oneway, pheno_average_precision_score, pheno_biosimilarity, pheno_moa_prediction,
    pheno_prediction_default_options, pheno_reference_subprofile, pheno_roc_auc_score,
    pheno_tukey_hsd, PhenoAverage, PhenoBiosimilarity, PhenoFoldMetrics, PhenoPredictionOptions,
    PhenoSubsetMetrics,
};
pub use status::{
    pheno_last_error, pheno_set_num_threads, pheno_status_str, pheno_version_number,
    PhenoStatusArg, VERSION_NUMBER,
};
pub use train::{
    pheno_trainer_add_crops, pheno_trainer_clear_crops, pheno_trainer_default_options,
    pheno_trainer_fit, pheno_trainer_free, pheno_trainer_load_checkpoint, pheno_trainer_new,
    pheno_trainer_new_from_weights, pheno_trainer_num_crops, pheno_trainer_predict,
    pheno_trainer_save_checkpoint, pheno_trainer_save_weights, pheno_trainer_step,
    pheno_trainer_steps, pheno_trainer_to_model, PhenoCompute, PhenoLrSchedule, PhenoOptimizer,
    PhenoTrainProgress, PhenoTrainProgressFn, PhenoTrainSplit, PhenoTrainer, PhenoTrainerOptions,
};
pub use unet::*;
pub use vae::*;
