//! GEGLU (`kernels/geglu.cu`): x [rows, 2D] → x[:, :D] · GELU(x[:, D:]) (exact, erf GELU), as
//! `ops::gelu::geglu`; forward and input gradient, f32 or bf16 storage.

use super::elementwise::suffix;
use super::kernels::GEGLU;
use super::{dim, grid_stride_blocks, Arg, Gpu, Launch, BLOCK};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// A GEGLU over `rows` rows of `2·d` values.
#[derive(Clone, Copy, Debug)]
pub struct Geglu {
    pub dtype: DType,
    pub rows: usize,
    pub d: usize,
}

impl Geglu {
    /// Checks the support (f32 or bf16) and the sizes: `two_d`, the input's last axis, even and
    /// non-zero; `rows` ≥ 1.
    pub fn new(dtype: DType, rows: usize, two_d: usize) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::InvalidArgument(format!(
                "geglu on CUDA: dtype {dtype:?} is not supported (f32 or bf16)"
            )));
        }
        if rows == 0 || two_d == 0 || !two_d.is_multiple_of(2) {
            return Err(Error::Shape(format!(
                "geglu on CUDA: {rows} rows of {two_d} values (the last axis must be even and non-zero)"
            )));
        }
        dim(two_d, "geglu width")?;
        rows.checked_mul(two_d).ok_or_else(|| {
            Error::InvalidArgument(format!("geglu on CUDA: {rows} × {two_d} elements overflow"))
        })?;
        Ok(Geglu {
            dtype,
            rows,
            d: two_d / 2,
        })
    }

    /// Elements of x (and of dx).
    pub fn input_len(&self) -> usize {
        self.rows * 2 * self.d
    }

    /// Elements of y (and of dy).
    pub fn output_len(&self) -> usize {
        self.rows * self.d
    }

    fn launch(&self, g: &impl Gpu, what: &str, mut args: Vec<Arg>) -> Launch {
        args.extend([Arg::U64(self.rows as u64), Arg::I32(self.d as i32)]);
        Launch {
            module: &GEGLU,
            entry: format!("geglu_{what}_{}", suffix(self.dtype)),
            grid: [grid_stride_blocks(g, self.output_len()), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args,
        }
    }

    /// y = x[:, :D] · GELU(x[:, D:]).
    ///
    /// # Safety
    /// x addresses `input_len`, y `output_len` elements of `dtype`, in distinct buffers.
    pub unsafe fn forward(&self, g: &impl Gpu, x: u64, y: u64) -> Result<()> {
        g.launch(&self.launch(g, "forward", vec![Arg::Ptr(x), Arg::Ptr(y)]))
    }

    /// dx = ∂L/∂x from dy (overwrites dx).
    ///
    /// # Safety
    /// x and dx address `input_len`, dy `output_len` elements of `dtype`; dx is distinct from both.
    pub unsafe fn backward(&self, g: &impl Gpu, x: u64, dy: u64, dx: u64) -> Result<()> {
        g.launch(&self.launch(g, "backward", vec![Arg::Ptr(x), Arg::Ptr(dy), Arg::Ptr(dx)]))
    }
}
