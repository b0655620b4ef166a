//! The diffusion U-Net's configuration as JSON: MONAI `DiffusionModelUNet`'s argument names, with
//! MONAI's defaults for the arguments not given, plus this library's `confounders` and
//! `null_embeddings`.
//!
//! ```json
//! {"spatial_dims": 2, "in_channels": 8, "out_channels": 8, "channels": [256, 512, 768],
//!  "attention_levels": [false, true, true], "num_res_blocks": 2, "num_head_channels": [0, 512, 768],
//!  "with_conditioning": true, "cross_attention_dim": 512,
//!  "confounders": {"source": 3, "batch": 10, "well": 384}, "null_embeddings": true}
//! ```
//!
//! `num_res_blocks` and `num_head_channels` take one integer for every level or a list; `confounders`
//! is an object name → number of values (in the order written) or a list of `[name, n]` pairs;
//! `spatial_dims` must be 2. MONAI's `upcast_attention` and `use_flash_attention` are accepted (the
//! computation is f32/f64 attention either way); `include_fc` must be true, `use_combined_linear`
//! false and `dropout_cattn` 0. Unknown keys are errors naming them.

use crate::diffusion::unet::{Confounder, UNetConfig};
use crate::error::{Error, Result};
use serde_json::{json, Value};

/// Every key `UNetConfig::from_json` accepts.
pub const KEYS: &[&str] = &[
    "spatial_dims",
    "in_channels",
    "out_channels",
    "num_res_blocks",
    "channels",
    "attention_levels",
    "norm_num_groups",
    "norm_eps",
    "resblock_updown",
    "num_head_channels",
    "with_conditioning",
    "transformer_num_layers",
    "cross_attention_dim",
    "num_class_embeds",
    "upcast_attention",
    "dropout_cattn",
    "include_fc",
    "use_combined_linear",
    "use_flash_attention",
    "confounders",
    "null_embeddings",
];

fn bad(m: String) -> Error {
    Error::InvalidArgument(format!("U-Net config: {m}"))
}

fn uint(k: &str, v: &Value) -> Result<usize> {
    v.as_u64()
        .and_then(|x| usize::try_from(x).ok())
        .ok_or_else(|| bad(format!("{k:?} must be a non-negative integer, got {v}")))
}

fn boolean(k: &str, v: &Value) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| bad(format!("{k:?} must be true or false, got {v}")))
}

fn list<'a>(k: &str, v: &'a Value) -> Result<&'a Vec<Value>> {
    v.as_array()
        .ok_or_else(|| bad(format!("{k:?} must be a list, got {v}")))
}

fn uint_list(k: &str, v: &Value) -> Result<Vec<usize>> {
    list(k, v)?
        .iter()
        .enumerate()
        .map(|(i, x)| uint(&format!("{k}[{i}]"), x))
        .collect()
}

/// One integer for every level, or a list (checked against the number of levels by `validate`).
fn per_level(k: &str, v: &Value, levels: usize) -> Result<Vec<usize>> {
    if v.is_array() {
        uint_list(k, v)
    } else {
        Ok(vec![uint(k, v)?; levels])
    }
}

fn optional_uint(k: &str, v: &Value) -> Result<Option<usize>> {
    if v.is_null() {
        Ok(None)
    } else {
        uint(k, v).map(Some)
    }
}

/// The keys of the object that is the value of top-level key `key` in the JSON text `text`, in
/// the order written (serde_json's `Map` sorts them). `text` must already be valid JSON.
fn object_key_order(text: &str, key: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    // Strings seen at depth 1 alternate key / value; a key is a string at depth 1 followed by ':'.
    let mut target_depth: Option<usize> = None;
    let mut keys = Vec::new();
    let mut pending_target = false;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                let raw = &text[start..i.min(b.len())];
                // Is it a key (next non-space is ':')?
                let mut j = i + 1;
                while j < b.len() && (b[j] as char).is_ascii_whitespace() {
                    j += 1;
                }
                let is_key = j < b.len() && b[j] == b':';
                if is_key {
                    let name: String = serde_json::from_str(&format!("\"{raw}\""))
                        .unwrap_or_else(|_| raw.to_string());
                    if depth == 1 && name == key {
                        pending_target = true;
                    } else if target_depth == Some(depth) {
                        keys.push(name);
                    }
                } else {
                    pending_target = false;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if pending_target {
                    pending_target = false;
                    if b[i] == b'{' {
                        target_depth = Some(depth);
                    }
                }
            }
            b'}' | b']' => {
                if target_depth == Some(depth) {
                    return keys;
                }
                depth = depth.saturating_sub(1);
            }
            c if !(c as char).is_ascii_whitespace() && c != b':' && c != b',' => {
                // A scalar value: the target key's value is not an object.
                pending_target = false;
            }
            _ => {}
        }
        i += 1;
    }
    keys
}

fn confounders(v: &Value, text: &str) -> Result<Vec<Confounder>> {
    let one = |name: &str, n: &Value| -> Result<Confounder> {
        Ok(Confounder {
            name: name.to_string(),
            num_values: uint(&format!("confounders[{name:?}]"), n)?,
        })
    };
    match v {
        Value::Null => Ok(vec![]),
        Value::Object(map) => {
            let mut order = object_key_order(text, "confounders");
            // The scan is only for the order: fall back to the map's own when it disagrees.
            if order.len() != map.len() || order.iter().any(|k| !map.contains_key(k)) {
                order = map.keys().cloned().collect();
            }
            order.iter().map(|k| one(k, &map[k])).collect()
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, pair)| match pair.as_array().map(|p| p.as_slice()) {
                Some([Value::String(name), n]) => one(name, n),
                _ => Err(bad(format!(
                    "confounders[{i}] must be a [name, number of values] pair, got {pair}"
                ))),
            })
            .collect(),
        _ => Err(bad(format!(
            "\"confounders\" must be an object {{name: number of values}} or a list of [name, n] \
             pairs, got {v}"
        ))),
    }
}

impl UNetConfig {
    /// Parses a JSON object of MONAI `DiffusionModelUNet` arguments (+ `confounders`,
    /// `null_embeddings`); absent arguments take MONAI's defaults (`in_channels` and `out_channels`
    /// are required, as in MONAI). The result is validated.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Format(format!("U-Net config is not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::Format("U-Net config must be a JSON object".to_string()))?;
        let unknown: Vec<&str> = obj
            .keys()
            .map(|k| k.as_str())
            .filter(|k| !KEYS.contains(k))
            .collect();
        if !unknown.is_empty() {
            return Err(bad(format!(
                "unknown key(s) {unknown:?}; known keys: {}",
                KEYS.join(", ")
            )));
        }
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        if let Some(sd) = get("spatial_dims") {
            if uint("spatial_dims", sd)? != 2 {
                return Err(Error::Unsupported(format!(
                    "U-Net config: spatial_dims is {sd}; only 2-D U-Nets are implemented"
                )));
            }
        }
        let required = |k: &str| -> Result<usize> {
            uint(
                k,
                get(k).ok_or_else(|| bad(format!("{k:?} is required (MONAI has no default)")))?,
            )
        };
        let channels = match get("channels") {
            Some(v) => uint_list("channels", v)?,
            None => vec![32, 64, 64, 64],
        };
        let levels = channels.len();
        let attention_levels = match get("attention_levels") {
            Some(v) => list("attention_levels", v)?
                .iter()
                .enumerate()
                .map(|(i, x)| boolean(&format!("attention_levels[{i}]"), x))
                .collect::<Result<Vec<_>>>()?,
            None => vec![false, false, true, true],
        };
        let num_res_blocks = match get("num_res_blocks") {
            Some(v) => per_level("num_res_blocks", v, levels)?,
            None => vec![2, 2, 2, 2],
        };
        let num_head_channels = match get("num_head_channels") {
            Some(v) => per_level("num_head_channels", v, attention_levels.len())?,
            None => vec![8; attention_levels.len()],
        };
        let flag = |k: &str, default: bool| -> Result<bool> {
            get(k).map_or(Ok(default), |v| boolean(k, v))
        };
        if !flag("include_fc", true)? {
            return Err(Error::Unsupported(
                "U-Net config: include_fc = false (attention without the output projection) is not \
                 implemented"
                    .into(),
            ));
        }
        if flag("use_combined_linear", false)? {
            return Err(Error::Unsupported(
                "U-Net config: use_combined_linear = true is not implemented".into(),
            ));
        }
        flag("upcast_attention", false)?;
        flag("use_flash_attention", false)?;
        if let Some(d) = get("dropout_cattn") {
            let d = d
                .as_f64()
                .ok_or_else(|| bad(format!("\"dropout_cattn\" must be a number, got {d}")))?;
            if d != 0.0 {
                return Err(Error::Unsupported(format!(
                    "U-Net config: dropout_cattn = {d}; only 0 is implemented"
                )));
            }
        }
        let norm_eps = match get("norm_eps") {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad(format!("\"norm_eps\" must be a number, got {v}")))?,
            None => 1e-6,
        };
        let config = UNetConfig {
            in_channels: required("in_channels")?,
            out_channels: required("out_channels")?,
            num_res_blocks,
            channels,
            attention_levels,
            norm_num_groups: get("norm_num_groups")
                .map_or(Ok(32), |v| uint("norm_num_groups", v))?,
            norm_eps,
            resblock_updown: flag("resblock_updown", false)?,
            num_head_channels,
            with_conditioning: flag("with_conditioning", false)?,
            transformer_num_layers: get("transformer_num_layers")
                .map_or(Ok(1), |v| uint("transformer_num_layers", v))?,
            cross_attention_dim: match get("cross_attention_dim") {
                Some(v) => optional_uint("cross_attention_dim", v)?,
                None => None,
            },
            num_class_embeds: match get("num_class_embeds") {
                Some(v) => optional_uint("num_class_embeds", v)?,
                None => None,
            },
            confounders: match get("confounders") {
                Some(v) => confounders(v, text)?,
                None => vec![],
            },
            null_embeddings: flag("null_embeddings", false)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// The config as a JSON object `from_json` reads back to an equal config (every key written;
    /// per-level values as lists, confounders as `[name, n]` pairs in their order).
    pub fn to_json(&self) -> String {
        let confounders: Vec<Value> = self
            .confounders
            .iter()
            .map(|c| json!([c.name, c.num_values]))
            .collect();
        let v = json!({
            "spatial_dims": 2,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_res_blocks": self.num_res_blocks,
            "channels": self.channels,
            "attention_levels": self.attention_levels,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "resblock_updown": self.resblock_updown,
            "num_head_channels": self.num_head_channels,
            "with_conditioning": self.with_conditioning,
            "transformer_num_layers": self.transformer_num_layers,
            "cross_attention_dim": self.cross_attention_dim,
            "num_class_embeds": self.num_class_embeds,
            "confounders": confounders,
            "null_embeddings": self.null_embeddings,
        });
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::object_key_order;

    #[test]
    fn key_order_follows_the_text() {
        let t = r#"{"a": {"z": 1}, "confounders" : { "source": 3, "b\"atch": {"x": [1,{"q":2}]}, "well": 384 }, "y": {"k": 1}}"#;
        assert_eq!(
            object_key_order(t, "confounders"),
            vec!["source", "b\"atch", "well"]
        );
        assert!(object_key_order(r#"{"confounders": [["a", 1]]}"#, "confounders").is_empty());
        assert!(object_key_order(r#"{"x": {"confounders": {"a": 1}}}"#, "confounders").is_empty());
    }
}
