//! Status text, the thread's last error, the version and the thread pool size.

use super::boundary::{guard, last_error_ptr};
use crate::error::{Error, PhenoStatus};
use std::ffi::c_char;

/// A `PhenoStatus` as the C caller passed it: any integer, so an out-of-range value is not
/// undefined behaviour. The header spells it `PhenoStatus` (cbindgen.toml renames it).
#[repr(transparent)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoStatusArg(pub i32);

fn status_text(code: i32) -> &'static std::ffi::CStr {
    use PhenoStatus::*;
    let known = [
        (PHENO_OK, c"success"),
        (PHENO_ERR_INVALID_ARGUMENT, c"invalid argument"),
        (PHENO_ERR_NULL_POINTER, c"null pointer"),
        (PHENO_ERR_SHAPE, c"shape or length mismatch"),
        (PHENO_ERR_DTYPE, c"unsupported data type"),
        (PHENO_ERR_IO, c"I/O error"),
        (PHENO_ERR_FORMAT, c"malformed file or data"),
        (PHENO_ERR_MISSING_KEY, c"missing or misshapen weight"),
        (PHENO_ERR_UNKNOWN_LAYER, c"unknown layer name"),
        (PHENO_ERR_NON_FINITE, c"non-finite value (NaN or infinity)"),
        (PHENO_ERR_NO_DEVICE, c"no usable device"),
        (PHENO_ERR_OUT_OF_MEMORY, c"out of memory"),
        (PHENO_ERR_CUDA, c"CUDA error"),
        (PHENO_ERR_CANCELLED, c"cancelled by the progress callback"),
        (PHENO_ERR_UNSUPPORTED, c"unsupported operation"),
        (PHENO_ERR_INTERNAL, c"internal error"),
    ];
    known
        .iter()
        .find(|(s, _)| *s as i32 == code)
        .map_or(c"unknown status code", |(_, t)| t)
}

/// Static English text for a status code; never NULL ("unknown status code" for values this
/// library does not define). Thread-safe.
#[no_mangle]
pub extern "C" fn pheno_status_str(status: PhenoStatusArg) -> *const c_char {
    status_text(status.0).as_ptr()
}

/// Detailed message of this thread's last failed call ("" if none failed yet), naming the function
/// and the culprit argument. Never NULL. The pointer stays valid until the next phenocore call on
/// this thread; copy the text to keep it. Each thread has its own message.
#[no_mangle]
pub extern "C" fn pheno_last_error() -> *const c_char {
    last_error_ptr()
}

const fn parse_decimal(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut v = 0u32;
    let mut i = 0;
    while i < b.len() {
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}

/// MAJOR * 10000 + MINOR * 100 + PATCH of the crate version.
pub const VERSION_NUMBER: u32 = parse_decimal(env!("CARGO_PKG_VERSION_MAJOR")) * 10000
    + parse_decimal(env!("CARGO_PKG_VERSION_MINOR")) * 100
    + parse_decimal(env!("CARGO_PKG_VERSION_PATCH"));

/// Version of the loaded library: MAJOR * 10000 + MINOR * 100 + PATCH. Compare with
/// `PHENO_VERSION_NUMBER` (the header's version) to detect a header/library mismatch.
#[no_mangle]
pub extern "C" fn pheno_version_number() -> u32 {
    VERSION_NUMBER
}

/// Most worker threads accepted by `pheno_set_num_threads`.
const MAX_THREADS: usize = 4096;

/// Sets the number of CPU worker threads used by later calls from any thread (0 = one per core).
/// Calls already running keep their pool. Thread-safe.
#[no_mangle]
pub extern "C" fn pheno_set_num_threads(n: usize) -> PhenoStatus {
    guard("pheno_set_num_threads", || {
        if n > MAX_THREADS {
            return Err(Error::InvalidArgument(format!(
                "n = {n} threads; at most {MAX_THREADS}"
            )));
        }
        crate::threads::set_num_threads(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn status_texts_cover_every_code_and_out_of_range() {
        let texts: Vec<String> = (0..16)
            .map(|c| {
                unsafe { CStr::from_ptr(pheno_status_str(PhenoStatusArg(c))) }
                    .to_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(texts[0], "success");
        assert_eq!(texts[13], "cancelled by the progress callback");
        assert!(
            texts.iter().all(|t| t != "unknown status code"),
            "{texts:?}"
        );
        for bad in [-1, 16, i32::MAX] {
            let t = unsafe { CStr::from_ptr(pheno_status_str(PhenoStatusArg(bad))) };
            assert_eq!(t.to_str().unwrap(), "unknown status code");
        }
    }

    #[test]
    fn version_number_matches_cargo() {
        let v: Vec<u32> = env!("CARGO_PKG_VERSION")
            .split('.')
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(pheno_version_number(), v[0] * 10000 + v[1] * 100 + v[2]);
    }

    #[test]
    fn last_error_is_per_thread_and_names_the_function() {
        assert_eq!(
            pheno_set_num_threads(MAX_THREADS + 1),
            PhenoStatus::PHENO_ERR_INVALID_ARGUMENT
        );
        let msg = unsafe { CStr::from_ptr(pheno_last_error()) }
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            msg.starts_with("pheno_set_num_threads: invalid argument: n = 4097"),
            "{msg}"
        );
        let other = std::thread::spawn(|| {
            unsafe { CStr::from_ptr(pheno_last_error()) }
                .to_str()
                .unwrap()
                .to_string()
        });
        assert_eq!(other.join().unwrap(), "");
    }

    #[test]
    fn panics_become_internal_errors_with_the_message() {
        let st = guard("pheno_test", || panic!("boom {}", 42));
        assert_eq!(st, PhenoStatus::PHENO_ERR_INTERNAL);
        let msg = unsafe { CStr::from_ptr(pheno_last_error()) }
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(msg, "pheno_test: internal error: panic: boom 42");
    }
}
