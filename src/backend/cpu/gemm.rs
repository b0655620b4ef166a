//! Matrix products through the `gemm` crate (blocked, SIMD, runtime CPU dispatch).

/// Row-major matrix view: element (r, c) at `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// Contiguous row-major (rows × cols).
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// The transpose of a contiguous row-major (cols × rows) matrix, i.e. W viewed as Wᵀ.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: rows,
        }
    }
    fn max_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
        }
    }
}

/// dst (m × n, contiguous row-major) = [dst if accumulate] + a (m × k) · b (k × n).
/// Panics (a bug, not caller input: shapes are checked at the op boundary) if the views do not fit.
pub fn matmul(dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul inner dimensions");
    assert!(
        dst.len() >= m * n && a.data.len() >= a.max_index() && b.data.len() >= b.max_index(),
        "matmul views out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: every index touched is < max_index() ≤ len for a and b, and < m·n ≤ len for dst
    // (checked above); the slices do not alias (dst is &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Strided view for [`gemm_t`]: element (r, c) at `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> View<'a, T> {
    /// Contiguous row-major matrix with `cols` columns.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        View {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a contiguous row-major matrix with `cols` columns.
    pub fn t(data: &'a [T], cols: usize) -> Self {
        View {
            data,
            rs: 1,
            cs: cols,
        }
    }
}

/// dst (m × n, contiguous) = [dst if accumulate] + a (m × k) · b (k × n), f32 or f64, optionally
/// parallel over the pool's threads. Panics (a bug: shapes are checked by the ops) if views do not fit.
#[allow(clippy::too_many_arguments)]
pub fn gemm_t<T: crate::autograd::Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    a: View<T>,
    b: View<T>,
    parallel: bool,
) {
    let fits = |v: &View<T>, r: usize, c: usize| {
        r == 0 || c == 0 || v.data.len() > (r - 1) * v.rs + (c - 1) * v.cs
    };
    assert!(
        dst.len() >= m * n && fits(&a, m, k) && fits(&b, k, n),
        "gemm views out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].iter_mut().for_each(|v| *v = T::ZERO);
        }
        return;
    }
    let threads = crate::threads::num_threads().max(1);
    let par = if parallel && threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index touched is inside the views (checked above); dst does not alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product() {
        let (m, k, n) = (7, 13, 5);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 3) % 7) as f32 - 3.0).collect(); // (n × k)
        let mut d = vec![1.0f32; m * n];
        matmul(
            &mut d,
            MatRef::rows(&a, m, k),
            MatRef::transposed(&w, k, n),
            true,
        );
        for i in 0..m {
            for j in 0..n {
                let e: f32 = 1.0 + (0..k).map(|t| a[i * k + t] * w[j * k + t]).sum::<f32>();
                assert_eq!(d[i * n + j], e);
            }
        }
    }
}
