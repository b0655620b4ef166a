use super::*;
use phenocore::autograd::{Params, Tape, Var};
use phenocore::backend::gpu::shape::{
    activation_backward, add, sum_f32, ActivationGrad, ConcatLast, Embedding, SampleChannels,
    Upsample2x,
};
use phenocore::backend::gpu::Gpu;
use phenocore::ops::elementwise;
use phenocore::ops::shape as cpu_shape;
use phenocore::DType;

/// The CPU op on an f64 tape: `f` gets the inputs (each requiring a gradient) and returns the
/// output; back-propagates `dy` and returns the output and each input's gradient (zeros if none).
fn tape_ref(
    inputs: &[(&[usize], &[f64])],
    dy: Option<&[f64]>,
    f: impl FnOnce(&mut Tape<f64>, &[Var]) -> Var,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut tape = Tape::<f64>::new(true);
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(s, v)| tape.input(s, v.to_vec(), true).unwrap())
        .collect();
    let y = f(&mut tape, &vars);
    let out = tape.data(&y).to_vec();
    let Some(dy) = dy else {
        return (out, vec![]);
    };
    let grads = tape
        .backward_with(&y, dy.to_vec(), &mut Params::new())
        .unwrap();
    let gs = vars
        .iter()
        .zip(inputs)
        .map(|(v, (_, d))| {
            grads
                .get(v)
                .map_or_else(|| vec![0.0; d.len()], <[f64]>::to_vec)
        })
        .collect();
    (out, gs)
}

/// Device buffers of one storage dtype; `offset` elements of padding in front of each upload
/// (1 makes the address not 16-byte aligned, so the scalar entry points run).
struct Io<'a, G: Gpu> {
    g: &'a G,
    dtype: DType,
    offset: usize,
}

/// A device buffer and the address of its data.
struct Dev<B> {
    _buf: B,
    ptr: u64,
}

impl<'a, G: Gpu> Io<'a, G> {
    fn new(g: &'a G, dtype: DType, offset: usize) -> Self {
        Io { g, dtype, offset }
    }

    fn tol(&self) -> f64 {
        if self.dtype == DType::BF16 {
            BF16_TOL
        } else {
            F32_TOL
        }
    }

    fn es(&self) -> usize {
        self.dtype.size_in_bytes()
    }

    /// Uploads v rounded to the dtype; returns the buffer and the rounded values (the reference's inputs).
    fn up(&self, v: &[f32]) -> (Dev<G::Buf>, Vec<f64>) {
        let mut padded = vec![0f32; self.offset];
        padded.extend_from_slice(v);
        let (buf, vals) = if self.dtype == DType::BF16 {
            let (bits, vals) = to_bf16(&padded);
            (self.g.upload_slice(&bits).unwrap(), vals)
        } else {
            (self.g.upload_slice(&padded).unwrap(), padded)
        };
        let ptr = self.g.ptr(&buf) + (self.offset * self.es()) as u64;
        (Dev { _buf: buf, ptr }, f64s(&vals[self.offset..]))
    }

    /// `n` uninitialised elements (after the padding).
    fn alloc(&self, n: usize) -> Dev<G::Buf> {
        let buf = self.g.alloc((n + self.offset) * self.es()).unwrap();
        let ptr = self.g.ptr(&buf) + (self.offset * self.es()) as u64;
        Dev { _buf: buf, ptr }
    }

    fn down(&self, d: &Dev<G::Buf>, n: usize) -> Vec<f64> {
        let all = n + self.offset;
        let v = if self.dtype == DType::BF16 {
            from_bf16(&self.g.download_vec::<u16>(&d._buf, all).unwrap())
        } else {
            f64s(&self.g.download_vec::<f32>(&d._buf, all).unwrap())
        };
        v[self.offset..].to_vec()
    }
}

/// f32 and bf16, aligned (vector entry points where the shape allows) and offset by one element.
fn layouts<G: Gpu>(g: &G) -> Vec<Io<'_, G>> {
    let mut v = vec![];
    for dtype in [DType::F32, DType::BF16] {
        for offset in [0, 1] {
            v.push(Io::new(g, dtype, offset));
        }
    }
    v
}

// ------------------------------------------------------------------------------------------------

/// SiLU / sigmoid backward and add: a pack tail (n % 8 ≠ 0) and several grid-stride steps
/// (40 003 elements on the emulation's 2 × 8 blocks of 256 threads); add also in place.
pub fn shape_activation_backward_and_add<G: Gpu>(g: &G) {
    let n = 40_003;
    for io in layouts(g) {
        let name = format!("{:?} offset {}", io.dtype, io.offset);
        let (xb, x) = io.up(&uniform(n, 1).iter().map(|v| 4.0 * v).collect::<Vec<_>>());
        let (dyb, dy) = io.up(&uniform(n, 2));
        for op in [ActivationGrad::Silu, ActivationGrad::Sigmoid] {
            let (_, grads) = tape_ref(&[(&[n], &x)], Some(&dy), |t, v| match op {
                ActivationGrad::Silu => elementwise::silu(t, &v[0]),
                ActivationGrad::Sigmoid => elementwise::sigmoid(t, &v[0]),
            });
            let dxb = io.alloc(n);
            unsafe { activation_backward(g, op, io.dtype, xb.ptr, dyb.ptr, dxb.ptr, n).unwrap() };
            assert_close(
                &format!("{op:?} backward {name}"),
                &io.down(&dxb, n),
                &grads[0],
                io.tol(),
            );
        }
        // y = x + dy, then in place: x += dy.
        let (want, _) = tape_ref(&[(&[n], &x), (&[n], &dy)], None, |t, v| {
            elementwise::add(t, &v[0], &v[1]).unwrap()
        });
        let yb = io.alloc(n);
        unsafe {
            add(g, io.dtype, xb.ptr, dyb.ptr, yb.ptr, n).unwrap();
            add(g, io.dtype, xb.ptr, dyb.ptr, xb.ptr, n).unwrap();
        }
        assert_close(&format!("add {name}"), &io.down(&yb, n), &want, io.tol());
        assert_close(
            &format!("add in place {name}"),
            &io.down(&xb, n),
            &want,
            io.tol(),
        );
    }
}

// ------------------------------------------------------------------------------------------------

/// (n, middle axes, c): odd channel counts (scalar entry points), multiples of 8 (vector ones),
/// one split (many samples × channel blocks, few positions) and several (one sample, many positions).
const SAMPLE_CASES: [(usize, &[usize], usize); 5] = [
    (2, &[37], 5),
    (3, &[5, 10], 16),
    (1, &[15, 20], 8),
    (4, &[3, 3], 33),
    (2, &[13, 10], 64),
];

/// Pooling, the squeeze-excite multiply (forward, dx, ds, the fused dx with the pool's gradient)
/// and the per-sample add (forward, de) against the CPU ops.
pub fn shape_pooling_and_squeeze_excite<G: Gpu>(g: &G) {
    let mut saw_splits = false;
    for (i, &(n, mid, c)) in SAMPLE_CASES.iter().enumerate() {
        let mut shape_v = vec![n];
        shape_v.extend_from_slice(mid);
        shape_v.push(c);
        let shape = &shape_v[..];
        for io in layouts(g) {
            let plan = SampleChannels::from_shape(io.dtype, shape).unwrap();
            saw_splits |= plan.reduction_splits(g) > 1;
            let (len, pl) = (plan.len(), plan.pooled_len());
            let name = format!("case {i} {shape:?} {:?} offset {}", io.dtype, io.offset);
            let seed = 10 * i as u64;
            let (xb, x) = io.up(&uniform(len, seed));
            let (sb, s) = io.up(&uniform(pl, seed + 1));
            let (dyb, dy) = io.up(&uniform(len, seed + 2));
            let (dpb, dp) = io.up(&uniform(pl, seed + 3));
            let tol = io.tol();

            // Global average pool.
            let (want_y, gr) = tape_ref(&[(shape, &x)], Some(&dp), |t, v| {
                elementwise::global_avg_pool(t, &v[0]).unwrap()
            });
            let want_pool_dx = gr[0].clone();
            let (yb, dxb) = (io.alloc(pl), io.alloc(len));
            unsafe {
                plan.global_avg_pool(g, xb.ptr, yb.ptr).unwrap();
                plan.global_avg_pool_backward(g, dpb.ptr, dxb.ptr, false)
                    .unwrap();
            }
            assert_close(&format!("pool {name}"), &io.down(&yb, pl), &want_y, tol);
            assert_close(
                &format!("pool backward {name}"),
                &io.down(&dxb, len),
                &want_pool_dx,
                tol,
            );

            // Squeeze-excite multiply.
            let (want_y, gr) = tape_ref(&[(shape, &x), (&[n, c], &s)], Some(&dy), |t, v| {
                elementwise::scale_channels(t, &v[0], &v[1]).unwrap()
            });
            let (yb, dxb, dsb, fused) = (io.alloc(len), io.alloc(len), io.alloc(pl), io.alloc(len));
            unsafe {
                plan.scale_channels(g, xb.ptr, sb.ptr, yb.ptr).unwrap();
                plan.scale_channels_backward_x(g, dyb.ptr, sb.ptr, dxb.ptr)
                    .unwrap();
                plan.scale_channels_backward_s(g, dyb.ptr, xb.ptr, dsb.ptr, false)
                    .unwrap();
                plan.scale_channels_backward_x_pooled(g, dyb.ptr, sb.ptr, dpb.ptr, fused.ptr)
                    .unwrap();
            }
            assert_close(
                &format!("scale_channels {name}"),
                &io.down(&yb, len),
                &want_y,
                tol,
            );
            assert_close(
                &format!("scale_channels dx {name}"),
                &io.down(&dxb, len),
                &gr[0],
                tol,
            );
            assert_close(
                &format!("scale_channels ds {name}"),
                &io.down(&dsb, pl),
                &gr[1],
                tol,
            );
            let want_fused: Vec<f64> = gr[0]
                .iter()
                .zip(&want_pool_dx)
                .map(|(a, b)| a + b)
                .collect();
            assert_close(
                &format!("scale_channels fused dx {name}"),
                &io.down(&fused, len),
                &want_fused,
                tol,
            );

            // Per-sample add.
            let (want_y, gr) = tape_ref(&[(shape, &x), (&[n, c], &s)], Some(&dy), |t, v| {
                cpu_shape::add_per_sample(t, &v[0], &v[1]).unwrap()
            });
            let (yb, deb) = (io.alloc(len), io.alloc(pl));
            unsafe {
                plan.add_per_sample(g, xb.ptr, sb.ptr, yb.ptr).unwrap();
                plan.add_per_sample_backward_e(g, dyb.ptr, deb.ptr, false)
                    .unwrap();
            }
            assert_close(
                &format!("add_per_sample {name}"),
                &io.down(&yb, len),
                &want_y,
                tol,
            );
            assert_close(
                &format!("add_per_sample de {name}"),
                &io.down(&deb, pl),
                &gr[1],
                tol,
            );
            assert_eq!(gr[0], dy, "add_per_sample: x's gradient is dy");
        }
    }
    assert!(saw_splits, "no case split its reduction over positions");
}

/// The accumulating forms add to what is there (in place: x += e, x · s into x too).
pub fn shape_per_sample_accumulate_and_in_place<G: Gpu>(g: &G) {
    for (n, mid, c) in [SAMPLE_CASES[1], SAMPLE_CASES[2], SAMPLE_CASES[3]] {
        let mut shape = vec![n];
        shape.extend_from_slice(mid);
        shape.push(c);
        for io in layouts(g) {
            let plan = SampleChannels::from_shape(io.dtype, &shape).unwrap();
            let (len, pl) = (plan.len(), plan.pooled_len());
            let name = format!("{shape:?} {:?} offset {}", io.dtype, io.offset);
            let (xb, x) = io.up(&uniform(len, 1));
            let (dyb, _) = io.up(&uniform(len, 2));
            let (dpb, dp) = io.up(&uniform(pl, 3));
            let (start_p, sp) = io.up(&uniform(pl, 4));
            let (start_x, sx) = io.up(&uniform(len, 5));
            let (ds_acc, ds_start) = io.up(&uniform(pl, 6));
            let (de_acc, de_start) = io.up(&uniform(pl, 7));
            let (fresh_ds, fresh_de) = (io.alloc(pl), io.alloc(pl));
            unsafe {
                plan.scale_channels_backward_s(g, dyb.ptr, xb.ptr, ds_acc.ptr, true)
                    .unwrap();
                plan.scale_channels_backward_s(g, dyb.ptr, xb.ptr, fresh_ds.ptr, false)
                    .unwrap();
                plan.add_per_sample_backward_e(g, dyb.ptr, de_acc.ptr, true)
                    .unwrap();
                plan.add_per_sample_backward_e(g, dyb.ptr, fresh_de.ptr, false)
                    .unwrap();
                plan.global_avg_pool_backward(g, dpb.ptr, start_x.ptr, true)
                    .unwrap();
                // x ← x + e, then x ← x · e, in place.
                plan.add_per_sample(g, xb.ptr, start_p.ptr, xb.ptr).unwrap();
                plan.scale_channels(g, xb.ptr, start_p.ptr, xb.ptr).unwrap();
            }
            let plus =
                |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a + b).collect::<Vec<_>>();
            let tol = io.tol();
            let ds = io.down(&fresh_ds, pl);
            assert_close(
                &format!("ds accumulate {name}"),
                &io.down(&ds_acc, pl),
                &plus(&ds_start, &ds),
                tol,
            );
            let de = io.down(&fresh_de, pl);
            assert_close(
                &format!("de accumulate {name}"),
                &io.down(&de_acc, pl),
                &plus(&de_start, &de),
                tol,
            );
            let p = plan.p as f64;
            let want: Vec<f64> = (0..len)
                .map(|i| sx[i] + dp[(i / (plan.p * c)) * c + i % c] / p)
                .collect();
            assert_close(
                &format!("pool backward accumulate {name}"),
                &io.down(&start_x, len),
                &want,
                tol,
            );
            let want: Vec<f64> = (0..len)
                .map(|i| {
                    let e = sp[(i / (plan.p * c)) * c + i % c];
                    (x[i] + e) * e
                })
                .collect();
            assert_close(
                &format!("in place (x + e) · e {name}"),
                &io.down(&xb, len),
                &want,
                tol,
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------

/// Nearest 2× upsampling: rows of 3 channels (4- / 2-byte words, scalar backward), of 8 (vector),
/// of 12 (48 / 24 bytes: 16- / 8-byte words).
pub fn shape_upsample_nearest2x<G: Gpu>(g: &G) {
    for (i, shape) in [[2, 3, 5, 3], [1, 4, 3, 8], [2, 5, 7, 12], [3, 7, 9, 1]]
        .into_iter()
        .enumerate()
    {
        for io in layouts(g) {
            let plan = Upsample2x::new(io.dtype, shape).unwrap();
            let name = format!("upsample {shape:?} {:?} offset {}", io.dtype, io.offset);
            let (xb, x) = io.up(&uniform(plan.input_len(), 20 + i as u64));
            let (dyb, dy) = io.up(&uniform(plan.output_len(), 30 + i as u64));
            let (want_y, gr) = tape_ref(&[(&shape, &x)], Some(&dy), |t, v| {
                cpu_shape::upsample_nearest2x(t, &v[0]).unwrap()
            });
            let (yb, dxb) = (io.alloc(plan.output_len()), io.alloc(plan.input_len()));
            unsafe {
                plan.forward(g, xb.ptr, yb.ptr).unwrap();
                plan.backward(g, dyb.ptr, dxb.ptr).unwrap();
            }
            // A copy: exact.
            assert_eq!(io.down(&yb, plan.output_len()), want_y, "{name}: forward");
            assert_close(
                &format!("{name}: backward"),
                &io.down(&dxb, plan.input_len()),
                &gr[0],
                io.tol(),
            );
        }
    }
}

/// Concatenation on the last axis and its split: widths giving every word size, an empty input,
/// a skipped gradient.
pub fn shape_concat_last<G: Gpu>(g: &G) {
    let cases: [(usize, &[usize]); 4] = [
        (7, &[3, 8, 5]),
        (33, &[4, 4]),
        (5, &[0, 6, 2]),
        (9, &[16, 1, 8, 7]),
    ];
    for (i, (rows, widths)) in cases.into_iter().enumerate() {
        for io in layouts(g) {
            let plan = ConcatLast::new(io.dtype, rows, widths).unwrap();
            let name = format!(
                "concat {rows} × {widths:?} {:?} offset {}",
                io.dtype, io.offset
            );
            let inputs: Vec<_> = (0..widths.len())
                .map(|j| io.up(&uniform(plan.input_len(j), 40 + 10 * i as u64 + j as u64)))
                .collect();
            let (dyb, dy) = io.up(&uniform(plan.output_len(), 99));
            let shapes: Vec<[usize; 2]> = widths.iter().map(|&w| [rows, w]).collect();
            let refs: Vec<(&[usize], &[f64])> = shapes
                .iter()
                .zip(&inputs)
                .map(|(s, (_, v))| (&s[..], &v[..]))
                .collect();
            let (want_y, gr) = tape_ref(&refs, Some(&dy), |t, v| {
                cpu_shape::concat_last(t, &v.iter().collect::<Vec<_>>()).unwrap()
            });
            let yb = io.alloc(plan.output_len());
            let dxs: Vec<_> = (0..widths.len())
                .map(|j| io.alloc(plan.input_len(j)))
                .collect();
            // The last input's gradient is not wanted.
            let wanted: Vec<Option<u64>> = dxs
                .iter()
                .enumerate()
                .map(|(j, d)| (j + 1 < widths.len()).then_some(d.ptr))
                .collect();
            unsafe {
                plan.forward(
                    g,
                    &inputs.iter().map(|(d, _)| d.ptr).collect::<Vec<_>>(),
                    yb.ptr,
                )
                .unwrap();
                plan.backward(g, dyb.ptr, &wanted).unwrap();
            }
            assert_eq!(io.down(&yb, plan.output_len()), want_y, "{name}: forward");
            for j in 0..widths.len() - 1 {
                assert_eq!(
                    io.down(&dxs[j], plan.input_len(j)),
                    gr[j],
                    "{name}: gradient of input {j}"
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------

/// Embedding gather and deterministic scatter-add: repeated indices, unused rows, odd widths
/// (2- / 4-byte words), a table gradient over several grid-stride steps, accumulation.
pub fn shape_embedding_gather_scatter<G: Gpu>(g: &G) {
    let many: Vec<usize> = uniform(300, 77)
        .iter()
        .map(|v| ((v + 1.0) * 6.5) as usize % 13)
        .collect();
    let cases: [(usize, usize, Vec<usize>); 4] = [
        (11, 6, vec![3, 0, 3, 10, 3, 7, 0]),
        (11, 7, vec![5]),
        (13, 1000, many),
        (4, 16, vec![]),
    ];
    for (i, (vocab, d, idx)) in cases.iter().enumerate() {
        for io in layouts(g) {
            let plan = Embedding::new(io.dtype, *vocab, *d, idx).unwrap();
            let name = format!(
                "embedding case {i} [{vocab}, {d}] {:?} offset {}",
                io.dtype, io.offset
            );
            let (tb, table) = io.up(&uniform(plan.table_len(), 50 + i as u64));
            let (dyb, dy) = io.up(&uniform(plan.output_len(), 60 + i as u64));
            let (want_y, gr) = tape_ref(&[(&[*vocab, *d], &table)], Some(&dy), |t, v| {
                cpu_shape::embedding(t, &v[0], idx).unwrap()
            });
            let yb = io.alloc(plan.output_len());
            let dtable = g.alloc(plan.table_len() * 4).unwrap();
            let start = uniform(plan.table_len(), 70);
            let acc = g.upload_slice(&start).unwrap();
            unsafe {
                plan.forward(g, tb.ptr, yb.ptr).unwrap();
                plan.backward(g, dyb.ptr, g.ptr(&dtable), false).unwrap();
                plan.backward(g, dyb.ptr, g.ptr(&acc), true).unwrap();
            }
            assert_eq!(io.down(&yb, plan.output_len()), want_y, "{name}: forward");
            let got = f64s(&g.download_vec::<f32>(&dtable, plan.table_len()).unwrap());
            // The table gradient is f32 for either storage: only f32 summation error.
            assert_close(&format!("{name}: table gradient"), &got, &gr[0], F32_TOL);
            let want: Vec<f64> = start
                .iter()
                .zip(&gr[0])
                .map(|(&s, g)| s as f64 + g)
                .collect();
            let got = f64s(&g.download_vec::<f32>(&acc, plan.table_len()).unwrap());
            assert_close(
                &format!("{name}: accumulated table gradient"),
                &got,
                &want,
                F32_TOL,
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------

/// The deterministic sum: empty, below one pack, one block plus one, many blocks (aligned and
/// offset); scale and accumulate; the same bits on a second run.
pub fn shape_deterministic_sum<G: Gpu>(g: &G) {
    for n in [0usize, 3, 8193, 100_003] {
        for offset in [0usize, 1] {
            let name = format!("sum n = {n} offset {offset}");
            // Signed values: compare against Σ|x| (the sum's natural error scale).
            let mut x = vec![0f32; offset];
            x.extend(uniform(n, 90 + n as u64));
            let xb = g.upload_slice(&x).unwrap();
            let xp = g.ptr(&xb) + 4 * offset as u64;
            let vals = f64s(&x[offset..]);
            let exact: f64 = vals.iter().sum();
            let abs: f64 = vals.iter().map(|v| v.abs()).sum::<f64>().max(1.0);
            let out = g.upload_slice(&[0.25f32, 0.0]).unwrap();
            let op = g.ptr(&out);
            unsafe {
                sum_f32(g, xp, n, op, 1.0, false).unwrap();
                sum_f32(g, xp, n, op + 4, 1.0, false).unwrap();
            }
            let r = g.download_vec::<f32>(&out, 2).unwrap();
            assert!(
                (r[0] as f64 - exact).abs() <= 1e-6 * abs,
                "{name}: got {}, want {exact}",
                r[0]
            );
            assert_eq!(r[0].to_bits(), r[1].to_bits(), "{name}: two runs differ");
            // Scaled and accumulated: out = 0.5 + 0.5 Σ.
            let out = g.upload_slice(&[0.5f32]).unwrap();
            unsafe { sum_f32(g, xp, n, g.ptr(&out), 0.5, true).unwrap() };
            let r = g.download_vec::<f32>(&out, 1).unwrap()[0] as f64;
            assert!(
                (r - (0.5 + 0.5 * exact)).abs() <= 1e-6 * abs,
                "{name}: scaled + accumulated got {r}"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------

/// Plans reject what the kernels do not support with an error, never a panic.
pub fn shape_rejects_unsupported_plans<G: Gpu>(g: &G) {
    assert!(SampleChannels::new(DType::F64, [1, 2, 3]).is_err());
    assert!(SampleChannels::new(DType::F32, [1, 0, 3]).is_err());
    assert!(SampleChannels::new(DType::F32, [1, 2, 1 << 31]).is_err());
    assert!(SampleChannels::new(DType::F32, [1, 1 << 30, 1]).is_err());
    assert!(SampleChannels::new(DType::F32, [1 << 16, 2, 3]).is_err());
    assert!(SampleChannels::from_shape(DType::F32, &[5]).is_err());
    assert!(Upsample2x::new(DType::F16, [1, 2, 2, 1]).is_err());
    assert!(Upsample2x::new(DType::F32, [1, 0, 2, 1]).is_err());
    assert!(ConcatLast::new(DType::F32, 3, &[]).is_err());
    assert!(ConcatLast::new(DType::F32, 3, &[0, 0]).is_err());
    assert!(ConcatLast::new(DType::F32, 0, &[2]).is_err());
    assert!(Embedding::new(DType::F32, 4, 3, &[0, 4]).is_err());
    assert!(Embedding::new(DType::F32, 0, 3, &[]).is_err());
    assert!(Embedding::new(DType::F64, 4, 3, &[1]).is_err());
    unsafe {
        assert!(activation_backward(g, ActivationGrad::Silu, DType::F64, 0, 0, 0, 4).is_err());
        assert!(add(g, DType::F16, 0, 0, 0, 4).is_err());
        // A buffer count that does not match the inputs (checked before any launch).
        let c = ConcatLast::new(DType::F32, 2, &[1, 2]).unwrap();
        assert!(c.forward(g, &[0], 0).is_err());
        assert!(c.backward(g, 0, &[None, None, None]).is_err());
    }
}

// ------------------------------------------------------------------------------------------------

/// A device that records which entry points run (and forwards everything to the real one).
struct Recording<'a, G: Gpu> {
    g: &'a G,
    entries: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl<G: Gpu> Gpu for Recording<'_, G> {
    type Buf = G::Buf;
    type Event = G::Event;
    type Graph = G::Graph;
    fn alloc(&self, bytes: usize) -> phenocore::Result<G::Buf> {
        self.g.alloc(bytes)
    }
    fn ptr(&self, buf: &G::Buf) -> u64 {
        self.g.ptr(buf)
    }
    fn upload(&self, bytes: &[u8]) -> phenocore::Result<G::Buf> {
        self.g.upload(bytes)
    }
    fn download(&self, buf: &G::Buf, out: &mut [u8]) -> phenocore::Result<()> {
        self.g.download(buf, out)
    }
    unsafe fn memset_zero(&self, ptr: u64, bytes: usize) -> phenocore::Result<()> {
        self.g.memset_zero(ptr, bytes)
    }
    unsafe fn launch(&self, l: &phenocore::backend::gpu::Launch) -> phenocore::Result<()> {
        self.entries.borrow_mut().insert(l.entry.clone());
        self.g.launch(l)
    }
    unsafe fn copy(&self, src: u64, dst: u64, bytes: usize) -> phenocore::Result<()> {
        self.g.copy(src, dst, bytes)
    }
    fn synchronize(&self) -> phenocore::Result<()> {
        self.g.synchronize()
    }
    unsafe fn gemm(&self, gemm: &phenocore::backend::gpu::Gemm) -> phenocore::Result<()> {
        self.g.gemm(gemm)
    }
    fn multiprocessors(&self) -> u32 {
        self.g.multiprocessors()
    }
    fn record(&self) -> phenocore::Result<G::Event> {
        self.g.record()
    }
    fn wait(&self, e: &G::Event) -> phenocore::Result<()> {
        self.g.wait(e)
    }
    unsafe fn upload_async(
        &self,
        bytes: &[u8],
        dst: u64,
        after: Option<&G::Event>,
    ) -> phenocore::Result<G::Event> {
        self.g.upload_async(bytes, dst, after)
    }
    unsafe fn download_after(
        &self,
        src: u64,
        out: &mut [u8],
        after: &G::Event,
    ) -> phenocore::Result<()> {
        self.g.download_after(src, out, after)
    }
    fn capture(&self, f: &mut dyn FnMut() -> phenocore::Result<()>) -> phenocore::Result<G::Graph> {
        self.g.capture(f)
    }
    unsafe fn replay(&self, graph: &G::Graph) -> phenocore::Result<()> {
        self.g.replay(graph)
    }
}

/// The parity tests above, run once more through a recorder: together they launch every entry
/// point of kernels/shape.cu (so none goes untested, vector and scalar forms alike).
pub fn shape_tests_cover_every_entry_point<G: Gpu>(g: &G) {
    let r = Recording {
        g,
        entries: Default::default(),
    };
    shape_activation_backward_and_add(&r);
    shape_pooling_and_squeeze_excite(&r);
    shape_per_sample_accumulate_and_in_place(&r);
    shape_upsample_nearest2x(&r);
    shape_concat_last(&r);
    shape_embedding_gather_scatter(&r);
    shape_deterministic_sum(&r);
    let ran = r.entries.into_inner();
    let missing: Vec<&str> = phenocore::backend::gpu::kernels::SHAPE
        .entries
        .iter()
        .copied()
        .filter(|e| !ran.contains(*e))
        .collect();
    assert!(
        missing.is_empty(),
        "entry points no shape test launches: {missing:?}"
    );
}
