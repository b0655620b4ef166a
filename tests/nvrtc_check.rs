//! CI check of the CUDA kernels without a GPU: every `kernels/*.cu` compiles with NVRTC to sm_80
//! and sm_90 cubin with no error, no warning and no register spill. Needs libnvrtc on the library
//! path: `scripts/test-cuda-nvrtc.sh` installs the nvidia-cuda-nvrtc wheel and runs these with
//! `--ignored`.
#![cfg(feature = "cuda")]

use phenocore::backend::cuda::nvrtc::{self, FunctionResources, MODULES};
use phenocore::Error;
use std::collections::BTreeSet;
use std::path::Path;

const ARCHS: [u32; 2] = [80, 90];
const PTXAS_VERBOSE: &str = "--ptxas-options=-v";
const NEEDS_NVRTC: &str = "needs libnvrtc: run scripts/test-cuda-nvrtc.sh";

fn files_in_kernels(ext: &str) -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(ext).map(str::to_string))
        .collect()
}

/// Runs without NVRTC: a new kernels/*.cu or *.cuh must be registered to be embedded and checked.
#[test]
fn every_kernel_file_is_embedded() {
    let embedded: BTreeSet<String> = MODULES.iter().map(|m| m.name.to_string()).collect();
    assert_eq!(
        files_in_kernels(".cu"),
        embedded,
        "kernels/*.cu vs nvrtc::MODULES"
    );
    let headers: BTreeSet<String> = nvrtc::HEADERS
        .iter()
        .map(|(n, _)| n.trim_end_matches(".cuh").to_string())
        .collect();
    assert_eq!(
        files_in_kernels(".cuh"),
        headers,
        "kernels/*.cuh vs nvrtc::HEADERS"
    );
}

#[test]
#[ignore = "needs libnvrtc: run scripts/test-cuda-nvrtc.sh"]
fn kernels_compile_to_cubin_without_warnings_or_spills() {
    let (major, minor) = nvrtc::version().expect(NEEDS_NVRTC);
    eprintln!("NVRTC {major}.{minor}");
    let mut failures = Vec::new();
    for module in MODULES {
        for arch in ARCHS {
            let where_ = format!("kernels/{}.cu for sm_{arch}", module.name);
            let compiled = match nvrtc::compile(module.name, module.source, arch, &[PTXAS_VERBOSE])
            {
                Ok(c) => c,
                Err(e) => {
                    failures.push(format!("{where_}: {e}"));
                    continue;
                }
            };
            assert_eq!(
                &compiled.cubin[..4],
                b"\x7fELF",
                "{where_}: NVRTC returned no ELF cubin"
            );
            for line in compiled.log.lines().filter(|l| l.contains("warning")) {
                failures.push(format!("{where_}: {line}"));
            }
            let functions = nvrtc::parse_ptxas_log(&compiled.log);
            let names: BTreeSet<&str> = functions.iter().map(|f| f.name.as_str()).collect();
            for entry in module.entries {
                if !names.contains(entry) {
                    failures.push(format!(
                        "{where_}: no ptxas report for entry point {entry} (log:\n{})",
                        compiled.log
                    ));
                }
            }
            for f in functions.iter().filter(|f| f.spills()) {
                failures.push(format!(
                    "{where_}: {} spills registers ({} bytes stored, {} loaded, {} registers)",
                    f.name, f.spill_store_bytes, f.spill_load_bytes, f.registers
                ));
            }
            let worst = functions.iter().max_by_key(|f| f.registers);
            eprintln!(
                "{where_}: {} functions, most registers: {worst:?}",
                functions.len()
            );
        }
    }
    assert!(
        failures.is_empty(),
        "NVRTC check failed:\n{}",
        failures.join("\n")
    );
}

/// Proves the spill check can fail: 48 live floats cannot fit in 32 registers.
#[test]
#[ignore = "needs libnvrtc: run scripts/test-cuda-nvrtc.sh"]
fn spill_check_catches_a_spilling_kernel() {
    const SPILLING: &str = r#"
        extern "C" __global__ void spill(float* out, const float* in) {
            float a[48];
            #pragma unroll
            for (int i = 0; i < 48; i++) a[i] = in[i * blockDim.x + threadIdx.x];
            float s = 0;
            #pragma unroll
            for (int i = 0; i < 48; i++) s += a[i] * a[47 - i] * s + a[(i * 5) % 48];
            #pragma unroll
            for (int i = 0; i < 48; i++) out[i * blockDim.x + threadIdx.x] = a[i] * s;
        }"#;
    for arch in ARCHS {
        let compiled = nvrtc::compile(
            "spill",
            SPILLING,
            arch,
            &[PTXAS_VERBOSE, "--maxrregcount=32"],
        )
        .expect(NEEDS_NVRTC);
        let functions = nvrtc::parse_ptxas_log(&compiled.log);
        let spill: Vec<&FunctionResources> =
            functions.iter().filter(|f| f.name == "spill").collect();
        assert_eq!(spill.len(), 1, "sm_{arch}: {functions:?}\n{}", compiled.log);
        assert!(
            spill[0].spills() && spill[0].registers <= 32,
            "sm_{arch}: {:?}\n{}",
            spill[0],
            compiled.log
        );
    }
}

#[test]
#[ignore = "needs libnvrtc: run scripts/test-cuda-nvrtc.sh"]
fn compile_errors_name_the_file_and_the_culprit() {
    let src = "#include \"common.cuh\"\nextern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }";
    match nvrtc::compile("broken", src, 90, &[]) {
        Err(Error::Cuda(m)) => assert!(
            m.contains("broken.cu") && m.contains("undefined_name"),
            "{m}"
        ),
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
#[ignore = "needs libnvrtc: run scripts/test-cuda-nvrtc.sh"]
fn cubins_are_cached_per_module_and_arch() {
    let a = nvrtc::cubin(&nvrtc::UNARY, 90).expect(NEEDS_NVRTC);
    let b = nvrtc::cubin(&nvrtc::UNARY, 90).expect(NEEDS_NVRTC);
    assert!(std::sync::Arc::ptr_eq(&a, &b), "second request recompiled");
    let c = nvrtc::cubin(&nvrtc::UNARY, 80).expect(NEEDS_NVRTC);
    assert!(!std::sync::Arc::ptr_eq(&a, &c));
    assert_ne!(*a, *c, "sm_80 and sm_90 cubins should differ");
}
