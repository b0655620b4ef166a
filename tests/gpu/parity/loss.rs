use super::*;
use phenocore::autograd::{Params, Tape};
use phenocore::backend::gpu::loss::CrossEntropy;
use phenocore::backend::gpu::Gpu;
use phenocore::ops::loss::{soft_target_cross_entropy, softmax_cross_entropy};
use phenocore::DType;

/// (n, k, ε): fewer classes than lanes, many classes per lane, rows over several grid-stride steps
/// (the emulation runs 16 blocks of 8 row warps per step), ε = 0 and ε = 1.
const CASES: [(usize, usize, f64); 5] = [
    (7, 10, 0.1),
    (33, 1000, 0.0),
    (300, 5, 0.25),
    (2, 3, 1.0),
    (5, 37, 0.05),
];
/// The upstream gradient of the loss.
const DL: f32 = 1.7;

enum Target {
    Labels(Vec<u32>),
    Soft(Vec<f32>),
}

fn cpu(n: usize, k: usize, eps: f64, z: &[f64], target: &Target) -> (f64, Vec<f64>) {
    let mut tape = Tape::<f64>::new(true);
    let zv = tape.input(&[n, k], z.to_vec(), true).unwrap();
    let loss = match target {
        Target::Labels(l) => softmax_cross_entropy(&mut tape, &zv, l, eps).unwrap(),
        Target::Soft(t) => soft_target_cross_entropy(&mut tape, &zv, f64s(t)).unwrap(),
    };
    let value = tape.data(&loss)[0];
    let grads = tape
        .backward_with(&loss, vec![DL as f64], &mut Params::new())
        .unwrap();
    (value, grads.get(&zv).unwrap().to_vec())
}

fn targets(n: usize, k: usize, seed: u64, soft: bool) -> Target {
    let u = uniform(n * k, seed);
    if soft {
        let mut t: Vec<f64> = u.iter().map(|&x| (x as f64 + 1.0).powi(3)).collect();
        for row in t.chunks_mut(k) {
            let s: f64 = row.iter().sum();
            row.iter_mut().for_each(|x| *x /= s);
        }
        Target::Soft(t.iter().map(|&x| x as f32).collect())
    } else {
        Target::Labels(
            (0..n)
                .map(|i| ((u[i * k] + 1.0) * 0.5 * k as f32) as u32 % k as u32)
                .collect(),
        )
    }
}

fn run<G: Gpu>(g: &G, dtype: DType, soft: bool, tol: f64) {
    for (i, (n, k, eps)) in CASES.into_iter().enumerate() {
        let p = CrossEntropy::new(dtype, n, k, eps).unwrap();
        let z: Vec<f32> = uniform(n * k, 70 + i as u64)
            .iter()
            .map(|x| 5.0 * x)
            .collect();
        let bf = dtype == DType::BF16;
        let z = if bf { to_bf16(&z).1 } else { z };
        let target = targets(n, k, 80 + i as u64, soft);
        let (want_loss, want_dz) = cpu(n, k, eps, &f64s(&z), &target);
        let zb = if bf {
            g.upload_slice(&to_bf16(&z).0).unwrap()
        } else {
            g.upload_slice(&z).unwrap()
        };
        let tb = match &target {
            Target::Labels(l) => g.upload_slice(l).unwrap(),
            Target::Soft(t) => g.upload_slice(t).unwrap(),
        };
        let dlb = g.upload_slice(&[DL]).unwrap();
        let (lseb, lossb) = (g.alloc(p.lse_len() * 4).unwrap(), g.alloc(4).unwrap());
        let dzb = g.alloc(p.logits_len() * dtype.size_in_bytes()).unwrap();
        let ptr = |b: &G::Buf| g.ptr(b);
        unsafe {
            if soft {
                p.forward_soft(g, ptr(&zb), ptr(&tb), ptr(&lseb), ptr(&lossb))
                    .unwrap();
                p.backward_soft(g, ptr(&zb), ptr(&tb), ptr(&lseb), ptr(&dlb), ptr(&dzb))
                    .unwrap();
            } else {
                p.forward_labels(g, ptr(&zb), ptr(&tb), ptr(&lseb), ptr(&lossb))
                    .unwrap();
                p.backward_labels(g, ptr(&zb), ptr(&tb), ptr(&lseb), ptr(&dlb), ptr(&dzb))
                    .unwrap();
            }
        }
        let name = format!("cross-entropy {dtype:?} soft {soft} [{n}, {k}] ε {eps}");
        let loss = g.download_vec::<f32>(&lossb, 1).unwrap()[0] as f64;
        // The loss is f32 for both storage types (and exact inputs): f32 bounds.
        assert_close(&format!("{name}: loss"), &[loss], &[want_loss], F32_TOL);
        let dz = if bf {
            from_bf16(&g.download_vec::<u16>(&dzb, p.logits_len()).unwrap())
        } else {
            f64s(&g.download_vec::<f32>(&dzb, p.logits_len()).unwrap())
        };
        assert_close(&format!("{name}: dlogits"), &dz, &want_dz, tol);
    }
}

pub fn cross_entropy_f32<G: Gpu>(g: &G) {
    run(g, DType::F32, false, F32_TOL);
}

pub fn cross_entropy_bf16<G: Gpu>(g: &G) {
    run(g, DType::BF16, false, BF16_TOL);
}

pub fn soft_target_cross_entropy_f32<G: Gpu>(g: &G) {
    run(g, DType::F32, true, F32_TOL);
}

pub fn soft_target_cross_entropy_bf16<G: Gpu>(g: &G) {
    run(g, DType::BF16, true, BF16_TOL);
}

/// A label ≥ K cannot be rejected on the host (it lives on the device): the loss comes out NaN.
pub fn cross_entropy_bad_label_is_nan<G: Gpu>(g: &G) {
    let p = CrossEntropy::new(DType::F32, 3, 4, 0.1).unwrap();
    let zb = g.upload_slice(&uniform(12, 5)).unwrap();
    let lb = g.upload_slice(&[1u32, 4, 0]).unwrap();
    let (lseb, lossb) = (g.alloc(12).unwrap(), g.alloc(4).unwrap());
    unsafe {
        p.forward_labels(g, g.ptr(&zb), g.ptr(&lb), g.ptr(&lseb), g.ptr(&lossb))
            .unwrap()
    };
    let loss = g.download_vec::<f32>(&lossb, 1).unwrap()[0];
    assert!(loss.is_nan(), "loss with an out-of-range label: {loss}");
}

pub fn cross_entropy_rejects_unsupported_plans<G: Gpu>(_g: &G) {
    for (dtype, n, k, eps) in [
        (DType::F16, 2, 3, 0.0),
        (DType::F64, 2, 3, 0.0),
        (DType::F32, 0, 3, 0.0),
        (DType::F32, 2, 0, 0.0),
        (DType::BF16, 2, 3, -0.1),
        (DType::BF16, 2, 3, 1.5),
        (DType::F32, 2, 3, f64::NAN),
    ] {
        assert!(
            CrossEntropy::new(dtype, n, k, eps).is_err(),
            "cross-entropy plan {dtype:?} [{n}, {k}] ε {eps} accepted"
        );
    }
}
