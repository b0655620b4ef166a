//! GPU time per kernel, for finding where a model's pass spends it: with `PHENOCORE_CUDA_PROFILE=1`
//! in the environment, every kernel launch and cuBLAS GEMM on a device stream is bracketed by a pair
//! of timing events (not while a CUDA graph is being captured), and [`report`] sums them by name.
//! Off (the default), it costs one cached flag test per launch.
//!
//! The events add a little time between launches, so the per-kernel times are what each kernel
//! took, not what a run without profiling takes in all.

use super::device::CudaDevice;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

struct Record {
    name: String,
    start: CudaEvent,
    end: CudaEvent,
}

static RECORDS: Mutex<Vec<Record>> = Mutex::new(Vec::new());

/// Whether `PHENOCORE_CUDA_PROFILE` is set to something other than `0` or empty.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("PHENOCORE_CUDA_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// The start event of one launch, when profiling and not capturing.
pub(crate) fn start(dev: &CudaDevice) -> Option<CudaEvent> {
    if !enabled() || super::capture_gate::capturing_here() {
        return None;
    }
    timed_event(dev)
}

/// An event with timing on (cudarc's default disables it) recorded on the device stream.
fn timed_event(dev: &CudaDevice) -> Option<CudaEvent> {
    dev.stream()
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .ok()
}

/// Records the launch begun by `start` under `name`.
pub(crate) fn finish(dev: &CudaDevice, start: Option<CudaEvent>, name: impl FnOnce() -> String) {
    let Some(start) = start else { return };
    if let Some(end) = timed_event(dev) {
        RECORDS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Record {
                name: name(),
                start,
                end,
            });
    }
}

/// The launches recorded since the last report, by total GPU time: name, calls, total and mean
/// milliseconds and share; clears the records. Empty when profiling is off.
pub fn report() -> String {
    let records = std::mem::take(&mut *RECORDS.lock().unwrap_or_else(|e| e.into_inner()));
    if records.is_empty() {
        return String::new();
    }
    let mut by_name: HashMap<String, (usize, f64)> = HashMap::new();
    for r in &records {
        let ms = r
            .end
            .synchronize()
            .and_then(|_| r.start.elapsed_ms(&r.end))
            .map_or(f64::NAN, f64::from);
        let e = by_name.entry(r.name.clone()).or_default();
        e.0 += 1;
        e.1 += ms;
    }
    let total: f64 = by_name.values().map(|v| v.1).sum();
    let mut rows: Vec<_> = by_name.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    let mut out = format!(
        "GPU time by kernel: {} launches, {total:.3} ms\n{:>10} {:>7} {:>10} {:>6}  name\n",
        records.len(),
        "total ms",
        "calls",
        "mean us",
        "share"
    );
    for (name, (calls, ms)) in rows {
        out += &format!(
            "{ms:10.3} {calls:7} {:10.2} {:5.1}%  {name}\n",
            1e3 * ms / calls as f64,
            100.0 * ms / total
        );
    }
    out
}
