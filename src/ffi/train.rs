//! The trainer handle (REFERENCE §2): create (fresh or from torchvision weights), one SGD / AdamW
//! step on a pushed batch, `fit` over crops pushed from the host with class-balanced epochs,
//! augmentation, validation and checkpoints, prediction, saving and export to an inference model.

use super::boundary::{c_path, checked_len, guard, null, reference, slice, slice_mut, write_out};
use super::model::{pheno_effnet_load_from_memory, PhenoModel};
use super::options::{
    effnet_opts, pheno_effnet_default_options, PhenoEffnetOptions, PhenoPadding, Prefix,
};
use crate::error::{Error, PhenoStatus, Result};
use crate::models::efficientnet::{
    EfficientNetConfig, Padding, Regularisation, TrainableEfficientNet,
};
use crate::optim::Schedule;
use crate::train::augment::Augmentation;
use crate::train::split::{leave_cells_out, leave_plates_out};
use crate::train::{
    Compute, Dataset, DecayScope, DomainAdversarial, EpochReport, Event, GrlLambda, MilOptions,
    OptimizerKind, Trainer, TrainerOptions,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};

/// Optimiser of a training run.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoOptimizer {
    /// torch.optim.SGD (momentum, Nesterov, weight decay added to the gradient); REFERENCE §2.
    PHENO_OPTIMIZER_SGD = 0,
    /// torch.optim.AdamW (decoupled weight decay).
    PHENO_OPTIMIZER_ADAMW = 1,
}

/// Learning rate as a function of the epoch (torch.optim.lr_scheduler closed forms).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoLrSchedule {
    /// lr throughout (default).
    PHENO_SCHEDULE_CONSTANT = 0,
    /// StepLR: lr · gamma^⌊epoch / step_size⌋.
    PHENO_SCHEDULE_STEP = 1,
    /// MultiStepLR: lr · gamma^(milestones passed); `milestones` / `n_milestones`.
    PHENO_SCHEDULE_MULTISTEP = 2,
    /// CosineAnnealingLR with `t_max` and `eta_min`.
    PHENO_SCHEDULE_COSINE = 3,
    /// ExponentialLR: lr · gamma^epoch.
    PHENO_SCHEDULE_EXPONENTIAL = 4,
}

/// How `pheno_trainer_fit` splits the pushed crops into training and validation.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoTrainSplit {
    /// Every crop trains; no validation.
    PHENO_SPLIT_NONE = 0,
    /// Leave-cells-out: in every well (plate, group), round(train_fraction · cells) train.
    PHENO_SPLIT_CELLS = 1,
    /// Leave-plates-out: crops on `val_plates` validate, all others train.
    PHENO_SPLIT_PLATES = 2,
}

/// Options of a trainer. Initialise with `pheno_trainer_default_options()` (REFERENCE §2), then
/// change fields. Booleans are 0 / non-zero. A rate of 0 disables a regulariser.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoTrainerOptions {
    /// `sizeof(PhenoTrainerOptions)`; set by `pheno_trainer_default_options()`.
    pub struct_size: usize,
    /// Default SGD.
    pub optimizer: PhenoOptimizer,
    /// Base learning rate (default 0.005).
    pub lr: f64,
    /// SGD momentum (default 0.9).
    pub momentum: f64,
    /// SGD Nesterov momentum (default 1).
    pub nesterov: i32,
    /// Weight decay (default 1e-5): L2 added to the gradient for SGD, decoupled for AdamW.
    pub weight_decay: f64,
    /// Non-zero: weight decay on convolution and linear kernels only (Keras regularisers); 0
    /// (default): on every parameter, as torch.optim with one parameter group.
    pub decay_kernels_only: i32,
    /// AdamW betas and eps (default 0.9, 0.999, 1e-8).
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Label smoothing of the cross-entropy, in [0, 1] (default 0).
    pub label_smoothing: f64,
    /// Dropout before the classifier (default 0.2).
    pub dropout: f64,
    /// Largest stochastic-depth (drop-connect) rate (default 0.2).
    pub drop_connect_rate: f64,
    /// BN running-statistics momentum, torch convention (default 0.1; Keras 0.99 is 0.01 here).
    pub bn_momentum: f64,
    /// Learning-rate schedule over epochs (default constant) and its parameters.
    pub schedule: PhenoLrSchedule,
    /// STEP: epochs per decay (default 10).
    pub step_size: u64,
    /// STEP, MULTISTEP, EXPONENTIAL: decay factor (default 0.1).
    pub gamma: f64,
    /// MULTISTEP: `n_milestones` increasing epochs (copied when the trainer is created).
    pub milestones: *const u64,
    pub n_milestones: usize,
    /// COSINE: period in epochs (default 30) and floor (default 0).
    pub t_max: u64,
    pub eta_min: f64,
    /// Linear warm-up from 0.1 · lr over this many epochs (default 0 = none).
    pub warmup_epochs: u64,
    /// Gradient clipping by total 2-norm; 0 = off (default).
    pub clip_grad_norm: f64,
    /// Augmentation in `pheno_trainer_fit`: non-zero (default) = the fields below; 0 = none.
    pub augment: i32,
    /// Augmentation also in `pheno_trainer_step` (default 0).
    pub augment_in_step: i32,
    /// Random crop probability (default 0.5) and its side range as a fraction of the crop
    /// (default 0.8, 1.0).
    pub aug_crop_p: f32,
    pub aug_crop_scale_min: f32,
    pub aug_crop_scale_max: f32,
    /// Random horizontal flip and rot90 (default 1, 1).
    pub aug_flip: i32,
    pub aug_rot90: i32,
    /// Per-channel brightness shift U(-b, b) (default 0.1) and contrast factor range (0.8, 1.2).
    pub aug_brightness: f32,
    pub aug_contrast_min: f32,
    pub aug_contrast_max: f32,
    /// Crops per step in `fit` (default 32).
    pub batch_size: usize,
    /// Epochs of `fit` (default 30).
    pub epochs: u64,
    /// Seed of the epochs, augmentation, dropout and the split (default 0).
    pub seed: u64,
    /// Threads preparing batches in `fit` (default 1) and batches prepared ahead (default 2).
    pub workers: usize,
    pub prefetch: usize,
    /// Domain-adversarial branch (gradient reversal layer, CP-CNN paper Methods): the number of
    /// domains (plates), >= 2; 0 = off (default). Domain labels come from
    /// `pheno_trainer_add_crops_with_domains` (or the plate ids of `pheno_trainer_add_crops`) and
    /// `pheno_trainer_step_domains` / `pheno_trainer_step_bags`.
    pub domain_count: usize,
    /// λ of the gradient reversal layer (default 1): constant, or the maximum of Ganin's schedule.
    pub domain_lambda: f64,
    /// 0 (default): constant λ; 1: λ · (2 / (1 + exp(-10 p)) - 1) over training progress p.
    pub domain_lambda_schedule: i32,
    /// Weight of the domain cross-entropy in the loss (default 1).
    pub domain_weight: f64,
    /// Widths of the domain head's hidden dense layers (NULL / 0 = 1024, 512, 128; copied).
    pub domain_hidden: *const usize,
    pub n_domain_hidden: usize,
    /// Attention MIL (CP-CNN paper Methods): non-zero = on (default 0). `fit` then trains on bags
    /// (`batch_size` counts bags) and `pheno_trainer_step_bags` takes bags.
    pub mil: i32,
    /// Crops per bag (default 16) and the treated crops of a treated bag (default 4..=12).
    pub mil_bag_size: usize,
    pub mil_min_treated: usize,
    pub mil_max_treated: usize,
    /// Negative-control classes (e.g. DMSO) filling the bags; required with `mil` (copied).
    pub mil_control_classes: *const u32,
    pub n_mil_control_classes: usize,
    /// Width of the attention's hidden layer (default 128).
    pub mil_attention_dim: usize,
    /// -1 = CPU (default); >= 0 = the CUDA device of that ordinal trains: parameters, gradients,
    /// BN statistics and the optimizer state stay there, validation runs there. Needs the `cuda`
    /// feature (else PHENO_ERR_UNSUPPORTED) and a GPU (else PHENO_ERR_NO_DEVICE). Not with
    /// `domain_count`, `mil` (PHENO_ERR_UNSUPPORTED).
    pub device: i32,
    /// The arithmetic of a device's steps (default F32); the CPU trains in f32 only.
    pub compute: PhenoCompute,
}

/// The arithmetic of training steps on a GPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum PhenoCompute {
    /// f32 storage and IEEE f32 GEMMs.
    PHENO_COMPUTE_F32 = 0,
    /// f32 storage, GEMMs on TF32 tensor cores.
    PHENO_COMPUTE_TF32 = 1,
    /// bf16 mixed precision (f32 master weights and optimizer state), as torch autocast.
    PHENO_COMPUTE_BF16 = 2,
}

/// What `pheno_trainer_fit` reports after every step and at the end of every epoch.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoTrainProgress {
    /// `sizeof(PhenoTrainProgress)` of the library; fields past the caller's struct are newer.
    pub struct_size: usize,
    /// 0-based epoch.
    pub epoch: u64,
    /// 1-based step within the epoch, and the steps of the epoch.
    pub step: u64,
    pub steps_in_epoch: u64,
    /// Loss of this step; at the epoch end, the mean training loss of the epoch.
    pub loss: f64,
    /// Non-zero at the end of an epoch; then the fields below are set (NaN when absent, e.g. the
    /// validation metrics without validation crops or top-5 with fewer than 5 classes).
    pub is_epoch_end: i32,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_accuracy: f64,
    pub val_macro_f1: f64,
    pub val_top5: f64,
}

/// Called by `pheno_trainer_fit` after every step and every epoch, on the calling thread. Return 0
/// to continue, non-zero to cancel (as `PhenoProgressFn`): the call then returns
/// PHENO_ERR_CANCELLED and the last checkpoint written stays valid. It must not unwind and must
/// not call functions on the trainer.
pub type PhenoTrainProgressFn = Option<
    unsafe extern "C" fn(progress: *const PhenoTrainProgress, user_data: *mut c_void) -> i32,
>;

/// A trainable EfficientNet-B0 with its optimiser state, counters, RNG and the crops pushed by
/// `pheno_trainer_add_crops`.
///
/// Thread safety: not thread-safe. One thread at a time may call functions on a trainer (it may
/// move between threads between calls). `pheno_trainer_free` must be called exactly once, after
/// every other call on it has returned.
pub struct PhenoTrainer {
    trainer: Trainer,
    opts: TrainerOptions,
    data: Pushed,
}

/// Crops pushed from the host for `fit`.
#[derive(Default)]
struct Pushed {
    crops: Vec<f32>,
    /// (C, H, W) of every pushed crop.
    dims: Option<(usize, usize, usize)>,
    labels: Vec<u32>,
    /// Well id per crop, or None when the host gave none.
    groups: Vec<Option<u32>>,
    plates: Vec<u32>,
    /// Domain label per crop (the plate id unless given).
    domains: Vec<u32>,
}

const MAX_IN_CHANNELS: usize = 4096;
const MAX_CLASSES: usize = 1 << 20;

/// Default options (REFERENCE §2): SGD lr 0.005, momentum 0.9, Nesterov, weight decay 1e-5 on
/// every parameter, no label smoothing, dropout 0.2, drop-connect 0.2, BN momentum 0.1, constant
/// schedule, no clipping, the §2 augmentations in `fit` only, batch 32, 30 epochs, seed 0, one
/// worker, prefetch 2.
#[no_mangle]
pub extern "C" fn pheno_trainer_default_options() -> PhenoTrainerOptions {
    let d = TrainerOptions::default();
    let a = Augmentation::default();
    let m = MilOptions::default();
    PhenoTrainerOptions {
        struct_size: size_of::<PhenoTrainerOptions>(),
        optimizer: PhenoOptimizer::PHENO_OPTIMIZER_SGD,
        lr: d.lr,
        momentum: d.momentum,
        nesterov: d.nesterov as i32,
        weight_decay: d.weight_decay,
        decay_kernels_only: 0,
        beta1: d.betas.0,
        beta2: d.betas.1,
        eps: d.eps,
        label_smoothing: d.label_smoothing,
        dropout: d.regularisation.dropout,
        drop_connect_rate: d.regularisation.drop_connect_rate,
        bn_momentum: d.regularisation.bn_momentum,
        schedule: PhenoLrSchedule::PHENO_SCHEDULE_CONSTANT,
        step_size: 10,
        gamma: 0.1,
        milestones: std::ptr::null(),
        n_milestones: 0,
        t_max: 30,
        eta_min: 0.0,
        warmup_epochs: 0,
        clip_grad_norm: 0.0,
        augment: 1,
        augment_in_step: 0,
        aug_crop_p: a.crop_p,
        aug_crop_scale_min: a.crop_scale.0,
        aug_crop_scale_max: a.crop_scale.1,
        aug_flip: a.flip as i32,
        aug_rot90: a.rot90 as i32,
        aug_brightness: a.brightness,
        aug_contrast_min: a.contrast.0,
        aug_contrast_max: a.contrast.1,
        batch_size: d.batch_size,
        epochs: d.epochs,
        seed: d.seed,
        workers: d.workers,
        prefetch: d.prefetch,
        domain_count: 0,
        domain_lambda: 1.0,
        domain_lambda_schedule: 0,
        domain_weight: 1.0,
        domain_hidden: std::ptr::null(),
        n_domain_hidden: 0,
        mil: 0,
        mil_bag_size: m.bag_size,
        mil_min_treated: m.min_treated,
        mil_max_treated: m.max_treated,
        mil_control_classes: std::ptr::null(),
        n_mil_control_classes: 0,
        mil_attention_dim: m.attention_dim,
        device: -1,
        compute: PhenoCompute::PHENO_COMPUTE_F32,
    }
}

/// Reads the caller's options (NULL = defaults) within its `struct_size`.
///
/// # Safety
/// `p` is NULL or points to a `PhenoTrainerOptions` of at least `p->struct_size` bytes whose
/// `milestones` (when within the struct and `n_milestones` > 0) points to `n_milestones` values.
unsafe fn trainer_opts(p: *const PhenoTrainerOptions) -> Result<TrainerOptions> {
    let mut c = pheno_trainer_default_options();
    // Each known field from the caller's prefix; the rest keep their defaults.
    let mut raw_optimizer = 0i32;
    let mut raw_schedule = 0i32;
    let mut raw_compute = 0i32;
    if let Some(pre) = Prefix::new(p, "opts", "pheno_trainer_default_options")? {
        macro_rules! read {
            ($field:ident, $t:ty) => {
                if let Some(v) = pre.field::<$t>(offset_of!(PhenoTrainerOptions, $field)) {
                    c.$field = v;
                }
            };
        }
        if let Some(v) = pre.field::<i32>(offset_of!(PhenoTrainerOptions, optimizer)) {
            raw_optimizer = v;
        }
        if let Some(v) = pre.field::<i32>(offset_of!(PhenoTrainerOptions, schedule)) {
            raw_schedule = v;
        }
        read!(lr, f64);
        read!(momentum, f64);
        read!(nesterov, i32);
        read!(weight_decay, f64);
        read!(decay_kernels_only, i32);
        read!(beta1, f64);
        read!(beta2, f64);
        read!(eps, f64);
        read!(label_smoothing, f64);
        read!(dropout, f64);
        read!(drop_connect_rate, f64);
        read!(bn_momentum, f64);
        read!(step_size, u64);
        read!(gamma, f64);
        read!(milestones, *const u64);
        read!(n_milestones, usize);
        read!(t_max, u64);
        read!(eta_min, f64);
        read!(warmup_epochs, u64);
        read!(clip_grad_norm, f64);
        read!(augment, i32);
        read!(augment_in_step, i32);
        read!(aug_crop_p, f32);
        read!(aug_crop_scale_min, f32);
        read!(aug_crop_scale_max, f32);
        read!(aug_flip, i32);
        read!(aug_rot90, i32);
        read!(aug_brightness, f32);
        read!(aug_contrast_min, f32);
        read!(aug_contrast_max, f32);
        read!(batch_size, usize);
        read!(epochs, u64);
        read!(seed, u64);
        read!(workers, usize);
        read!(prefetch, usize);
        read!(domain_count, usize);
        read!(domain_lambda, f64);
        read!(domain_lambda_schedule, i32);
        read!(domain_weight, f64);
        read!(domain_hidden, *const usize);
        read!(n_domain_hidden, usize);
        read!(mil, i32);
        read!(mil_bag_size, usize);
        read!(mil_min_treated, usize);
        read!(mil_max_treated, usize);
        read!(mil_control_classes, *const u32);
        read!(n_mil_control_classes, usize);
        read!(mil_attention_dim, usize);
        read!(device, i32);
        if let Some(v) = pre.field::<i32>(offset_of!(PhenoTrainerOptions, compute)) {
            raw_compute = v;
        }
    }
    let device = match c.device {
        -1 => None,
        d if d >= 0 => Some(d as usize),
        d => {
            return Err(Error::InvalidArgument(format!(
                "opts->device is {d}; expected -1 (CPU) or a CUDA ordinal >= 0"
            )))
        }
    };
    let compute = match raw_compute {
        0 => Compute::F32,
        1 => Compute::Tf32,
        2 => Compute::Bf16,
        v => {
            return Err(Error::InvalidArgument(format!(
                "opts->compute is {v}; expected PHENO_COMPUTE_F32 (0), _TF32 (1) or _BF16 (2)"
            )))
        }
    };
    if device.is_none() && compute != Compute::F32 {
        return Err(Error::InvalidArgument(format!(
            "opts->compute is {raw_compute} but opts->device is -1: the CPU trains in f32; set \
             a CUDA device for TF32 or bf16"
        )));
    }
    let domain_adversarial = if c.domain_count == 0 {
        None
    } else {
        let hidden = if c.n_domain_hidden == 0 {
            DomainAdversarial::default().hidden
        } else {
            if c.domain_hidden.is_null() {
                return Err(null("opts->domain_hidden"));
            }
            slice(c.domain_hidden, c.n_domain_hidden, "opts->domain_hidden")?.to_vec()
        };
        let lambda = match c.domain_lambda_schedule {
            0 => GrlLambda::Constant(c.domain_lambda),
            1 => GrlLambda::Ganin {
                max: c.domain_lambda,
            },
            v => {
                return Err(Error::InvalidArgument(format!(
                    "opts->domain_lambda_schedule is {v}; expected 0 (constant) or 1 (Ganin)"
                )))
            }
        };
        Some(DomainAdversarial {
            domains: c.domain_count,
            lambda,
            weight: c.domain_weight,
            hidden,
        })
    };
    let mil = if c.mil == 0 {
        None
    } else {
        if c.n_mil_control_classes > 0 && c.mil_control_classes.is_null() {
            return Err(null("opts->mil_control_classes"));
        }
        Some(MilOptions {
            bag_size: c.mil_bag_size,
            min_treated: c.mil_min_treated,
            max_treated: c.mil_max_treated,
            control_classes: slice(
                c.mil_control_classes,
                c.n_mil_control_classes,
                "opts->mil_control_classes",
            )?
            .to_vec(),
            attention_dim: c.mil_attention_dim,
        })
    };
    let optimizer = match raw_optimizer {
        0 => OptimizerKind::Sgd,
        1 => OptimizerKind::AdamW,
        v => {
            return Err(Error::InvalidArgument(format!(
            "opts->optimizer is {v}; expected PHENO_OPTIMIZER_SGD (0) or PHENO_OPTIMIZER_ADAMW (1)"
        )))
        }
    };
    let schedule = match raw_schedule {
        0 => Schedule::Constant,
        1 => Schedule::Step {
            step_size: c.step_size,
            gamma: c.gamma,
        },
        2 => {
            if c.n_milestones > 0 && c.milestones.is_null() {
                return Err(null("opts->milestones"));
            }
            let m = slice(c.milestones, c.n_milestones, "opts->milestones")?.to_vec();
            if let Some(i) = (1..m.len()).find(|&i| m[i] <= m[i - 1]) {
                return Err(Error::InvalidArgument(format!(
                    "opts->milestones must increase: milestones[{}] = {} follows {}",
                    i,
                    m[i],
                    m[i - 1]
                )));
            }
            Schedule::MultiStep {
                milestones: m,
                gamma: c.gamma,
            }
        }
        3 => Schedule::Cosine {
            t_max: c.t_max,
            eta_min: c.eta_min,
        },
        4 => Schedule::Exponential { gamma: c.gamma },
        v => {
            return Err(Error::InvalidArgument(format!(
                "opts->schedule is {v}; expected 0..=4 (PHENO_SCHEDULE_*)"
            )))
        }
    };
    for (name, v) in [
        ("momentum", c.momentum),
        ("weight_decay", c.weight_decay),
        ("eps", c.eps),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "opts->{name} is {v}; expected a finite number >= 0"
            )));
        }
    }
    for (name, v) in [("beta1", c.beta1), ("beta2", c.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(Error::InvalidArgument(format!(
                "opts->{name} is {v}; expected a number in [0, 1)"
            )));
        }
    }
    if !(c.clip_grad_norm.is_finite() && c.clip_grad_norm >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "opts->clip_grad_norm is {}; expected a finite number >= 0 (0 = off)",
            c.clip_grad_norm
        )));
    }
    if c.workers == 0 || c.prefetch == 0 {
        return Err(Error::InvalidArgument(format!(
            "opts->workers ({}) and opts->prefetch ({}) must be >= 1",
            c.workers, c.prefetch
        )));
    }
    let augmentation = Augmentation {
        crop_p: c.aug_crop_p,
        crop_scale: (c.aug_crop_scale_min, c.aug_crop_scale_max),
        flip: c.aug_flip != 0,
        rot90: c.aug_rot90 != 0,
        brightness: c.aug_brightness,
        contrast: (c.aug_contrast_min, c.aug_contrast_max),
    };
    augmentation
        .validate()
        .map_err(|e| Error::InvalidArgument(format!("opts->aug_*: {e}")))?;
    let o = TrainerOptions {
        online_label_smoothing: None,
        optimizer,
        lr: c.lr,
        momentum: c.momentum,
        nesterov: c.nesterov != 0,
        weight_decay: c.weight_decay,
        decay_scope: if c.decay_kernels_only != 0 {
            DecayScope::Kernels
        } else {
            DecayScope::All
        },
        betas: (c.beta1, c.beta2),
        eps: c.eps,
        label_smoothing: c.label_smoothing,
        regularisation: Regularisation {
            dropout: c.dropout,
            drop_connect_rate: c.drop_connect_rate,
            bn_momentum: c.bn_momentum,
        },
        schedule,
        warmup_epochs: c.warmup_epochs,
        clip_grad_norm: (c.clip_grad_norm > 0.0).then_some(c.clip_grad_norm),
        augmentation: if c.augment != 0 {
            augmentation
        } else {
            Augmentation::none()
        },
        augment_in_step: c.augment_in_step != 0,
        batch_size: c.batch_size,
        epochs: c.epochs,
        seed: c.seed,
        workers: c.workers,
        prefetch: c.prefetch,
        domain_adversarial,
        mil,
        device,
        compute,
    };
    o.validate()
        .map_err(|e| Error::InvalidArgument(format!("opts: {e}")))?;
    Ok(o)
}

fn check_counts(in_channels: usize, num_classes: usize) -> Result<()> {
    if !(1..=MAX_IN_CHANNELS).contains(&in_channels) {
        return Err(Error::InvalidArgument(format!(
            "in_channels is {in_channels}; expected 1..={MAX_IN_CHANNELS}"
        )));
    }
    if !(1..=MAX_CLASSES).contains(&num_classes) {
        return Err(Error::InvalidArgument(format!(
            "num_classes is {num_classes}; expected 1..={MAX_CLASSES}"
        )));
    }
    Ok(())
}

/// # Safety
/// `out` is NULL or valid for a write.
unsafe fn publish(
    out: *mut *mut PhenoTrainer,
    make: impl FnOnce() -> Result<PhenoTrainer>,
) -> Result<()> {
    super::boundary::publish_handle(out, "out_trainer", make)
}

/// # Safety
/// `t` is NULL or a live trainer not used by any other call during `'a`.
unsafe fn trainer_mut<'a>(t: *mut PhenoTrainer) -> Result<&'a mut PhenoTrainer> {
    t.as_mut().ok_or_else(|| null("trainer"))
}

/// A trainer for a call that reads its weights (`*const` in the header). On a device the call
/// refreshes the host's copy of the weights, a cache: what the trainer holds does not change. Like
/// every trainer call it needs the trainer to itself (trainers are not thread-safe).
///
/// # Safety
/// As [`trainer_mut`]; `t` came from this library as a `*mut` (every trainer handle does).
unsafe fn trainer_reading<'a>(t: *const PhenoTrainer) -> Result<&'a mut PhenoTrainer> {
    trainer_mut(t as *mut PhenoTrainer)
}

impl PhenoTrainer {
    fn new(model: TrainableEfficientNet<f32>, opts: TrainerOptions) -> Result<Self> {
        Ok(PhenoTrainer {
            trainer: Trainer::new(model, opts.clone())?,
            opts,
            data: Pushed::default(),
        })
    }

    fn config(&self) -> &EfficientNetConfig {
        self.trainer.config()
    }

    /// The crops of a call as a slice, checked against the model: (C, H, W) non-zero, C the
    /// model's channels, every value finite (errors name the crop, channel and pixel).
    ///
    /// # Safety
    /// `crops` points to n·c·h·w floats.
    unsafe fn crops<'a>(
        &self,
        crops: *const f32,
        n: usize,
        c: usize,
        h: usize,
        w: usize,
    ) -> Result<&'a [f32]> {
        if n == 0 {
            return Err(Error::InvalidArgument(
                "n is 0; pass at least one crop".into(),
            ));
        }
        if h == 0 || w == 0 {
            return Err(Error::Shape(format!(
                "crops are {h} × {w}; expected H, W >= 1"
            )));
        }
        let want = self.config().in_channels;
        if c != want {
            return Err(Error::Shape(format!(
                "crops have {c} channels but the model takes {want}"
            )));
        }
        let len = checked_len::<f32>(&[n, c, h, w], "crops")?;
        if crops.is_null() {
            return Err(null("crops"));
        }
        let x = slice(crops, len, "crops")?;
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            let per = c * h * w;
            let (crop, rest) = (i / per, i % per);
            return Err(Error::NonFinite(format!(
                "crops: crop {crop}, channel {}, pixel (y {}, x {}) is {}",
                rest / (h * w),
                rest % (h * w) / w,
                rest % w,
                x[i]
            )));
        }
        Ok(x)
    }

    /// Labels of `n` crops, each < num_classes (errors name the crop).
    ///
    /// # Safety
    /// `labels` points to n values.
    unsafe fn labels<'a>(&self, labels: *const u32, n: usize) -> Result<&'a [u32]> {
        if labels.is_null() {
            return Err(null("labels"));
        }
        let l = slice(labels, n, "labels")?;
        let k = self.config().num_classes;
        if let Some((i, &v)) = l.iter().enumerate().find(|(_, &v)| v as usize >= k) {
            return Err(Error::InvalidArgument(format!(
                "labels[{i}] (crop {i}) is {v}, out of range: the model has {k} classes (0..={})",
                k - 1
            )));
        }
        Ok(l)
    }

    /// Makes the trainer run `epochs` epochs in total: a new `Trainer` with the changed options,
    /// given this one's exact state through a temporary checkpoint.
    fn set_epochs(&mut self, epochs: u64) -> Result<()> {
        if epochs == self.opts.epochs {
            return Ok(());
        }
        let mut opts = self.opts.clone();
        opts.epochs = epochs;
        let tmp = TempFile::new()?;
        self.trainer.save_checkpoint(&tmp.0)?;
        let model = TrainableEfficientNet::<f32>::from_state_dict(
            &self.trainer.model()?.state_dict()?,
            self.config().clone(),
        )?;
        let mut fresh = Trainer::new(model, opts.clone())?;
        fresh.load_checkpoint(&tmp.0)?;
        self.trainer = fresh;
        self.opts = opts;
        Ok(())
    }
}

/// A temporary file path removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new() -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(
            "phenocore-trainer-{}-{nanos}-{}.safetensors",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Ok(TempFile(std::env::temp_dir().join(name)))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A trainer of a freshly initialised EfficientNet-B0 (torchvision's initialisation, deterministic
/// in `init_seed`) with `in_channels` inputs and `num_classes` outputs. `opts` may be NULL
/// (REFERENCE §2 defaults); `model_opts` may be NULL (symmetric padding, bn_eps 1e-5, CPU). On
/// success `*out_trainer` owns a new trainer (free it with `pheno_trainer_free`); on failure it is
/// set to NULL.
///
/// # Safety
/// `opts` is NULL or initialised by `pheno_trainer_default_options()`; `model_opts` is NULL or
/// initialised by `pheno_effnet_default_options()`; `out_trainer` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_new(
    opts: *const PhenoTrainerOptions,
    in_channels: usize,
    num_classes: usize,
    init_seed: u64,
    model_opts: *const PhenoEffnetOptions,
    out_trainer: *mut *mut PhenoTrainer,
) -> PhenoStatus {
    guard("pheno_trainer_new", || {
        publish(out_trainer, || {
            check_counts(in_channels, num_classes)?;
            let mo = effnet_opts(model_opts)?;
            let o = trainer_opts(opts)?;
            let config = EfficientNetConfig {
                in_channels,
                num_classes,
                padding: mo.padding,
                bn_eps: mo.bn_eps,
            };
            PhenoTrainer::new(TrainableEfficientNet::new(config, init_seed)?, o)
        })
    })
}

/// A trainer starting from torchvision-format safetensors weights at `path` (e.g. ImageNet,
/// 3 channels): the stem is expanded to `in_channels` (channel i = source channel i % source
/// channels) and, when the file's classifier does not have `num_classes` outputs, a fresh
/// classifier is drawn from `seed`. Other arguments as `pheno_trainer_new`.
///
/// # Safety
/// `path` is a NUL-terminated string; other arguments as `pheno_trainer_new`.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_new_from_weights(
    opts: *const PhenoTrainerOptions,
    path: *const c_char,
    in_channels: usize,
    num_classes: usize,
    seed: u64,
    model_opts: *const PhenoEffnetOptions,
    out_trainer: *mut *mut PhenoTrainer,
) -> PhenoStatus {
    guard("pheno_trainer_new_from_weights", || {
        publish(out_trainer, || {
            let path = c_path(path, "path")?;
            check_counts(in_channels, num_classes)?;
            let mo = effnet_opts(model_opts)?;
            let o = trainer_opts(opts)?;
            let bytes = std::fs::read(path)
                .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
            let state =
                crate::io::safetensors::read_f32_tensors(&bytes).map_err(|e| with_path(e, path))?;
            let config = EfficientNetConfig {
                in_channels,
                num_classes,
                padding: mo.padding,
                bn_eps: mo.bn_eps,
            };
            let model = TrainableEfficientNet::from_pretrained(&state, config, seed)
                .map_err(|e| with_path(e, path))?;
            PhenoTrainer::new(model, o)
        })
    })
}

/// Prefixes an error's message with the file it concerns (same variant, same status).
fn with_path(e: Error, path: &Path) -> Error {
    let p = path.display();
    match e {
        Error::Format(m) => Error::Format(format!("{p}: {m}")),
        Error::MissingKey(m) => Error::MissingKey(format!("{p}: {m}")),
        Error::Shape(m) => Error::Shape(format!("{p}: {m}")),
        Error::DType(m) => Error::DType(format!("{p}: {m}")),
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{p}: {m}")),
        other => other,
    }
}

/// One optimiser step on `n` crops (N, C, H, W) float32 row-major with BN in training mode (no
/// augmentation unless `augment_in_step`); writes the batch's loss (before the update) to
/// `*out_loss`. Errors: C not the model's channels (SHAPE), a non-finite crop value (NON_FINITE
/// naming the crop), a label >= num_classes (INVALID_ARGUMENT naming the crop), a non-finite loss
/// or gradient (NON_FINITE naming the step; weights and BN statistics unchanged).
///
/// # Safety
/// `trainer` is a live trainer; `crops` points to n·c·h·w floats; `labels` to n values;
/// `out_loss` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_step(
    trainer: *mut PhenoTrainer,
    crops: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    labels: *const u32,
    out_loss: *mut f64,
) -> PhenoStatus {
    guard("pheno_trainer_step", || {
        let t = trainer_mut(trainer)?;
        if out_loss.is_null() {
            return Err(null("out_loss"));
        }
        let x = t.crops(crops, n, c, h, w)?;
        let y = t.labels(labels, n)?;
        let loss = t.trainer.step(x, n, h, w, y)?;
        write_out(out_loss, loss, "out_loss")
    })
}

/// `pheno_trainer_step` with the domain-adversarial branch (`opts->domain_count` > 0): `domains`
/// holds each crop's domain (plate) label in 0..domain_count. `*out_loss` gets the total loss
/// (treatment cross-entropy + domain_weight · domain cross-entropy). Errors as
/// `pheno_trainer_step`, plus a domain label out of range (INVALID_ARGUMENT naming the crop) or a
/// trainer without the domain branch (INVALID_ARGUMENT).
///
/// # Safety
/// As `pheno_trainer_step`; `domains` points to n values.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_step_domains(
    trainer: *mut PhenoTrainer,
    crops: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    labels: *const u32,
    domains: *const u32,
    out_loss: *mut f64,
) -> PhenoStatus {
    guard("pheno_trainer_step_domains", || {
        let t = trainer_mut(trainer)?;
        if out_loss.is_null() {
            return Err(null("out_loss"));
        }
        let x = t.crops(crops, n, c, h, w)?;
        let y = t.labels(labels, n)?;
        if domains.is_null() {
            return Err(null("domains"));
        }
        let d = slice(domains, n, "domains")?;
        let loss = t.trainer.step_with_domains(x, n, h, w, y, d)?;
        write_out(out_loss, loss, "out_loss")
    })
}

/// One step on `n_bags` attention-MIL bags (`opts->mil` set): `crops` holds n_bags ·
/// `opts->mil_bag_size` crops (C, H, W), bag after bag; `bag_labels` one label per bag; `domains`
/// one domain label per crop when the domain branch is on (else NULL). Writes the loss.
///
/// # Safety
/// `trainer` is a live trainer; `crops` points to n_bags · bag_size · c · h · w floats;
/// `bag_labels` to n_bags values; `domains` is NULL or points to n_bags · bag_size values.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_step_bags(
    trainer: *mut PhenoTrainer,
    crops: *const f32,
    n_bags: usize,
    c: usize,
    h: usize,
    w: usize,
    bag_labels: *const u32,
    domains: *const u32,
    out_loss: *mut f64,
) -> PhenoStatus {
    guard("pheno_trainer_step_bags", || {
        let t = trainer_mut(trainer)?;
        if out_loss.is_null() {
            return Err(null("out_loss"));
        }
        let Some(m) = t.opts.mil.as_ref() else {
            return Err(Error::InvalidArgument(
                "pheno_trainer_step_bags: the trainer was created without opts->mil".into(),
            ));
        };
        let n = n_bags
            .checked_mul(m.bag_size)
            .ok_or_else(|| Error::InvalidArgument(format!("n_bags {n_bags} is too large")))?;
        let x = t.crops(crops, n, c, h, w)?;
        let y = t.labels(bag_labels, n_bags)?;
        let d = if domains.is_null() {
            None
        } else {
            Some(slice(domains, n, "domains")?)
        };
        let loss = t.trainer.step_bags(x, n_bags, h, w, y, d)?;
        write_out(out_loss, loss, "out_loss")
    })
}

/// Logits (n × num_classes float32, row-major) of `n` crops with BN in eval mode (running
/// statistics) into `out_logits`, which holds `out_len` floats.
///
/// # Safety
/// `trainer` is a live trainer; `crops` points to n·c·h·w floats; `out_logits` to `out_len`
/// writable floats.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_predict(
    trainer: *mut PhenoTrainer,
    crops: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    out_logits: *mut f32,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_trainer_predict", || {
        let t = trainer_mut(trainer)?;
        let x = t.crops(crops, n, c, h, w)?;
        let k = t.config().num_classes;
        let need = checked_len::<f32>(&[n, k], "out_logits")?;
        if out_len < need {
            return Err(Error::Shape(format!(
                "out_len is {out_len} floats but the logits need n × num_classes = {n} × {k} = {need}"
            )));
        }
        if out_logits.is_null() {
            return Err(null("out_logits"));
        }
        let out = slice_mut(out_logits, need, "out_logits")?;
        let logits = t.trainer.predict(x, n, h, w)?;
        if logits.len() != need {
            return Err(Error::Internal(format!(
                "predict returned {} values for {need}",
                logits.len()
            )));
        }
        out.copy_from_slice(&logits);
        Ok(())
    })
}

/// Appends `n` crops (N, C, H, W float32) with their labels to the trainer's in-memory dataset for
/// `pheno_trainer_fit` (copied). `groups` (well id of each crop, e.g. plate-local well index) and
/// `plates` (plate id of each crop) may be NULL: without groups, the crops of one label on one
/// plate form one group for the leave-cells-out split; without plates, the crops are on plate 0.
/// Every call must use the same (C, H, W). Nothing is appended when an argument is rejected.
///
/// # Safety
/// `trainer` is a live trainer; `crops` points to n·c·h·w floats; `labels`, and `groups` and
/// `plates` when not NULL, to n values each.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_add_crops(
    trainer: *mut PhenoTrainer,
    crops: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    labels: *const u32,
    groups: *const u32,
    plates: *const u32,
) -> PhenoStatus {
    guard("pheno_trainer_add_crops", || {
        add_crops(
            trainer,
            crops,
            n,
            c,
            h,
            w,
            labels,
            groups,
            plates,
            std::ptr::null(),
        )
    })
}

/// `pheno_trainer_add_crops` with each crop's domain label for the domain-adversarial branch
/// (`opts->domain_count` > 0): `domains` points to n values in 0..domain_count (checked by
/// `pheno_trainer_fit`, which names the crop). Crops added without domains use their plate id.
///
/// # Safety
/// As `pheno_trainer_add_crops`; `domains` points to n values.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_add_crops_with_domains(
    trainer: *mut PhenoTrainer,
    crops: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    labels: *const u32,
    groups: *const u32,
    plates: *const u32,
    domains: *const u32,
) -> PhenoStatus {
    guard("pheno_trainer_add_crops_with_domains", || {
        if domains.is_null() {
            return Err(null("domains"));
        }
        add_crops(trainer, crops, n, c, h, w, labels, groups, plates, domains)
    })
}

/// # Safety
/// As `pheno_trainer_add_crops_with_domains`, `domains` may be NULL.
#[allow(clippy::too_many_arguments)]
unsafe fn add_crops(
    trainer: *mut PhenoTrainer,
    crops: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    labels: *const u32,
    groups: *const u32,
    plates: *const u32,
    domains: *const u32,
) -> Result<()> {
    {
        let t = trainer_mut(trainer)?;
        let x = t.crops(crops, n, c, h, w)?;
        if let Some(d) = t.data.dims {
            if d != (c, h, w) {
                return Err(Error::Shape(format!(
                    "crops are {c} × {h} × {w} but the crops added before are {} × {} × {}",
                    d.0, d.1, d.2
                )));
            }
        }
        let y = t.labels(labels, n)?;
        let g = if groups.is_null() {
            None
        } else {
            Some(slice(groups, n, "groups")?)
        };
        let p = if plates.is_null() {
            None
        } else {
            Some(slice(plates, n, "plates")?)
        };
        let dom = if domains.is_null() {
            None
        } else {
            Some(slice(domains, n, "domains")?)
        };
        let d = &mut t.data;
        d.crops
            .try_reserve(x.len())
            .map_err(|_| Error::OutOfMemory(format!("cannot hold {} more crop values", x.len())))?;
        d.crops.extend_from_slice(x);
        d.dims = Some((c, h, w));
        d.labels.extend_from_slice(y);
        match g {
            Some(g) => d.groups.extend(g.iter().map(|&v| Some(v))),
            None => d.groups.extend(std::iter::repeat_n(None, n)),
        }
        match p {
            Some(p) => d.plates.extend_from_slice(p),
            None => d.plates.extend(std::iter::repeat_n(0, n)),
        }
        match (dom, p) {
            (Some(v), _) | (None, Some(v)) => d.domains.extend_from_slice(v),
            (None, None) => d.domains.extend(std::iter::repeat_n(0, n)),
        }
        Ok(())
    }
}

/// Number of crops added with `pheno_trainer_add_crops` (and not cleared).
///
/// # Safety
/// `trainer` is a live trainer; `out_n` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_num_crops(
    trainer: *const PhenoTrainer,
    out_n: *mut usize,
) -> PhenoStatus {
    guard("pheno_trainer_num_crops", || {
        let t = reference(trainer, "trainer")?;
        if out_n.is_null() {
            return Err(null("out_n"));
        }
        write_out(out_n, t.data.labels.len(), "out_n")
    })
}

/// Drops every crop added with `pheno_trainer_add_crops` (the model and its state are kept).
///
/// # Safety
/// `trainer` is a live trainer.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_clear_crops(trainer: *mut PhenoTrainer) -> PhenoStatus {
    guard("pheno_trainer_clear_crops", || {
        trainer_mut(trainer)?.data = Pushed::default();
        Ok(())
    })
}

fn nan_or(v: Option<f64>) -> f64 {
    v.unwrap_or(f64::NAN)
}

fn epoch_progress(r: &EpochReport) -> PhenoTrainProgress {
    let v = r.validation.as_ref();
    PhenoTrainProgress {
        struct_size: size_of::<PhenoTrainProgress>(),
        epoch: r.epoch,
        step: r.steps,
        steps_in_epoch: r.steps,
        loss: r.train_loss,
        is_epoch_end: 1,
        lr: r.lr,
        train_loss: r.train_loss,
        train_accuracy: r.train_accuracy,
        val_accuracy: nan_or(v.map(|v| v.accuracy)),
        val_macro_f1: nan_or(v.map(|v| v.macro_f1)),
        val_top5: nan_or(v.and_then(|v| v.top_k.iter().find(|(k, _)| *k == 5).map(|p| p.1))),
    }
}

/// Trains on the crops added with `pheno_trainer_add_crops` until `epochs` epochs are done in total
/// (0 = `opts->epochs`; a trainer restored from a checkpoint continues where it stopped), with
/// class-balanced epochs, augmentation on `opts->workers` threads and validation after every epoch.
///
/// `split`: PHENO_SPLIT_NONE (all crops train), PHENO_SPLIT_CELLS (leave-cells-out:
/// round(`train_fraction` · cells) of every well train, drawn from `opts->seed`) or
/// PHENO_SPLIT_PLATES (crops on the `n_val_plates` plates `val_plates` validate). `checkpoint_path`
/// (NULL = none) gets an atomic checkpoint after every epoch; `best_path` (NULL = none) the best
/// model so far (validation accuracy, else training loss) as torchvision-named safetensors.
/// `progress` (NULL = none) is called after every step and every epoch; non-zero cancels with
/// PHENO_ERR_CANCELLED, the last checkpoint staying valid.
///
/// # Safety
/// `trainer` is a live trainer; `val_plates` points to `n_val_plates` values (may be NULL when 0);
/// the paths are NULL or NUL-terminated strings; `progress` is NULL or a valid callback taking
/// `user_data`.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_fit(
    trainer: *mut PhenoTrainer,
    split: i32,
    train_fraction: f64,
    val_plates: *const u32,
    n_val_plates: usize,
    epochs: u64,
    checkpoint_path: *const c_char,
    best_path: *const c_char,
    progress: PhenoTrainProgressFn,
    user_data: *mut c_void,
) -> PhenoStatus {
    guard("pheno_trainer_fit", || {
        let t = trainer_mut(trainer)?;
        let checkpoint = if checkpoint_path.is_null() {
            None
        } else {
            Some(c_path(checkpoint_path, "checkpoint_path")?)
        };
        let best = if best_path.is_null() {
            None
        } else {
            Some(c_path(best_path, "best_path")?)
        };
        let n = t.data.labels.len();
        let Some((c, h, w)) = t.data.dims.filter(|_| n > 0) else {
            return Err(Error::InvalidArgument(
                "no crops: add them with pheno_trainer_add_crops first".into(),
            ));
        };
        let mut rng = ChaCha8Rng::seed_from_u64(t.opts.seed ^ 0x5EED_5B11_7000_0001);
        let (train, val) = match split {
            0 => ((0..n).collect::<Vec<_>>(), Vec::new()),
            1 => {
                // One group per (plate, well), or per (plate, label) without well ids.
                let mut ids: BTreeMap<(u32, bool, u32), u32> = BTreeMap::new();
                let keys: Vec<u32> = (0..n)
                    .map(|i| {
                        let key = match t.data.groups[i] {
                            Some(g) => (t.data.plates[i], true, g),
                            None => (t.data.plates[i], false, t.data.labels[i]),
                        };
                        let next = ids.len() as u32;
                        *ids.entry(key).or_insert(next)
                    })
                    .collect();
                let s = leave_cells_out(&keys, train_fraction, &mut rng)?;
                (s.train, s.val)
            }
            2 => {
                let vp = slice(val_plates, n_val_plates, "val_plates")?;
                let wells: Vec<u32> = (0..n)
                    .map(|i| t.data.groups[i].unwrap_or(u32::MAX - t.data.labels[i]))
                    .collect();
                let s = leave_plates_out(&t.data.plates, &t.data.labels, &wells, vp)?;
                (s.split.train, s.split.val)
            }
            v => {
                return Err(Error::InvalidArgument(format!(
                    "split is {v}; expected PHENO_SPLIT_NONE (0), PHENO_SPLIT_CELLS (1) or PHENO_SPLIT_PLATES (2)"
                )))
            }
        };
        if train.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "the split leaves no training crops ({} crops, {} in validation)",
                n,
                val.len()
            )));
        }
        if epochs > 0 {
            t.set_epochs(epochs)?;
        }
        let mut data = Dataset::new(
            std::mem::take(&mut t.data.crops),
            c,
            h,
            w,
            t.data.labels.clone(),
        )?;
        if t.opts.domain_adversarial.is_some() {
            data.domains = Some(t.data.domains.clone());
        }
        let mut cb = |e: Event| -> bool {
            let Some(f) = progress else { return true };
            let p = match e {
                Event::Step {
                    epoch,
                    step,
                    steps_in_epoch,
                    loss,
                } => PhenoTrainProgress {
                    struct_size: size_of::<PhenoTrainProgress>(),
                    epoch,
                    step,
                    steps_in_epoch,
                    loss,
                    is_epoch_end: 0,
                    lr: f64::NAN,
                    train_loss: f64::NAN,
                    train_accuracy: f64::NAN,
                    val_accuracy: f64::NAN,
                    val_macro_f1: f64::NAN,
                    val_top5: f64::NAN,
                },
                Event::Epoch(r) => epoch_progress(r),
            };
            // SAFETY: the caller promised a valid callback taking its own user_data.
            unsafe { f(&p, user_data) == 0 }
        };
        let r = t
            .trainer
            .fit(&data, &train, &val, checkpoint, best, &mut cb);
        // Give the crops back to the handle (a second fit reuses them).
        t.data.crops = match std::sync::Arc::try_unwrap(data.data) {
            Ok(v) => v,
            Err(shared) => shared.as_ref().clone(),
        };
        r.map(|_| ())
    })
}

/// Writes the current weights and BN statistics as torchvision-named float32 safetensors (loadable
/// with `pheno_effnet_load`), atomically (temporary file renamed over `path`).
///
/// # Safety
/// `trainer` is a live trainer; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_save_weights(
    trainer: *const PhenoTrainer,
    path: *const c_char,
) -> PhenoStatus {
    guard("pheno_trainer_save_weights", || {
        let t = trainer_reading(trainer)?;
        let path = c_path(path, "path")?;
        t.trainer.inference_model()?.save(path)
    })
}

/// Writes a training checkpoint (weights, optimiser state, step and epoch counters, RNG state)
/// atomically: a failure leaves an earlier checkpoint at `path` as it was.
///
/// # Safety
/// `trainer` is a live trainer; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_save_checkpoint(
    trainer: *const PhenoTrainer,
    path: *const c_char,
) -> PhenoStatus {
    guard("pheno_trainer_save_checkpoint", || {
        let t = trainer_reading(trainer)?;
        let path = c_path(path, "path")?;
        t.trainer.save_checkpoint(path)
    })
}

/// Restores a checkpoint written by `pheno_trainer_save_checkpoint` (or by `fit`) into a trainer of
/// the same architecture and optimiser: the next step is exactly the one the saved run would have
/// taken. The trainer is unchanged when the checkpoint is rejected.
///
/// # Safety
/// `trainer` is a live trainer; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_load_checkpoint(
    trainer: *mut PhenoTrainer,
    path: *const c_char,
) -> PhenoStatus {
    guard("pheno_trainer_load_checkpoint", || {
        let t = trainer_mut(trainer)?;
        let path = c_path(path, "path")?;
        t.trainer.load_checkpoint(path)
    })
}

/// An inference model (`PhenoModel`, BN folded) with the trainer's current weights, for
/// `pheno_effnet_features` and friends; independent of the trainer afterwards. On success
/// `*out_model` owns it (free with `pheno_effnet_free`); on failure it is set to NULL.
///
/// # Safety
/// `trainer` is a live trainer; `out_model` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_to_model(
    trainer: *const PhenoTrainer,
    out_model: *mut *mut PhenoModel,
) -> PhenoStatus {
    let mut bytes = Vec::new();
    let mut mo = pheno_effnet_default_options();
    let st = guard("pheno_trainer_to_model", || {
        if out_model.is_null() {
            return Err(null("out_model"));
        }
        out_model.write_unaligned(std::ptr::null_mut());
        let t = trainer_reading(trainer)?;
        let cfg = t.config();
        mo.padding = match cfg.padding {
            Padding::Symmetric => PhenoPadding::PHENO_PADDING_SYMMETRIC,
            Padding::TfSame => PhenoPadding::PHENO_PADDING_TF_SAME,
        };
        mo.bn_eps = cfg.bn_eps;
        bytes = crate::io::safetensors::to_bytes(&t.trainer.model()?.state_dict()?)?;
        Ok(())
    });
    if st != PhenoStatus::PHENO_OK {
        return st;
    }
    pheno_effnet_load_from_memory(bytes.as_ptr(), bytes.len(), &mo, out_model)
}

/// Optimiser steps taken so far (`pheno_trainer_step` and `fit`, restored by checkpoints) and
/// completed `fit` epochs.
///
/// # Safety
/// `trainer` is a live trainer; the out-pointers are valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_steps(
    trainer: *const PhenoTrainer,
    out_steps: *mut u64,
    out_epochs: *mut u64,
) -> PhenoStatus {
    guard("pheno_trainer_steps", || {
        let t = reference(trainer, "trainer")?;
        if out_steps.is_null() {
            return Err(null("out_steps"));
        }
        if out_epochs.is_null() {
            return Err(null("out_epochs"));
        }
        write_out(out_steps, t.trainer.steps(), "out_steps")?;
        write_out(out_epochs, t.trainer.epochs_done(), "out_epochs")
    })
}

/// Releases a trainer and its crops. Accepts NULL.
///
/// # Safety
/// `trainer` is NULL or a live trainer not used by any other call, now or later.
#[no_mangle]
pub unsafe extern "C" fn pheno_trainer_free(trainer: *mut PhenoTrainer) {
    if !trainer.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(Box::from_raw(trainer))
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crops(n: usize, c: usize, hw: usize) -> Vec<f32> {
        (0..n * c * hw * hw)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect()
    }

    unsafe fn small() -> *mut PhenoTrainer {
        let mut o = pheno_trainer_default_options();
        o.batch_size = 4;
        o.epochs = 1;
        let mut t = std::ptr::null_mut();
        assert_eq!(
            pheno_trainer_new(&o, 2, 3, 1, std::ptr::null(), &mut t),
            PhenoStatus::PHENO_OK
        );
        t
    }

    #[test]
    fn step_checks_inputs() {
        unsafe {
            let t = small();
            let x = crops(2, 2, 32);
            let mut loss = 0.0;
            let ok = pheno_trainer_step(t, x.as_ptr(), 2, 2, 32, 32, [0u32, 2].as_ptr(), &mut loss);
            assert_eq!(ok, PhenoStatus::PHENO_OK);
            assert!(loss.is_finite() && loss > 0.0, "{loss}");
            let bad =
                pheno_trainer_step(t, x.as_ptr(), 2, 2, 32, 32, [0u32, 3].as_ptr(), &mut loss);
            assert_eq!(bad, PhenoStatus::PHENO_ERR_INVALID_ARGUMENT);
            let msg = std::ffi::CStr::from_ptr(super::super::boundary::last_error_ptr())
                .to_string_lossy()
                .into_owned();
            assert!(msg.contains("crop 1"), "{msg}");
            let shape = pheno_trainer_step(t, x.as_ptr(), 1, 4, 32, 32, [0u32].as_ptr(), &mut loss);
            assert_eq!(shape, PhenoStatus::PHENO_ERR_SHAPE);
            let mut y = x.clone();
            y[2 * 32 * 32 + 5] = f32::NAN;
            let nan =
                pheno_trainer_step(t, y.as_ptr(), 2, 2, 32, 32, [0u32, 1].as_ptr(), &mut loss);
            assert_eq!(nan, PhenoStatus::PHENO_ERR_NON_FINITE);
            let (mut s, mut e) = (0u64, 0u64);
            assert_eq!(
                pheno_trainer_steps(t, &mut s, &mut e),
                PhenoStatus::PHENO_OK
            );
            assert_eq!((s, e), (1, 0));
            pheno_trainer_free(t);
        }
    }

    #[test]
    fn options_reject_bad_values() {
        let mut o = pheno_trainer_default_options();
        o.schedule = PhenoLrSchedule::PHENO_SCHEDULE_MULTISTEP;
        let m = [3u64, 2];
        o.milestones = m.as_ptr();
        o.n_milestones = 2;
        let e = unsafe { trainer_opts(&o) }.unwrap_err();
        assert!(e.to_string().contains("milestones[1]"), "{e}");
        let mut o = pheno_trainer_default_options();
        o.label_smoothing = 2.0;
        assert!(unsafe { trainer_opts(&o) }.is_err());
        let mut raw = pheno_trainer_default_options();
        unsafe { (std::ptr::addr_of_mut!(raw.optimizer) as *mut i32).write(9) };
        let e = unsafe { trainer_opts(&raw) }.unwrap_err();
        assert!(e.to_string().contains("opts->optimizer is 9"), "{e}");
        // An older caller's shorter struct: the fields it lacks keep their defaults.
        let mut o = pheno_trainer_default_options();
        o.lr = 0.1;
        o.epochs = 3;
        o.struct_size = offset_of!(PhenoTrainerOptions, momentum);
        let r = unsafe { trainer_opts(&o) }.unwrap();
        assert_eq!((r.lr, r.epochs), (0.1, 30));
        assert_eq!(
            unsafe { trainer_opts(std::ptr::null()) }.unwrap(),
            TrainerOptions::default()
        );
    }
}
