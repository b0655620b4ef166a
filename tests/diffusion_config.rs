//! U-Net configuration JSON (MONAI `DiffusionModelUNet` argument names and defaults, confounders,
//! null embeddings): parsing, defaults, round trip, and errors naming the culprit.

use phenocore::diffusion::unet::{Confounder, DiffusionUNet, UNetConfig};
use phenocore::Error;

fn fixture(name: &str) -> String {
    let p = format!("{}/tests/fixtures/unet/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn err(text: &str) -> String {
    match UNetConfig::from_json(text) {
        Ok(c) => panic!("{text} parsed to {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn monai_fixture_configs_parse() {
    let c = UNetConfig::from_json(&fixture("cond.json")).unwrap();
    assert_eq!(c.in_channels, 3);
    assert_eq!(c.out_channels, 3);
    assert_eq!(c.channels, vec![4, 8, 12]);
    assert_eq!(c.attention_levels, vec![false, true, true]);
    assert_eq!(c.num_res_blocks, vec![1, 1, 1]); // int broadcast to every level
    assert_eq!(c.num_head_channels, vec![0, 4, 6]);
    assert_eq!(c.norm_num_groups, 2);
    assert_eq!(c.norm_eps, 1e-6);
    assert!(c.with_conditioning && !c.resblock_updown && !c.null_embeddings);
    assert_eq!(c.cross_attention_dim, Some(6));
    assert_eq!(c.num_class_embeds, Some(5));
    assert_eq!(c.transformer_num_layers, 1);
    assert!(c.confounders.is_empty());

    let p = UNetConfig::from_json(&fixture("plain.json")).unwrap();
    assert_eq!(p.num_res_blocks, vec![2, 2]);
    assert_eq!(p.num_head_channels, vec![4, 4]);
    assert_eq!(p.norm_eps, 1e-5);
    assert!(p.resblock_updown && !p.with_conditioning);
    assert_eq!((p.cross_attention_dim, p.num_class_embeds), (None, None));
}

/// The parameter count of a U-Net built from the parsed config equals the number of values MONAI
/// saved for that config in the fixture (keys "w.*").
#[test]
fn parsed_config_has_monais_parameter_count() {
    for name in ["cond", "plain"] {
        let c = UNetConfig::from_json(&fixture(&format!("{name}.json"))).unwrap();
        let bytes = std::fs::read(format!(
            "{}/tests/fixtures/unet/{name}.safetensors",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let monai: usize = st
            .tensors()
            .iter()
            .filter(|(k, _)| k.starts_with("w."))
            .map(|(_, v)| v.shape().iter().product::<usize>())
            .sum();
        let ours = DiffusionUNet::<f32>::new(c, 0).unwrap().num_parameters();
        assert_eq!(ours, monai, "{name}");
        assert!(monai > 1000);
    }
}

#[test]
fn monai_defaults_fill_absent_keys() {
    let c = UNetConfig::from_json(r#"{"spatial_dims": 2, "in_channels": 1, "out_channels": 2}"#)
        .unwrap();
    assert_eq!(c.channels, vec![32, 64, 64, 64]);
    assert_eq!(c.attention_levels, vec![false, false, true, true]);
    assert_eq!(c.num_res_blocks, vec![2; 4]);
    assert_eq!(c.num_head_channels, vec![8; 4]);
    assert_eq!(c.norm_num_groups, 32);
    assert_eq!(c.norm_eps, 1e-6);
    assert_eq!(c.transformer_num_layers, 1);
    assert!(!c.resblock_updown && !c.with_conditioning && !c.null_embeddings);
    assert_eq!((c.cross_attention_dim, c.num_class_embeds), (None, None));
    // MONAI flags with no effect on f32 math are accepted; null = absent.
    let d = UNetConfig::from_json(
        r#"{"in_channels": 1, "out_channels": 2, "upcast_attention": true,
            "use_flash_attention": true, "include_fc": true, "use_combined_linear": false,
            "dropout_cattn": 0.0, "cross_attention_dim": null, "num_class_embeds": null}"#,
    )
    .unwrap();
    assert_eq!(c, d);
}

#[test]
fn confounders_keep_their_written_order() {
    let base = r#""in_channels": 8, "out_channels": 8, "channels": [32, 64], "num_res_blocks": 1, "attention_levels": [false, true], "num_head_channels": 32, "null_embeddings": true"#;
    let obj = UNetConfig::from_json(&format!(
        r#"{{"confounders": {{"source": 3, "batch": 10, "well": 384}}, {base}}}"#
    ))
    .unwrap();
    let want = vec![
        Confounder {
            name: "source".into(),
            num_values: 3,
        },
        Confounder {
            name: "batch".into(),
            num_values: 10,
        },
        Confounder {
            name: "well".into(),
            num_values: 384,
        },
    ];
    assert_eq!(obj.confounders, want);
    assert!(obj.null_embeddings);
    let pairs = UNetConfig::from_json(&format!(
        r#"{{{base}, "confounders": [["source", 3], ["batch", 10], ["well", 384]]}}"#
    ))
    .unwrap();
    assert_eq!(pairs, obj);
}

#[test]
fn to_json_round_trips() {
    let paper = UNetConfig::paper(3, 10, 384);
    let text = paper.to_json();
    assert_eq!(UNetConfig::from_json(&text).unwrap(), paper);
    let cond = UNetConfig::from_json(&fixture("cond.json")).unwrap();
    assert_eq!(UNetConfig::from_json(&cond.to_json()).unwrap(), cond);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["confounders"][2], serde_json::json!(["well", 384]));
    assert_eq!(v["cross_attention_dim"], serde_json::json!(512));
}

#[test]
fn bad_configs_name_the_culprit() {
    let e = err(r#"{"in_channels": 1, "out_channels": 1, "num_res_block": 2, "chanels": [4]}"#);
    assert!(
        e.contains("num_res_block") && e.contains("chanels") && e.contains("unknown"),
        "{e}"
    );
    let e = err(r#"{"spatial_dims": 3, "in_channels": 1, "out_channels": 1}"#);
    assert!(e.contains("spatial_dims") && e.contains('3'), "{e}");
    assert!(matches!(
        UNetConfig::from_json(r#"{"spatial_dims": 3, "in_channels": 1, "out_channels": 1}"#),
        Err(Error::Unsupported(_))
    ));
    let e = err(r#"{"out_channels": 1}"#);
    assert!(e.contains("in_channels") && e.contains("required"), "{e}");
    let e = err(r#"{"in_channels": 1, "out_channels": 1, "num_head_channels": [8, 8]}"#);
    assert!(e.contains("num_head_channels"), "{e}");
    let e = err(r#"{"in_channels": -1, "out_channels": 1}"#);
    assert!(e.contains("in_channels"), "{e}");
    let e = err(r#"{"in_channels": 1, "out_channels": 1, "with_conditioning": true}"#);
    assert!(e.contains("cross_attention_dim"), "{e}");
    let e = err(r#"{"in_channels": 1, "out_channels": 1, "confounders": {"source": 0}}"#);
    assert!(e.contains("source"), "{e}");
    let e = err(r#"{"in_channels": 1, "out_channels": 1, "confounders": [["source"]]}"#);
    assert!(e.contains("confounders[0]"), "{e}");
    let e = err(r#"{"in_channels": 1, "out_channels": 1, "confounders": 3}"#);
    assert!(e.contains("confounders"), "{e}");
    let e = err(r#"{"in_channels": 1, "out_channels": 1, "use_combined_linear": true}"#);
    assert!(e.contains("use_combined_linear"), "{e}");
    let e = err(r#"{"in_channels": 1, "out_channels": 1, "dropout_cattn": 0.1}"#);
    assert!(e.contains("dropout_cattn"), "{e}");
    let e = err(r#"{"in_channels": 1, "out_channels": 1, "norm_eps": "small"}"#);
    assert!(e.contains("norm_eps"), "{e}");
    let e = err("[1, 2]");
    assert!(e.contains("object"), "{e}");
    let e = err("{\"in_channels\": 1,");
    assert!(e.contains("JSON"), "{e}");
}
