//! What every exported function stands on: the panic boundary, this thread's last error, and the
//! checks that turn C pointers and lengths into Rust slices (or into an `Error` naming the argument).

use crate::error::{Error, PhenoStatus, Result};
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(msg: &str) {
    let msg = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = msg);
}

/// Pointer to this thread's last message; stays valid until the message is replaced.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// Runs the body of exported function `name`: an error becomes its status and this thread's last
/// error ("name: message"); a panic becomes `PHENO_ERR_INTERNAL` with the panic message.
pub(crate) fn guard(name: &str, body: impl FnOnce() -> Result<()>) -> PhenoStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => PhenoStatus::PHENO_OK,
        Ok(Err(e)) => {
            set_last_error(&format!("{name}: {e}"));
            e.status()
        }
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".to_string());
            set_last_error(&format!("{name}: internal error: panic: {msg}"));
            PhenoStatus::PHENO_ERR_INTERNAL
        }
    }
}

pub(crate) fn null(what: &str) -> Error {
    Error::NullPointer(format!("{what} is NULL"))
}

/// `&*p`, or a NullPointer error naming `what`.
///
/// # Safety
/// A non-NULL `p` must point to a valid `T` that outlives `'a`.
pub(crate) unsafe fn reference<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    p.as_ref().ok_or_else(|| null(what))
}

/// Product of `dims` (a buffer length), or a Shape error when it overflows or exceeds what one
/// allocation of `T` can hold.
pub(crate) fn checked_len<T>(dims: &[usize], what: &str) -> Result<usize> {
    let n = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match n {
        Some(n)
            if n.checked_mul(std::mem::size_of::<T>())
                .is_some_and(|b| b <= isize::MAX as usize) =>
        {
            Ok(n)
        }
        _ => Err(Error::Shape(format!(
            "{what}: dimensions {dims:?} overflow the address space"
        ))),
    }
}

fn check_ptr<T>(p: *const T, len: usize, what: &str) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    if p.is_null() {
        return Err(null(what));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::InvalidArgument(format!(
            "{what} ({p:p}) is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    if len
        .checked_mul(std::mem::size_of::<T>())
        .map_or(true, |b| b > isize::MAX as usize)
    {
        return Err(Error::Shape(format!(
            "{what}: length {len} overflows the address space"
        )));
    }
    Ok(())
}

/// A slice of `len` elements at `p`; `p` may be NULL when `len` is 0.
///
/// # Safety
/// A non-NULL `p` must point to `len` initialised elements that outlive `'a` and are not written
/// during `'a`.
pub(crate) unsafe fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    check_ptr(p, len, what)?;
    if len == 0 {
        return Ok(&[]);
    }
    Ok(std::slice::from_raw_parts(p, len))
}

/// A mutable slice of `len` elements at `p`; `p` may be NULL when `len` is 0.
///
/// # Safety
/// A non-NULL `p` must point to `len` writable elements that outlive `'a` and are not accessed
/// through any other pointer during `'a`.
pub(crate) unsafe fn slice_mut<'a, T>(p: *mut T, len: usize, what: &str) -> Result<&'a mut [T]> {
    check_ptr(p, len, what)?;
    if len == 0 {
        return Ok(&mut []);
    }
    Ok(std::slice::from_raw_parts_mut(p, len))
}

/// A NUL-terminated UTF-8 string.
///
/// # Safety
/// A non-NULL `p` must point to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(null(what));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|e| Error::InvalidArgument(format!("{what} is not valid UTF-8: {e}")))
}

/// A NUL-terminated path (any bytes on Unix, UTF-8 elsewhere).
///
/// # Safety
/// As `c_str`.
pub(crate) unsafe fn c_path<'a>(p: *const c_char, what: &str) -> Result<&'a std::path::Path> {
    if p.is_null() {
        return Err(null(what));
    }
    let bytes = CStr::from_ptr(p).to_bytes();
    if bytes.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is an empty path")));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::path::Path::new(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        let s = std::str::from_utf8(bytes)
            .map_err(|e| Error::InvalidArgument(format!("{what} is not valid UTF-8: {e}")))?;
        Ok(std::path::Path::new(s))
    }
}

/// Writes `v` through an out-pointer that the caller has already checked for NULL.
///
/// # Safety
/// `p` must be valid for a write of `T`.
pub(crate) unsafe fn write_out<T>(p: *mut T, v: T, what: &str) -> Result<()> {
    if p.is_null() {
        return Err(null(what));
    }
    p.write_unaligned(v);
    Ok(())
}

/// `n` NUL-terminated UTF-8 strings from a `const char *const *` array; `p` may be NULL when `n`
/// is 0. Errors name the array and the index of a NULL or non-UTF-8 entry.
///
/// # Safety
/// A non-NULL `p` must point to `n` pointers, each NULL or a NUL-terminated string, outliving `'a`.
pub(crate) unsafe fn c_str_array<'a>(
    p: *const *const c_char,
    n: usize,
    what: &str,
) -> Result<Vec<&'a str>> {
    let ptrs = slice(p, n, what)?;
    ptrs.iter()
        .enumerate()
        .map(|(i, &s)| c_str(s, &format!("{what}[{i}]")))
        .collect()
}

/// Writes NULL to `out` (named `what` in the error when `out` itself is NULL), runs `make`, and on
/// success writes the new boxed handle: a failed constructor leaves `*out == NULL`.
///
/// # Safety
/// `out` is NULL or valid for a write.
pub unsafe fn publish_handle<T>(
    out: *mut *mut T,
    what: &str,
    make: impl FnOnce() -> Result<T>,
) -> Result<()> {
    if out.is_null() {
        return Err(null(what));
    }
    out.write_unaligned(std::ptr::null_mut());
    let h = make()?;
    out.write_unaligned(Box::into_raw(Box::new(h)));
    Ok(())
}
