//! CPU kernels: reference and fast paths.
pub mod activation;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod conv;
pub mod gemm;
pub mod pointwise;
pub mod pointwise_bf16;
#[cfg(target_arch = "x86_64")]
pub mod sgemm;
#[cfg(target_arch = "x86_64")]
pub mod winograd;

/// Deterministic test values in [−0.5, 0.5) (a 64-bit LCG).
#[cfg(test)]
pub(crate) fn test_rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}
