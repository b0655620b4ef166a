//! Activations on f32 slices, vectorised per CPU (AVX-512 / AVX2 / fallback chosen at run time).

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma+avx2", "x86_64+avx2+fma"))]
pub fn silu_inplace(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = silu(*x);
    }
}

/// y = silu(x + bias[c]) over a [rows, c] slab.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma+avx2", "x86_64+avx2+fma"))]
pub fn bias_silu_rows(v: &mut [f32], bias: &[f32]) {
    let c = bias.len();
    for row in v.chunks_exact_mut(c) {
        for (x, b) in row.iter_mut().zip(bias) {
            *x = silu(*x + *b);
        }
    }
}
