use crate::error::{Error, Result};

/// How convolutions pad.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// torchvision: (k − 1) / 2 on every side.
    Symmetric,
    /// TensorFlow "SAME" (Keras / DeepProfiler weights): total max((out−1)·s + k − in, 0), extra on bottom/right.
    TfSame,
}

impl Padding {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "symmetric" => Ok(Padding::Symmetric),
            "tf_same" => Ok(Padding::TfSame),
            _ => Err(Error::InvalidArgument(format!(
                "unknown padding {s:?}: expected symmetric or tf_same"
            ))),
        }
    }

    /// (output size, padding before) for one spatial dim.
    pub fn out_and_pad(self, input: usize, kernel: usize, stride: usize) -> (usize, usize) {
        match self {
            Padding::Symmetric => {
                let p = (kernel - 1) / 2;
                ((input + 2 * p - kernel) / stride + 1, p)
            }
            Padding::TfSame => {
                let out = input.div_ceil(stride);
                let total = ((out - 1) * stride + kernel).saturating_sub(input);
                (out, total / 2)
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EfficientNetConfig {
    pub in_channels: usize,
    pub num_classes: usize,
    pub padding: Padding,
    /// BN epsilon: 1e-5 torchvision, 1e-3 Keras.
    pub bn_eps: f32,
}

/// Arithmetic of the 1 × 1 / stem convolutions (the GEMMs). Depthwise, SE and the classifier stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 throughout (default; matches the float64 reference to ~1e-5).
    #[default]
    F32,
    /// Opt-in: GEMM inputs rounded to bf16, f32 accumulation (AVX512_BF16 CPUs only).
    Bf16,
}

impl Default for EfficientNetConfig {
    fn default() -> Self {
        // Cell Painting: 5 channels (DNA, RNA, ER, AGP, Mito); torchvision conventions.
        EfficientNetConfig {
            in_channels: 5,
            num_classes: 1000,
            padding: Padding::Symmetric,
            bn_eps: 1e-5,
        }
    }
}

/// One MBConv block of EfficientNet-B0.
#[derive(Clone, Copy, Debug)]
pub struct BlockSpec {
    /// Stage 1..=7 (torchvision `features.{stage}`).
    pub stage: usize,
    /// Index inside the stage (torchvision `features.{stage}.{index}`, Keras letter a, b, c, d).
    pub index: usize,
    pub expand: usize,
    pub kernel: usize,
    pub stride: usize,
    pub in_ch: usize,
    pub out_ch: usize,
}

impl BlockSpec {
    pub fn hidden(&self) -> usize {
        self.in_ch * self.expand
    }
    /// SE width: max(1, block input channels / 4) (REFERENCE §1).
    pub fn se_width(&self) -> usize {
        (self.in_ch / 4).max(1)
    }
    pub fn residual(&self) -> bool {
        self.stride == 1 && self.in_ch == self.out_ch
    }
    pub fn keras_prefix(&self) -> String {
        format!("block{}{}", self.stage, (b'a' + self.index as u8) as char)
    }
    pub fn torch_prefix(&self) -> String {
        format!("features.{}.{}.block", self.stage, self.index)
    }
}

macro_rules! b {
    ($s:expr, $i:expr, $e:expr, $k:expr, $st:expr, $in:expr, $out:expr) => {
        BlockSpec {
            stage: $s,
            index: $i,
            expand: $e,
            kernel: $k,
            stride: $st,
            in_ch: $in,
            out_ch: $out,
        }
    };
}

/// The 16 MBConv blocks of EfficientNet-B0 (REFERENCE §1 table).
pub const BLOCKS: [BlockSpec; 16] = [
    b!(1, 0, 1, 3, 1, 32, 16),
    b!(2, 0, 6, 3, 2, 16, 24),
    b!(2, 1, 6, 3, 1, 24, 24),
    b!(3, 0, 6, 5, 2, 24, 40),
    b!(3, 1, 6, 5, 1, 40, 40),
    b!(4, 0, 6, 3, 2, 40, 80),
    b!(4, 1, 6, 3, 1, 80, 80),
    b!(4, 2, 6, 3, 1, 80, 80),
    b!(5, 0, 6, 5, 1, 80, 112),
    b!(5, 1, 6, 5, 1, 112, 112),
    b!(5, 2, 6, 5, 1, 112, 112),
    b!(6, 0, 6, 5, 2, 112, 192),
    b!(6, 1, 6, 5, 1, 192, 192),
    b!(6, 2, 6, 5, 1, 192, 192),
    b!(6, 3, 6, 5, 1, 192, 192),
    b!(7, 0, 6, 3, 1, 192, 320),
];

pub const STEM_CH: usize = 32;
pub const TOP_CH: usize = 1280;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn se_widths_match_reference() {
        let w: Vec<usize> = BLOCKS.iter().map(|b| b.se_width()).collect();
        assert_eq!(
            w,
            vec![8, 4, 6, 6, 10, 10, 20, 20, 20, 28, 28, 28, 48, 48, 48, 48]
        );
    }

    #[test]
    fn tf_same_padding_matches_reference() {
        // REFERENCE §1: stride 2, even input: k3 → (0,1), k5 → (1,2).
        assert_eq!(Padding::TfSame.out_and_pad(128, 3, 2), (64, 0));
        assert_eq!(Padding::TfSame.out_and_pad(16, 5, 2), (8, 1));
        assert_eq!(Padding::TfSame.out_and_pad(8, 5, 1), (8, 2));
        assert_eq!(Padding::Symmetric.out_and_pad(128, 3, 2), (64, 1));
        assert_eq!(Padding::Symmetric.out_and_pad(16, 5, 2), (8, 2));
    }
}
