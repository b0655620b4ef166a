//! The CPU emulation of the CUDA kernels (see `cuda_emu.hpp`): each `kernels/<module>.cu` is built
//! with g++ into a shared library once (cached by content under the target dir) and launched through
//! its `emu__<entry>` exports with the same grid, block and argument list a GPU would get.

use phenocore::backend::gpu::kernels::{KernelModule, HEADERS};
use phenocore::backend::gpu::{Gemm, Gpu, Launch};
use phenocore::DType;
use phenocore::{Error, Result};
use std::alloc::Layout;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

const EMU_HEADER: &str = include_str!("cuda_emu.hpp");

/// The emulated device: host memory, kernels run by `cuda_emu.hpp`.
pub struct Emu {
    libs: Mutex<HashMap<&'static str, Arc<libloading::Library>>>,
}

pub fn emu() -> &'static Emu {
    static EMU: OnceLock<Emu> = OnceLock::new();
    EMU.get_or_init(|| Emu {
        libs: Mutex::new(HashMap::new()),
    })
}

/// Host memory standing in for a device buffer (256-byte aligned, like the caching allocator's).
pub struct EmuBuf {
    ptr: *mut u8,
    layout: Layout,
}

unsafe impl Send for EmuBuf {}
unsafe impl Sync for EmuBuf {}

impl Drop for EmuBuf {
    fn drop(&mut self) {
        // A buffer allocated inside a capture is the graph's: kept until the graph is dropped.
        let kept = CAPTURE.with(|c| match c.borrow_mut().as_mut() {
            Some(cap) => {
                let inside = cap.live.remove(&(self.ptr as usize));
                if inside {
                    cap.kept.push((self.ptr, self.layout));
                }
                inside
            }
            None => false,
        });
        if !kept {
            // SAFETY: allocated in `alloc` with this layout.
            unsafe { std::alloc::dealloc(self.ptr, self.layout) }
        }
    }
}

/// What a capture records, to run on replay.
enum Op {
    Launch(Launch),
    Gemm(Gemm),
    Zero(u64, usize),
    Copy(u64, u64, usize),
}

/// The calling thread's capture under way (tests run on several threads at once).
#[derive(Default)]
struct Capturing {
    ops: Vec<Op>,
    /// Buffers allocated inside the capture and not yet released.
    live: std::collections::HashSet<usize>,
    /// Buffers allocated and released inside the capture.
    kept: Vec<(*mut u8, Layout)>,
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Capturing>> = const { std::cell::RefCell::new(None) };
}

/// Records `op` when the calling thread is capturing (and returns true).
fn recorded(op: impl FnOnce() -> Op) -> bool {
    CAPTURE.with(|c| match c.borrow_mut().as_mut() {
        Some(cap) => {
            cap.ops.push(op());
            true
        }
        None => false,
    })
}

fn no_capture(what: &str) -> Result<()> {
    if CAPTURE.with(|c| c.borrow().is_some()) {
        return Err(Error::InvalidArgument(format!(
            "{what} is not allowed while capturing a graph"
        )));
    }
    Ok(())
}

/// A captured sequence and the buffers it owns.
pub struct EmuGraph {
    ops: Vec<Op>,
    kept: Vec<(*mut u8, Layout)>,
}

impl Drop for EmuGraph {
    fn drop(&mut self) {
        for &(p, l) in &self.kept {
            // SAFETY: allocated in `alloc` with this layout, released only here.
            unsafe { std::alloc::dealloc(p, l) }
        }
    }
}

#[repr(C)]
struct Cfg {
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
}

type Launcher = unsafe extern "C" fn(*const Cfg, *mut *mut c_void) -> c_int;

fn build(module: &KernelModule) -> Result<PathBuf> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (module.source, HEADERS, EMU_HEADER).hash(&mut h);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("gpu-emu")
        .join(format!("{}-{:016x}", module.name, h.finish()));
    let lib = dir.join(format!("{}.so", module.name));
    if lib.exists() {
        return Ok(lib);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?;
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| Error::Io(format!("{name}: {e}")))
    };
    write("cuda_emu.hpp", EMU_HEADER)?;
    for (name, text) in HEADERS {
        write(name, text)?;
    }
    let src = format!("{}.cu", module.name);
    write(&src, module.source)?;
    let tmp = dir.join(format!("{}.so.tmp", module.name));
    let out = std::process::Command::new(std::env::var("CXX").unwrap_or_else(|_| "g++".into()))
        .current_dir(&dir)
        .args([
            "-std=c++20",
            "-O2",
            "-g",
            "-shared",
            "-fPIC",
            "-pthread",
            "-Wall",
            "-Wno-unknown-pragmas",
        ])
        .args([
            "-DPHENO_EMU",
            "-include",
            "cuda_emu.hpp",
            "-I",
            ".",
            "-x",
            "c++",
            &src,
            "-o",
        ])
        .arg(&tmp)
        .output()
        .map_err(|e| {
            Error::Io(format!(
                "running g++ (install g++ for the kernel emulation tests): {e}"
            ))
        })?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || log.contains("warning") {
        return Err(Error::Cuda(format!(
            "g++ could not build kernels/{src} for the emulation:\n{log}"
        )));
    }
    std::fs::rename(&tmp, &lib).map_err(|e| Error::Io(format!("{}: {e}", lib.display())))?;
    Ok(lib)
}

impl Emu {
    fn lib(&self, module: &'static KernelModule) -> Result<Arc<libloading::Library>> {
        let mut libs = self.libs.lock().unwrap();
        if let Some(l) = libs.get(module.name) {
            return Ok(l.clone());
        }
        let path = build(module)?;
        // SAFETY: the library has no initialisers beyond C++ statics of the emulation header.
        let lib = Arc::new(
            unsafe { libloading::Library::new(&path) }
                .map_err(|e| Error::Cuda(format!("loading {}: {e}", path.display())))?,
        );
        libs.insert(module.name, lib.clone());
        Ok(lib)
    }

    /// Checks that every entry point the launch layer names exists in the module's build.
    pub fn check_entries(&self, module: &'static KernelModule) -> Result<()> {
        let lib = self.lib(module)?;
        for entry in module.entries {
            // SAFETY: only looks the symbol up.
            unsafe { lib.get::<Launcher>(format!("emu__{entry}\0").as_bytes()) }.map_err(|e| {
                Error::Cuda(format!(
                    "kernels/{}.cu has no entry point {entry}: {e}",
                    module.name
                ))
            })?;
        }
        Ok(())
    }
}

impl Gpu for Emu {
    type Buf = EmuBuf;
    type Event = EmuEvent;
    type Graph = EmuGraph;

    fn alloc(&self, bytes: usize) -> Result<EmuBuf> {
        let layout = Layout::from_size_align(bytes.max(1), 256)
            .map_err(|e| Error::OutOfMemory(format!("{bytes} bytes: {e}")))?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(Error::OutOfMemory(format!("{bytes} bytes")));
        }
        // Uninitialised on a GPU: filled with 0xff bytes (a NaN in every float type) here, so a
        // kernel that reads what nobody wrote shows it.
        // SAFETY: ptr is valid for layout.size() bytes.
        unsafe { std::ptr::write_bytes(ptr, 0xff, layout.size()) };
        CAPTURE.with(|c| {
            if let Some(cap) = c.borrow_mut().as_mut() {
                cap.live.insert(ptr as usize);
            }
        });
        Ok(EmuBuf { ptr, layout })
    }

    fn ptr(&self, buf: &EmuBuf) -> u64 {
        buf.ptr as u64
    }

    fn upload(&self, bytes: &[u8]) -> Result<EmuBuf> {
        no_capture("a copy to the device")?;
        let b = self.alloc(bytes.len())?;
        // SAFETY: b holds at least bytes.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), b.ptr, bytes.len()) };
        Ok(b)
    }

    fn download(&self, buf: &EmuBuf, out: &mut [u8]) -> Result<()> {
        no_capture("a copy from the device")?;
        assert!(
            out.len() <= buf.layout.size(),
            "download past the end of a buffer"
        );
        // SAFETY: checked above.
        unsafe { std::ptr::copy_nonoverlapping(buf.ptr, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    unsafe fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        if recorded(|| Op::Zero(ptr, bytes)) {
            return Ok(());
        }
        std::ptr::write_bytes(ptr as *mut u8, 0, bytes);
        Ok(())
    }

    unsafe fn copy(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        if recorded(|| Op::Copy(src, dst, bytes)) {
            return Ok(());
        }
        std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        no_capture("synchronising")
    }

    unsafe fn launch(&self, l: &Launch) -> Result<()> {
        let lib = self.lib(l.module)?;
        let f = lib
            .get::<Launcher>(format!("emu__{}\0", l.entry).as_bytes())
            .map_err(|e| {
                Error::Cuda(format!(
                    "kernels/{}.cu: no entry point {}: {e}",
                    l.module.name, l.entry
                ))
            })?;
        assert!(
            l.module.entries.contains(&l.entry.as_str()),
            "{} is launched but not listed in the module's entries (the NVRTC check would miss it)",
            l.entry
        );
        if recorded(|| Op::Launch(l.clone())) {
            return Ok(());
        }
        let cfg = Cfg {
            grid: l.grid,
            block: l.block,
            shared_bytes: l.shared_bytes,
        };
        let mut params: Vec<*mut c_void> = l.args.iter().map(|a| a.as_param()).collect();
        let rc = f(&cfg, params.as_mut_ptr());
        if rc != 0 {
            return Err(Error::Cuda(format!(
                "emulated launch of {} failed ({rc}): {l:?}",
                l.entry
            )));
        }
        Ok(())
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        g.check()?;
        if recorded(|| Op::Gemm(*g)) {
            return Ok(());
        }
        // Reads the operands as the GPU would (row-major, strides, transposes), sums in f64.
        let load_as = |dtype: DType, p: u64, i: usize| -> f64 {
            match dtype {
                DType::BF16 => half::bf16::from_bits(*(p as *const u16).add(i)).to_f64(),
                _ => *(p as *const f32).add(i) as f64,
            }
        };
        let load = |p: u64, i: usize| load_as(g.dtype, p, i);
        let a = |i: usize, l: usize| {
            if g.trans_a {
                load(g.a, l * g.lda + i)
            } else {
                load(g.a, i * g.lda + l)
            }
        };
        let b = |l: usize, j: usize| {
            if g.trans_b {
                load(g.b, j * g.ldb + l)
            } else {
                load(g.b, l * g.ldb + j)
            }
        };
        for i in 0..g.m {
            for j in 0..g.n {
                let acc: f64 = (0..g.k).map(|l| a(i, l) * b(l, j)).sum();
                let at = i * g.ldc + j;
                // beta = 0 ignores C (it may be uninitialised), as cuBLAS does.
                let old = if g.beta == 0.0 {
                    0.0
                } else {
                    load_as(g.c_dtype, g.c, at)
                };
                let v = (g.alpha as f64 * acc + g.beta as f64 * old) as f32;
                match g.c_dtype {
                    DType::BF16 => *(g.c as *mut u16).add(at) = half::bf16::from_f32(v).to_bits(),
                    _ => *(g.c as *mut f32).add(at) = v,
                }
            }
        }
        Ok(())
    }

    fn multiprocessors(&self) -> u32 {
        // Few, so grid-stride loops and split reductions take more than one step in the tests;
        // PHENO_EMU_SMS sets another count (an H200 has 132), for the grids a GPU gets.
        static SMS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        *SMS.get_or_init(|| {
            std::env::var("PHENO_EMU_SMS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or(2)
        })
    }

    fn record(&self) -> Result<EmuEvent> {
        Ok(EmuEvent::default())
    }

    fn wait(&self, e: &EmuEvent) -> Result<()> {
        if let Some((bytes, dst)) = e.0.lock().unwrap().take() {
            // SAFETY: upload_async's caller guaranteed dst holds bytes.len() bytes, live until
            // waited on.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst as *mut u8, bytes.len()) };
        }
        Ok(())
    }

    unsafe fn upload_async(
        &self,
        bytes: &[u8],
        dst: u64,
        after: Option<&EmuEvent>,
    ) -> Result<EmuEvent> {
        no_capture("a copy to the device")?;
        if let Some(a) = after {
            self.wait(a)?;
        }
        // The copy lands only when someone waits on its event: the latest a real copy stream may
        // complete it. Compute that reads `dst` without waiting sees the old bytes.
        Ok(EmuEvent(Arc::new(Mutex::new(Some((bytes.to_vec(), dst))))))
    }

    unsafe fn download_after(&self, src: u64, out: &mut [u8], after: &EmuEvent) -> Result<()> {
        no_capture("a copy from the device")?;
        self.wait(after)?;
        std::ptr::copy_nonoverlapping(src as *const u8, out.as_mut_ptr(), out.len());
        Ok(())
    }

    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<EmuGraph> {
        self.capture_impl(f)
    }

    unsafe fn replay(&self, graph: &EmuGraph) -> Result<()> {
        no_capture("replaying a graph")?;
        for op in &graph.ops {
            match op {
                Op::Launch(l) => self.launch(l)?,
                Op::Gemm(g) => self.gemm(g)?,
                Op::Zero(p, n) => self.memset_zero(*p, *n)?,
                Op::Copy(s, d, n) => self.copy(*s, *d, *n)?,
            }
        }
        Ok(())
    }
}

impl Emu {
    /// Captures on the calling thread: launches, GEMMs and device copies are recorded, not run.
    fn capture_impl(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<EmuGraph> {
        if CAPTURE.with(|c| c.borrow().is_some()) {
            return Err(Error::InvalidArgument(
                "a capture is already under way".into(),
            ));
        }
        CAPTURE.with(|c| *c.borrow_mut() = Some(Capturing::default()));
        let r = f();
        let cap = CAPTURE.with(|c| c.borrow_mut().take()).expect("set above");
        let graph = EmuGraph {
            ops: cap.ops,
            kept: cap.kept,
        };
        r?;
        if !cap.live.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} buffer(s) allocated during the capture outlived it",
                cap.live.len()
            )));
        }
        Ok(graph)
    }
}

/// A point in the emulated stream: work runs when it is queued, except a pending
/// [`Gpu::upload_async`] copy, which lands when the event is waited on.
#[derive(Clone, Default)]
pub struct EmuEvent(Arc<Mutex<Option<(Vec<u8>, u64)>>>);
