//! Shape and small elementwise ops with backward for the diffusion models: reshape, nearest ×2
//! upsampling, concatenation on the last axis, embedding lookup, per-sample broadcast add, scalar
//! multiply and the mean-squared-error loss.

use crate::autograd::{Buf, Float, Tape, Var};
use crate::error::{Error, Result};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// A parallel copy of `src`.
fn par_copy<T: Float>(src: &[T]) -> Buf<T> {
    let mut out = Buf::alloc(src.len());
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(o, s)| o.copy_from_slice(s));
    out
}

/// The same values under another shape with the same number of elements (row-major order kept).
pub fn reshape<T: Float>(tape: &mut Tape<T>, x: &Var, shape: &[usize]) -> Result<Var> {
    if shape.iter().product::<usize>() != x.numel() {
        return Err(Error::Shape(format!(
            "reshape: {:?} ({} values) cannot become {shape:?} ({} values)",
            x.shape(),
            x.numel(),
            shape.iter().product::<usize>()
        )));
    }
    let out = par_copy(&tape.value(x));
    let xid = x.id();
    let need = tape.requires_grad(x);
    Ok(tape.push(shape, out, need, move |out_id, gr| {
        if let Some(d) = gr.take(out_id) {
            gr.add(xid, d);
        }
        Ok(())
    }))
}

/// Nearest-neighbour ×2 upsampling of NHWC maps: [N, H, W, C] → [N, 2H, 2W, C]
/// (torch `F.interpolate(x, scale_factor=2.0, mode="nearest")`).
pub fn upsample_nearest2x<T: Float>(tape: &mut Tape<T>, x: &Var) -> Result<Var> {
    let (n, h, w, c) = match x.shape() {
        &[n, h, w, c] if n * h * w * c > 0 => (n, h, w, c),
        s => {
            return Err(Error::Shape(format!(
                "upsample_nearest2x: input must be a non-empty NHWC (N, H, W, C), got {s:?}"
            )))
        }
    };
    let xv = tape.value(x);
    let (row_in, row_out) = (w * c, 2 * w * c);
    let mut out = Buf::alloc(4 * x.numel());
    // One task per input row: writes output rows 2y and 2y + 1.
    out.par_chunks_mut(2 * row_out)
        .zip(xv.par_chunks(row_in.max(1)))
        .for_each(|(o, xr)| {
            let (top, bottom) = o.split_at_mut(row_out);
            for (px, o2) in xr.chunks_exact(c).zip(top.chunks_exact_mut(2 * c)) {
                o2[..c].copy_from_slice(px);
                o2[c..].copy_from_slice(px);
            }
            bottom.copy_from_slice(top);
        });
    let xid = x.id();
    let need = tape.requires_grad(x);
    Ok(
        tape.push(&[n, 2 * h, 2 * w, c], out, need, move |out_id, gr| {
            if let Some(d) = gr.take(out_id) {
                let mut dx = Buf::alloc(n * h * w * c);
                dx.par_chunks_mut(row_in.max(1))
                    .zip(d.par_chunks(2 * row_out))
                    .for_each(|(dr, d2)| {
                        let (top, bottom) = d2.split_at(row_out);
                        for (j, px) in dr.chunks_exact_mut(c).enumerate() {
                            let (t, b) =
                                (&top[2 * j * c..][..2 * c], &bottom[2 * j * c..][..2 * c]);
                            for i in 0..c {
                                px[i] = (t[i] + t[c + i]) + (b[i] + b[c + i]);
                            }
                        }
                    });
                gr.add(xid, dx);
            }
            Ok(())
        }),
    )
}

/// Concatenation on the last axis of inputs with equal leading dims (torch.cat(dim=1) in NCHW).
pub fn concat_last<T: Float>(tape: &mut Tape<T>, xs: &[&Var]) -> Result<Var> {
    let Some(first) = xs.first() else {
        return Err(Error::InvalidArgument(
            "concat_last: needs at least one input".into(),
        ));
    };
    let lead = &first.shape()[..first.shape().len().saturating_sub(1)];
    if first.shape().is_empty()
        || xs
            .iter()
            .any(|v| v.shape().is_empty() || &v.shape()[..v.shape().len() - 1] != lead)
    {
        return Err(Error::Shape(format!(
            "concat_last: inputs must share all but the last axis, got {:?}",
            xs.iter().map(|v| v.shape().to_vec()).collect::<Vec<_>>()
        )));
    }
    let widths: Vec<usize> = xs.iter().map(|v| *v.shape().last().unwrap_or(&0)).collect();
    let total: usize = widths.iter().sum();
    if total == 0 {
        return Err(Error::Shape(format!(
            "concat_last: all inputs have an empty last axis ({} inputs)",
            xs.len()
        )));
    }
    let rows: usize = lead.iter().product();
    let vals: Vec<_> = xs.iter().map(|v| tape.value(v)).collect();
    let mut out = Buf::alloc(rows * total);
    let rows_per = (CHUNK / total.max(1)).max(1);
    out.par_chunks_mut(rows_per * total.max(1))
        .enumerate()
        .for_each(|(ci, o)| {
            let r0 = ci * rows_per;
            for (i, orow) in o.chunks_exact_mut(total).enumerate() {
                let r = r0 + i;
                let mut at = 0;
                for (v, &wd) in vals.iter().zip(&widths) {
                    orow[at..at + wd].copy_from_slice(&v[r * wd..(r + 1) * wd]);
                    at += wd;
                }
            }
        });
    let ids: Vec<usize> = xs.iter().map(|v| v.id()).collect();
    let need = xs.iter().any(|v| tape.requires_grad(v));
    let mut shape = lead.to_vec();
    shape.push(total);
    Ok(tape.push(&shape, out, need, move |out_id, gr| {
        let Some(d) = gr.take(out_id) else {
            return Ok(());
        };
        let mut at = 0;
        for (&id, &wd) in ids.iter().zip(&widths) {
            if gr.wants(id) && wd > 0 {
                let mut dx = Buf::alloc(rows * wd);
                dx.par_chunks_mut(rows_per * wd)
                    .enumerate()
                    .for_each(|(ci, dr)| {
                        let r0 = ci * rows_per;
                        for (i, row) in dr.chunks_exact_mut(wd).enumerate() {
                            let r = r0 + i;
                            row.copy_from_slice(&d[r * total + at..r * total + at + wd]);
                        }
                    });
                gr.add(id, dx);
            }
            at += wd;
        }
        Ok(())
    }))
}

/// Rows `idx` of `table` [V, D] → [idx.len(), D]; the gradient is scattered back (repeated indices add).
pub fn embedding<T: Float>(tape: &mut Tape<T>, table: &Var, idx: &[usize]) -> Result<Var> {
    let (v, d) = match table.shape() {
        &[v, d] => (v, d),
        s => {
            return Err(Error::Shape(format!(
                "embedding: table must be [V, D], got {s:?}"
            )))
        }
    };
    if let Some((pos, &bad)) = idx.iter().enumerate().find(|(_, &i)| i >= v) {
        return Err(Error::InvalidArgument(format!(
            "embedding: index {bad} (position {pos}) is out of range for a table of {v} rows"
        )));
    }
    let tv = tape.value(table);
    let mut out = Buf::alloc(idx.len() * d);
    for (o, &i) in out.chunks_exact_mut(d.max(1)).zip(idx) {
        o.copy_from_slice(&tv[i * d..(i + 1) * d]);
    }
    let tid = table.id();
    let need = tape.requires_grad(table);
    let idx = idx.to_vec();
    Ok(tape.push(&[idx.len(), d], out, need, move |out_id, gr| {
        if let Some(g) = gr.take(out_id) {
            gr.accumulate(tid, v * d, |acc, _| {
                for (gr_row, &i) in g.chunks_exact(d.max(1)).zip(&idx) {
                    acc[i * d..(i + 1) * d]
                        .iter_mut()
                        .zip(gr_row)
                        .for_each(|(a, &b)| *a += b);
                }
            });
        }
        Ok(())
    }))
}

/// y[n, …, c] = x[n, …, c] + e[n, c] for x [N, …, C] and e [N, C] (e broadcast over the middle axes).
pub fn add_per_sample<T: Float>(tape: &mut Tape<T>, x: &Var, e: &Var) -> Result<Var> {
    let xs = x.shape();
    if xs.len() < 2 || e.shape() != [xs[0], xs[xs.len() - 1]] {
        return Err(Error::Shape(format!(
            "add_per_sample: x {xs:?} needs e of shape [N, C] = [{}, {}], got {:?}",
            xs.first().copied().unwrap_or(0),
            xs.last().copied().unwrap_or(0),
            e.shape()
        )));
    }
    let (n, c) = (xs[0], xs[xs.len() - 1]);
    if x.numel() == 0 {
        return Err(Error::Shape(format!("add_per_sample: empty input {xs:?}")));
    }
    let per = x.numel() / n;
    let (xv, ev) = (tape.value(x), tape.value(e));
    let mut out = Buf::alloc(xv.len());
    let rows_per = (CHUNK / c.max(1)).max(1);
    // Tasks of up to `rows_per` rows, never crossing a sample.
    let tasks: Vec<(usize, usize, &mut [T])> = out
        .chunks_mut(per.max(1))
        .enumerate()
        .flat_map(|(s, o)| {
            o.chunks_mut(rows_per * c.max(1))
                .enumerate()
                .map(move |(j, ch)| (s, s * per + j * rows_per * c, ch))
        })
        .collect();
    tasks.into_par_iter().for_each(|(s, off, o)| {
        let er = &ev[s * c..(s + 1) * c];
        let xs = &xv[off..off + o.len()];
        for (or, xr) in o.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
            for ((o, &a), &b) in or.iter_mut().zip(xr).zip(er) {
                *o = a + b;
            }
        }
    });
    let (xid, eid) = (x.id(), e.id());
    let need = tape.requires_grad(x) || tape.requires_grad(e);
    Ok(tape.push(xs, out, need, move |out_id, gr| {
        let Some(d) = gr.take(out_id) else {
            return Ok(());
        };
        if gr.wants(eid) {
            // Per sample: Σ over its positions, in fixed row order.
            let de: Vec<T> = d
                .par_chunks(per.max(1))
                .flat_map_iter(|ds| {
                    let mut acc = vec![T::ZERO; c];
                    for r in ds.chunks_exact(c) {
                        acc.iter_mut().zip(r).for_each(|(a, &v)| *a += v);
                    }
                    acc
                })
                .collect();
            debug_assert_eq!(de.len(), n * c);
            gr.add(eid, de);
        }
        gr.add(xid, d);
        Ok(())
    }))
}

/// y = s·x.
pub fn mul_scalar<T: Float>(tape: &mut Tape<T>, x: &Var, s: f64) -> Var {
    let st = T::from_f64(s);
    let xv = tape.value(x);
    let mut out = Buf::alloc(xv.len());
    out.par_chunks_mut(CHUNK)
        .zip(xv.par_chunks(CHUNK))
        .for_each(|(o, xs)| o.iter_mut().zip(xs).for_each(|(o, &v)| *o = v * st));
    let xid = x.id();
    let need = tape.requires_grad(x);
    tape.push(x.shape(), out, need, move |out_id, gr| {
        if let Some(mut d) = gr.take(out_id) {
            d.par_chunks_mut(CHUNK)
                .for_each(|ds| ds.iter_mut().for_each(|v| *v *= st));
            gr.add(xid, d);
        }
        Ok(())
    })
}

/// mean((pred − target)²) over all elements → scalar [1] (torch `F.mse_loss`, reduction "mean").
pub fn mse_loss<T: Float>(tape: &mut Tape<T>, pred: &Var, target: &[T]) -> Result<Var> {
    let len = pred.numel();
    if target.len() != len || len == 0 {
        return Err(Error::Shape(format!(
            "mse_loss: prediction {:?} has {len} values, target {}",
            pred.shape(),
            target.len()
        )));
    }
    let pv = tape.value(pred);
    // Fixed chunks, partials in f64 added in order (deterministic).
    let parts: Vec<f64> = pv
        .par_chunks(CHUNK)
        .zip(target.par_chunks(CHUNK))
        .map(|(p, t)| {
            p.iter()
                .zip(t)
                .map(|(&a, &b)| {
                    let d = a - b;
                    d * d
                })
                .sum::<T>()
                .to_f64()
        })
        .collect();
    let loss = parts.iter().sum::<f64>() / len as f64;
    let pid = pred.id();
    let need = tape.requires_grad(pred);
    let target: Buf<T> = par_copy(target);
    Ok(
        tape.push(&[1], vec![T::from_f64(loss)], need, move |out_id, gr| {
            if let Some(g) = gr.take(out_id) {
                let k = g[0] * T::from_f64(2.0 / len as f64);
                let mut d = Buf::alloc(len);
                d.par_chunks_mut(CHUNK)
                    .zip(pv.par_chunks(CHUNK).zip(target.par_chunks(CHUNK)))
                    .for_each(|(d, (p, t))| {
                        for ((d, &p), &t) in d.iter_mut().zip(p).zip(t) {
                            *d = k * (p - t);
                        }
                    });
                gr.add(pid, d);
            }
            Ok(())
        }),
    )
}
