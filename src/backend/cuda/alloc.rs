//! Caching device allocator: size-bucketed free lists per device, so repeated shapes reuse blocks
//! instead of calling cuMemAlloc. All work on a device runs on that device's one stream, so a block
//! released by the host can be handed out again at once: the stream runs the old reader before the
//! new writer. Blocks go back to the driver only in `empty_cache` (after a synchronize), which also
//! runs once, as a retry, when the driver reports out of memory.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::Mutex;

/// What the allocator needs from a device; `CudaDevice` implements it, the tests use a fake.
pub(crate) trait RawMemory {
    /// Allocates `bytes` of device memory; `Error::OutOfMemory` when the device is full.
    fn malloc(&self, bytes: usize) -> Result<u64>;
    fn free(&self, ptr: u64) -> Result<()>;
    /// Waits until no queued work can still touch any block.
    fn synchronize(&self) -> Result<()>;
}

/// Allocator counters, in bytes of bucket (rounded) size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Calls to the driver's allocator so far; constant in steady state.
    pub driver_allocs: u64,
    pub driver_frees: u64,
    pub bytes_in_use: usize,
    pub peak_bytes_in_use: usize,
    /// Bytes held in the free lists.
    pub bytes_cached: usize,
}

/// Smallest block handed out. Every block is its own cuMemAlloc, which aligns to 256 bytes, so
/// blocks are 16-byte aligned as the vectorised kernels need.
pub const MIN_BLOCK: usize = 512;

/// The bucket a request of `bytes` is served from: 512 B at least, above that the next of
/// 5, 6, 7 or 8 · 2^(k−2) (at most 25% rounding waste). None when the size would overflow.
pub fn bucket_size(bytes: usize) -> Option<usize> {
    if bytes <= MIN_BLOCK {
        return Some(MIN_BLOCK);
    }
    let quarter = 1usize << ((bytes - 1).ilog2() - 2);
    bytes.div_ceil(quarter).checked_mul(quarter)
}

#[derive(Default)]
struct Inner {
    free: HashMap<usize, Vec<u64>>,
    stats: AllocStats,
}

#[derive(Default)]
pub(crate) struct CachingAllocator {
    inner: Mutex<Inner>,
}

impl CachingAllocator {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A block of at least `bytes`; returns (device pointer, bucket size). Give it back with `release`.
    pub fn alloc(&self, raw: &impl RawMemory, bytes: usize) -> Result<(u64, usize)> {
        let bucket = bucket_size(bytes).ok_or_else(|| {
            Error::OutOfMemory(format!(
                "a device buffer of {bytes} bytes is beyond any device"
            ))
        })?;
        {
            let mut inner = self.lock();
            if let Some(ptr) = inner.free.get_mut(&bucket).and_then(Vec::pop) {
                inner.stats.bytes_cached -= bucket;
                Self::count_in_use(&mut inner.stats, bucket);
                return Ok((ptr, bucket));
            }
        }
        let ptr = match raw.malloc(bucket) {
            Ok(p) => p,
            Err(Error::OutOfMemory(_)) => {
                self.empty_cache(raw)?;
                raw.malloc(bucket).map_err(|e| match e {
                    Error::OutOfMemory(m) => Error::OutOfMemory(format!(
                        "{m} (after returning the cache to the driver; {} bytes are in use by live tensors)",
                        self.stats().bytes_in_use
                    )),
                    other => other,
                })?
            }
            Err(e) => return Err(e),
        };
        let mut inner = self.lock();
        inner.stats.driver_allocs += 1;
        Self::count_in_use(&mut inner.stats, bucket);
        Ok((ptr, bucket))
    }

    fn count_in_use(stats: &mut AllocStats, bucket: usize) {
        stats.bytes_in_use += bucket;
        stats.peak_bytes_in_use = stats.peak_bytes_in_use.max(stats.bytes_in_use);
    }

    /// Puts a block from `alloc` back on its free list.
    pub fn release(&self, ptr: u64, bucket: usize) {
        let mut inner = self.lock();
        inner.free.entry(bucket).or_default().push(ptr);
        inner.stats.bytes_in_use -= bucket;
        inner.stats.bytes_cached += bucket;
    }

    /// Returns every cached block to the driver.
    pub fn empty_cache(&self, raw: &impl RawMemory) -> Result<()> {
        let blocks: Vec<(usize, Vec<u64>)> = self.lock().free.drain().collect();
        raw.synchronize()?;
        let mut first_error = None;
        for (bucket, ptrs) in blocks {
            for ptr in ptrs {
                let freed = raw.free(ptr);
                let mut inner = self.lock();
                inner.stats.bytes_cached -= bucket;
                match freed {
                    Ok(()) => inner.stats.driver_frees += 1,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub fn stats(&self) -> AllocStats {
        self.lock().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A device with `capacity` bytes that records every call.
    struct FakeDevice {
        capacity: usize,
        live: RefCell<HashMap<u64, usize>>,
        next: Cell<u64>,
        syncs: Cell<u32>,
    }

    impl FakeDevice {
        fn new(capacity: usize) -> Self {
            FakeDevice {
                capacity,
                live: RefCell::default(),
                next: Cell::new(0x1000),
                syncs: Cell::new(0),
            }
        }
        fn used(&self) -> usize {
            self.live.borrow().values().sum()
        }
    }

    impl RawMemory for FakeDevice {
        fn malloc(&self, bytes: usize) -> Result<u64> {
            if self.used() + bytes > self.capacity {
                return Err(Error::OutOfMemory(format!(
                    "fake device full: {bytes} bytes requested"
                )));
            }
            let p = self.next.get();
            self.next.set(p + bytes as u64);
            self.live.borrow_mut().insert(p, bytes);
            Ok(p)
        }
        fn free(&self, ptr: u64) -> Result<()> {
            self.live
                .borrow_mut()
                .remove(&ptr)
                .map(|_| ())
                .ok_or_else(|| Error::Internal(format!("double free of {ptr:#x}")))
        }
        fn synchronize(&self) -> Result<()> {
            self.syncs.set(self.syncs.get() + 1);
            Ok(())
        }
    }

    #[test]
    fn buckets_round_up_by_at_most_a_quarter() {
        assert_eq!(bucket_size(0), Some(512));
        assert_eq!(bucket_size(512), Some(512));
        assert_eq!(bucket_size(513), Some(640));
        assert_eq!(bucket_size(1024), Some(1024));
        assert_eq!(bucket_size(1025), Some(1280));
        assert_eq!(bucket_size(3 << 20), Some(3 << 20));
        assert_eq!(bucket_size(usize::MAX), None);
        for bytes in (513..100_000).step_by(37) {
            let b = bucket_size(bytes).unwrap();
            assert!(b >= bytes && (b - bytes) * 4 <= bytes, "{bytes} → {b}");
        }
    }

    #[test]
    fn repeated_shapes_reuse_blocks() {
        let dev = FakeDevice::new(1 << 30);
        let a = CachingAllocator::default();
        for _ in 0..10 {
            // One "layer": three live buffers of fixed sizes, then all released.
            let blocks: Vec<_> = [4000, 100_000, 4000]
                .iter()
                .map(|&n| a.alloc(&dev, n).unwrap())
                .collect();
            for (p, b) in blocks {
                a.release(p, b);
            }
        }
        let s = a.stats();
        assert_eq!(s.driver_allocs, 3, "{s:?}");
        assert_eq!(s.bytes_in_use, 0);
        assert_eq!(s.bytes_cached, dev.used());
        assert_eq!(
            s.peak_bytes_in_use,
            2 * bucket_size(4000).unwrap() + bucket_size(100_000).unwrap()
        );
    }

    #[test]
    fn out_of_memory_empties_the_cache_then_retries() {
        let dev = FakeDevice::new(1 << 20);
        let a = CachingAllocator::default();
        let (p, b) = a.alloc(&dev, 600 << 10).unwrap();
        a.release(p, b);
        // The cached 600 KiB block leaves too little room for 700 KiB until it is freed.
        let (q, c) = a.alloc(&dev, 700 << 10).unwrap();
        let s = a.stats();
        assert_eq!(
            (
                s.driver_allocs,
                s.driver_frees,
                s.bytes_cached,
                s.bytes_in_use
            ),
            (2, 1, 0, c)
        );
        assert_eq!(dev.syncs.get(), 1);
        assert_eq!(dev.live.borrow().get(&q), Some(&c));
        // A request that cannot fit even with an empty cache names the sizes.
        match a.alloc(&dev, 900 << 10) {
            Err(Error::OutOfMemory(m)) => {
                assert!(
                    m.contains(&bucket_size(900 << 10).unwrap().to_string())
                        && m.contains("in use"),
                    "{m}"
                )
            }
            other => panic!("expected OutOfMemory, got {other:?}"),
        }
    }
}
