//! Elementwise kernels (`kernels/unary.cu`, `kernels/affine.cu`): one 16-byte pack per thread per
//! grid-stride step, f16 / bf16 computed in f32.

use super::kernels::{AFFINE, UNARY};
use super::{dim, grid_stride_blocks, Arg, Gpu, Launch, BLOCK};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The suffix of a dtype's entry point (`silu_f32`, `silu_bf16`, …), as `FOR_EACH_DTYPE` names them.
pub fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

/// Which activation [`unary`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    Silu,
    Sigmoid,
}

/// y = op(x) over `n` elements of `dtype`.
///
/// # Safety
/// `x` and `y` address `n` elements of `dtype` each, in distinct buffers.
pub unsafe fn unary(g: &impl Gpu, op: Unary, dtype: DType, x: u64, y: u64, n: usize) -> Result<()> {
    let name = match op {
        Unary::Silu => "silu",
        Unary::Sigmoid => "sigmoid",
    };
    map(g, &UNARY, name, dtype, x, y, n, &[])
}

/// y[r, c] = op(y[r, c] + b[c]) in place over `rows` rows of `ch` channels of `dtype` (f32 or
/// bf16; op none, SiLU or sigmoid): a GEMM's bias and activation in one pass, 16 bytes per access
/// when `ch` and the addresses allow.
///
/// # Safety
/// `y` addresses `rows · ch` elements of `dtype`, `b` `ch` elements (distinct from y).
pub unsafe fn bias_act(
    g: &impl Gpu,
    dtype: DType,
    y: u64,
    b: u64,
    rows: usize,
    ch: usize,
    op: Option<Unary>,
) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(Error::InvalidArgument(format!(
            "bias and activation on CUDA: dtype {dtype:?} is not supported (f32 or bf16)"
        )));
    }
    if rows == 0 || ch == 0 {
        return Ok(());
    }
    let v = 16 / dtype.size_in_bytes();
    let vector = ch.is_multiple_of(v) && y.is_multiple_of(16) && b.is_multiple_of(16);
    let per = if vector { v } else { 1 };
    let code = match op {
        None => 0,
        Some(Unary::Silu) => 1,
        Some(Unary::Sigmoid) => 2,
    };
    g.launch(&Launch {
        module: &UNARY,
        entry: format!(
            "bias_act_{}{}",
            suffix(dtype),
            if vector { "_v" } else { "" }
        ),
        grid: [grid_stride_blocks(g, rows * (ch / per)), 1, 1],
        block: [BLOCK, 1, 1],
        shared_bytes: 0,
        args: vec![
            Arg::Ptr(y),
            Arg::Ptr(b),
            Arg::U64(rows as u64),
            Arg::I32(dim(ch, "channels")?),
            Arg::I32(code),
        ],
    })
}

/// y = x · mul + add over `n` elements of `dtype`.
///
/// # Safety
/// As [`unary`].
pub unsafe fn affine(
    g: &impl Gpu,
    dtype: DType,
    x: u64,
    y: u64,
    n: usize,
    mul: f64,
    add: f64,
) -> Result<()> {
    map(
        g,
        &AFFINE,
        "affine",
        dtype,
        x,
        y,
        n,
        &[Arg::F64(mul), Arg::F64(add)],
    )
}

/// y = x converted from `from` to `to` over `n` elements: f32 → bf16 (round to nearest even) or
/// bf16 → f32 (exact). The same dtype twice is a device copy.
///
/// # Safety
/// `x` addresses `n` elements of `from`, `y` `n` of `to`, in distinct buffers (16-byte aligned).
pub unsafe fn cast(g: &impl Gpu, from: DType, to: DType, x: u64, y: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let entry = match (from, to) {
        (a, b) if a == b => return g.copy(x, y, n * a.size_in_bytes()),
        (DType::F32, DType::BF16) => "cast_f32_to_bf16",
        (DType::BF16, DType::F32) => "cast_bf16_to_f32",
        _ => {
            return Err(crate::error::Error::InvalidArgument(format!(
                "cast on CUDA: {from:?} to {to:?} is not supported (f32 <-> bf16)"
            )))
        }
    };
    // cast_map gives each thread one pack of 8 elements per grid-stride step.
    g.launch(&Launch {
        module: &UNARY,
        entry: entry.into(),
        grid: [grid_stride_blocks(g, n.div_ceil(8)), 1, 1],
        block: [BLOCK, 1, 1],
        shared_bytes: 0,
        args: vec![Arg::Ptr(x), Arg::Ptr(y), Arg::U64(n as u64)],
    })
}

#[allow(clippy::too_many_arguments)]
unsafe fn map(
    g: &impl Gpu,
    module: &'static super::kernels::KernelModule,
    op: &str,
    dtype: DType,
    x: u64,
    y: u64,
    n: usize,
    scalars: &[Arg],
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    // map_unary gives each thread one 16-byte pack per grid-stride step.
    let packs = n.div_ceil(16 / dtype.size_in_bytes());
    let mut args = vec![Arg::Ptr(x), Arg::Ptr(y), Arg::U64(n as u64)];
    args.extend_from_slice(scalars);
    g.launch(&Launch {
        module,
        entry: format!("{op}_{}", suffix(dtype)),
        grid: [grid_stride_blocks(g, packs), 1, 1],
        block: [BLOCK, 1, 1],
        shared_bytes: 0,
        args,
    })
}
