//! Recycling of large f32 / f64 buffers (activations, gradients, scratch) across ops and steps.
//!
//! Every training step allocates and frees the same few hundred large buffers. Served by the
//! system allocator, each is a fresh `mmap` whose pages fault in (and are zeroed by the kernel)
//! on first touch — for EfficientNet-B0 on a 64-crop batch ~1.4 GB per step. [`Buf`] returns its
//! storage to a per-scalar-type pool on drop and [`Buf::alloc`] takes a buffer of exactly the
//! requested length back from it, so a steady training loop touches already-mapped memory.
//!
//! Bounds: buffers under [`MIN_POOLED_BYTES`] are left to the allocator and the cache of one
//! scalar type never holds more than [`MAX_CACHED_BYTES`] (a miss that would push it over releases
//! the oldest cached buffers first). In a steady loop the cache holds about one step's working set
//! (the high-water mark grows by the few buffers whose sizes differ between forward and backward,
//! ~15 % for EfficientNet-B0); [`trim`] releases everything cached, e.g. after training.

use super::Float;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Smaller buffers are served well by the allocator's heap and are not pooled.
pub const MIN_POOLED_BYTES: usize = 1 << 16;
/// Upper bound on the bytes the pool of one scalar type keeps cached.
pub const MAX_CACHED_BYTES: usize = 4 << 30;
/// A cached buffer not taken again within this many later returns is released at the next miss
/// (an EfficientNet-B0 training step returns a few hundred buffers).
pub const MAX_AGE: u64 = 1 << 13;

struct Entry<T> {
    stamp: u64,
    buf: Vec<T>,
}

struct State<T> {
    entries: Vec<Entry<T>>,
    cached_bytes: usize,
    clock: u64,
}

/// The cache of free buffers of one scalar type (see the module docs).
pub struct Pool<T> {
    state: Mutex<State<T>>,
}

impl<T: Float> Pool<T> {
    pub const fn new() -> Self {
        Pool {
            state: Mutex::new(State {
                entries: Vec::new(),
                cached_bytes: 0,
                clock: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of length `n` with unspecified (finite or not) contents.
    fn take(&self, n: usize, zero: bool) -> Vec<T> {
        let bytes = n * std::mem::size_of::<T>();
        if bytes < MIN_POOLED_BYTES {
            return vec![T::ZERO; n];
        }
        let mut evicted = Vec::new();
        {
            let mut st = self.lock();
            // Most recently returned buffer of this length (warmest in cache), else the smallest
            // one holding it with less than 50 % to spare.
            let exact = st
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.buf.len() == n)
                .max_by_key(|(_, e)| e.stamp)
                .map(|(i, _)| i);
            let hit = exact.or_else(|| {
                st.entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.buf.len() > n && e.buf.len() - n <= n / 2)
                    .min_by_key(|(_, e)| e.buf.len())
                    .map(|(i, _)| i)
            });
            if let Some(i) = hit {
                let mut v = st.entries.swap_remove(i).buf;
                st.cached_bytes -= v.len() * std::mem::size_of::<T>();
                drop(st);
                v.truncate(n);
                if zero {
                    use rayon::prelude::*;
                    v.par_chunks_mut(1 << 16)
                        .for_each(|c| c.iter_mut().for_each(|x| *x = T::ZERO));
                }
                return v;
            }
            // Miss: release buffers not reused for `MAX_AGE` returns (sizes of another phase,
            // e.g. a different batch size), and keep the cache within its bound once this buffer
            // returns to it, oldest first.
            let clock = st.clock;
            let mut i = 0;
            while i < st.entries.len() {
                if clock - st.entries[i].stamp > MAX_AGE {
                    let e = st.entries.swap_remove(i);
                    st.cached_bytes -= e.buf.len() * std::mem::size_of::<T>();
                    evicted.push(e.buf);
                } else {
                    i += 1;
                }
            }
            while st.cached_bytes + bytes > MAX_CACHED_BYTES && !st.entries.is_empty() {
                let i = st
                    .entries
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| e.stamp)
                    .map_or(0, |(i, _)| i);
                let e = st.entries.swap_remove(i);
                st.cached_bytes -= e.buf.len() * std::mem::size_of::<T>();
                evicted.push(e.buf);
            }
        }
        drop(evicted); // freed outside the lock
        vec![T::ZERO; n]
    }

    fn put(&self, mut v: Vec<T>) {
        let sz = std::mem::size_of::<T>();
        if v.capacity() * sz < MIN_POOLED_BYTES {
            return;
        }
        if v.len() != v.capacity() {
            v.resize(v.capacity(), T::ZERO);
        }
        let bytes = v.len() * sz;
        let mut st = self.lock();
        if st.cached_bytes + bytes > MAX_CACHED_BYTES {
            return; // dropped (freed) after the guard
        }
        st.clock += 1;
        let stamp = st.clock;
        st.cached_bytes += bytes;
        st.entries.push(Entry { stamp, buf: v });
    }

    /// Releases every cached buffer to the allocator.
    pub fn trim(&self) {
        let entries = {
            let mut st = self.lock();
            st.cached_bytes = 0;
            std::mem::take(&mut st.entries)
        };
        drop(entries);
    }

    /// Bytes currently cached.
    pub fn cached_bytes(&self) -> usize {
        self.lock().cached_bytes
    }
}

impl<T: Float> Default for Pool<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Releases every buffer cached by the f32 and f64 pools (e.g. after training).
pub fn trim() {
    f32::pool().trim();
    f64::pool().trim();
}

/// A vector that, when drawn from its scalar type's [`Pool`] ([`Buf::alloc`], [`Buf::zeros`]),
/// returns its storage there on drop. A `Buf` made from a `Vec` (`From`) is freed normally: only
/// sizes that are requested from the pool are cached. Dereferences to `Vec<T>` (and `[T]`).
pub struct Buf<T: Float> {
    v: Vec<T>,
    pooled: bool,
}

impl<T: Float> Buf<T> {
    /// Length `n`, contents unspecified (the caller overwrites every element).
    pub fn alloc(n: usize) -> Self {
        Buf {
            v: T::pool().take(n, false),
            pooled: true,
        }
    }
    /// Length `n`, all zeros.
    pub fn zeros(n: usize) -> Self {
        Buf {
            v: T::pool().take(n, true),
            pooled: true,
        }
    }
    /// Hands a vector's storage to the pool (as if a pooled `Buf` of it were dropped).
    pub fn recycle(v: Vec<T>) {
        drop(Buf { v, pooled: true });
    }
    /// Takes the vector out (it will not return to the pool).
    pub fn into_vec(mut self) -> Vec<T> {
        std::mem::take(&mut self.v)
    }
}

impl<T: Float> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Self {
        Buf { v, pooled: false }
    }
}

impl<T: Float> Drop for Buf<T> {
    fn drop(&mut self) {
        if self.pooled && self.v.capacity() > 0 {
            T::pool().put(std::mem::take(&mut self.v));
        }
    }
}

impl<T: Float> Clone for Buf<T> {
    fn clone(&self) -> Self {
        let mut b = Buf::alloc(self.v.len());
        b.v.copy_from_slice(&self.v);
        b
    }
}

impl<T: Float> Deref for Buf<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.v
    }
}

impl<T: Float> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.v
    }
}

impl<T: Float> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.v.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        // A dedicated pool so parallel tests using the global ones do not interfere.
        let pool = Pool::<f64>::new();
        let n = MIN_POOLED_BYTES; // 8·n bytes
        let a = pool.take(n, false);
        let ptr = a.as_ptr();
        pool.put(a);
        assert_eq!(pool.cached_bytes(), 8 * n);
        let b = pool.take(n, true);
        assert_eq!(
            b.as_ptr(),
            ptr,
            "same-length request reuses the cached buffer"
        );
        assert!(b.iter().all(|&v| v == 0.0));
        assert_eq!(pool.cached_bytes(), 0);
        pool.put(b);
        // A miss of another length allocates a fresh buffer; both are cached afterwards.
        let c = pool.take(n / 2, false);
        assert_eq!(pool.cached_bytes(), 8 * n);
        assert_eq!(c.len(), n / 2);
        pool.put(c);
        assert_eq!(pool.cached_bytes(), 8 * n + 8 * n / 2);
        // Small buffers are not cached.
        pool.put(vec![1.0; 16]);
        assert_eq!(pool.cached_bytes(), 8 * n + 8 * n / 2);
        // A shorter request reuses a cached buffer less than 50 % larger.
        let d = pool.take(n - n / 4, false);
        assert_eq!((d.len(), d.as_ptr()), (n - n / 4, ptr));
        assert_eq!(pool.cached_bytes(), 8 * n / 2);
        pool.put(d);
        assert_eq!(pool.cached_bytes(), 8 * n + 8 * n / 2);
        pool.trim();
        assert_eq!(pool.cached_bytes(), 0);
        // Buffers made from plain vectors are not cached.
        drop(Buf::<f64>::from(vec![0.0; n]));
    }
}
