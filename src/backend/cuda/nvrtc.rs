//! NVRTC: the embedded `kernels/*.cu` → cubin for one GPU architecture, cached per (module, arch).
//!
//! The kernels include no CUDA toolkit header (see `kernels/common.cuh`), so a machine needs only
//! the driver and libnvrtc. `compile` is also what the CI check (`tests/nvrtc_check.rs`) runs, with
//! `--ptxas-options=-v` added, to catch compile errors and register spills for every kernel.

use super::guard;
use crate::error::{Error, Result};
use cudarc::nvrtc::sys;
use std::collections::BTreeMap;
use std::ffi::{c_char, CStr, CString};
use std::sync::{Arc, Mutex, OnceLock};

pub use crate::backend::gpu::kernels::{KernelModule, AFFINE, HEADERS, MODULES, UNARY};

/// Options every compile uses (the architecture is added per call).
pub const BASE_OPTIONS: &[&str] = &["--std=c++17"];

/// A GPU architecture as compute capability major·10 + minor (sm_90 → 90).
pub type Arch = u32;

#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// The NVRTC program log: front-end warnings, and ptxas resource use when asked for.
    pub log: String,
}

/// Errors with `Error::NoDevice` unless libnvrtc can be loaded (probed once per process).
pub fn ensure_nvrtc() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries dlopen on the candidate library names.
    if *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() }) {
        Ok(())
    } else {
        Err(Error::NoDevice(
            "libnvrtc could not be loaded (looked for libnvrtc.so, libnvrtc.so.13 and related names on the \
             library path); install the CUDA NVRTC library (e.g. the nvidia-cuda-nvrtc wheel) and put its \
             lib directory on LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// The NVRTC version as (major, minor).
pub fn version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    guard("nvrtcVersion", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: both out-pointers are valid for the call.
        check(
            unsafe { sys::nvrtcVersion(&mut major, &mut minor) },
            "nvrtcVersion",
        )?;
        Ok((major, minor))
    })
}

/// Compiles `source` (named `<name>.cu` in messages) to a cubin for `arch`, with `BASE_OPTIONS`
/// and `extra_options`. A compile error returns `Error::Cuda` carrying the NVRTC log.
pub fn compile(name: &str, source: &str, arch: Arch, extra_options: &[&str]) -> Result<Compiled> {
    ensure_nvrtc()?;
    guard("NVRTC compile", || {
        compile_unguarded(name, source, arch, extra_options)
    })
}

/// The cubin of an embedded module for `arch`, compiled once per process.
pub fn cubin(module: &KernelModule, arch: Arch) -> Result<Arc<Vec<u8>>> {
    type Cache = BTreeMap<(&'static str, Arch), Arc<Vec<u8>>>;
    static CACHE: Mutex<Cache> = Mutex::new(BTreeMap::new());
    let key = (module.name, arch);
    if let Some(c) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    // Compiled outside the lock: two threads may race on a first compile; both results are equal.
    let compiled = Arc::new(compile(module.name, module.source, arch, &[])?.cubin);
    Ok(CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_insert(compiled)
        .clone())
}

struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: self.0 came from a successful nvrtcCreateProgram and is destroyed only here.
        unsafe { sys::nvrtcDestroyProgram(&mut self.0) };
    }
}

fn compile_unguarded(
    name: &str,
    source: &str,
    arch: Arch,
    extra_options: &[&str],
) -> Result<Compiled> {
    let cstr = |s: &str, what: &str| {
        CString::new(s).map_err(|_| {
            Error::InvalidArgument(format!("NVRTC {what} of {name}.cu contains a NUL byte"))
        })
    };
    let src = cstr(source, "source")?;
    let file_name = cstr(&format!("{name}.cu"), "name")?;
    let header_src = HEADERS
        .iter()
        .map(|(_, s)| cstr(s, "header"))
        .collect::<Result<Vec<_>>>()?;
    let header_names = HEADERS
        .iter()
        .map(|(n, _)| cstr(n, "header name"))
        .collect::<Result<Vec<_>>>()?;
    let header_src_ptrs: Vec<*const c_char> = header_src.iter().map(|s| s.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();

    let mut prog = Program(std::ptr::null_mut());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; NVRTC copies them.
    check(
        unsafe {
            sys::nvrtcCreateProgram(
                &mut prog.0,
                src.as_ptr(),
                file_name.as_ptr(),
                HEADERS.len() as i32,
                header_src_ptrs.as_ptr(),
                header_name_ptrs.as_ptr(),
            )
        },
        "nvrtcCreateProgram",
    )?;

    let arch_opt = format!("--gpu-architecture=sm_{arch}");
    let options = BASE_OPTIONS
        .iter()
        .copied()
        .chain(std::iter::once(arch_opt.as_str()))
        .chain(extra_options.iter().copied())
        .map(|o| cstr(o, "option"))
        .collect::<Result<Vec<_>>>()?;
    let option_ptrs: Vec<*const c_char> = options.iter().map(|s| s.as_ptr()).collect();
    // SAFETY: prog is a live program; option_ptrs holds options.len() valid C strings.
    let status =
        unsafe { sys::nvrtcCompileProgram(prog.0, option_ptrs.len() as i32, option_ptrs.as_ptr()) };
    let log = program_log(&prog)?;
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Cuda(format!(
            "NVRTC failed to compile kernels/{name}.cu for sm_{arch} ({}):\n{log}",
            error_string(status)
        )));
    }

    let mut size = 0usize;
    // SAFETY: prog compiled successfully; size is a valid out-pointer.
    check(
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) },
        "nvrtcGetCUBINSize",
    )?;
    if size == 0 {
        return Err(Error::Cuda(format!(
            "NVRTC produced no cubin for kernels/{name}.cu (options {options:?})"
        )));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: cubin has exactly the size NVRTC reported.
    check(
        unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) },
        "nvrtcGetCUBIN",
    )?;
    Ok(Compiled { cubin, log })
}

fn program_log(prog: &Program) -> Result<String> {
    let mut size = 0usize;
    // SAFETY: prog is a live program; size is a valid out-pointer.
    check(
        unsafe { sys::nvrtcGetProgramLogSize(prog.0, &mut size) },
        "nvrtcGetProgramLogSize",
    )?;
    let mut buf = vec![0u8; size.max(1)];
    // SAFETY: buf holds the size NVRTC reported, NUL terminator included.
    check(
        unsafe { sys::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr().cast()) },
        "nvrtcGetProgramLog",
    )?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).trim_end().to_string())
}

fn error_string(status: sys::nvrtcResult) -> String {
    // SAFETY: nvrtcGetErrorString returns a pointer to a static NUL-terminated string (or NULL).
    let p = unsafe { sys::nvrtcGetErrorString(status) };
    if p.is_null() {
        format!("{status:?}")
    } else {
        // SAFETY: non-NULL, static, NUL-terminated per the NVRTC API.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn check(status: sys::nvrtcResult, what: &str) -> Result<()> {
    if status == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!(
            "{what} failed: {}",
            error_string(status)
        )))
    }
}

/// Resource use of one function, from ptxas's `-v` report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionResources {
    pub name: String,
    pub registers: u32,
    pub stack_frame_bytes: u64,
    pub spill_store_bytes: u64,
    pub spill_load_bytes: u64,
}

impl FunctionResources {
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// Parses the ptxas `-v` lines of an NVRTC log:
/// `Function properties for NAME` / `N bytes stack frame, S bytes spill stores, L bytes spill loads`
/// / `Used R registers`.
pub fn parse_ptxas_log(log: &str) -> Vec<FunctionResources> {
    fn number_before(line: &str, unit: &str) -> Option<u64> {
        let head = &line[..line.find(unit)?];
        head.split(|c: char| !c.is_ascii_digit())
            .rfind(|s| !s.is_empty())?
            .parse()
            .ok()
    }
    let mut out: Vec<FunctionResources> = Vec::new();
    for line in log.lines() {
        if let Some(name) = line.split("Function properties for ").nth(1) {
            out.push(FunctionResources {
                name: name.trim().to_string(),
                ..Default::default()
            });
        } else if let Some(f) = out.last_mut() {
            if line.contains("spill stores") {
                f.stack_frame_bytes = number_before(line, " bytes stack frame").unwrap_or(0);
                f.spill_store_bytes = number_before(line, " bytes spill stores").unwrap_or(0);
                f.spill_load_bytes = number_before(line, " bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") {
                f.registers = number_before(line, " registers").unwrap_or(0) as u32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : Compiling entry function 'spill' for 'sm_90'\n\
                   ptxas info    : Function properties for spill\n\
                   ptxas         .     1000 bytes stack frame, 1108 bytes spill stores, 1268 bytes spill loads\n\
                   ptxas info    : Used 32 registers, used 0 barriers, 1000 bytes cumulative stack size\n\
                   ptxas info    : Function properties for silu_f32\n\
                   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 31 registers, used 0 barriers\n";
        let f = parse_ptxas_log(log);
        assert_eq!(f.len(), 2);
        assert_eq!(
            f[0],
            FunctionResources {
                name: "spill".into(),
                registers: 32,
                stack_frame_bytes: 1000,
                spill_store_bytes: 1108,
                spill_load_bytes: 1268
            }
        );
        assert!(f[0].spills());
        assert_eq!(
            (f[1].name.as_str(), f[1].registers, f[1].spills()),
            ("silu_f32", 31, false)
        );
    }

    #[test]
    fn every_module_has_a_distinct_name() {
        let mut names: Vec<_> = MODULES.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), MODULES.len());
    }
}
