//! Named feature layers: Keras names (DeepProfiler) and torchvision module paths → tap points.

use super::config::{BlockSpec, BLOCKS, STEM_CH, TOP_CH};
use crate::error::{Error, Result};

/// Where in the forward pass a tensor is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TapPoint {
    /// Stem conv + BN + SiLU.
    Stem,
    /// Block b: expand 1×1 + BN + SiLU.
    Expand(usize),
    /// Block b: depthwise + BN + SiLU (Keras `blockXy_activation`).
    Depthwise(usize),
    /// Block b: after the squeeze-excite multiply.
    SeExcite(usize),
    /// Block b: project 1×1 + BN, before the residual.
    Project(usize),
    /// Block b output (after the residual when there is one).
    Output(usize),
    /// Head 1×1 conv + BN + SiLU (`top_activation`); pooled = `avg_pool`.
    Top,
    /// Classifier output.
    Logits,
}

impl TapPoint {
    /// Order of computation; a pass can stop after the deepest requested tap.
    pub fn order(self) -> (usize, usize) {
        match self {
            TapPoint::Stem => (0, 0),
            TapPoint::Expand(b) => (b + 1, 0),
            TapPoint::Depthwise(b) => (b + 1, 1),
            TapPoint::SeExcite(b) => (b + 1, 2),
            TapPoint::Project(b) => (b + 1, 3),
            TapPoint::Output(b) => (b + 1, 4),
            TapPoint::Top => (BLOCKS.len() + 1, 0),
            TapPoint::Logits => (BLOCKS.len() + 2, 0),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerTap {
    pub name: String,
    pub point: TapPoint,
    channels: usize,
}

impl LayerTap {
    pub fn channels(&self) -> usize {
        self.channels
    }
    /// The logits (channels = classes, filled in by the model).
    pub fn logits() -> Self {
        LayerTap {
            name: "logits".into(),
            point: TapPoint::Logits,
            channels: 0,
        }
    }
}

fn block_channels(point: TapPoint) -> usize {
    match point {
        TapPoint::Stem => STEM_CH,
        TapPoint::Expand(b) | TapPoint::Depthwise(b) | TapPoint::SeExcite(b) => BLOCKS[b].hidden(),
        TapPoint::Project(b) | TapPoint::Output(b) => BLOCKS[b].out_ch,
        TapPoint::Top => TOP_CH,
        TapPoint::Logits => 0,
    }
}

fn tap(name: &str, point: TapPoint) -> LayerTap {
    LayerTap {
        name: name.to_string(),
        point,
        channels: block_channels(point),
    }
}

fn find_block(pred: impl Fn(&BlockSpec) -> bool) -> Option<usize> {
    BLOCKS.iter().position(pred)
}

const SUPPORTED: &str = "Keras names stem_activation, block{1-7}{a-d}_{expand_activation,activation,se_excite,project_bn,add}, \
top_activation, avg_pool, logits; torchvision paths features.0, features.S, features.S.J, features.S.J.block.K, features.8, avgpool, classifier";

/// Resolves a layer name (Keras or torchvision) to a tap. Logits report 0 channels here; the model knows its classes.
pub fn resolve(name: &str) -> Result<LayerTap> {
    let unknown = || {
        Error::UnknownLayer(format!(
            "{name:?} is not a layer of EfficientNet-B0 (supported: {SUPPORTED})"
        ))
    };
    match name {
        "stem_activation" | "features.0" => return Ok(tap(name, TapPoint::Stem)),
        "top_activation" | "features.8" | "features" | "avg_pool" | "avgpool" => {
            return Ok(tap(name, TapPoint::Top))
        }
        "logits" | "classifier" | "classifier.1" => return Ok(tap(name, TapPoint::Logits)),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("block") {
        let mut ch = rest.chars();
        let stage = ch.next().and_then(|c| c.to_digit(10)).ok_or_else(unknown)? as usize;
        let letter = ch.next().ok_or_else(unknown)?;
        if !letter.is_ascii_lowercase() {
            return Err(unknown());
        }
        let index = (letter as u8 - b'a') as usize;
        let b = find_block(|s| s.stage == stage && s.index == index).ok_or_else(unknown)?;
        let suffix = ch.as_str().strip_prefix('_').ok_or_else(unknown)?;
        let point = match suffix {
            "expand_activation" if BLOCKS[b].expand != 1 => TapPoint::Expand(b),
            "activation" => TapPoint::Depthwise(b),
            "se_excite" => TapPoint::SeExcite(b),
            "project_bn" => TapPoint::Project(b),
            "add" if BLOCKS[b].residual() => TapPoint::Output(b),
            _ => return Err(unknown()),
        };
        return Ok(tap(name, point));
    }
    if let Some(rest) = name.strip_prefix("features.") {
        let parts: Vec<&str> = rest.split('.').collect();
        let num = |s: &str| s.parse::<usize>().map_err(|_| unknown());
        let stage = num(parts[0])?;
        if !(1..=7).contains(&stage) {
            return Err(unknown());
        }
        let point = match parts.len() {
            1 => TapPoint::Output(
                find_block(|s| s.stage == stage)
                    .map(|b| b + BLOCKS.iter().filter(|s| s.stage == stage).count() - 1)
                    .ok_or_else(unknown)?,
            ),
            2 | 4 => {
                let index = num(parts[1])?;
                let b = find_block(|s| s.stage == stage && s.index == index).ok_or_else(unknown)?;
                if parts.len() == 2 {
                    TapPoint::Output(b)
                } else {
                    if parts[2] != "block" {
                        return Err(unknown());
                    }
                    let k = num(parts[3])?;
                    let has_expand = BLOCKS[b].expand != 1;
                    match (has_expand, k) {
                        (true, 0) => TapPoint::Expand(b),
                        (true, 1) | (false, 0) => TapPoint::Depthwise(b),
                        (true, 2) | (false, 1) => TapPoint::SeExcite(b),
                        (true, 3) | (false, 2) => TapPoint::Project(b),
                        _ => return Err(unknown()),
                    }
                }
            }
            _ => return Err(unknown()),
        };
        return Ok(tap(name, point));
    }
    Err(unknown())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block6a_activation_is_features_6_0_block_1() {
        let k = resolve("block6a_activation").unwrap();
        let t = resolve("features.6.0.block.1").unwrap();
        assert_eq!(k.point, t.point);
        assert_eq!(k.channels(), 672);
        assert_eq!(
            resolve("block6a_expand_activation").unwrap().channels(),
            672
        );
        assert_ne!(resolve("block6a_expand_activation").unwrap().point, k.point);
        assert_eq!(resolve("top_activation").unwrap().channels(), 1280);
        assert_eq!(
            resolve("features.1.0.block.0").unwrap().point,
            TapPoint::Depthwise(0)
        );
        assert_eq!(resolve("features.6").unwrap().point, TapPoint::Output(14));
        assert_eq!(resolve("block2b_add").unwrap().point, TapPoint::Output(2));
    }

    #[test]
    fn unknown_layers_are_named() {
        for bad in [
            "block8a_activation",
            "block1a_expand_activation",
            "block2a_add",
            "features.9",
            "features.6.0.block.7",
            "conv1",
            "block6e_activation",
            "",
        ] {
            let e = resolve(bad).unwrap_err();
            assert!(matches!(e, Error::UnknownLayer(_)), "{bad}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
