//! diffusers AutoencoderKL parity (encode / decode / the LDM 5-channel scheme), weight I/O, the
//! no-grad inference path, decoder gradients by finite differences, and bad input.
//! Fixture: tests/fixtures/make_vae_fixture.py (a diffusers AutoencoderKL with block_out_channels
//! (8, 16, 16), layers_per_block 1, norm_num_groups 4, random weights).

use phenocore::autograd::Tape;
use phenocore::diffusion::vae::{ldm_groups, AutoencoderKL, AutoencoderKLConfig, Nchw};
use phenocore::io::safetensors::{read_f32_tensors, TensorMap};
use phenocore::Error;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vae")
        .join(name)
}

fn config() -> AutoencoderKLConfig {
    let text = std::fs::read_to_string(fixture("config.json")).unwrap();
    AutoencoderKLConfig::from_json(&text).unwrap()
}

fn weights() -> TensorMap {
    read_f32_tensors(&std::fs::read(fixture("weights.safetensors")).unwrap()).unwrap()
}

fn model() -> AutoencoderKL {
    AutoencoderKL::load(config(), &fixture("weights.safetensors")).unwrap()
}

fn io(name: &str) -> Nchw<f32> {
    let m = read_f32_tensors(&std::fs::read(fixture("io.safetensors")).unwrap()).unwrap();
    Nchw::from_tensor(&m[name]).unwrap()
}

/// max |a − b| / max |b|.
fn rel_err(got: &Nchw<f32>, want: &Nchw<f32>) -> f64 {
    assert_eq!(got.shape, want.shape);
    let scale = want.data.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let diff = got
        .data
        .iter()
        .zip(&want.data)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    diff / scale
}

#[test]
fn config_matches_diffusers_names_and_sdxl_defaults() {
    let c = config();
    assert_eq!(c.block_out_channels, vec![8, 16, 16]);
    assert_eq!(
        (c.layers_per_block, c.norm_num_groups, c.latent_channels),
        (1, 4, 4)
    );
    assert_eq!(c.downscale(), 4);
    let s = AutoencoderKLConfig::sdxl();
    assert_eq!(s.block_out_channels, vec![128, 256, 512, 512]);
    assert_eq!(
        (s.layers_per_block, s.latent_channels, s.norm_num_groups),
        (2, 4, 32)
    );
    assert_eq!(
        (s.norm_eps, s.scaling_factor, s.downscale()),
        (1e-6, 0.13025, 8)
    );
    // The parameter list is exactly diffusers' state_dict.
    let specs = c.param_specs();
    let w = weights();
    assert_eq!(specs.len(), w.len());
    for (name, shape, _) in &specs {
        assert_eq!(w[name].shape(), shape.as_slice(), "{name}");
    }
    // SDXL: 83.65 M parameters (diffusers AutoencoderKL of stabilityai/sdxl-vae).
    let n: usize = s
        .param_specs()
        .iter()
        .map(|(_, sh, _)| sh.iter().product::<usize>())
        .sum();
    assert_eq!(n, 83_653_863);
    assert!(matches!(
        AutoencoderKLConfig::from_json(r#"{"down_block_types": ["AttnDownEncoderBlock2D"]}"#),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        AutoencoderKLConfig::from_json(r#"{"layers_per_blok": 2}"#),
        Err(Error::InvalidArgument(m)) if m.contains("layers_per_blok")
    ));
    assert!(matches!(
        AutoencoderKLConfig::from_json(r#"{"block_out_channels": [30, 64]}"#),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn encode_matches_diffusers() {
    let vae = model();
    let (mean, logvar) = vae.encode(&io("x")).unwrap();
    let (em, el) = (rel_err(&mean, &io("mean")), rel_err(&logvar, &io("logvar")));
    eprintln!("encode vs diffusers: mean {em:.2e}, logvar {el:.2e}");
    assert!(em <= 1e-4 && el <= 1e-4, "mean {em:.2e} logvar {el:.2e}");
}

#[test]
fn decode_matches_diffusers() {
    let vae = model();
    let out = vae.decode(&io("z")).unwrap();
    let e = rel_err(&out, &io("decoded"));
    eprintln!("decode vs diffusers: {e:.2e}");
    assert!(e <= 1e-4, "decode rel err {e:.2e}");
}

#[test]
fn five_channel_scheme_matches_two_encodes_and_its_inverse() {
    let vae = model();
    let x5 = io("x5");
    let lat = vae.encode5(&x5, &ldm_groups(), None).unwrap();
    assert_eq!(lat.shape, [1, 8, 8, 8]);
    let e = rel_err(&lat, &io("latents5"));
    assert!(e <= 1e-4, "encode5 rel err {e:.2e}");
    // Composition: the first half is encode(x5[:, 0..3]).mean · scaling_factor.
    let sub = Nchw::new([1, 3, 32, 32], x5.data[..3 * 1024].to_vec()).unwrap();
    let (mean, _) = vae.encode(&sub).unwrap();
    for (a, b) in lat.data[..4 * 64].iter().zip(&mean.data) {
        assert!((a - b * 0.13025).abs() <= 1e-6 * (1.0 + a.abs()));
    }
    let rec = vae.decode5(&lat, &ldm_groups()).unwrap();
    assert_eq!(rec.shape, [1, 5, 32, 32]);
    let e = rel_err(&rec, &io("recon5"));
    assert!(e <= 1e-4, "decode5 rel err {e:.2e}");
    // Channel 2 is the mean of its two reconstructions; channel 0 is the first group's alone.
    let half = |i: usize| {
        let z: Vec<f32> = lat.data[i * 256..(i + 1) * 256]
            .iter()
            .map(|v| v / 0.13025)
            .collect();
        vae.decode(&Nchw::new([1, 4, 8, 8], z).unwrap()).unwrap()
    };
    let (r0, r1) = (half(0), half(1));
    for p in 0..1024 {
        let want2 = 0.5 * (r0.data[2 * 1024 + p] + r1.data[p]);
        assert!((rec.data[2 * 1024 + p] - want2).abs() <= 1e-5);
        assert!((rec.data[p] - r0.data[p]).abs() <= 1e-5);
        assert!((rec.data[4 * 1024 + p] - r1.data[2 * 1024 + p]).abs() <= 1e-5);
    }
    // Configurable groups: one channel per group is invalid for a 3-channel VAE; an uncovered
    // channel and an out-of-range one are errors.
    let bad = |g: Vec<Vec<usize>>| vae.encode5(&x5, &g, None).unwrap_err();
    assert!(matches!(bad(vec![vec![0, 1]]), Error::InvalidArgument(_)));
    assert!(
        matches!(bad(vec![vec![0, 1, 2], vec![1, 2, 3]]), Error::InvalidArgument(m) if m.contains("channel 4"))
    );
    assert!(matches!(bad(vec![vec![0, 1, 2], vec![2, 3, 5]]), Error::Shape(m) if m.contains('5')));
    // Other groups compose the same way: [[0,1,2],[3,4,0]] shares channel 0.
    let g2 = vec![vec![0, 1, 2], vec![3, 4, 0]];
    let lat2 = vae.encode5(&x5, &g2, None).unwrap();
    assert_eq!(&lat2.data[..256], &lat.data[..256]);
    assert_eq!(vae.decode5(&lat2, &g2).unwrap().shape, [1, 5, 32, 32]);
    assert!(matches!(
        vae.decode5(&lat, &[vec![0, 1, 2]]),
        Err(Error::Shape(_))
    ));
}

#[test]
fn sample_draws_from_the_posterior_and_is_seeded() {
    let vae = model();
    let (mean, logvar) = vae.encode(&io("x")).unwrap();
    let draw = |seed| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        AutoencoderKL::<f32>::sample(&mean, &logvar, &mut rng).unwrap()
    };
    let (a, b, c) = (draw(3), draw(3), draw(4));
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Standardised draws are N(0, 1): 512 values, mean within 4σ/√n, variance within 25 %.
    let e: Vec<f64> = (0..a.data.len())
        .map(|i| (a.data[i] as f64 - mean.data[i] as f64) / (0.5 * logvar.data[i] as f64).exp())
        .collect();
    let n = e.len() as f64;
    let m = e.iter().sum::<f64>() / n;
    let v = e.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
    assert!(
        m.abs() < 4.0 / n.sqrt() && (v - 1.0).abs() < 0.25,
        "mean {m} var {v}"
    );
}

#[test]
fn weights_round_trip_and_mismatches_are_named() {
    let vae = model();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vae.safetensors");
    vae.save(&path).unwrap();
    let back = AutoencoderKL::<f32>::load(config(), &path).unwrap();
    for ((n1, s1, _, v1), (n2, s2, _, v2)) in vae.params().iter().zip(back.params().iter()) {
        assert_eq!((n1, s1, v1), (n2, s2, v2));
    }
    // Weights for another config: the first mismatching key and both shapes are named.
    let err = AutoencoderKL::<f32>::from_tensors(AutoencoderKLConfig::sdxl(), &weights())
        .err()
        .unwrap();
    match err {
        Error::Shape(m) => assert!(
            m.contains("encoder.conv_in.weight")
                && m.contains("[8, 3, 3, 3]")
                && m.contains("[128, 3, 3, 3]"),
            "{m}"
        ),
        e => panic!("{e:?}"),
    }
    let mut c = config();
    c.layers_per_block = 2;
    let err = AutoencoderKL::<f32>::from_tensors(c, &weights())
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::MissingKey(m) if m.contains("encoder.down_blocks.0.resnets.1.norm1.weight")),
        "{err:?}"
    );
    let mut c = config();
    c.mid_block_add_attention = false;
    let err = AutoencoderKL::<f32>::from_tensors(c, &weights())
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::Format(m) if m.contains("attentions.0")),
        "{err:?}"
    );
    // Pre-0.14 attention names load to the same model.
    let mut legacy = TensorMap::new();
    for (k, t) in weights() {
        let k = k
            .replace(".to_q.", ".query.")
            .replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn.");
        legacy.insert(k, t);
    }
    let old = AutoencoderKL::<f32>::from_tensors(config(), &legacy).unwrap();
    assert_eq!(old.decode(&io("z")).unwrap(), vae.decode(&io("z")).unwrap());
}

#[test]
fn bad_input_is_rejected() {
    let vae = model();
    let x = io("x");
    let wrong_c = Nchw::new([2, 4, 32, 24], vec![0.0; 2 * 4 * 32 * 24]).unwrap();
    assert!(matches!(vae.encode(&wrong_c), Err(Error::Shape(m)) if m.contains("4 channels")));
    // 3 levels: H and W must be multiples of 4.
    let odd = Nchw::new([1, 3, 30, 32], vec![0.0; 3 * 30 * 32]).unwrap();
    assert!(matches!(vae.encode(&odd), Err(Error::Shape(m)) if m.contains("30")));
    let mut nan = x.clone();
    nan.data[77] = f32::NAN;
    assert!(matches!(vae.encode(&nan), Err(Error::NonFinite(m)) if m.contains("77")));
    let mut z = io("z");
    z.data[5] = f32::INFINITY;
    assert!(matches!(vae.decode(&z), Err(Error::NonFinite(_))));
    let z3 = Nchw::new([1, 3, 8, 8], vec![0.0; 192]).unwrap();
    assert!(matches!(vae.decode(&z3), Err(Error::Shape(_))));
    assert!(matches!(
        Nchw::new([1, 3, 8, 8], vec![0.0f32; 10]),
        Err(Error::Shape(_))
    ));
    let empty = Nchw::new([0, 3, 32, 32], Vec::<f32>::new()).unwrap();
    assert!(vae.encode(&empty).is_err());
}

fn tiny() -> AutoencoderKLConfig {
    AutoencoderKLConfig {
        in_channels: 2,
        out_channels: 2,
        block_out_channels: vec![4, 4],
        layers_per_block: 1,
        latent_channels: 2,
        norm_num_groups: 2,
        ..AutoencoderKLConfig::sdxl()
    }
}

/// A tiny f64 model with non-trivial GroupNorm affine parameters.
fn tiny_model(seed: u64) -> AutoencoderKL<f64> {
    let mut vae = AutoencoderKL::<f64>::new(tiny(), seed).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + 1);
    let p = vae.params_mut();
    for i in 0..p.len() {
        if p.name(i).contains("norm") {
            let w = p.name(i).ends_with("weight");
            for v in p.value_mut(i).iter_mut() {
                *v = if w { 1.0 } else { 0.0 } + rng.gen_range(-0.3..0.3);
            }
        }
    }
    vae
}

#[test]
fn inference_records_nothing() {
    let vae = tiny_model(1);
    let mut tape = Tape::<f64>::no_grad();
    let z = tape.input(&[1, 4, 4, 2], vec![0.5; 32], true).unwrap();
    let out = vae.decoder_forward(&mut tape, &z).unwrap();
    assert_eq!(out.shape(), &[1, 8, 8, 2]);
    assert_eq!(tape.num_nodes(), 0);
    // Frozen parameters on a gradient tape: only the input's path is recorded.
    let mut frozen = tiny_model(1);
    frozen.set_trainable(false).unwrap();
    assert!(!frozen.trainable());
    let mut tape = Tape::<f64>::new(false);
    let z = tape.input(&[1, 4, 4, 2], vec![0.5; 32], false).unwrap();
    frozen.decoder_forward(&mut tape, &z).unwrap();
    assert_eq!(tape.num_nodes(), 0);
}

#[test]
fn decoder_input_gradient_matches_finite_differences() {
    let mut vae = tiny_model(2);
    vae.set_trainable(false).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let z: Vec<f64> = (0..32).map(|_| rng.gen_range(-1.5..1.5)).collect();
    let report = phenocore::ops::gradcheck::check(&[(vec![1, 4, 4, 2], z)], false, 32, |t, v| {
        vae.decoder_forward(t, &v[0])
    })
    .unwrap();
    assert!(report.worst() < 1e-6, "{report:?}");
    // The encoder too (stride-2 (0,1,0,1)-padded conv, attention).
    let x: Vec<f64> = (0..2 * 8 * 8 * 2)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let report = phenocore::ops::gradcheck::check(&[(vec![2, 8, 8, 2], x)], false, 24, |t, v| {
        vae.encoder_forward(t, &v[0])
    })
    .unwrap();
    assert!(report.worst() < 1e-6, "{report:?}");
}

#[test]
fn decoder_parameter_gradients_match_finite_differences() {
    let mut vae = tiny_model(3);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let z: Vec<f64> = (0..32).map(|_| rng.gen_range(-1.5..1.5)).collect();
    let r: Vec<f64> = (0..128).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let loss = |vae: &AutoencoderKL<f64>| -> f64 {
        let mut tape = Tape::<f64>::no_grad();
        let zv = tape.input(&[1, 4, 4, 2], z.clone(), false).unwrap();
        let out = vae.decoder_forward(&mut tape, &zv).unwrap();
        tape.data(&out).iter().zip(&r).map(|(a, b)| a * b).sum()
    };
    let mut tape = Tape::<f64>::new(false);
    let zv = tape.input(&[1, 4, 4, 2], z.clone(), false).unwrap();
    let out = vae.decoder_forward(&mut tape, &zv).unwrap();
    tape.backward_with(&out, r.clone(), vae.params_mut())
        .unwrap();
    for name in [
        "post_quant_conv.weight",
        "decoder.mid_block.attentions.0.to_q.weight",
        "decoder.mid_block.attentions.0.group_norm.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.bias",
        "decoder.up_blocks.1.resnets.0.norm2.bias",
        "decoder.conv_out.weight",
    ] {
        let i = vae.params().index(name).unwrap();
        let analytic = vae.params().grad(i).to_vec();
        for j in [0, analytic.len() / 2, analytic.len() - 1] {
            let x0 = vae.params().value(i)[j];
            let h = 1e-5;
            vae.params_mut().value_mut(i)[j] = x0 + h;
            let lp = loss(&vae);
            vae.params_mut().value_mut(i)[j] = x0 - h;
            let lm = loss(&vae);
            vae.params_mut().value_mut(i)[j] = x0;
            let numeric = (lp - lm) / (2.0 * h);
            assert!(
                (analytic[j] - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "{name}[{j}]: analytic {} numeric {numeric}",
                analytic[j]
            );
        }
    }
}
