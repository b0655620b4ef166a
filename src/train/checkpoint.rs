//! Training checkpoints: one safetensors file holding the weights and BN statistics (torchvision
//! names, f32), the optimiser's state tensors (`optimizer/<name>`), and in the metadata the step and
//! epoch counters, the optimiser's scalars, the step RNG (ChaCha8 seed, stream, word position), the
//! best score so far and the model config. Written to a temporary file in the same folder and
//! renamed, so a crash, a cancel or a full disk leaves the previous checkpoint as it was.

use super::trainer::Trainer;
use crate::error::{Error, Result};
use crate::models::efficientnet::Padding;
use crate::optim::OptimizerState;
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

const FORMAT: &str = "phenocore-train-checkpoint-1";
const OPT_PREFIX: &str = "optimizer/";
const OLS_PREFIX: &str = "online_label_smoothing/";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

pub fn save(t: &Trainer, path: &Path) -> Result<()> {
    let (model, opt, step, epoch, rng, best) = t.parts();
    // With the training-only heads (domain branch, MIL attention).
    let state = model.full_state_dict()?;
    let ostate = opt.state();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("step".into(), step.to_string());
    meta.insert("epoch".into(), epoch.to_string());
    meta.insert("optimizer".into(), opt.kind().to_string());
    let scalars: Vec<String> = ostate
        .scalars
        .iter()
        .map(|(k, v)| format!("{k}={}", f64_bits(*v)))
        .collect();
    meta.insert("optimizer_scalars".into(), scalars.join(";"));
    meta.insert("rng_seed".into(), hex(&rng.get_seed()));
    meta.insert("rng_stream".into(), rng.get_stream().to_string());
    meta.insert("rng_word_pos".into(), rng.get_word_pos().to_string());
    if let Some((score, e)) = best {
        meta.insert("best_score".into(), f64_bits(score));
        meta.insert("best_epoch".into(), e.to_string());
    }
    let cfg = model.config();
    meta.insert("in_channels".into(), cfg.in_channels.to_string());
    meta.insert("num_classes".into(), cfg.num_classes.to_string());
    meta.insert(
        "padding".into(),
        match cfg.padding {
            Padding::Symmetric => "symmetric".into(),
            Padding::TfSame => "tf_same".into(),
        },
    );
    meta.insert("bn_eps".into(), cfg.bn_eps.to_string());

    let mut owned: Vec<(String, Vec<usize>, &[u8])> = Vec::new();
    for (name, tensor) in &state {
        owned.push((
            name.clone(),
            tensor.shape().to_vec(),
            bytemuck::cast_slice(tensor.as_f32()?),
        ));
    }
    for (name, v) in &ostate.tensors {
        owned.push((
            format!("{OPT_PREFIX}{name}"),
            vec![v.len()],
            bytemuck::cast_slice(v),
        ));
    }
    let ols_bytes: Vec<(String, Vec<usize>, Vec<u8>)> = match t.ols_state() {
        Some(st) => [
            ("supervise", &st.supervise),
            ("update", &st.update),
            ("count", &st.count),
        ]
        .into_iter()
        .map(|(n, v)| {
            (
                format!("{OLS_PREFIX}{n}"),
                vec![v.len()],
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect(),
        None => Vec::new(),
    };
    let views = owned
        .iter()
        .map(|(n, s, d)| (n, s, *d, Dtype::F32))
        .chain(
            ols_bytes
                .iter()
                .map(|(n, s, d)| (n, s, d.as_slice(), Dtype::F64)),
        )
        .map(|(n, s, d, dt)| {
            TensorView::new(dt, s.clone(), d)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Internal(format!("checkpoint tensor {n:?}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, &Some(meta))
        .map_err(|e| Error::Internal(format!("serialise checkpoint: {e}")))?;
    crate::io::write_atomic(path, &bytes)
}

/// f64 kept exactly: its bit pattern in hex.
fn f64_bits(v: f64) -> String {
    format!("{:016x}", v.to_bits())
}

fn parse_bits(s: &str, what: &str) -> Result<f64> {
    u64::from_str_radix(s, 16)
        .map(f64::from_bits)
        .map_err(|_| Error::Format(format!("checkpoint: bad {what} {s:?}")))
}

pub fn load(t: &mut Trainer, path: &Path) -> Result<()> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Io(format!("cannot read checkpoint {}: {e}", path.display())))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Format(format!("{} is not a safetensors file: {e}", path.display())))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| -> Result<&String> {
        meta.get(k).ok_or_else(|| {
            Error::Format(format!(
                "{} is not a phenocore training checkpoint (no {k:?} in its metadata)",
                path.display()
            ))
        })
    };
    if get("format")? != FORMAT {
        return Err(Error::Format(format!(
            "{}: unknown checkpoint format {:?}",
            path.display(),
            get("format")?
        )));
    }
    let parse_u64 = |k: &str| -> Result<u64> {
        get(k)?
            .parse()
            .map_err(|_| Error::Format(format!("checkpoint: bad {k}")))
    };
    let (step, epoch) = (parse_u64("step")?, parse_u64("epoch")?);
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
    let f32s = |name: &str| -> Result<Vec<f32>> {
        let v = st
            .tensor(name)
            .map_err(|_| Error::MissingKey(format!("checkpoint has no tensor {name:?}")))?;
        if v.dtype() != Dtype::F32 {
            return Err(Error::DType(format!(
                "checkpoint tensor {name:?} is not f32"
            )));
        }
        Ok(v.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let mut ostate = OptimizerState::default();
    for name in st.names() {
        if let Some(n) = name.strip_prefix(OPT_PREFIX) {
            ostate.tensors.push((n.to_string(), f32s(name)?));
        }
    }
    for kv in get("optimizer_scalars")?
        .split(';')
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::Format(format!("checkpoint: bad optimizer scalar {kv:?}")))?;
        ostate.scalars.push((k.to_string(), parse_bits(v, k)?));
    }
    let seed: [u8; 32] = unhex(get("rng_seed")?)
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::Format("checkpoint: bad rng_seed".into()))?;
    let stream = parse_u64("rng_stream")?;
    let word_pos: u128 = get("rng_word_pos")?
        .parse()
        .map_err(|_| Error::Format("checkpoint: bad rng_word_pos".into()))?;
    let best = match (meta.get("best_score"), meta.get("best_epoch")) {
        (Some(s), Some(e)) => Some((
            parse_bits(s, "best_score")?,
            e.parse()
                .map_err(|_| Error::Format("checkpoint: bad best_epoch".into()))?,
        )),
        _ => None,
    };

    let f64s = |name: &str| -> Result<Option<Vec<f64>>> {
        match st.tensor(name) {
            Err(_) => Ok(None),
            Ok(v) if v.dtype() == Dtype::F64 => Ok(Some(
                v.data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            )),
            Ok(_) => Err(Error::DType(format!(
                "checkpoint tensor {name:?} is not f64"
            ))),
        }
    };
    let ols = (
        f64s(&format!("{OLS_PREFIX}supervise"))?,
        f64s(&format!("{OLS_PREFIX}update"))?,
        f64s(&format!("{OLS_PREFIX}count"))?,
    );
    if let Some(cur) = t.ols_state() {
        match &ols {
            (Some(s), Some(u), Some(c))
                if s.len() == cur.supervise.len() && u.len() == cur.update.len() && c.len() == cur.count.len() => {}
            _ => {
                return Err(Error::MissingKey(format!(
                    "{}: this trainer uses online label smoothing but the checkpoint has no matching statistics",
                    path.display()
                )))
            }
        }
    }
    let mut fresh = t.fresh_optimizer()?;
    let (model, opt, t_step, t_epoch, rng, t_best) = t.parts_mut();
    let kind = get("optimizer")?;
    if kind != opt.kind() {
        return Err(Error::InvalidArgument(format!(
            "checkpoint was written by a {kind} optimiser, this trainer uses {}",
            opt.kind()
        )));
    }
    // Validate every model tensor before changing anything.
    let params = model.params();
    let mut values = Vec::with_capacity(params.len());
    for (name, shape, _, _) in params.iter() {
        let v = f32s(name)?;
        if v.len() != shape.iter().product::<usize>() {
            return Err(Error::Shape(format!(
                "checkpoint tensor {name:?} has {} values, the model needs shape {shape:?}",
                v.len()
            )));
        }
        values.push(v);
    }
    fresh.load_state(&ostate)?;
    let params = model.params_mut();
    for (i, v) in values.into_iter().enumerate() {
        params.value_mut(i).copy_from_slice(&v);
    }
    *opt = fresh;
    *t_step = step;
    *t_epoch = epoch;
    let mut r = <ChaCha8Rng as rand::SeedableRng>::from_seed(seed);
    r.set_stream(stream);
    r.set_word_pos(word_pos);
    *rng = r;
    *t_best = best;
    if let (Some(s), Some(u), Some(c)) = ols {
        t.set_ols_state(s, u, c);
    }
    Ok(())
}
