//! Batches prepared on worker threads while the consumer computes.
//!
//! `Prefetcher::new(num_batches, workers, prefetch, producer)` runs `producer(i)` for
//! i = 0..num_batches on `workers` dedicated `std::thread`s (not the rayon pool the compute uses) and
//! yields the results in order of i. At most `prefetch` batches are in preparation or waiting ahead
//! of the consumer (the batch it waits for included), which bounds memory; use
//! `prefetch ≥ workers` to keep every worker busy. Each worker owns a clone of the producer (so it
//! may keep scratch buffers). Results are deterministic when the producer's randomness depends only
//! on its batch index: draw it from `batch_rng(seed, epoch, i)`, never from shared state.
//!
//! An error (or a panic, reported as `Internal`) from the producer is delivered in its batch's
//! place; the iterator then ends. Dropping the prefetcher stops the workers: each finishes at most
//! the batch it is preparing, and the drop joins them.

use crate::error::{Error, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// The RNG of batch `batch` of epoch `epoch` of a run seeded `seed`: a ChaCha8 key made of the
/// three numbers, so streams of different batches are independent and thread timing cannot matter.
pub fn batch_rng(seed: u64, epoch: u64, batch: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&batch.to_le_bytes());
    key[24..].copy_from_slice(b"phenobat");
    ChaCha8Rng::from_seed(key)
}

/// The RNG of epoch-level draws (the balanced epoch's order) of epoch `epoch`.
pub fn epoch_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[24..].copy_from_slice(b"phenoepo");
    ChaCha8Rng::from_seed(key)
}

struct State<T> {
    next_to_assign: usize,
    next_to_deliver: usize,
    ready: BTreeMap<usize, Result<T>>,
    stop: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
    num_batches: usize,
    window: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A poisoned lock only means a thread panicked while holding it; the state stays coherent
        // (every mutation is a single insert / increment).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Prefetcher<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    workers: Vec<JoinHandle<()>>,
    done: bool,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Starts `workers` threads preparing batches `0..num_batches` with at most `prefetch` ahead.
    /// Errors: `workers == 0`, `prefetch == 0`, or a thread that cannot be spawned.
    pub fn new<F>(num_batches: usize, workers: usize, prefetch: usize, producer: F) -> Result<Self>
    where
        F: FnMut(usize) -> Result<T> + Clone + Send + 'static,
    {
        if workers == 0 || prefetch == 0 {
            return Err(Error::InvalidArgument(format!(
                "Prefetcher: workers and prefetch must be positive, got workers={workers}, \
                 prefetch={prefetch}"
            )));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_to_assign: 0,
                next_to_deliver: 0,
                ready: BTreeMap::new(),
                stop: false,
            }),
            changed: Condvar::new(),
            num_batches,
            window: prefetch,
        });
        let mut this = Prefetcher {
            shared: shared.clone(),
            workers: Vec::with_capacity(workers),
            done: num_batches == 0,
        };
        for w in 0..workers.min(num_batches.max(1)) {
            let shared = shared.clone();
            let mut produce = producer.clone();
            let handle = std::thread::Builder::new()
                .name(format!("phenocore-prefetch-{w}"))
                .spawn(move || worker(&shared, &mut produce))
                .map_err(|e| {
                    Error::Internal(format!("Prefetcher: cannot spawn worker {w}: {e}"))
                })?;
            this.workers.push(handle);
        }
        Ok(this)
    }

    /// Number of batches this prefetcher was asked for.
    pub fn len(&self) -> usize {
        self.shared.num_batches
    }

    pub fn is_empty(&self) -> bool {
        self.shared.num_batches == 0
    }

    fn stop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker<T, F>(shared: &Shared<T>, produce: &mut F)
where
    F: FnMut(usize) -> Result<T>,
{
    loop {
        let i = {
            let mut st = shared.lock();
            loop {
                if st.stop || st.next_to_assign >= shared.num_batches {
                    return;
                }
                if st.next_to_assign < st.next_to_deliver + shared.window {
                    break;
                }
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.next_to_assign += 1;
            st.next_to_assign - 1
        };
        let out = catch_unwind(AssertUnwindSafe(|| produce(i))).unwrap_or_else(|_| {
            Err(Error::Internal(format!(
                "Prefetcher: the producer panicked on batch {i}"
            )))
        });
        let failed = out.is_err();
        {
            let mut st = shared.lock();
            st.ready.insert(i, out);
            if failed {
                st.stop = true;
            }
        }
        shared.changed.notify_all();
        if failed {
            return;
        }
    }
}

impl<T: Send + 'static> Iterator for Prefetcher<T> {
    type Item = Result<T>;

    /// The next batch in order; blocks until it is ready. After an error, `None`.
    fn next(&mut self) -> Option<Result<T>> {
        if self.done {
            return None;
        }
        let item = {
            let mut st = self.shared.lock();
            loop {
                let want = st.next_to_deliver;
                if let Some(item) = st.ready.remove(&want) {
                    st.next_to_deliver += 1;
                    break item;
                }
                // An earlier error stopped the workers before batch `want` was assigned.
                if st.stop && want >= st.next_to_assign {
                    self.done = true;
                    return None;
                }
                st = self
                    .shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        self.shared.changed.notify_all();
        if item.is_err() || self.shared.lock().next_to_deliver >= self.shared.num_batches {
            self.done = true;
            self.stop();
        }
        Some(item)
    }
}

impl<T: Send + 'static> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn in_order_and_bounded() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let started = Arc::new(AtomicUsize::new(0));
        let s = started.clone();
        let mut p = Prefetcher::new(20, 3, 4, move |i| {
            s.fetch_add(1, Ordering::SeqCst);
            Ok(i * 10)
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(started.load(Ordering::SeqCst) <= 4, "window exceeded");
        let got: Vec<usize> = p.by_ref().map(|r| r.unwrap()).collect();
        assert_eq!(got, (0..20).map(|i| i * 10).collect::<Vec<_>>());
        assert!(p.next().is_none());
    }

    #[test]
    fn batch_rng_depends_on_all_three() {
        let a: u64 = batch_rng(1, 2, 3).gen();
        assert_eq!(a, batch_rng(1, 2, 3).gen::<u64>());
        assert_ne!(a, batch_rng(1, 2, 4).gen::<u64>());
        assert_ne!(a, batch_rng(1, 3, 3).gen::<u64>());
        assert_ne!(a, batch_rng(2, 2, 3).gen::<u64>());
        assert_ne!(a, epoch_rng(1, 2).gen::<u64>());
    }
}
