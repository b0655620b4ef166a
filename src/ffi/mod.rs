//! The C ABI. The only module with `#[no_mangle]`.
