//! Every training op's backward against central finite differences in f64 (normalised max error
//! ≤ 1e-6), plus closed-form checks of BN running statistics, dropout / drop-connect scaling and
//! label-smoothed cross-entropy.

use phenocore::autograd::{Params, Tape, Var};
use phenocore::models::efficientnet::Padding;
use phenocore::ops::gradcheck::check;
use phenocore::ops::{conv, elementwise as ew, loss, norm};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(-1.0..1.0)).collect()
}

fn inp(shape: &[usize], seed: u64) -> (Vec<usize>, Vec<f64>) {
    (shape.to_vec(), rand_vec(shape.iter().product(), seed))
}

const TOL: f64 = 1e-6;

fn assert_ok(name: &str, r: phenocore::ops::gradcheck::Report) {
    println!("{name}: {:?} (checked {:?})", r.max_err, r.checked);
    assert!(r.worst() <= TOL, "{name}: {:?}", r.max_err);
}

#[test]
fn dense_conv_all_geometries() {
    for (k, s, pad, h, w) in [
        (3, 2, Padding::Symmetric, 7, 6),
        (3, 2, Padding::TfSame, 8, 8),
        (5, 2, Padding::TfSame, 8, 7),
        (3, 1, Padding::Symmetric, 5, 5),
        (3, 1, Padding::TfSame, 5, 4),
        (1, 2, Padding::Symmetric, 5, 5),
    ] {
        let r = check(
            &[inp(&[2, h, w, 3], 1), inp(&[4, 3, k, k], 2)],
            true,
            60,
            |t, v| conv::conv2d(t, &v[0], &v[1], s, pad),
        )
        .unwrap();
        assert_ok(&format!("conv2d k{k} s{s} {pad:?} {h}x{w}"), r);
    }
}

#[test]
fn dense_conv_matches_direct_sum() {
    // Closed form at one output: out[n, oy, ox, o] = Σ w[o, i, ky, kx] x[n, oy·s − pt + ky, ox·s − pl + kx, i].
    let (h, w, k, s) = (8usize, 8usize, 5usize, 2usize);
    for pad in [Padding::Symmetric, Padding::TfSame] {
        let x = rand_vec(h * w * 2, 3);
        let wt = rand_vec(3 * 2 * k * k, 4);
        let mut tape = Tape::<f64>::new(false);
        let xv = tape.input(&[1, h, w, 2], x.clone(), false).unwrap();
        let wv = tape.input(&[3, 2, k, k], wt.clone(), false).unwrap();
        let y = conv::conv2d(&mut tape, &xv, &wv, s, pad).unwrap();
        let (oh, pt) = pad.out_and_pad(h, k, s);
        let (ow, pl) = pad.out_and_pad(w, k, s);
        assert_eq!(y.shape(), &[1, oh, ow, 3]);
        let out = tape.data(&y);
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..3 {
                    let mut e = 0.0;
                    for i in 0..2 {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s + ky) as isize - pt as isize;
                                let ix = (ox * s + kx) as isize - pl as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    e += wt[((o * 2 + i) * k + ky) * k + kx]
                                        * x[((iy as usize) * w + ix as usize) * 2 + i];
                                }
                            }
                        }
                    }
                    let got = out[(oy * ow + ox) * 3 + o];
                    assert!(
                        (got - e).abs() < 1e-12,
                        "{pad:?} {oy} {ox} {o}: {got} vs {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn pointwise_and_depthwise() {
    let r = check(
        &[inp(&[2, 3, 4, 5], 5), inp(&[6, 5, 1, 1], 6)],
        true,
        80,
        |t, v| conv::pointwise(t, &v[0], &v[1]),
    )
    .unwrap();
    assert_ok("pointwise", r);
    for (k, s, pad, h) in [
        (3, 1, Padding::Symmetric, 5),
        (3, 2, Padding::Symmetric, 6),
        (5, 2, Padding::TfSame, 8),
        (5, 1, Padding::TfSame, 5),
        (3, 2, Padding::TfSame, 7),
    ] {
        let r = check(
            &[inp(&[2, h, h, 4], 7), inp(&[4, 1, k, k], 8)],
            true,
            80,
            |t, v| conv::depthwise(t, &v[0], &v[1], s, pad),
        )
        .unwrap();
        assert_ok(&format!("depthwise k{k} s{s} {pad:?}"), r);
    }
}

#[test]
fn batch_norm_train_and_eval_with_and_without_silu() {
    for training in [true, false] {
        for act in [norm::Act::None, norm::Act::Silu] {
            let r = check(
                &[inp(&[3, 2, 2, 4], 9), inp(&[4], 10), inp(&[4], 11)],
                training,
                60,
                |t, v| {
                    let (mut m, mut var) = (vec![0.1, -0.2, 0.3, 0.0], vec![1.5, 0.5, 2.0, 1.0]);
                    let run = norm::Running {
                        mean: &mut m,
                        var: &mut var,
                    };
                    norm::batch_norm(
                        t,
                        &v[0],
                        &v[1],
                        &v[2],
                        run,
                        &norm::BatchNormConfig::torch(1e-3),
                        act,
                    )
                },
            )
            .unwrap();
            assert_ok(&format!("batch_norm training={training} {act:?}"), r);
        }
    }
}

#[test]
fn batch_norm_running_statistics_follow_both_conventions() {
    let x = rand_vec(5 * 3, 12);
    for (cfg, m) in [
        (norm::BatchNormConfig::torch(1e-5), 0.1),
        (norm::BatchNormConfig::keras(1e-3, 0.99), 0.01),
    ] {
        let mut tape = Tape::<f64>::new(true);
        let xv = tape.input(&[5, 3], x.clone(), false).unwrap();
        let g = tape.input(&[3], vec![1.0; 3], false).unwrap();
        let b = tape.input(&[3], vec![0.0; 3], false).unwrap();
        let (mut rm, mut rv) = (vec![0.5; 3], vec![2.0; 3]);
        let y = norm::batch_norm(
            &mut tape,
            &xv,
            &g,
            &b,
            norm::Running {
                mean: &mut rm,
                var: &mut rv,
            },
            &cfg,
            norm::Act::None,
        )
        .unwrap();
        for c in 0..3 {
            let col: Vec<f64> = (0..5).map(|i| x[i * 3 + c]).collect();
            let mu = col.iter().sum::<f64>() / 5.0;
            let var = col.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / 5.0;
            assert!((rm[c] - ((1.0 - m) * 0.5 + m * mu)).abs() < 1e-14);
            assert!((rv[c] - ((1.0 - m) * 2.0 + m * var * 5.0 / 4.0)).abs() < 1e-14);
            let yv = tape.data(&y)[c];
            assert!((yv - (x[c] - mu) / (var + cfg.eps).sqrt()).abs() < 1e-12);
        }
    }
}

#[test]
fn pointwise_activations_pooling_linear() {
    assert_ok(
        "silu",
        check(&[inp(&[3, 7], 13)], true, 50, |t, v| Ok(ew::silu(t, &v[0]))).unwrap(),
    );
    assert_ok(
        "sigmoid",
        check(&[inp(&[3, 7], 14)], true, 50, |t, v| {
            Ok(ew::sigmoid(t, &v[0]))
        })
        .unwrap(),
    );
    assert_ok(
        "add",
        check(&[inp(&[2, 5], 15), inp(&[2, 5], 16)], true, 50, |t, v| {
            ew::add(t, &v[0], &v[1])
        })
        .unwrap(),
    );
    assert_ok(
        "scale_channels",
        check(
            &[inp(&[2, 3, 3, 4], 17), inp(&[2, 4], 18)],
            true,
            80,
            |t, v| ew::scale_channels(t, &v[0], &v[1]),
        )
        .unwrap(),
    );
    assert_ok(
        "global_avg_pool",
        check(&[inp(&[2, 3, 2, 4], 19)], true, 60, |t, v| {
            ew::global_avg_pool(t, &v[0])
        })
        .unwrap(),
    );
    assert_ok(
        "linear",
        check(
            &[inp(&[3, 5], 20), inp(&[4, 5], 21), inp(&[4], 22)],
            true,
            60,
            |t, v| ew::linear(t, &v[0], &v[1], Some(&v[2])),
        )
        .unwrap(),
    );
    assert_ok(
        "linear (no bias, 1×1 conv weight)",
        check(
            &[inp(&[3, 5], 23), inp(&[4, 5, 1, 1], 24)],
            true,
            60,
            |t, v| ew::linear(t, &v[0], &v[1], None),
        )
        .unwrap(),
    );
}

#[test]
fn squeeze_excite_composite() {
    // mean → fc1 + b → SiLU → fc2 + b → sigmoid → multiply, the EfficientNet SE block.
    let r = check(
        &[
            inp(&[2, 3, 3, 6], 25),
            inp(&[2, 6, 1, 1], 26),
            inp(&[2], 27),
            inp(&[6, 2, 1, 1], 28),
            inp(&[6], 29),
        ],
        true,
        60,
        |t, v| {
            let p = ew::global_avg_pool(t, &v[0])?;
            let a = ew::linear(t, &p, &v[1], Some(&v[2]))?;
            let a = ew::silu(t, &a);
            let s = ew::linear(t, &a, &v[3], Some(&v[4]))?;
            let s = ew::sigmoid(t, &s);
            ew::scale_channels(t, &v[0], &s)
        },
    )
    .unwrap();
    assert_ok("squeeze-excite", r);
}

#[test]
fn dropout_and_drop_connect() {
    for p in [0.0, 0.3] {
        assert_ok(
            "dropout",
            check(&[inp(&[4, 6], 30)], true, 40, |t, v| {
                ew::dropout(t, &v[0], p, &mut ChaCha8Rng::seed_from_u64(1))
            })
            .unwrap(),
        );
        assert_ok(
            "drop_connect",
            check(&[inp(&[5, 2, 2, 3], 31)], true, 40, |t, v| {
                ew::drop_connect(t, &v[0], p, &mut ChaCha8Rng::seed_from_u64(2))
            })
            .unwrap(),
        );
    }
    // Scaling: kept values are x / (1 − p); drop-connect zeroes whole samples; the kept fraction
    // is near 1 − p; eval mode is the identity.
    let n = 4000;
    let mut tape = Tape::<f64>::new(true);
    let x = tape.input(&[n, 3], vec![1.0; 3 * n], false).unwrap();
    let y = ew::drop_connect(&mut tape, &x, 0.25, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
    let yv = tape.data(&y).to_vec();
    let mut kept = 0;
    for s in yv.chunks(3) {
        assert!(s.iter().all(|&v| v == s[0]) && (s[0] == 0.0 || (s[0] - 1.0 / 0.75).abs() < 1e-15));
        kept += (s[0] != 0.0) as usize;
    }
    let frac = kept as f64 / n as f64;
    assert!(
        (frac - 0.75).abs() < 4.0 * (0.75f64 * 0.25 / n as f64).sqrt(),
        "{frac}"
    );
    let mut eval = Tape::<f64>::new(false);
    let x = eval
        .input(&[2, 2], vec![1.0, 2.0, 3.0, 4.0], false)
        .unwrap();
    let y = ew::dropout(&mut eval, &x, 0.5, &mut ChaCha8Rng::seed_from_u64(4)).unwrap();
    assert_eq!(eval.data(&y), &[1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn cross_entropy_with_label_smoothing() {
    let labels = [2u32, 0, 3];
    for eps in [0.0, 0.1] {
        let r = check(&[inp(&[3, 4], 32)], true, 12, |t, v| {
            loss::softmax_cross_entropy(t, &v[0], &labels, eps)
        })
        .unwrap();
        assert_ok("cross-entropy", r);
    }
    // Closed form: uniform logits give log K whatever the smoothing.
    let mut tape = Tape::<f64>::new(true);
    let z = tape.input(&[2, 5], vec![0.7; 10], true).unwrap();
    let l = loss::softmax_cross_entropy(&mut tape, &z, &[1, 4], 0.2).unwrap();
    assert!((tape.data(&l)[0] - 5f64.ln()).abs() < 1e-14);
    // Bad labels are errors naming the item.
    let e = loss::softmax_cross_entropy(&mut tape, &z, &[1, 5], 0.0).unwrap_err();
    assert!(e.to_string().contains("label 5 of item 1"), "{e}");
}

#[test]
fn saved_activations_are_released_by_backward() {
    // After backward, the tape's saved values are gone: parameters are uniquely owned again, so the
    // optimiser's in-place update does not copy.
    let mut params = Params::<f32>::new();
    params
        .add(
            "w",
            &[3, 2, 1, 1],
            vec![0.5; 6],
            phenocore::autograd::ParamKind::Weight,
        )
        .unwrap();
    let mut tape = Tape::<f32>::new(true);
    let x = tape.input(&[1, 2, 2, 2], vec![1.0; 8], false).unwrap();
    let w: Var = tape.param(&params, 0);
    let y = conv::pointwise(&mut tape, &x, &w).unwrap();
    let p = ew::global_avg_pool(&mut tape, &y).unwrap();
    let l = loss::softmax_cross_entropy(&mut tape, &p, &[0], 0.0).unwrap();
    let before = params.value(0).as_ptr();
    tape.backward(&l, &mut params).unwrap();
    let v = params.value_mut(0);
    assert_eq!(
        v.as_ptr(),
        before,
        "parameter copied: the tape still held it"
    );
    // Closed form of the gradient: logits all equal 1.0 → p = 1/3, dL/dz = (p − onehot)/1,
    // dz/dw[o, i] = mean over pixels of x[i] = 1.
    let g = params.grad(0);
    for o in 0..3 {
        let dz = 1.0 / 3.0 - if o == 0 { 1.0 } else { 0.0 };
        for i in 0..2 {
            assert!((g[o * 2 + i] - dz).abs() < 1e-6);
        }
    }
}

#[test]
fn soft_target_cross_entropy_matches_fd_and_hard_labels() {
    let q: Vec<f64> = vec![
        0.7, 0.1, 0.1, 0.1, 0.0, 0.5, 0.5, 0.0, 0.25, 0.25, 0.25, 0.25,
    ];
    let r = check(&[inp(&[3, 4], 33)], true, 12, |t, v| {
        loss::soft_target_cross_entropy(t, &v[0], q.clone())
    })
    .unwrap();
    assert_ok("soft-target cross-entropy", r);
    // One-hot targets smoothed by ε equal the hard-label loss with label smoothing ε.
    let z = rand_vec(12, 34);
    let labels = [1u32, 3, 0];
    let eps = 0.1;
    let mut soft = vec![eps / 4.0; 12];
    for (i, &y) in labels.iter().enumerate() {
        soft[i * 4 + y as usize] += 1.0 - eps;
    }
    let mut tape = Tape::<f64>::new(true);
    let zv = tape.input(&[3, 4], z, true).unwrap();
    let a = loss::soft_target_cross_entropy(&mut tape, &zv, soft).unwrap();
    let b = loss::softmax_cross_entropy(&mut tape, &zv, &labels, eps).unwrap();
    assert!((tape.data(&a)[0] - tape.data(&b)[0]).abs() < 1e-14);
    // Targets that are not distributions are refused.
    let e = loss::soft_target_cross_entropy(&mut tape, &zv, vec![0.5; 12]).unwrap_err();
    assert!(e.to_string().contains("target row 0"), "{e}");
}
