use super::*;
use phenocore::backend::gpu::Gpu;
use phenocore::models::efficientnet::{
    EfficientNet, EfficientNetConfig, GpuEfficientNet, Padding, StateDict,
};
use phenocore::Tensor;
use rand::{Rng, SeedableRng};

/// A model whose BN layers are not the identity (random γ, β, running mean and variance), so the
/// folding is exercised; torchvision's initialisation otherwise.
fn model(padding: Padding) -> EfficientNet {
    let cfg = EfficientNetConfig {
        in_channels: 5,
        num_classes: 7,
        padding,
        bn_eps: 1e-3,
    };
    let base = EfficientNet::new(cfg, 11).unwrap();
    let mut state: StateDict = base.state_dict().clone();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let keys: Vec<String> = state.keys().cloned().collect();
    for k in keys {
        let t = &state[&k];
        let shape = t.shape().to_vec();
        let n: usize = shape.iter().product();
        let v: Option<Vec<f32>> = if k.ends_with("running_var") {
            Some((0..n).map(|_| r.gen_range(0.5f32..1.5)).collect())
        } else if k.ends_with("running_mean") || (k.ends_with(".bias") && !k.contains("fc")) {
            Some((0..n).map(|_| r.gen_range(-0.2f32..0.2)).collect())
        } else if shape.len() == 1 && k.ends_with(".weight") {
            Some((0..n).map(|_| r.gen_range(0.7f32..1.3)).collect())
        } else {
            None
        };
        if let Some(v) = v {
            state.insert(k, Tensor::from_f32(&shape, v).unwrap());
        }
    }
    EfficientNet::from_state_dict(state, padding, 1e-3).unwrap()
}

/// GPU features `got` have `want`'s shape and values within the f32 bound.
fn same_features(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    let rel = assert_close(
        what,
        &f64s(got.as_f32().unwrap()),
        &f64s(want.as_f32().unwrap()),
        F32_TOL,
    );
    eprintln!("{what}: relative error {rel:.2e}");
}

/// Whole-model inference: the GPU composition (im2col + GEMM stem, MBConv from the kernels and
/// GEMMs, BN folded) against the CPU pass, at the paper's layer and at taps on the way.
pub fn effnet_features_match_cpu<G: Gpu>(g: &G) {
    for padding in [Padding::Symmetric, Padding::TfSame] {
        let m = model(padding);
        let gm = GpuEfficientNet::new(g, &m).unwrap();
        let (n, h, w) = (2, 40, 36);
        let crops = Tensor::from_f32(&[n, 5, h, w], uniform(n * 5 * h * w, 21)).unwrap();
        for layer in [
            "stem_activation",
            "block2a_expand_activation",
            "block3b_se_excite",
            "block5c_add",
            "block6a_activation",
            "top_activation",
        ] {
            let want = &m.features(&crops, &[layer]).unwrap()[0];
            let got = gm.features(g, &crops, layer).unwrap();
            same_features(&format!("EfficientNet {padding:?} {layer}"), &got, want);
        }
    }
    // Several layers from one pass, logits (the classifier on the device) included, in the
    // order asked, a layer twice.
    let m = model(Padding::Symmetric);
    let gm = GpuEfficientNet::new(g, &m).unwrap();
    let (n, h, w) = (3, 36, 40);
    let crops = Tensor::from_f32(&[n, 5, h, w], uniform(n * 5 * h * w, 23)).unwrap();
    let layers = [
        "logits",
        "block6a_activation",
        "stem_activation",
        "top_activation",
        "block6a_activation",
    ];
    let want = m.features(&crops, &layers).unwrap();
    let got = gm.features_multi(g, &crops, &layers).unwrap();
    assert_eq!(got.len(), layers.len());
    for ((layer, want), got) in layers.iter().zip(&want).zip(&got) {
        same_features(&format!("EfficientNet features_multi {layer}"), got, want);
    }
    assert_eq!(got[0].shape(), &[n, 7]);
    assert_eq!(got[1].as_f32().unwrap(), got[4].as_f32().unwrap());
    assert!(gm.features_multi(g, &crops, &[]).is_err());
    assert!(gm
        .features_multi(g, &crops, &["top_activation", "no_such_layer"])
        .is_err());
    let bad = Tensor::from_f32(&[1, 3, 8, 8], vec![0.0; 192]).unwrap();
    assert!(
        gm.features(g, &bad, "block6a_activation").is_err(),
        "3-channel crops for a 5-channel model"
    );
    let crops = Tensor::from_f32(&[1, 5, 8, 8], vec![0.0; 320]).unwrap();
    assert!(gm.features(g, &crops, "no_such_layer").is_err());
}

/// The pipelined pass (staged uploads on the copy stream, double-buffered inputs, read-back of
/// batch i − 1 while batch i runs) gives the features of the one-shot pass, with a short last
/// batch. On the emulation a staged upload lands only when its event is waited on, so a batch
/// computed before its input arrived would read the previous batch (or NaN) and fail here.
pub fn effnet_features_batched_match_one_shot<G: Gpu>(g: &G) {
    let m = model(Padding::TfSame);
    let gm = GpuEfficientNet::new(g, &m).unwrap();
    let (n, h, w) = (5, 24, 20);
    let crops = Tensor::from_f32(&[n, 5, h, w], uniform(n * 5 * h * w, 23)).unwrap();
    for layer in ["block3b_se_excite", "block6a_activation"] {
        let want = gm.features(g, &crops, layer).unwrap();
        for batch in [1, 2, 5, 8] {
            let got = gm.features_batched(g, &crops, layer, batch).unwrap();
            assert_eq!(got.shape(), want.shape(), "{layer} batch {batch}");
            assert_close(
                &format!("batched features {layer}, batch {batch}"),
                &f64s(got.as_f32().unwrap()),
                &f64s(want.as_f32().unwrap()),
                F32_TOL,
            );
        }
    }
    assert!(gm
        .features_batched(g, &crops, "block6a_activation", 0)
        .is_err());
}

/// A captured features pass replays to the one-shot pass's features for new crops each time
/// (on the emulation, capture records the launches without running them; replay runs them).
pub fn effnet_features_graph_replays<G: Gpu>(g: &G) {
    let m = model(Padding::Symmetric);
    let gm = GpuEfficientNet::new(g, &m).unwrap();
    let (n, h, w) = (2, 20, 24);
    let graph = gm
        .capture_features(g, n, h, w, "block6a_activation")
        .unwrap();
    for seed in [31, 32] {
        let crops = Tensor::from_f32(&[n, 5, h, w], uniform(n * 5 * h * w, seed)).unwrap();
        let want = gm.features(g, &crops, "block6a_activation").unwrap();
        let got = graph.run(g, &crops).unwrap();
        assert_close(
            &format!("graph replay, crops {seed}"),
            &f64s(got.as_f32().unwrap()),
            &f64s(want.as_f32().unwrap()),
            F32_TOL,
        );
    }
    let other = Tensor::from_f32(&[1, 5, h, w], uniform(5 * h * w, 3)).unwrap();
    assert!(graph.run(g, &other).is_err(), "a batch of another shape");
    // Host copies cannot be captured; a buffer allocated inside must not outlive the capture.
    assert!(g.capture(&mut || g.upload(&[0u8; 16]).map(drop)).is_err());
    let mut leaked = None;
    assert!(g
        .capture(&mut || {
            leaked = Some(g.alloc(64)?);
            Ok(())
        })
        .is_err());
}
