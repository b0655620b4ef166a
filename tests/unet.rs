//! The diffusion U-Net against MONAI `DiffusionModelUNet` (fixtures from
//! tests/fixtures/make_unet_fixture.py): output and every parameter gradient, in f64 and f32, with
//! cross-attention + class embeddings ("cond") and with self-attention + resblock_updown ("plain");
//! older MONAI key names; confounders / null embeddings; bad input.

use phenocore::autograd::{Float, Tape};
use phenocore::diffusion::unet::{
    nchw_to_nhwc, nhwc_to_nchw, Conditioning, Confounder, DiffusionUNet, UNetConfig, NULL,
};
use phenocore::io::safetensors::TensorMap;
use phenocore::tensor::Tensor;
use std::collections::BTreeMap;

#[path = "common/unet_fixture.rs"]
mod unet_fixture;
use unet_fixture::UNetFixture;

/// A MONAI fixture and its weights' older (GenerativeModels) key names.
struct Fixture {
    fx: UNetFixture,
    old_keys: BTreeMap<String, String>,
}

fn read(name: &str) -> Fixture {
    let fx = UNetFixture::read(name);
    let old_keys: BTreeMap<String, String> = serde_json::from_str(
        &std::fs::read_to_string(format!("{}{name}_old_keys.json", unet_fixture::DIR)).unwrap(),
    )
    .unwrap();
    Fixture { fx, old_keys }
}

impl std::ops::Deref for Fixture {
    type Target = UNetFixture;
    fn deref(&self) -> &UNetFixture {
        &self.fx
    }
}

impl Fixture {
    fn weights(&self, rename: bool) -> TensorMap {
        self.fx.weights(rename.then_some(&self.old_keys))
    }
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Runs forward + backward of Σ r·out; returns (output NCHW, grad x NCHW, param grads).
fn run<T: Float>(
    fx: &Fixture,
    model: &mut DiffusionUNet<T>,
) -> (Vec<f64>, Vec<f64>, BTreeMap<String, Vec<f64>>) {
    let (xs, x) = fx.get("x");
    let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
    let to_t = |v: &[f64]| v.iter().map(|&a| T::from_f64(a)).collect::<Vec<T>>();
    let ts: Vec<f64> = fx.get("timesteps").1.clone();
    let conditions = fx.conditions(T::from_f64);
    let cond = conditions.cond();
    let mut tape = Tape::<T>::new(true);
    let xv = tape
        .input(&[n, h, w, c], nchw_to_nhwc(&to_t(x), n, c, h, w), true)
        .unwrap();
    let out = model.forward(&mut tape, &xv, &ts, &cond).unwrap();
    let oc = model.config().out_channels;
    let out_nchw: Vec<f64> = nhwc_to_nchw(tape.data(&out), n, oc, h, w)
        .iter()
        .map(|v| v.to_f64())
        .collect();
    let r = nchw_to_nhwc(&to_t(&fx.get("r").1), n, oc, h, w);
    model.params_mut().zero_grad();
    let grads = tape.backward_with(&out, r, model.params_mut()).unwrap();
    let gx: Vec<f64> = nhwc_to_nchw(grads.get(&xv).unwrap(), n, c, h, w)
        .iter()
        .map(|v| v.to_f64())
        .collect();
    let p = model.params();
    let mut pg = BTreeMap::new();
    for i in 0..p.len() {
        pg.insert(
            p.name(i).to_string(),
            p.grad(i).iter().map(|v| v.to_f64()).collect(),
        );
    }
    (out_nchw, gx, pg)
}

fn check(name: &str, tol_f64: f64, tol_f32: f64) {
    let fx = read(name);
    let weights = fx.weights(false);
    for (label, tol) in [("f64", tol_f64), ("f32", tol_f32)] {
        let (out, gx, pg) = if label == "f64" {
            let mut m = DiffusionUNet::<f64>::from_state_dict(&weights, fx.config.clone()).unwrap();
            run(&fx, &mut m)
        } else {
            let mut m = DiffusionUNet::<f32>::from_state_dict(&weights, fx.config.clone()).unwrap();
            run(&fx, &mut m)
        };
        let e_out = max_rel(&out, &fx.get("out").1);
        let e_x = max_rel(&gx, &fx.get("grad_x").1);
        // Each tensor's error relative to its largest reference gradient (floored at 1e-6 of the
        // largest over all parameters). Key-bias gradients are exactly zero in exact arithmetic
        // (softmax is shift-invariant): both sides hold only round-off, checked to be tiny.
        let global = pg
            .keys()
            .flat_map(|k| fx.get(&format!("grad.{k}")).1.iter())
            .fold(0f64, |m, v| m.max(v.abs()));
        let mut worst = (0f64, String::new());
        for (k, g) in &pg {
            let r = &fx.get(&format!("grad.{k}")).1;
            if k.ends_with("attn.to_k.bias") {
                let m = g.iter().fold(0f64, |m, v| m.max(v.abs()));
                assert!(
                    m <= 1e-5 * global,
                    "{name} {label}: {k} should be ~0, max {m:e}"
                );
                continue;
            }
            let scale = r
                .iter()
                .fold(0f64, |m, v| m.max(v.abs()))
                .max(1e-6 * global);
            let e = g.iter().zip(r).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale;
            if e > worst.0 {
                worst = (e, k.clone());
            }
        }
        println!(
            "{name} {label}: out {e_out:.2e}, grad x {e_x:.2e}, worst param grad {:.2e} ({}), {} params",
            worst.0,
            worst.1,
            pg.len()
        );
        assert!(e_out <= tol, "{name} {label}: output rel err {e_out:e}");
        assert!(e_x <= tol, "{name} {label}: grad x rel err {e_x:e}");
        assert!(
            worst.0 <= tol,
            "{name} {label}: grad {} rel err {:e}",
            worst.1,
            worst.0
        );
    }
}

#[test]
fn matches_monai_with_cross_attention_and_class_embeddings() {
    // f64 is limited by the reference parameter gradients stored in f32 (~6e-8 relative).
    check("cond", 1e-6, 1e-4);
}

#[test]
fn matches_monai_with_self_attention_and_resblock_updown() {
    check("plain", 1e-6, 1e-4);
}

#[test]
fn loads_older_monai_generative_key_names() {
    let fx = read("cond");
    assert!(!fx.old_keys.is_empty());
    let old = fx.weights(true);
    assert!(old.keys().any(|k| k.ends_with("to_out.0.weight")));
    let a = DiffusionUNet::<f32>::from_state_dict(&old, fx.config.clone()).unwrap();
    let b = DiffusionUNet::<f32>::from_state_dict(&fx.weights(false), fx.config.clone()).unwrap();
    let (sa, sb) = (a.state_dict().unwrap(), b.state_dict().unwrap());
    assert_eq!(sa.len(), sb.len());
    for (k, t) in &sa {
        assert_eq!(t.as_f32().unwrap(), sb[k].as_f32().unwrap(), "{k}");
    }
    let fx = read("plain");
    let old = fx.weights(true);
    assert!(old.keys().any(|k| k.ends_with("proj_attn.weight")));
    DiffusionUNet::<f32>::from_state_dict(&old, fx.config.clone()).unwrap();
}

#[test]
fn predict_equals_the_training_forward_and_saves_round_trip() {
    let fx = read("cond");
    let m = DiffusionUNet::<f32>::from_state_dict(&fx.weights(false), fx.config.clone()).unwrap();
    let (xs, x) = fx.get("x");
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let ctx: Vec<f32> = fx.get("context").1.iter().map(|&v| v as f32).collect();
    let labels = [1usize, 4];
    let cond = Conditioning {
        context: Some(&ctx),
        context_len: 3,
        class_labels: Some(&labels),
        ..Default::default()
    };
    let y = m
        .predict(&x32, xs[0], xs[2], xs[3], &fx.get("timesteps").1, &cond)
        .unwrap();
    let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
    assert!(max_rel(&y64, &fx.get("out").1) < 1e-4);
    let dir = std::env::temp_dir().join(format!("unet_rt_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    m.save(&path).unwrap();
    let m2 = DiffusionUNet::<f32>::load(&path, fx.config.clone()).unwrap();
    let y2 = m2
        .predict(&x32, xs[0], xs[2], xs[3], &fx.get("timesteps").1, &cond)
        .unwrap();
    assert_eq!(y, y2);
    std::fs::remove_dir_all(&dir).ok();
}

fn confounded_config() -> UNetConfig {
    UNetConfig {
        in_channels: 2,
        out_channels: 2,
        num_res_blocks: vec![1, 1],
        channels: vec![4, 8],
        attention_levels: vec![false, true],
        norm_num_groups: 2,
        norm_eps: 1e-6,
        resblock_updown: false,
        num_head_channels: vec![4, 4],
        with_conditioning: true,
        transformer_num_layers: 1,
        cross_attention_dim: Some(3),
        num_class_embeds: None,
        confounders: vec![
            Confounder {
                name: "source".into(),
                num_values: 2,
            },
            Confounder {
                name: "well".into(),
                num_values: 3,
            },
        ],
        null_embeddings: true,
    }
}

#[test]
fn confounder_tables_sum_into_the_time_embedding_and_nulls_use_their_rows() {
    let cfg = confounded_config();
    let m = DiffusionUNet::<f64>::new(cfg.clone(), 3).unwrap();
    // Zero-initialised output conv gives zero output; use random weights for a visible effect.
    let mut state = m.state_dict().unwrap();
    for (k, t) in state.iter_mut() {
        if k.contains("conv2") || k.contains("proj_out") || k.starts_with("out.2") {
            let n = t.as_f32().unwrap().len();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 13) as f32 - 6.0) * 0.05)
                .collect();
            *t = Tensor::from_f32(t.shape(), v).unwrap();
        }
    }
    let m = DiffusionUNet::<f64>::from_state_dict(&state, cfg.clone()).unwrap();
    let x: Vec<f64> = (0..2 * 2 * 4 * 4)
        .map(|i| ((i % 11) as f64 - 5.0) * 0.2)
        .collect();
    let ctx: Vec<f64> = (0..2 * 3).map(|i| i as f64 * 0.1 - 0.2).collect();
    let ts = [3.0, 500.0];
    let run = |conf: &[usize], null: Option<&[bool]>| {
        let cond = Conditioning {
            context: Some(&ctx),
            context_len: 1,
            context_null: null,
            confounders: Some(conf),
            ..Default::default()
        };
        m.predict(&x, 2, 4, 4, &ts, &cond).unwrap()
    };
    let base = run(&[0, 1, 1, 2], None);
    // Changing sample 1's well changes only sample 1.
    let other = run(&[0, 1, 1, 0], None);
    let half = base.len() / 2;
    assert_eq!(base[..half], other[..half]);
    assert!(base[half..] != other[half..]);
    // Null confounder = its extra table row: equal to putting that row's values in the table.
    let nulls = run(&[NULL, 1, 1, 2], None);
    let mut st2 = state.clone();
    let key = "confounder_embedding.source.weight";
    let tab = st2[key].as_f32().unwrap().to_vec();
    let d = tab.len() / 3;
    let mut swapped = tab.clone();
    swapped[..d].copy_from_slice(&tab[2 * d..]);
    st2.insert(key.into(), Tensor::from_f32(&[3, d], swapped).unwrap());
    let m2 = DiffusionUNet::<f64>::from_state_dict(&st2, cfg.clone()).unwrap();
    let cond = Conditioning {
        context: Some(&ctx),
        context_len: 1,
        confounders: Some(&[0, 1, 1, 2]),
        ..Default::default()
    };
    let via_row = m2.predict(&x, 2, 4, 4, &ts, &cond).unwrap();
    let e = max_rel(&nulls, &via_row);
    assert!(e < 1e-12, "null row {e}");
    // Null context = the learned vector as the context.
    let nc = run(&[0, 1, 1, 2], Some(&[true, false]));
    let nullv: Vec<f64> = state["null_context"]
        .as_f32()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let mut ctx2 = ctx.clone();
    ctx2[..3].copy_from_slice(&nullv);
    let cond = Conditioning {
        context: Some(&ctx2),
        context_len: 1,
        confounders: Some(&[0, 1, 1, 2]),
        ..Default::default()
    };
    let via_ctx = m.predict(&x, 2, 4, 4, &ts, &cond).unwrap();
    assert!(max_rel(&nc, &via_ctx) < 1e-12);
    assert_eq!(nc[half..], base[half..]);
}

#[test]
fn confounder_and_null_context_gradients_match_finite_differences() {
    // The whole model in f64: d(Σ r·out)/d(confounder table, null context) vs central differences.
    let cfg = confounded_config();
    let m = DiffusionUNet::<f64>::new(cfg.clone(), 5).unwrap();
    let mut state = m.state_dict().unwrap();
    for (k, t) in state.iter_mut() {
        if k.contains("conv2") || k.contains("proj_out") || k.starts_with("out.2") {
            let n = t.as_f32().unwrap().len();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.04)
                .collect();
            *t = Tensor::from_f32(t.shape(), v).unwrap();
        }
    }
    let x: Vec<f64> = (0..2 * 4 * 4 * 2)
        .map(|i| ((i % 7) as f64 - 3.0) * 0.3)
        .collect();
    let ctx: Vec<f64> = vec![0.3, -0.1, 0.2, 0.5, 0.4, -0.6];
    let conf = [NULL, 2, 1, NULL];
    let flags = [false, true];
    let ts = [10.0, 900.0];
    let r: Vec<f64> = (0..2 * 4 * 4 * 2)
        .map(|i| ((i * 13 % 9) as f64 - 4.0) * 0.25)
        .collect();
    let loss = |model: &mut DiffusionUNet<f64>, want_grad: bool| -> f64 {
        let cond = Conditioning {
            context: Some(&ctx),
            context_len: 1,
            context_null: Some(&flags),
            confounders: Some(&conf),
            ..Default::default()
        };
        let mut tape = Tape::<f64>::new(true);
        let xv = tape.input(&[2, 4, 4, 2], x.clone(), false).unwrap();
        let out = model.forward(&mut tape, &xv, &ts, &cond).unwrap();
        let l: f64 = tape.data(&out).iter().zip(&r).map(|(a, b)| a * b).sum();
        if want_grad {
            model.params_mut().zero_grad();
            tape.backward_with(&out, r.clone(), model.params_mut())
                .unwrap();
        }
        l
    };
    let mut model = DiffusionUNet::<f64>::from_state_dict(&state, cfg.clone()).unwrap();
    loss(&mut model, true);
    for key in [
        "confounder_embedding.source.weight",
        "confounder_embedding.well.weight",
        "null_context",
    ] {
        let i = model.params().index(key).unwrap();
        let analytic = model.params().grad(i).to_vec();
        let mut worst = 0f64;
        let scale = analytic.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{key}: zero gradient");
        for j in 0..analytic.len() {
            let h = 1e-5;
            let orig = model.params().value(i)[j];
            model.params_mut().value_mut(i)[j] = orig + h;
            let lp = loss(&mut model, false);
            model.params_mut().value_mut(i)[j] = orig - h;
            let lm = loss(&mut model, false);
            model.params_mut().value_mut(i)[j] = orig;
            worst = worst.max(((lp - lm) / (2.0 * h) - analytic[j]).abs() / scale);
        }
        assert!(worst < 1e-6, "{key}: FD error {worst:e}");
        // Rows no sample drew get exactly zero: source row 0, well rows 0 and 1.
        if key == "confounder_embedding.source.weight" {
            let d = analytic.len() / 3;
            assert!(analytic[..d].iter().all(|&v| v == 0.0));
            assert!(analytic[d..].iter().all(|&v| v != 0.0));
        }
        if key == "confounder_embedding.well.weight" {
            let d = analytic.len() / 4;
            assert!(analytic[..2 * d].iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn bad_input_gives_errors_naming_the_problem() {
    let cfg = confounded_config();
    let m = DiffusionUNet::<f32>::new(cfg.clone(), 1).unwrap();
    let x = vec![0f32; 2 * 2 * 4 * 4];
    let ctx = vec![0f32; 6];
    let ts = [1.0, 2.0];
    let cond = |conf: &'static [usize]| Conditioning {
        context: Some(&ctx),
        context_len: 1,
        confounders: Some(conf),
        ..Default::default()
    };
    let err = |r: phenocore::Result<Vec<f32>>| r.unwrap_err().to_string();
    // Wrong latent shape for the config.
    let e = err(m.predict(
        &vec![0f32; 2 * 3 * 4 * 4],
        2,
        4,
        4,
        &ts,
        &cond(&[0, 0, 0, 0]),
    ));
    assert!(e.contains("values") || e.contains("channels"), "{e}");
    let e = err(m.predict(
        &vec![0f32; 2 * 2 * 3 * 3],
        2,
        3,
        3,
        &ts,
        &cond(&[0, 0, 0, 0]),
    ));
    assert!(e.contains("multiples of 2"), "{e}");
    // Confounder index out of range.
    let e = err(m.predict(&x, 2, 4, 4, &ts, &cond(&[0, 0, 0, 3])));
    assert!(e.contains("\"well\"") && e.contains("index 3"), "{e}");
    // NaN latents.
    let mut xn = x.clone();
    xn[37] = f32::NAN;
    let e = err(m.predict(&xn, 2, 4, 4, &ts, &cond(&[0, 0, 0, 0])));
    assert!(e.contains("not finite") && e.contains("sample 1"), "{e}");
    // Guidance (null condition) without null embeddings.
    let mut c2 = cfg.clone();
    c2.null_embeddings = false;
    let m2 = DiffusionUNet::<f32>::new(c2, 1).unwrap();
    let e = err(m2.predict(&x, 2, 4, 4, &ts, &cond(&[NULL, 0, 0, 0])));
    assert!(e.contains("null") && e.contains("source"), "{e}");
    let flags = [true, false];
    let cnull = Conditioning {
        context: Some(&ctx),
        context_len: 1,
        context_null: Some(&flags),
        confounders: Some(&[0, 0, 0, 0]),
        ..Default::default()
    };
    let e = err(m2.predict(&x, 2, 4, 4, &ts, &cnull));
    assert!(e.contains("no null embeddings"), "{e}");
    // Weights for another config: the first mismatching key is named.
    let mut other = cfg.clone();
    other.channels = vec![4, 12];
    other.num_head_channels = vec![4, 6];
    let e = DiffusionUNet::<f32>::from_state_dict(&m.state_dict().unwrap(), other)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("down_blocks.1") || e.contains("middle_block"),
        "{e}"
    );
    assert!(e.contains("[8") && e.contains("[12"), "{e}");
    // Bad configs.
    let mut bad = cfg.clone();
    bad.num_head_channels = vec![4, 3];
    assert!(DiffusionUNet::<f32>::new(bad, 0)
        .err()
        .unwrap()
        .to_string()
        .contains("num_head_channels[1]"));
    let mut bad = cfg;
    bad.attention_levels = vec![true];
    assert!(DiffusionUNet::<f32>::new(bad, 0)
        .err()
        .unwrap()
        .to_string()
        .contains("attention_levels"));
}
