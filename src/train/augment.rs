//! Training-time augmentation of single-cell crops (REFERENCE §2), following DeepProfiler's
//! `deepprofiler/imaging/augmentations.py` (`augment` = `random_crop` → `random_flips` →
//! `random_illumination`):
//!
//! 1. **Crop** with probability `crop_p`: a square side drawn as an *integer* uniform in
//!    `[⌊lo·h⌋, ⌊hi·h⌋)` (DeepProfiler: `tf.random.uniform(minval=int(w*0.8), maxval=w, int32)`, so
//!    102..=127 for 128), at an integer offset uniform in `0..=h−side` (`tf.image.random_crop`),
//!    resized back to h × w bilinearly with half-pixel centres (`tf.image.resize` in TF2 =
//!    `ResizeBilinear(half_pixel_centers=True)`, no antialias). That convention is identical to
//!    `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`: source coordinate
//!    `(x + 0.5)·in/out − 0.5`, clamped at 0 below and at the last pixel above.
//!    Non-square crops: the height side is drawn as above and the width side is
//!    `round(side_h·w/h)` (DeepProfiler only handles square crops).
//! 2. **Flip** left-right with p = 0.5, then **rot90** counter-clockwise k ∈ {0,1,2,3} times
//!    (`tf.image.rot90`, = `np.rot90` on the (h, w) axes). rot90 needs a square crop: a non-square
//!    crop with `rot90` enabled is a `Shape` error.
//! 3. **Illumination**, per channel independently: brightness shift b ~ U(−β, β)
//!    (`tf.image.adjust_brightness`: x + b), then contrast factor f ~ U(lo, hi)
//!    (`tf.image.adjust_contrast`: (x − mean) · f + mean, mean over the channel's pixels after the
//!    shift). Together: `x' = (x − m)·f + m + b` with m the channel mean before the shift.
//!    DeepProfiler routes each channel through `grayscale_to_rgb` / `rgb_to_grayscale`, which scales
//!    it by 0.2989 + 0.587 + 0.114 = 0.9999; that artefact is not reproduced.
//!
//! Draw order from the RNG (fixed, part of determinism): crop coin, side, y offset, x offset (the
//! last three only when cropping), flip coin, k, then per channel brightness, contrast. Disabled
//! parts draw nothing.

use crate::error::{Error, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Augmentation parameters. `Default` = REFERENCE §2 / DeepProfiler; `none()` = identity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augmentation {
    /// Probability of the random crop (0 disables it).
    pub crop_p: f32,
    /// Crop side as a fraction of the crop size: integer side in `[⌊lo·h⌋, ⌊hi·h⌋)`.
    pub crop_scale: (f32, f32),
    /// Random horizontal flip with p = 0.5.
    pub flip: bool,
    /// Random rot90 with k uniform in {0, 1, 2, 3}.
    pub rot90: bool,
    /// Per-channel brightness shift U(−brightness, brightness) (0 disables it).
    pub brightness: f32,
    /// Per-channel contrast factor U(lo, hi) around the channel mean ((1, 1) disables it).
    pub contrast: (f32, f32),
}

impl Default for Augmentation {
    fn default() -> Self {
        // CP-CNN paper, Methods / DeepProfiler augmentations.py
        Augmentation {
            crop_p: 0.5,
            crop_scale: (0.8, 1.0),
            flip: true,
            rot90: true,
            brightness: 0.1,
            contrast: (0.8, 1.2),
        }
    }
}

/// The random draws of one `augment` call; `apply` with these reproduces it.
#[derive(Clone, Debug, PartialEq)]
pub struct AugmentParams {
    /// `(y0, x0, side_h, side_w)` of the crop window, or None.
    pub crop: Option<(usize, usize, usize, usize)>,
    pub flip: bool,
    /// Counter-clockwise quarter turns.
    pub rot_k: u8,
    /// Per channel brightness shift (empty when disabled).
    pub brightness: Vec<f32>,
    /// Per channel contrast factor (empty when disabled).
    pub contrast: Vec<f32>,
}

fn numel(c: usize, h: usize, w: usize) -> Result<usize> {
    if c == 0 || h == 0 || w == 0 {
        return Err(Error::Shape(format!(
            "augment: crop dims must be positive, got c={c}, h={h}, w={w}"
        )));
    }
    c.checked_mul(h)
        .and_then(|v| v.checked_mul(w))
        .ok_or_else(|| Error::Shape(format!("augment: c·h·w overflows ({c}×{h}×{w})")))
}

fn check_dims(len: usize, c: usize, h: usize, w: usize) -> Result<()> {
    if len != numel(c, h, w)? {
        return Err(Error::shape_mismatch(
            "augment: crop buffer",
            &[c, h, w],
            &[len],
        ));
    }
    Ok(())
}

impl Augmentation {
    /// No augmentation at all (validation / inference).
    pub fn none() -> Self {
        Augmentation {
            crop_p: 0.0,
            crop_scale: (1.0, 1.0),
            flip: false,
            rot90: false,
            brightness: 0.0,
            contrast: (1.0, 1.0),
        }
    }

    /// Checks every field; errors name the field and value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("Augmentation: {m}")));
        if !(0.0..=1.0).contains(&self.crop_p) {
            return bad(format!("crop_p must be in [0, 1], got {}", self.crop_p));
        }
        let (lo, hi) = self.crop_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return bad(format!(
                "crop_scale must satisfy 0 < lo <= hi <= 1, got ({lo}, {hi})"
            ));
        }
        if !(self.brightness.is_finite() && self.brightness >= 0.0) {
            return bad(format!(
                "brightness must be finite and >= 0, got {}",
                self.brightness
            ));
        }
        let (clo, chi) = self.contrast;
        if !(clo.is_finite() && chi.is_finite() && clo >= 0.0 && clo <= chi) {
            return bad(format!(
                "contrast must satisfy 0 <= lo <= hi (finite), got ({clo}, {chi})"
            ));
        }
        Ok(())
    }

    /// Draws the random parameters for one c × h × w crop (see the module doc for the order).
    pub fn draw(
        &self,
        c: usize,
        h: usize,
        w: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<AugmentParams> {
        self.validate()?;
        numel(c, h, w)?;
        if self.rot90 && h != w {
            return Err(Error::Shape(format!(
                "augment: rot90 needs square crops, got h={h}, w={w} (disable rot90)"
            )));
        }
        let mut p = AugmentParams {
            crop: None,
            flip: false,
            rot_k: 0,
            brightness: Vec::new(),
            contrast: Vec::new(),
        };
        if self.crop_p > 0.0 && rng.gen::<f32>() < self.crop_p {
            let lo = ((self.crop_scale.0 * h as f32).floor() as usize).clamp(1, h);
            let hi = (self.crop_scale.1 * h as f32).floor() as usize;
            let side_h = if hi > lo { rng.gen_range(lo..hi) } else { lo };
            let side_w = if h == w {
                side_h
            } else {
                ((side_h as f64 * w as f64 / h as f64).round() as usize).clamp(1, w)
            };
            let y0 = rng.gen_range(0..=h - side_h);
            let x0 = rng.gen_range(0..=w - side_w);
            p.crop = Some((y0, x0, side_h, side_w));
        }
        if self.flip {
            p.flip = rng.gen::<bool>();
        }
        if self.rot90 {
            p.rot_k = rng.gen_range(0..4u8);
        }
        let (clo, chi) = self.contrast;
        let contrast_on = !(clo == 1.0 && chi == 1.0);
        if self.brightness > 0.0 || contrast_on {
            let b = self.brightness;
            for _ in 0..c {
                if b > 0.0 {
                    p.brightness.push(rng.gen_range(-b..b));
                }
                if contrast_on {
                    p.contrast.push(if chi > clo {
                        rng.gen_range(clo..chi)
                    } else {
                        clo
                    });
                }
            }
        }
        Ok(p)
    }

    /// Augments one c × h × w crop (row-major, channel first) in place. `scratch` is reused
    /// between calls to avoid allocation.
    pub fn augment(
        &self,
        crop: &mut [f32],
        c: usize,
        h: usize,
        w: usize,
        rng: &mut ChaCha8Rng,
        scratch: &mut Vec<f32>,
    ) -> Result<()> {
        check_dims(crop.len(), c, h, w)?;
        let p = self.draw(c, h, w, rng)?;
        apply(&p, crop, c, h, w, scratch)
    }
}

impl Augmentation {
    /// Augments `n` crops of c × h × w stored back to back, one after the other from `rng`.
    pub fn augment_batch(
        &self,
        batch: &mut [f32],
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        rng: &mut ChaCha8Rng,
        scratch: &mut Vec<f32>,
    ) -> Result<()> {
        let per = numel(c, h, w)?;
        if per.checked_mul(n) != Some(batch.len()) {
            return Err(Error::shape_mismatch(
                "augment_batch: batch buffer",
                &[n, c, h, w],
                &[batch.len()],
            ));
        }
        for crop in batch.chunks_exact_mut(per) {
            self.augment(crop, c, h, w, rng, scratch)?;
        }
        Ok(())
    }
}

/// Applies drawn parameters to one c × h × w crop in place (crop+resize → flip → rot90 →
/// brightness → contrast).
pub fn apply(
    p: &AugmentParams,
    crop: &mut [f32],
    c: usize,
    h: usize,
    w: usize,
    scratch: &mut Vec<f32>,
) -> Result<()> {
    check_dims(crop.len(), c, h, w)?;
    if let Some((y0, x0, sh, sw)) = p.crop {
        if sh == 0 || sw == 0 || y0 + sh > h || x0 + sw > w {
            return Err(Error::InvalidArgument(format!(
                "augment: crop window (y0={y0}, x0={x0}, {sh}×{sw}) outside the {h}×{w} crop"
            )));
        }
        scratch.clear();
        scratch.reserve(c * sh * sw);
        for ch in 0..c {
            let plane = &crop[ch * h * w..(ch + 1) * h * w];
            for y in y0..y0 + sh {
                scratch.extend_from_slice(&plane[y * w + x0..y * w + x0 + sw]);
            }
        }
        resize_bilinear(scratch, c, sh, sw, crop, h, w)?;
    }
    if p.flip {
        flip_horizontal(crop, c, h, w)?;
    }
    if !p.rot_k.is_multiple_of(4) {
        rot90(crop, c, h, w, p.rot_k, scratch)?;
    }
    for (name, v) in [("brightness", &p.brightness), ("contrast", &p.contrast)] {
        if !v.is_empty() && v.len() != c {
            return Err(Error::InvalidArgument(format!(
                "augment: {} {name} values for {c} channels",
                v.len()
            )));
        }
    }
    if !p.brightness.is_empty() || !p.contrast.is_empty() {
        for ch in 0..c {
            let b = p.brightness.get(ch).copied().unwrap_or(0.0);
            let f = p.contrast.get(ch).copied().unwrap_or(1.0);
            adjust_channel(&mut crop[ch * h * w..(ch + 1) * h * w], b, f);
        }
    }
    Ok(())
}

/// `x ← (x − m)·f + m + b`, m = mean of the plane (f64 accumulation): brightness then contrast as
/// `tf.image.adjust_brightness` → `tf.image.adjust_contrast`.
pub fn adjust_channel(plane: &mut [f32], brightness: f32, contrast: f32) {
    if plane.is_empty() {
        return;
    }
    let m = if contrast != 1.0 {
        (plane.iter().map(|&v| v as f64).sum::<f64>() / plane.len() as f64) as f32
    } else {
        0.0
    };
    let offset = m - m * contrast + brightness;
    for v in plane.iter_mut() {
        *v = *v * contrast + offset;
    }
}

/// Bilinear resize of c planes `sh × sw` → `dh × dw`, half-pixel centres, no antialias
/// (TF2 `tf.image.resize` = torch `interpolate(bilinear, align_corners=False)`).
pub fn resize_bilinear(
    src: &[f32],
    c: usize,
    sh: usize,
    sw: usize,
    dst: &mut [f32],
    dh: usize,
    dw: usize,
) -> Result<()> {
    if sh == 0 || sw == 0 || dh == 0 || dw == 0 {
        return Err(Error::Shape(format!(
            "resize_bilinear: empty size {sh}×{sw} → {dh}×{dw}"
        )));
    }
    if src.len() != c * sh * sw {
        return Err(Error::shape_mismatch(
            "resize_bilinear: source",
            &[c, sh, sw],
            &[src.len()],
        ));
    }
    if dst.len() != c * dh * dw {
        return Err(Error::shape_mismatch(
            "resize_bilinear: destination",
            &[c, dh, dw],
            &[dst.len()],
        ));
    }
    // torch area_pixel_compute_source_index (float opmath): max(scale·(i + 0.5) − 0.5, 0).
    let taps = |inp: usize, out: usize| -> Vec<(usize, usize, f32)> {
        let scale = inp as f32 / out as f32;
        (0..out)
            .map(|i| {
                let s = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (s as usize).min(inp - 1);
                let i1 = (i0 + 1).min(inp - 1);
                (i0, i1, s - i0 as f32)
            })
            .collect()
    };
    let xs = taps(sw, dw);
    let ys = taps(sh, dh);
    for ch in 0..c {
        let s = &src[ch * sh * sw..(ch + 1) * sh * sw];
        let d = &mut dst[ch * dh * dw..(ch + 1) * dh * dw];
        for (y, &(y0, y1, ly)) in ys.iter().enumerate() {
            let (r0, r1) = (&s[y0 * sw..(y0 + 1) * sw], &s[y1 * sw..(y1 + 1) * sw]);
            let row = &mut d[y * dw..(y + 1) * dw];
            for (o, &(x0, x1, lx)) in row.iter_mut().zip(&xs) {
                let top = r0[x0] + (r0[x1] - r0[x0]) * lx;
                let bot = r1[x0] + (r1[x1] - r1[x0]) * lx;
                *o = top + (bot - top) * ly;
            }
        }
    }
    Ok(())
}

/// Mirrors every row (left ↔ right) of c planes h × w.
pub fn flip_horizontal(buf: &mut [f32], c: usize, h: usize, w: usize) -> Result<()> {
    check_dims(buf.len(), c, h, w)?;
    for row in buf.chunks_exact_mut(w) {
        row.reverse();
    }
    Ok(())
}

/// Rotates c square planes n × n counter-clockwise by k quarter turns (`np.rot90(x, k, (1, 2))`):
/// k = 1 gives `out[i][j] = in[j][n−1−i]`.
pub fn rot90(
    buf: &mut [f32],
    c: usize,
    h: usize,
    w: usize,
    k: u8,
    scratch: &mut Vec<f32>,
) -> Result<()> {
    check_dims(buf.len(), c, h, w)?;
    let k = k % 4;
    if k == 0 {
        return Ok(());
    }
    if h != w {
        return Err(Error::Shape(format!(
            "rot90: needs square planes, got {h}×{w}"
        )));
    }
    let n = h;
    if k == 2 {
        for plane in buf.chunks_exact_mut(n * n) {
            plane.reverse();
        }
        return Ok(());
    }
    scratch.clear();
    scratch.resize(n * n, 0.0);
    for plane in buf.chunks_exact_mut(n * n) {
        scratch.copy_from_slice(plane);
        for i in 0..n {
            let out = &mut plane[i * n..(i + 1) * n];
            if k == 1 {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = scratch[j * n + (n - 1 - i)];
                }
            } else {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = scratch[(n - 1 - j) * n + i];
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37).sin()).collect()
    }

    #[test]
    fn rot90_and_flip_invariants() {
        let (c, n) = (2, 5);
        let x = ramp(c * n * n);
        let mut s = Vec::new();
        let mut y = x.clone();
        for _ in 0..4 {
            rot90(&mut y, c, n, n, 1, &mut s).unwrap();
        }
        assert_eq!(y, x);
        rot90(&mut y, c, n, n, 1, &mut s).unwrap();
        rot90(&mut y, c, n, n, 3, &mut s).unwrap();
        assert_eq!(y, x);
        let mut z = x.clone();
        rot90(&mut z, c, n, n, 2, &mut s).unwrap();
        rot90(&mut y, c, n, n, 1, &mut s).unwrap();
        rot90(&mut y, c, n, n, 1, &mut s).unwrap();
        assert_eq!(y, z);
        // k = 1 closed form: out[i][j] = in[j][n-1-i]
        let mut r = x.clone();
        rot90(&mut r, c, n, n, 1, &mut s).unwrap();
        assert_eq!(r[n + 2], x[2 * n + (n - 1 - 1)]);
        let mut f = x.clone();
        flip_horizontal(&mut f, c, n, n).unwrap();
        assert_eq!(f[n], x[2 * n - 1]);
        flip_horizontal(&mut f, c, n, n).unwrap();
        assert_eq!(f, x);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut s = Vec::new();
        let a = Augmentation::default();
        let mut buf = vec![0.0; 10];
        assert!(matches!(
            a.augment(&mut buf, 1, 3, 3, &mut rng, &mut s),
            Err(Error::Shape(_))
        ));
        let mut buf = vec![0.0; 12];
        let e = a.augment(&mut buf, 1, 3, 4, &mut rng, &mut s).unwrap_err();
        assert!(e.to_string().contains("rot90"), "{e}");
        let bad = Augmentation {
            crop_p: 1.5,
            ..Default::default()
        };
        let e = bad
            .augment(&mut buf, 1, 3, 4, &mut rng, &mut s)
            .unwrap_err();
        assert!(e.to_string().contains("crop_p"), "{e}");
    }
}
