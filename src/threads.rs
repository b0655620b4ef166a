//! The thread pool all CPU work runs in. `set_num_threads(0)` means "all cores".

use std::sync::{Arc, RwLock};

static POOL: RwLock<Option<Arc<rayon::ThreadPool>>> = RwLock::new(None);

/// Sets the number of worker threads for subsequent calls (0 = number of cores).
pub fn set_num_threads(n: usize) -> crate::Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("phenocore-{i}"))
        .build()
        .map_err(|e| crate::Error::Internal(format!("cannot build thread pool: {e}")))?;
    *POOL
        .write()
        .map_err(|_| crate::Error::Internal("thread pool lock poisoned".into()))? =
        Some(Arc::new(pool));
    Ok(())
}

/// Number of threads the next call will use.
pub fn num_threads() -> usize {
    match POOL.read().ok().and_then(|p| p.clone()) {
        Some(p) => p.current_num_threads(),
        None => rayon::current_num_threads(),
    }
}

/// Runs `f` inside the configured pool (the global rayon pool if none was set).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = POOL.read().ok().and_then(|p| p.clone());
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}
