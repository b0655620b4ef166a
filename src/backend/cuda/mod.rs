//! CUDA backend (feature `cuda`): device contexts, NVRTC-compiled kernels from `kernels/`, a caching
//! allocator and the launches behind `ops`.
//!
//! cudarc loads libcuda and libnvrtc at run time and panics when one is missing, so every entry
//! point probes the libraries first (`device::ensure_driver`, `nvrtc::ensure_nvrtc`) and runs its
//! cudarc calls inside `guard`: a machine without a driver gets `Error::NoDevice`, never a panic.

mod alloc;
mod device;
mod gpu;
pub mod nvrtc;
pub mod ops;
pub mod profile;
mod storage;

pub use alloc::{bucket_size, AllocStats};
pub use device::{device, device_count, ensure_driver, CudaDevice};
pub use gpu::CudaGraphRun;
pub use storage::CudaStorage;

use crate::error::{Error, Result};
use cudarc::driver::sys::CUresult;
use cudarc::driver::DriverError;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`, turning a panic (cudarc's reaction to a missing library or symbol) into its message.
fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into())
    })
}

/// Runs a block of cudarc calls; a panic inside becomes `Error::Cuda` naming `what`. The block is
/// one [`capture_gate::Op`]: while another thread captures a CUDA graph, it waits.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let _op = capture_gate::op();
    catch_panic(f).unwrap_or_else(|msg| {
        Err(Error::Cuda(format!(
            "{what}: the CUDA library panicked: {msg}"
        )))
    })
}

/// Keeps other threads off the device streams while one thread captures a CUDA graph.
///
/// A capture records everything queued on the device's stream, from any thread, and a stream being
/// captured may not be synchronised. So while one thread captures, every other thread's driver work
/// (each `guard` block) waits, and a capture starts only once the blocks under way have finished.
/// The capturing thread's own blocks, and blocks nested in a block, pass straight through.
/// Process-wide: captures are rare (one per input shape), the blocks short.
pub(crate) mod capture_gate {
    use std::cell::Cell;
    use std::sync::{Condvar, Mutex, MutexGuard};
    use std::thread::{self, ThreadId};

    struct State {
        /// The thread capturing, if any.
        owner: Option<ThreadId>,
        /// Outermost blocks under way on other threads.
        active: usize,
    }
    static STATE: Mutex<State> = Mutex::new(State {
        owner: None,
        active: 0,
    });
    static CHANGED: Condvar = Condvar::new();
    thread_local! {
        /// How deep the calling thread is in blocks.
        static DEPTH: Cell<usize> = const { Cell::new(0) };
        /// Whether the calling thread's outermost block counts in `State::active`.
        static COUNTED: Cell<bool> = const { Cell::new(false) };
    }

    fn lock() -> MutexGuard<'static, State> {
        STATE.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn wait(s: MutexGuard<'static, State>) -> MutexGuard<'static, State> {
        CHANGED.wait(s).unwrap_or_else(|e| e.into_inner())
    }

    /// One block of driver work; ends when dropped.
    pub(crate) struct Op {
        counted: bool,
    }

    pub(crate) fn op() -> Op {
        let depth = DEPTH.get();
        DEPTH.set(depth + 1);
        if depth > 0 {
            return Op { counted: false };
        }
        let me = thread::current().id();
        let mut s = lock();
        if s.owner == Some(me) {
            return Op { counted: false };
        }
        while s.owner.is_some() {
            s = wait(s);
        }
        s.active += 1;
        COUNTED.set(true);
        Op { counted: true }
    }

    impl Drop for Op {
        fn drop(&mut self) {
            DEPTH.set(DEPTH.get() - 1);
            if self.counted {
                COUNTED.set(false);
                let mut s = lock();
                s.active -= 1;
                // A capture may be waiting for the blocks to end: for all of them, or (begun
                // inside a block of its own) for all but one, so wake it at every end.
                if s.owner.is_some() {
                    CHANGED.notify_all();
                }
            }
        }
    }

    /// Whether the calling thread is capturing a graph.
    pub(crate) fn capturing_here() -> bool {
        lock().owner == Some(thread::current().id())
    }

    /// The calling thread's capture; other threads' blocks wait until it is dropped.
    pub(crate) struct Capture(());

    /// Waits for another thread's capture and for the other threads' blocks under way, then
    /// holds the device streams for the caller.
    pub(crate) fn capture() -> Capture {
        let me = thread::current().id();
        // Called inside a block of its own, the caller's block is one of those under way.
        let own = usize::from(DEPTH.get() > 0 && COUNTED.get());
        let mut s = lock();
        while s.owner.is_some() {
            s = wait(s);
        }
        s.owner = Some(me);
        while s.active > own {
            s = wait(s);
        }
        Capture(())
    }

    impl Drop for Capture {
        fn drop(&mut self) {
            lock().owner = None;
            CHANGED.notify_all();
        }
    }
}

/// Maps a driver error onto the library's error kinds.
fn driver_error(what: &str, e: DriverError) -> Error {
    // The code's name needs no library call; the description asks the driver, so only when loaded.
    let detail = match ensure_driver() {
        Ok(()) => e
            .error_string()
            .map(|s| format!(" ({})", s.to_string_lossy()))
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let msg = format!("{what}: {:?}{detail}", e.0);
    match e.0 {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory(msg),
        CUresult::CUDA_ERROR_NO_DEVICE
        | CUresult::CUDA_ERROR_INVALID_DEVICE
        | CUresult::CUDA_ERROR_NOT_INITIALIZED
        | CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE
        | CUresult::CUDA_ERROR_SYSTEM_NOT_READY
        | CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => Error::NoDevice(msg),
        _ => Error::Cuda(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<CudaStorage>();
        send_sync::<CudaDevice>();
    }

    #[test]
    fn capture_gate_keeps_other_threads_off_during_a_capture() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        use std::sync::{mpsc, Arc};
        use std::time::Duration;
        let pause = Duration::from_millis(100);

        // A capture holds off another thread's block until it ends; its own blocks pass.
        let cap = capture_gate::capture();
        let entered = Arc::new(AtomicBool::new(false));
        let other = {
            let entered = entered.clone();
            std::thread::spawn(move || {
                let _op = capture_gate::op();
                entered.store(true, SeqCst);
            })
        };
        {
            let _own = capture_gate::op();
            let _nested = capture_gate::op();
        }
        std::thread::sleep(pause);
        assert!(
            !entered.load(SeqCst),
            "a block ran during another thread's capture"
        );
        drop(cap);
        other.join().unwrap();
        assert!(entered.load(SeqCst));

        // A thread inside a block until told to leave (returns once it is inside).
        let hold_block = || {
            let (hold_tx, hold_rx) = mpsc::channel::<()>();
            let (started_tx, started_rx) = mpsc::channel::<()>();
            let busy = std::thread::spawn(move || {
                let _op = capture_gate::op();
                started_tx.send(()).unwrap();
                hold_rx.recv().unwrap();
            });
            started_rx.recv().unwrap();
            (hold_tx, busy)
        };

        // A capture waits for the blocks already under way on other threads.
        let (hold_tx, busy) = hold_block();
        let captured = Arc::new(AtomicBool::new(false));
        let capturer = {
            let captured = captured.clone();
            std::thread::spawn(move || {
                let _cap = capture_gate::capture();
                captured.store(true, SeqCst);
            })
        };
        std::thread::sleep(pause);
        assert!(
            !captured.load(SeqCst),
            "a capture began while a block was under way"
        );
        hold_tx.send(()).unwrap();
        busy.join().unwrap();
        capturer.join().unwrap();
        assert!(captured.load(SeqCst));

        // A capture begun inside a block of its own waits for another thread's block, and is
        // woken when that block ends (one block is then still under way: its own).
        let (hold_tx, busy) = hold_block();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let capturer = std::thread::spawn(move || {
            let _op = capture_gate::op();
            let _cap = capture_gate::capture();
            done_tx.send(()).unwrap();
        });
        std::thread::sleep(pause);
        assert!(
            done_rx.try_recv().is_err(),
            "a capture began while another thread's block was under way"
        );
        hold_tx.send(()).unwrap();
        busy.join().unwrap();
        assert!(
            done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "a capture begun inside its own block was not woken when the other block ended"
        );
        capturer.join().unwrap();
    }

    #[test]
    fn panics_become_errors() {
        let e = guard("test launch", || -> Result<()> {
            panic!("Unable to dynamically load the \"cuda\" shared library")
        });
        match e {
            Err(Error::Cuda(m)) => assert!(
                m.contains("test launch") && m.contains("\"cuda\" shared library"),
                "{m}"
            ),
            other => panic!("expected Error::Cuda, got {other:?}"),
        }
        assert_eq!(guard("fine", || Ok(7)), Ok(7));
    }

    #[test]
    fn driver_errors_map_to_kinds() {
        let oom = driver_error("alloc", DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(
            matches!(&oom, Error::OutOfMemory(m) if m.starts_with("alloc: CUDA_ERROR_OUT_OF_MEMORY")),
            "{oom:?}"
        );
        let none = driver_error("init", DriverError(CUresult::CUDA_ERROR_NO_DEVICE));
        assert!(matches!(none, Error::NoDevice(_)), "{none:?}");
        let launch = driver_error("launch", DriverError(CUresult::CUDA_ERROR_LAUNCH_FAILED));
        assert!(matches!(launch, Error::Cuda(_)), "{launch:?}");
    }
}
