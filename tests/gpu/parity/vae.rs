//! The diffusion VAE on the GPU (`diffusion::gpu_vae::GpuVae`) against the CPU `AutoencoderKL<f64>`
//! with the same parameters: encode (posterior mean and logvar) and decode, on a two-level model
//! with mid-block attention, conv shortcuts and quant convs, and on a three-level model without
//! attention or quant convs (two stride-2 downsamples, two upsamples, no shortcut convs, one
//! GroupNorm group); the LDM 5-channel encode5 / decode5 (with and without a posterior draw); and
//! rejected inputs.

use super::*;
use phenocore::backend::gpu::Gpu;
use phenocore::diffusion::gpu_vae::GpuVae;
use phenocore::diffusion::vae::{ldm_groups, AutoencoderKL, AutoencoderKLConfig, Nchw};
use rand::{Rng, SeedableRng};

/// 5 channels in, [16, 32], one resnet per level (shortcut conv 16 → 32 in the encoder, 32 → 16 in
/// the decoder), mid-block attention (one head over 32 channels), quant convs.
fn small() -> AutoencoderKLConfig {
    AutoencoderKLConfig {
        in_channels: 5,
        out_channels: 5,
        block_out_channels: vec![16, 32],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 8,
        norm_eps: 1e-6,
        scaling_factor: 0.13025,
        shift_factor: None,
        mid_block_add_attention: true,
        use_quant_conv: true,
        use_post_quant_conv: true,
    }
}

/// Three levels of equal width (no shortcut convs), two resnets per level, no attention, no quant
/// convs, one group, 3 channels (the LDM grouping), a shift factor.
fn plain() -> AutoencoderKLConfig {
    AutoencoderKLConfig {
        in_channels: 3,
        out_channels: 3,
        block_out_channels: vec![8, 8, 8],
        layers_per_block: 2,
        latent_channels: 2,
        norm_num_groups: 1,
        norm_eps: 1e-5,
        scaling_factor: 0.5,
        shift_factor: Some(0.25),
        mid_block_add_attention: false,
        use_quant_conv: false,
        use_post_quant_conv: false,
    }
}

/// A model whose every parameter is perturbed (GroupNorm starts at γ = 1, β = 0): nothing is the
/// identity or zero, so the test can fail. The f32 model and the same parameters in f64.
fn models(cfg: AutoencoderKLConfig, seed: u64) -> (AutoencoderKL<f32>, AutoencoderKL<f64>) {
    let mut m = AutoencoderKL::<f32>::new(cfg.clone(), seed).unwrap();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed + 100);
    let p = m.params_mut();
    for i in 0..p.len() {
        let shape = p.shape(i).to_vec();
        let s = if shape.len() >= 2 {
            0.5 / (shape[1..].iter().product::<usize>() as f32).sqrt()
        } else {
            0.2
        };
        for v in p.value_mut(i).iter_mut() {
            *v += r.gen_range(-s..s);
        }
    }
    let m64 = AutoencoderKL::<f64>::from_tensors(cfg, &m.to_tensors().unwrap()).unwrap();
    (m, m64)
}

fn nchw64(x: &Nchw<f32>) -> Nchw<f64> {
    Nchw::new(x.shape, f64s(&x.data)).unwrap()
}

fn check(what: &str, got: &Nchw<f32>, want: &Nchw<f64>) -> f64 {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let rel = assert_close(what, &f64s(&got.data), &want.data, F32_TOL);
    let scale = want.data.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1e-3, "{what}: output scale {scale}");
    eprintln!("{what}: relative error {rel:.2e} (scale {scale:.3})");
    rel
}

/// Encode (mean, logvar) and decode of `n` images `h` × `w` against the CPU in f64.
fn encode_decode<G: Gpu>(
    g: &G,
    what: &str,
    cfg: AutoencoderKLConfig,
    n: usize,
    h: usize,
    w: usize,
) {
    let (m32, m64) = models(cfg.clone(), 7 + h as u64);
    let gv = GpuVae::new(g, &m32).unwrap();
    let x = Nchw::new(
        [n, cfg.in_channels, h, w],
        uniform(n * cfg.in_channels * h * w, 11),
    )
    .unwrap();
    let (mean, logvar) = gv.encode(g, &x).unwrap();
    let (mean64, logvar64) = m64.encode(&nchw64(&x)).unwrap();
    check(&format!("{what}: encode mean"), &mean, &mean64);
    check(&format!("{what}: encode logvar"), &logvar, &logvar64);

    let f = cfg.downscale();
    let z = Nchw::new(
        [n, cfg.latent_channels, h / f, w / f],
        uniform(n * cfg.latent_channels * (h / f) * (w / f), 12),
    )
    .unwrap();
    let y = gv.decode(g, &z).unwrap();
    let y64 = m64.decode(&nchw64(&z)).unwrap();
    check(&format!("{what}: decode"), &y, &y64);
}

/// Whole-model encode and decode on the GPU against the CPU in f64 (normwise ≤ 1e-5).
pub fn vae_encode_decode_match_cpu<G: Gpu>(g: &G) {
    encode_decode(g, "VAE [16, 32] + attention", small(), 2, 16, 16);
    encode_decode(g, "VAE [8, 8, 8] plain", plain(), 1, 12, 8);
}

/// The LDM 5-channel scheme (two overlapping RGB-like groups) through the GPU encode / decode, with
/// the posterior mean and with a draw (the same seeded RNG on both sides), against the CPU; and
/// inputs the CPU rejects rejected (errors, not panics).
pub fn vae_encode5_decode5_and_rejects<G: Gpu>(g: &G) {
    let cfg = plain();
    let (m32, m64) = models(cfg.clone(), 30);
    let gv = GpuVae::new(g, &m32).unwrap();
    let groups = ldm_groups();
    let (n, h, w) = (2, 8, 8);
    let x = Nchw::new([n, 5, h, w], uniform(n * 5 * h * w, 31)).unwrap();
    let lat = gv.encode5(g, &x, &groups, None).unwrap();
    let lat64 = m64.encode5(&nchw64(&x), &groups, None).unwrap();
    check("VAE encode5 (mean)", &lat, &lat64);
    let mut r32 = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut r64 = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let drawn = gv.encode5(g, &x, &groups, Some(&mut r32)).unwrap();
    let drawn64 = m64.encode5(&nchw64(&x), &groups, Some(&mut r64)).unwrap();
    check("VAE encode5 (draw)", &drawn, &drawn64);
    let dist: f64 = drawn
        .data
        .iter()
        .zip(&lat.data)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    assert!(dist > 1e-3, "the draw equals the mean ({dist})");
    let rec = gv.decode5(g, &lat, &groups).unwrap();
    let rec64 = m64.decode5(&lat64, &groups).unwrap();
    check("VAE decode5", &rec, &rec64);

    // Rejected inputs.
    let bad_c = Nchw::new([1, 4, h, w], uniform(4 * h * w, 32)).unwrap();
    assert!(gv.encode(g, &bad_c).is_err(), "wrong channel count");
    let bad_hw = Nchw::new([1, 3, 6, 8], uniform(3 * 6 * 8, 33)).unwrap();
    assert!(gv.encode(g, &bad_hw).is_err(), "6 is not a multiple of 4");
    let empty = Nchw::new([0, 3, h, w], vec![]).unwrap();
    assert!(gv.encode(g, &empty).is_err(), "empty batch");
    let mut nan = Nchw::new([1, 3, h, w], uniform(3 * h * w, 34)).unwrap();
    nan.data[17] = f32::NAN;
    assert!(gv.encode(g, &nan).is_err(), "non-finite input");
    let bad_z = Nchw::new([1, 3, 2, 2], uniform(12, 35)).unwrap();
    assert!(gv.decode(g, &bad_z).is_err(), "wrong latent channel count");
    assert!(
        gv.encode5(g, &x, &[vec![0, 1, 2]], None).is_err(),
        "channels 3, 4 in no group"
    );
    assert!(
        gv.decode5(g, &lat, &[vec![0, 1, 2]]).is_err(),
        "latent channels do not fit the groups"
    );
}
