//! Reading one MONAI U-Net fixture of tests/fixtures/unet (make_unet_fixture.py): every tensor of
//! `<name>.safetensors` as f64 with its shape, and the `DiffusionModelUNet` config of `<name>.json`
//! as a [`UNetConfig`] (no confounders, no null embeddings: MONAI has neither). Shared by
//! tests/unet.rs and the GPU parity suite (tests/gpu/parity/unet.rs).
#![allow(dead_code)]

use phenocore::diffusion::unet::{Conditioning, UNetConfig};
use phenocore::io::safetensors::TensorMap;
use phenocore::tensor::Tensor;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;

pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/unet/");

pub struct UNetFixture {
    /// Tensors by name: (shape, values as f64).
    pub t: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    pub config: UNetConfig,
}

impl UNetFixture {
    pub fn read(name: &str) -> Self {
        let bytes = std::fs::read(format!("{DIR}{name}.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut t = BTreeMap::new();
        for (k, v) in st.tensors() {
            let data: Vec<f64> = v
                .data()
                .chunks_exact(v.dtype().size())
                .map(|c| match v.dtype() {
                    Dtype::F32 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
                    Dtype::F64 => f64::from_le_bytes(c.try_into().unwrap()),
                    Dtype::I64 => i64::from_le_bytes(c.try_into().unwrap()) as f64,
                    d => panic!("{k}: {d:?}"),
                })
                .collect();
            t.insert(k.to_string(), (v.shape().to_vec(), data));
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{DIR}{name}.json")).unwrap())
                .unwrap();
        let levels = json["channels"].as_array().unwrap().len();
        let per_level = |key: &str| -> Vec<usize> {
            match &json[key] {
                serde_json::Value::Array(a) => {
                    a.iter().map(|v| v.as_u64().unwrap() as usize).collect()
                }
                v => vec![v.as_u64().unwrap() as usize; levels],
            }
        };
        let config = UNetConfig {
            in_channels: json["in_channels"].as_u64().unwrap() as usize,
            out_channels: json["out_channels"].as_u64().unwrap() as usize,
            num_res_blocks: per_level("num_res_blocks"),
            channels: per_level("channels"),
            attention_levels: json["attention_levels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_bool().unwrap())
                .collect(),
            norm_num_groups: json["norm_num_groups"].as_u64().unwrap() as usize,
            norm_eps: json["norm_eps"].as_f64().unwrap(),
            resblock_updown: json["resblock_updown"].as_bool().unwrap_or(false),
            num_head_channels: per_level("num_head_channels"),
            with_conditioning: json["with_conditioning"].as_bool().unwrap_or(false),
            transformer_num_layers: json["transformer_num_layers"].as_u64().unwrap_or(1) as usize,
            cross_attention_dim: json["cross_attention_dim"].as_u64().map(|v| v as usize),
            num_class_embeds: json["num_class_embeds"].as_u64().map(|v| v as usize),
            confounders: vec![],
            null_embeddings: false,
        };
        UNetFixture { t, config }
    }

    pub fn get(&self, k: &str) -> &(Vec<usize>, Vec<f64>) {
        self.t.get(k).unwrap_or_else(|| panic!("fixture lacks {k}"))
    }

    /// The fixture's conditions ("context" [n, len, d], "class_labels"), context values through `to`.
    pub fn conditions<T>(&self, to: impl Fn(f64) -> T) -> FixtureConditions<T> {
        let ctx = self.t.get("context");
        FixtureConditions {
            context: ctx.map(|(_, v)| v.iter().map(|&a| to(a)).collect()),
            context_len: ctx.map(|(s, _)| s[1]).unwrap_or(0),
            labels: self
                .t
                .get("class_labels")
                .map(|(_, v)| v.iter().map(|&a| a as usize).collect()),
        }
    }

    /// The weights ("w.<key>") as f32 tensors under their keys, renamed through `rename` when given.
    pub fn weights(&self, rename: Option<&BTreeMap<String, String>>) -> TensorMap {
        let mut m = TensorMap::new();
        for (k, (s, v)) in &self.t {
            if let Some(key) = k.strip_prefix("w.") {
                let key = rename
                    .and_then(|r| r.get(key).cloned())
                    .unwrap_or_else(|| key.to_string());
                let v32 = v.iter().map(|&x| x as f32).collect();
                m.insert(key, Tensor::from_f32(s, v32).unwrap());
            }
        }
        m
    }
}

/// Owned conditions of a fixture; [`FixtureConditions::cond`] borrows them as a [`Conditioning`].
pub struct FixtureConditions<T> {
    pub context: Option<Vec<T>>,
    pub context_len: usize,
    pub labels: Option<Vec<usize>>,
}

impl<T> FixtureConditions<T> {
    pub fn cond(&self) -> Conditioning<'_, T> {
        Conditioning {
            context: self.context.as_deref(),
            context_len: self.context_len,
            context_null: None,
            class_labels: self.labels.as_deref(),
            confounders: None,
        }
    }
}
