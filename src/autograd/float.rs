//! The scalar types ops are generic over: f32 (training) and f64 (finite-difference checks).

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

pub trait Float:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + PartialOrd
    + PartialEq
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn is_finite(self) -> bool;
    fn max(self, other: Self) -> Self;
    /// The process-wide recycling pool of buffers of this type.
    fn pool() -> &'static super::pool::Pool<Self>;
    /// e^x for activations: f32 uses the vectorisable polynomial of `backend::cpu::activation`
    /// (relative error < 2e-7), f64 the exact one.
    fn exp_act(self) -> Self {
        self.exp()
    }
    fn from_usize(n: usize) -> Self {
        Self::from_f64(n as f64)
    }
    fn sigmoid(self) -> Self {
        Self::ONE / (Self::ONE + (-self).exp_act())
    }
    fn silu(self) -> Self {
        self * self.sigmoid()
    }
    /// d silu / dx = σ(x) (1 + x (1 − σ(x))).
    fn silu_grad(self) -> Self {
        let s = self.sigmoid();
        s * (Self::ONE + self * (Self::ONE - s))
    }
}

macro_rules! impl_float {
    ($t:ty, $exp_act:path) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn exp_act(self) -> Self {
                $exp_act(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn pool() -> &'static super::pool::Pool<Self> {
                static POOL: super::pool::Pool<$t> = super::pool::Pool::new();
                &POOL
            }
        }
    };
}
impl_float!(f32, crate::backend::cpu::activation::exp);
impl_float!(f64, f64::exp);
