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
    private: Option<Private>,
}

/// A pool that one thread's allocations and releases go to while it captures a CUDA graph: the
/// graph's kernels keep the addresses they were captured with, so every block the capture touched
/// stays the graph's until it is dropped (blocks freed inside the capture are reused inside it).
struct Private {
    thread: std::thread::ThreadId,
    free: HashMap<usize, Vec<u64>>,
    /// Every block handed out inside the capture: (pointer, bucket).
    owned: Vec<(u64, usize)>,
    /// Of those, how many the host still holds.
    live: usize,
}

impl Private {
    fn mine(p: &Option<Private>) -> bool {
        p.as_ref()
            .is_some_and(|p| p.thread == std::thread::current().id())
    }
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
            if Private::mine(&inner.private) {
                let block = {
                    let p = inner.private.as_mut().expect("checked");
                    p.free.get_mut(&bucket).and_then(Vec::pop)
                };
                if let Some(ptr) = block {
                    inner.private.as_mut().expect("checked").live += 1;
                    return Ok((ptr, bucket));
                }
            }
            if let Some(ptr) = inner.free.get_mut(&bucket).and_then(Vec::pop) {
                inner.stats.bytes_cached -= bucket;
                Self::count_in_use(&mut inner.stats, bucket);
                Self::adopt(&mut inner, ptr, bucket);
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
        Self::adopt(&mut inner, ptr, bucket);
        Ok((ptr, bucket))
    }

    /// A block handed out from the shared cache or the driver joins the capturing thread's pool.
    fn adopt(inner: &mut Inner, ptr: u64, bucket: usize) {
        if Private::mine(&inner.private) {
            let p = inner.private.as_mut().expect("checked");
            p.owned.push((ptr, bucket));
            p.live += 1;
        }
    }

    /// Routes the calling thread's allocations and releases to a private pool until
    /// [`Self::end_private`]. Errors if a capture is already under way on this device.
    pub fn begin_private(&self) -> Result<()> {
        let mut inner = self.lock();
        if inner.private.is_some() {
            return Err(Error::InvalidArgument(
                "a CUDA graph is already being captured on this device".into(),
            ));
        }
        inner.private = Some(Private {
            thread: std::thread::current().id(),
            free: HashMap::new(),
            owned: Vec::new(),
            live: 0,
        });
        Ok(())
    }

    /// Ends the private pool: the blocks of the capture the host has released, which now belong
    /// to the graph (give them back with [`Self::release_owned`] when it is dropped), and how many
    /// blocks of the capture the host still holds (those go back to the shared cache when their
    /// holders release them; a graph whose buffers outlive the capture is not safe to keep).
    pub fn end_private(&self) -> (Vec<(u64, usize)>, usize) {
        match self.lock().private.take() {
            Some(p) => (
                p.free
                    .into_iter()
                    .flat_map(|(b, ptrs)| ptrs.into_iter().map(move |ptr| (ptr, b)))
                    .collect(),
                p.live,
            ),
            None => (Vec::new(), 0),
        }
    }

    /// Returns a dropped graph's blocks to the shared cache (after the stream has finished it).
    pub fn release_owned(&self, blocks: &[(u64, usize)]) {
        let mut inner = self.lock();
        for &(ptr, bucket) in blocks {
            inner.free.entry(bucket).or_default().push(ptr);
            inner.stats.bytes_in_use -= bucket;
            inner.stats.bytes_cached += bucket;
        }
    }

    fn count_in_use(stats: &mut AllocStats, bucket: usize) {
        stats.bytes_in_use += bucket;
        stats.peak_bytes_in_use = stats.peak_bytes_in_use.max(stats.bytes_in_use);
    }

    /// Puts a block from `alloc` back on its free list.
    pub fn release(&self, ptr: u64, bucket: usize) {
        let mut inner = self.lock();
        if let Some(p) = inner.private.as_mut() {
            if p.owned.contains(&(ptr, bucket)) {
                // A block of the capture (the capturing thread frees it, or anyone else frees a
                // block the capture took from them: both keep it for the graph). Still in use.
                p.live -= 1;
                p.free.entry(bucket).or_default().push(ptr);
                return;
            }
        }
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
    fn a_capture_keeps_its_blocks_until_the_graph_returns_them() {
        let dev = FakeDevice::new(1 << 30);
        let a = CachingAllocator::default();
        // A cached block from before the capture, and one held by the host throughout.
        let (held, hb) = a.alloc(&dev, 4000).unwrap();
        let (c0, cb) = a.alloc(&dev, 4000).unwrap();
        a.release(c0, cb);
        a.begin_private().unwrap();
        assert!(a.begin_private().is_err(), "one capture at a time");
        // Inside: the first block comes from the shared cache, a freed block is reused inside.
        let (p1, b1) = a.alloc(&dev, 4000).unwrap();
        assert_eq!(p1, c0);
        let (p2, b2) = a.alloc(&dev, 100_000).unwrap();
        a.release(p2, b2);
        let (p3, b3) = a.alloc(&dev, 100_000).unwrap();
        assert_eq!(p3, p2, "freed inside the capture, reused inside it");
        a.release(p1, b1);
        a.release(p3, b3);
        // Another thread allocating meanwhile never gets the capture's blocks.
        std::thread::scope(|s| {
            s.spawn(|| {
                // Its own fake device (the fake is single-threaded), at distinct addresses.
                let other = FakeDevice::new(1 << 30);
                other.next.set(1 << 40);
                let (q, qb) = a.alloc(&other, 4000).unwrap();
                assert!(q != p1, "a captured block went to another thread");
                a.release(q, qb);
            });
        });
        let (mut owned, live) = a.end_private();
        owned.sort();
        let mut want = vec![(p1, b1), (p2, b2)];
        want.sort();
        assert_eq!((owned.clone(), live), (want, 0));
        // The graph's blocks stay out of the cache: a new request gets fresh memory.
        let (q, qb) = a.alloc(&dev, 100_000).unwrap();
        assert_ne!(q, p2);
        a.release(q, qb);
        a.release_owned(&owned);
        let (r, rb) = a.alloc(&dev, 100_000).unwrap();
        assert!(r == p2 || r == q);
        a.release(r, rb);
        a.release(held, hb);
        assert_eq!(a.stats().bytes_in_use, 0);
        // A block allocated inside and still held at the end is reported, not adopted.
        a.begin_private().unwrap();
        let (x, xb) = a.alloc(&dev, 4000).unwrap();
        let (idle, live) = a.end_private();
        assert_eq!((idle.len(), live), (0, 1));
        a.release(x, xb);
        assert_eq!(a.stats().bytes_in_use, 0);
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
