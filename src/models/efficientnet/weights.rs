//! EfficientNet-B0 parameters in torchvision naming: expected shapes, validation, init, stem expansion.

use super::config::{BlockSpec, EfficientNetConfig, Padding, BLOCKS, STEM_CH, TOP_CH};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

/// Parameter name → f32 CPU tensor (torchvision keys).
pub type StateDict = crate::io::safetensors::TensorMap;

pub const BN_SUFFIXES: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

/// Key prefixes of a block's sub-layers: (expand conv+BN, dw conv+BN, SE, project conv, project BN).
pub struct BlockKeys {
    pub expand: Option<String>,
    pub dw: String,
    pub se: String,
    pub project: String,
}

pub fn block_keys(b: &BlockSpec) -> BlockKeys {
    let p = b.torch_prefix();
    if b.expand == 1 {
        BlockKeys {
            expand: None,
            dw: format!("{p}.0"),
            se: format!("{p}.1"),
            project: format!("{p}.2"),
        }
    } else {
        BlockKeys {
            expand: Some(format!("{p}.0")),
            dw: format!("{p}.1"),
            se: format!("{p}.2"),
            project: format!("{p}.3"),
        }
    }
}

/// Every parameter with its shape, in forward order.
pub fn expected_shapes(cfg: &EfficientNetConfig) -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    let conv_bn = |v: &mut Vec<(String, Vec<usize>)>, prefix: &str, w: Vec<usize>| {
        let c = w[0];
        v.push((format!("{prefix}.0.weight"), w));
        for s in BN_SUFFIXES {
            v.push((format!("{prefix}.1.{s}"), vec![c]));
        }
    };
    conv_bn(&mut v, "features.0", vec![STEM_CH, cfg.in_channels, 3, 3]);
    for b in &BLOCKS {
        let k = block_keys(b);
        let h = b.hidden();
        if let Some(e) = &k.expand {
            conv_bn(&mut v, e, vec![h, b.in_ch, 1, 1]);
        }
        conv_bn(&mut v, &k.dw, vec![h, 1, b.kernel, b.kernel]);
        let sq = b.se_width();
        v.push((format!("{}.fc1.weight", k.se), vec![sq, h, 1, 1]));
        v.push((format!("{}.fc1.bias", k.se), vec![sq]));
        v.push((format!("{}.fc2.weight", k.se), vec![h, sq, 1, 1]));
        v.push((format!("{}.fc2.bias", k.se), vec![h]));
        conv_bn(&mut v, &k.project, vec![b.out_ch, h, 1, 1]);
    }
    conv_bn(&mut v, "features.8", vec![TOP_CH, BLOCKS[15].out_ch, 1, 1]);
    v.push(("classifier.1.weight".into(), vec![cfg.num_classes, TOP_CH]));
    v.push(("classifier.1.bias".into(), vec![cfg.num_classes]));
    v
}

/// Reads in-channels and classes from the stem and classifier shapes.
pub fn config_from_state_dict(
    state: &StateDict,
    padding: Padding,
    bn_eps: f32,
) -> Result<EfficientNetConfig> {
    if !(bn_eps.is_finite() && bn_eps > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "BN epsilon must be a positive number, got {bn_eps}"
        )));
    }
    let stem = state.get("features.0.0.weight").ok_or_else(|| {
        Error::MissingKey("missing key \"features.0.0.weight\" (stem convolution)".into())
    })?;
    let cls = state.get("classifier.1.weight").ok_or_else(|| {
        Error::MissingKey("missing key \"classifier.1.weight\" (classifier)".into())
    })?;
    if stem.rank() != 4 || stem.shape()[1] == 0 {
        return Err(Error::Shape(format!(
            "\"features.0.0.weight\" has shape {:?}, expected [32, C, 3, 3]",
            stem.shape()
        )));
    }
    if cls.rank() != 2 || cls.shape()[0] == 0 {
        return Err(Error::Shape(format!(
            "\"classifier.1.weight\" has shape {:?}, expected [classes, 1280]",
            cls.shape()
        )));
    }
    Ok(EfficientNetConfig {
        in_channels: stem.shape()[1],
        num_classes: cls.shape()[0],
        padding,
        bn_eps,
    })
}

/// Every expected key present with its shape, no extra keys, all values finite.
pub fn validate(state: &StateDict, cfg: &EfficientNetConfig) -> Result<()> {
    let expected = expected_shapes(cfg);
    for (name, shape) in &expected {
        match state.get(name) {
            None => {
                return Err(Error::MissingKey(format!(
                    "missing key {name:?} (expected shape {shape:?})"
                )))
            }
            Some(t) if t.shape() != shape.as_slice() => {
                return Err(Error::Shape(format!(
                    "key {name:?} has shape {:?}, expected {shape:?}",
                    t.shape()
                )))
            }
            Some(t) => t.check_finite(&format!("weight {name:?}"))?,
        }
    }
    if state.len() != expected.len() {
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        let extra: Vec<&String> = state
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .collect();
        return Err(Error::MissingKey(format!(
            "unexpected keys for EfficientNet-B0: {extra:?}"
        )));
    }
    Ok(())
}

/// torchvision's initialisation, deterministic in `seed`.
pub fn init_state_dict(cfg: &EfficientNetConfig, seed: u64) -> StateDict {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut state = StateDict::new();
    for (name, shape) in expected_shapes(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name == "classifier.1.weight" {
            // torchvision: uniform(−1/√out, 1/√out)
            let r = 1.0 / (shape[0] as f32).sqrt();
            let u = Uniform::new_inclusive(-r, r);
            (0..n).map(|_| u.sample(&mut rng)).collect()
        } else if shape.len() == 4 {
            // kaiming_normal_(mode="fan_out"): std = √(2 / (out · kh · kw))
            let std = (2.0 / (shape[0] * shape[2] * shape[3]) as f32).sqrt();
            let d = Normal::new(0.0f32, std).unwrap_or(Normal::new(0.0, 1.0).expect("unit normal"));
            (0..n).map(|_| d.sample(&mut rng)).collect()
        } else if name.ends_with(".1.weight") || name.ends_with("running_var") {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        state.insert(
            name,
            Tensor::from_f32(&shape, data).expect("shape from expected_shapes"),
        );
    }
    state
}

/// Expands an ImageNet 3-channel stem kernel [32, 3, 3, 3] to `channels` input channels:
/// channel i = ImageNet channel i % 3 (REFERENCE §1).
pub fn expand_stem_channels(state: &mut StateDict, channels: usize) -> Result<()> {
    let key = "features.0.0.weight";
    let w = state
        .get(key)
        .ok_or_else(|| Error::MissingKey(format!("missing key {key:?}")))?;
    let s = w.shape().to_vec();
    if s.len() != 4 || channels == 0 {
        return Err(Error::Shape(format!(
            "{key:?} has shape {s:?}; cannot expand to {channels} channels"
        )));
    }
    let (o, c, kh, kw) = (s[0], s[1], s[2], s[3]);
    let src = w.as_f32()?;
    let mut out = vec![0f32; o * channels * kh * kw];
    for oc in 0..o {
        for i in 0..channels {
            let from = &src[(oc * c + i % c) * kh * kw..][..kh * kw];
            out[(oc * channels + i) * kh * kw..][..kh * kw].copy_from_slice(from);
        }
    }
    state.insert(key.into(), Tensor::from_f32(&[o, channels, kh, kw], out)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_count_matches_torchvision() {
        // torchvision efficientnet_b0 (3 → 1000): 5,288,548 parameters (+ BN running stats, not counted).
        let cfg = EfficientNetConfig {
            in_channels: 3,
            num_classes: 1000,
            ..Default::default()
        };
        let params: usize = expected_shapes(&cfg)
            .iter()
            .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(params, 5_288_548);
    }

    #[test]
    fn validation_names_the_key() {
        let cfg = EfficientNetConfig {
            num_classes: 7,
            ..Default::default()
        };
        let mut s = init_state_dict(&cfg, 1);
        validate(&s, &cfg).unwrap();
        s.insert(
            "features.3.1.block.1.0.weight".into(),
            Tensor::from_f32(&[240, 1, 3, 3], vec![0.0; 2160]).unwrap(),
        );
        let e = validate(&s, &cfg).unwrap_err().to_string();
        assert!(
            e.contains("features.3.1.block.1.0.weight")
                && e.contains("[240, 1, 5, 5]")
                && e.contains("[240, 1, 3, 3]"),
            "{e}"
        );
        s.remove("features.3.1.block.1.0.weight");
        let e = validate(&s, &cfg).unwrap_err().to_string();
        assert!(
            e.contains("missing key \"features.3.1.block.1.0.weight\""),
            "{e}"
        );
        let mut s = init_state_dict(&cfg, 1);
        s.insert(
            "extra.bias".into(),
            Tensor::from_f32(&[1], vec![0.0]).unwrap(),
        );
        assert!(validate(&s, &cfg)
            .unwrap_err()
            .to_string()
            .contains("extra.bias"));
    }

    #[test]
    fn stem_expansion_repeats_imagenet_channels() {
        let cfg = EfficientNetConfig {
            in_channels: 3,
            num_classes: 2,
            ..Default::default()
        };
        let mut s = init_state_dict(&cfg, 3);
        let orig = s["features.0.0.weight"].as_f32().unwrap().to_vec();
        expand_stem_channels(&mut s, 5).unwrap();
        let w = s["features.0.0.weight"].as_f32().unwrap();
        assert_eq!(s["features.0.0.weight"].shape(), &[32, 5, 3, 3]);
        for o in 0..32 {
            for i in 0..5 {
                assert_eq!(
                    &w[(o * 5 + i) * 9..][..9],
                    &orig[(o * 3 + i % 3) * 9..][..9]
                );
            }
        }
    }
}
