//! Inference with weights packed once: dense / 1 × 1 convolutions and linear layers whose weights
//! were packed ahead (a model's inference cache), so repeated forward passes — a sampling loop
//! calls the U-Net 50–1000 times with the same weights — do not repack them on every call. f32 on
//! AVX-512 only ([`PackedConv::new`] returns None elsewhere and callers use the generic ops); no
//! backward (the ops refuse a tape that records gradients).

use crate::autograd::{Buf, Tape, Var};
use crate::backend::cpu::pointwise::PackedPointwise;
use crate::error::{Error, Result};
use crate::ops::conv::{block_rows, im2col_taps, row_block, Geom, Pad2d};
use rayon::prelude::*;

/// A convolution's (or linear layer's) weights and bias packed for the register-tile kernel.
pub struct PackedConv {
    /// k > 1: the im2col register-tile kernel's packing.
    pk: Option<PackedPointwise>,
    /// k = 1 (linear / 1 × 1): Wᵀ as the AVX-512 GEMM's panels, and the bias.
    #[cfg(target_arch = "x86_64")]
    pb: Option<(crate::backend::cpu::sgemm::PackedB, Vec<f32>)>,
    cout: usize,
    cin: usize,
    k: usize,
}

impl PackedConv {
    /// `w` OIHW [cout, cin, k, k] (a linear layer: k = 1), `b` [cout] or None. None when the CPU
    /// lacks AVX-512.
    pub fn new(w: &[f32], b: Option<&[f32]>, cout: usize, cin: usize, k: usize) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && w.len() == cout * cin * k * k {
            let kk = k * k;
            let kdim = cin * kk;
            if kk == 1 {
                use crate::backend::cpu::sgemm::PackedB;
                let bias = match b {
                    Some(b) if b.len() == cout => b.to_vec(),
                    Some(_) => return None,
                    None => vec![0f32; cout],
                };
                return Some(PackedConv {
                    pk: None,
                    pb: Some((PackedB::pack(w, cin, cout, 1, cin), bias)),
                    cout,
                    cin,
                    k,
                });
            }
            // Tap-major [cout, k·k·cin], the layout of `im2col_taps`.
            let wp: Vec<f32> = if kk == 1 {
                w.to_vec()
            } else {
                let mut wp = vec![0f32; cout * kdim];
                for o in 0..cout {
                    for ci in 0..cin {
                        for t in 0..kk {
                            wp[o * kdim + t * cin + ci] = w[(o * cin + ci) * kk + t];
                        }
                    }
                }
                wp
            };
            let zero;
            let bias = match b {
                Some(b) if b.len() == cout => b,
                Some(_) => return None,
                None => {
                    zero = vec![0f32; cout];
                    &zero
                }
            };
            return Some(PackedConv {
                pk: Some(PackedPointwise::new(&wp, bias, cout, kdim)),
                pb: None,
                cout,
                cin,
                k,
            });
        }
        let _ = (w, b, cout, cin, k);
        None
    }

    pub fn out_channels(&self) -> usize {
        self.cout
    }
}

fn no_grad(tape: &Tape<f32>, x: &Var, what: &str) -> Result<()> {
    if tape.records_grad() || tape.requires_grad(x) {
        return Err(Error::Internal(format!(
            "{what}: pre-packed weights are for inference (a no-grad tape)"
        )));
    }
    Ok(())
}

/// y [..., cout] = x [..., cin] · Wᵀ + b (a packed linear layer or 1 × 1 convolution on NHWC rows).
pub fn linear_packed(tape: &mut Tape<f32>, x: &Var, pc: &PackedConv) -> Result<Var> {
    no_grad(tape, x, "linear_packed")?;
    let shape = x.shape().to_vec();
    if pc.k != 1 || shape.last() != Some(&pc.cin) || shape.len() < 2 {
        return Err(Error::Shape(format!(
            "linear_packed: input {shape:?} for packed weights [{}, {}]",
            pc.cout, pc.cin
        )));
    }
    let m = x.numel() / pc.cin;
    let xv = tape.value(x);
    let mut out = Buf::<f32>::alloc(m * pc.cout);
    #[cfg(target_arch = "x86_64")]
    if let Some((pb, bias)) = &pc.pb {
        crate::ops::conv::sgemm_bias(&mut out, &xv, pb.panels(), Some(bias), m, pc.cin, pc.cout);
    }
    if let Some(pk) = &pc.pk {
        let rows = row_block(m);
        out.par_chunks_mut(rows * pc.cout)
            .zip(xv[..m * pc.cin].par_chunks(rows * pc.cin))
            .for_each(|(o, a)| pk.forward(a, o.len() / pc.cout, o, false, false));
    }
    let mut oshape = shape;
    *oshape.last_mut().unwrap_or(&mut 0) = pc.cout;
    Ok(tape.push(&oshape, out, false, |_, _| Ok(())))
}

/// [`crate::ops::conv::conv2d_pad`]'s forward with pre-packed weights and bias: x [N, H, W, cin] →
/// [N, OH, OW, cout].
pub fn conv2d_packed(
    tape: &mut Tape<f32>,
    x: &Var,
    pc: &PackedConv,
    stride: usize,
    pad: Pad2d,
) -> Result<Var> {
    no_grad(tape, x, "conv2d_packed")?;
    let (n, h, w, c) = match x.shape() {
        &[n, h, w, c] if c == pc.cin => (n, h, w, c),
        s => {
            return Err(Error::Shape(format!(
                "conv2d_packed: input must be NHWC with {} channels, got {s:?}",
                pc.cin
            )))
        }
    };
    if pc.k == 1 && stride == 1 && pad == Pad2d::same(0) {
        return linear_packed(tape, x, pc);
    }
    let g = Geom::explicit(h, w, pc.k, stride, pad)?;
    let kdim = c * pc.k * pc.k;
    let (p, per_in, cout) = (g.oh * g.ow, h * w * c, pc.cout);
    let rows = block_rows(&g, kdim);
    let xv = tape.value(x);
    let mut out = Buf::<f32>::alloc(n * p * cout);
    let tasks: Vec<(usize, usize, &mut [f32])> = out
        .chunks_mut(p * cout)
        .enumerate()
        .flat_map(|(s, o)| {
            o.chunks_mut(rows * g.ow * cout)
                .enumerate()
                .map(move |(bi, ob)| (s, bi, ob))
        })
        .collect();
    tasks.into_par_iter().for_each(|(s, bi, ob)| {
        let (oy0, oy1) = (bi * rows, ((bi + 1) * rows).min(g.oh));
        let m = (oy1 - oy0) * g.ow;
        let mut cols = Buf::<f32>::alloc(m * kdim);
        im2col_taps(
            &xv[s * per_in..(s + 1) * per_in],
            c,
            &g,
            oy0,
            oy1,
            &mut cols,
        );
        if let Some(pk) = &pc.pk {
            pk.forward(&cols, m, ob, false, false);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some((pb, bias)) = &pc.pb {
            use crate::backend::cpu::sgemm;
            ob.chunks_exact_mut(cout)
                .for_each(|r| r.copy_from_slice(bias));
            sgemm::gemm_seq(
                m,
                sgemm::AView::rows(&cols, kdim),
                pb.panels(),
                ob,
                cout,
                true,
            );
        }
    });
    Ok(tape.push(&[n, g.oh, g.ow, cout], out, false, |_, _| Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::test_rnd as rnd;
    use crate::ops::conv::conv2d_pad;
    use crate::ops::elementwise::linear;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    /// Packed linear / 1 × 1 (GEMM panels, any stride and padding) and k × k (im2col kernel)
    /// against the tape's unpacked ops.
    #[test]
    fn packed_ops_match_the_tape_ops() {
        let Some(_) = PackedConv::new(&[0.0], None, 1, 1, 1) else {
            return; // no AVX-512
        };
        let (n, h, w, cin, cout) = (2, 7, 6, 19, 70);
        let x = rnd(n * h * w * cin, 1);
        for &(k, stride, pad) in &[(1usize, 1usize, 0usize), (1, 2, 1), (3, 2, 1), (3, 1, 1)] {
            let wt = rnd(cout * cin * k * k, 2);
            let b = rnd(cout, 3);
            let mut t = Tape::<f32>::no_grad();
            let xv = t.input(&[n, h, w, cin], x.clone(), false).unwrap();
            let wv = t.input(&[cout, cin, k, k], wt.clone(), false).unwrap();
            let bv = t.input(&[cout], b.clone(), false).unwrap();
            let want = conv2d_pad(&mut t, &xv, &wv, Some(&bv), stride, Pad2d::same(pad)).unwrap();
            let pc = PackedConv::new(&wt, Some(&b), cout, cin, k).unwrap();
            let got = conv2d_packed(&mut t, &xv, &pc, stride, Pad2d::same(pad)).unwrap();
            assert_eq!(got.shape(), want.shape());
            close(&t.data(&got), &t.data(&want));
            if k == 1 {
                let w2 = t.input(&[cout, cin], wt.clone(), false).unwrap();
                let want = linear(&mut t, &xv, &w2, Some(&bv)).unwrap();
                let got = linear_packed(&mut t, &xv, &pc).unwrap();
                close(&t.data(&got), &t.data(&want));
            }
        }
    }
}
