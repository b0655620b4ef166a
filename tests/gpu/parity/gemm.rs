use super::*;
use phenocore::backend::gpu::{Gemm, Gpu, Math};
use phenocore::DType;

/// Row-major op(A)·op(B) in f64 from the stored (possibly strided, transposed) operands.
#[allow(clippy::too_many_arguments)]
fn reference(
    m: usize,
    n: usize,
    k: usize,
    a: &[f64],
    lda: usize,
    ta: bool,
    b: &[f64],
    ldb: usize,
    tb: bool,
) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|l| {
                    let av = if ta { a[l * lda + i] } else { a[i * lda + l] };
                    let bv = if tb { b[j * ldb + l] } else { b[l * ldb + j] };
                    av * bv
                })
                .sum();
        }
    }
    c
}

/// Every transpose combination, padded leading dimensions, alpha / beta, f32 / TF32 / bf16 / bf16
/// inputs with an f32 output: checks the row-major → cuBLAS column-major mapping (on the
/// emulation: the harness's own GEMM).
pub fn gemm_f32_bf16_tf32_transposes<G: Gpu>(g: &G) {
    let (m, n, k) = (37, 29, 70);
    for (dtype, c_dtype, math, tol) in [
        (DType::F32, DType::F32, Math::F32, F32_TOL),
        (DType::F32, DType::F32, Math::Tf32, 2e-3),
        (DType::BF16, DType::BF16, Math::F32, BF16_TOL),
        // bf16 operands are exact in f32: only the f32 sums round.
        (DType::BF16, DType::F32, Math::F32, F32_TOL),
    ] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let (lda, ldb, ldc) = (ac + 3, bc + 1, n + 5);
            let seed = (ta as u64) * 2 + tb as u64;
            let (a, b, c0) = (
                uniform(ar * lda, seed),
                uniform(br * ldb, seed + 10),
                uniform(m * ldc, seed + 20),
            );
            let (alpha, beta) = (1.5f32, -0.5f32);
            let name = format!("gemm {dtype:?} -> {c_dtype:?} {math:?} ta={ta} tb={tb}");
            let (ab, bb, cb, av, bv, cv) = if dtype == DType::BF16 {
                let (a16, af) = to_bf16(&a);
                let (b16, bf) = to_bf16(&b);
                let (c16, cf) = to_bf16(&c0);
                let (cb, cf) = if c_dtype == DType::BF16 {
                    (g.upload_slice(&c16).unwrap(), cf)
                } else {
                    (g.upload_slice(&c0).unwrap(), c0.clone())
                };
                (
                    g.upload_slice(&a16).unwrap(),
                    g.upload_slice(&b16).unwrap(),
                    cb,
                    af,
                    bf,
                    cf,
                )
            } else {
                (
                    g.upload_slice(&a).unwrap(),
                    g.upload_slice(&b).unwrap(),
                    g.upload_slice(&c0).unwrap(),
                    a.clone(),
                    b.clone(),
                    c0.clone(),
                )
            };
            let gemm = Gemm {
                m,
                n,
                k,
                a: g.ptr(&ab),
                lda,
                trans_a: ta,
                b: g.ptr(&bb),
                ldb,
                trans_b: tb,
                c: g.ptr(&cb),
                ldc,
                alpha,
                beta,
                dtype,
                c_dtype,
                math,
            };
            unsafe { g.gemm(&gemm) }.unwrap();
            let prod = reference(m, n, k, &f64s(&av), lda, ta, &f64s(&bv), ldb, tb);
            let got = if c_dtype == DType::BF16 {
                from_bf16(&g.download_vec::<u16>(&cb, m * ldc).unwrap())
            } else {
                f64s(&g.download_vec::<f32>(&cb, m * ldc).unwrap())
            };
            let (mut got_c, mut want_c) = (Vec::new(), Vec::new());
            for i in 0..m {
                for j in 0..ldc {
                    got_c.push(got[i * ldc + j]);
                    // Columns past n are padding and must be left alone.
                    want_c.push(if j < n {
                        alpha as f64 * prod[i * n + j] + beta as f64 * cv[i * ldc + j] as f64
                    } else {
                        cv[i * ldc + j] as f64
                    });
                }
            }
            assert_close(&name, &got_c, &want_c, tol);
        }
    }
    // A leading dimension shorter than a row is an error, not a launch.
    let bad = Gemm {
        m: 4,
        n: 4,
        k: 4,
        a: 0,
        lda: 3,
        trans_a: false,
        b: 0,
        ldb: 4,
        trans_b: false,
        c: 0,
        ldc: 4,
        alpha: 1.0,
        beta: 0.0,
        dtype: DType::F32,
        c_dtype: DType::F32,
        math: Math::F32,
    };
    assert!(unsafe { g.gemm(&bad) }.is_err());
    // f32 inputs with a bf16 output is not a cuBLAS combination the backend offers: an error.
    let bad_out = Gemm {
        lda: 4,
        c_dtype: DType::BF16,
        ..bad
    };
    let e = unsafe { g.gemm(&bad_out) }.unwrap_err().to_string();
    assert!(e.contains("output dtype"), "{e}");
}
