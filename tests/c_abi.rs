//! Builds tests/c/test_phenocore.c against include/phenocore.h and the cdylib cargo built for this
//! test run, and runs it with the features the Rust API gives for the same model and crops, so the
//! C ABI is checked value for value against the library it wraps.
#![cfg(target_os = "linux")]

use phenocore::models::efficientnet::{EfficientNet, EfficientNetConfig, Padding};
use phenocore::Tensor;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

// Must match tests/c/test_phenocore.c.
const C: usize = 5;
const CLASSES: usize = 10;
const N: usize = 3;
const HW: usize = 36;
const SEED: u64 = 42;

fn crops() -> Vec<f32> {
    (0..N * C * HW * HW)
        .map(|i| ((i as u64 * 7919) % 1000) as f32 / 1000.0)
        .collect()
}

/// "name count" then the values, one per line, in Rust's shortest round-trip form.
fn expected_file() -> String {
    let config = EfficientNetConfig {
        in_channels: C,
        num_classes: CLASSES,
        padding: Padding::Symmetric,
        bn_eps: 1e-5,
    };
    let net = EfficientNet::new(config, SEED).expect("model");
    let x = Tensor::from_f32(&[N, C, HW, HW], crops()).expect("crops");
    let feats = net
        .features(&x, &["block6a_activation", "top_activation"])
        .expect("features");
    let logits = net.logits(&x).expect("logits");
    let mut s = String::new();
    for (name, t) in [
        ("block6a_activation", &feats[0]),
        ("top_activation", &feats[1]),
        ("logits", &logits),
    ] {
        let v = t.as_f32().expect("f32");
        writeln!(s, "{name} {}", v.len()).unwrap();
        for x in v {
            writeln!(s, "{x:e}").unwrap();
        }
    }
    s
}

/// The directory holding the cdylib built alongside this test binary.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    for dir in [
        deps.clone(),
        deps.parent().expect("profile dir").to_path_buf(),
    ] {
        if dir.join("libphenocore.so").exists() {
            return dir;
        }
    }
    panic!("libphenocore.so not found next to {}", exe.display());
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

#[test]
fn c_program_passes_and_matches_the_rust_api() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("phenocore-c");
    std::fs::create_dir_all(&work).expect("work dir");
    // Kept at a fixed place so scripts/test-c.sh can reuse it for the valgrind run.
    let expected = work.join("expected_features.txt");
    let tmp = work.join(format!("expected_features.txt.{}", std::process::id()));
    std::fs::write(&tmp, expected_file()).expect("write expected features");
    std::fs::rename(&tmp, &expected).expect("rename expected features");

    let lib = lib_dir();
    // Per process, so concurrent test runs do not overwrite each other's program.
    let scratch = work.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let exe = scratch.join("test_phenocore");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    run(Command::new(&cc)
        .args([
            "-std=c11",
            "-O1",
            "-g",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-pthread",
        ])
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/c/test_phenocore.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib)
        // DT_RPATH, not DT_RUNPATH: cargo puts target/<profile> first on LD_LIBRARY_PATH, which
        // outranks a RUNPATH, and the program would load whatever libphenocore.so an earlier
        // `cargo build` left there instead of the one built for this test.
        .arg("-Wl,--disable-new-dtags")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lphenocore", "-lm"]));
    let out = run(Command::new(&exe)
        .arg("--expected")
        .arg(&expected)
        .arg("--workdir")
        .arg(&scratch));
    let _ = std::fs::remove_dir_all(&scratch);
    println!("{out}");
    assert!(out.contains(" 0 failures"), "{out}");
    assert!(
        out.contains("C ABI vs Rust API"),
        "the Rust comparison did not run:\n{out}"
    );
}
