//! `include/phenocore.h` is generated from src/ffi by cbindgen and committed. This test regenerates
//! it and fails when the committed file differs; `PHENOCORE_BLESS=1 cargo test --test header_fresh`
//! rewrites it.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn version_macros() -> String {
    format!(
        "\n#define PHENO_VERSION_MAJOR {}\n#define PHENO_VERSION_MINOR {}\n#define PHENO_VERSION_PATCH {}\n\
         /* Version of this header; compare with pheno_version_number() (the loaded library's). */\n\
         #define PHENO_VERSION_NUMBER (PHENO_VERSION_MAJOR * 10000 + PHENO_VERSION_MINOR * 100 + PHENO_VERSION_PATCH)\n",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH"),
    )
}

fn generate(root: &Path) -> String {
    let mut config = cbindgen::Config::from_file(root.join("cbindgen.toml"))
        .expect("cbindgen.toml should parse");
    config.after_includes = Some(version_macros());
    let bindings = cbindgen::Builder::new()
        // Only the FFI module and the status enum: other modules' public items stay out of the header.
        .with_src(root.join("src/error.rs"))
        .with_src(root.join("src/ffi/mod.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen should parse the crate");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

#[test]
fn committed_header_matches_the_ffi_module() {
    let root = root();
    let fresh = generate(&root);
    let path = root.join("include/phenocore.h");
    if std::env::var_os("PHENOCORE_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("write include/phenocore.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let line = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(fresh.lines().count()));
        panic!(
            "include/phenocore.h is stale (first difference at line {}): regenerate it with \
             `PHENOCORE_BLESS=1 cargo test --test header_fresh` and commit it",
            line + 1
        );
    }
}

#[test]
fn header_has_the_contract_names() {
    let h = generate(&root());
    for needle in [
        "typedef struct PhenoModel PhenoModel;",
        "const char *pheno_status_str(PhenoStatus status);",
        "const char *pheno_last_error(void);",
        "uint32_t pheno_version_number(void);",
        "PhenoStatus pheno_set_num_threads(size_t n);",
        "PHENO_PADDING_TF_SAME = 1",
        "PHENO_ERR_INTERNAL = 15",
        "PHENO_NORM_NONE = 2",
        "PHENO_PIXEL_F32 = 2",
        "typedef int32_t (*PhenoProgressFn)(size_t done, size_t total, void *user_data);",
        "PhenoEffnetOptions pheno_effnet_default_options(void);",
        "void pheno_effnet_free(PhenoModel *model);",
        "#define PHENO_VERSION_MAJOR",
        "float *const *out",
        "const char *const *layers",
    ] {
        assert!(h.contains(needle), "header lacks {needle:?}");
    }
    assert!(
        !h.contains("PhenoStatusArg"),
        "the integer status argument must appear as PhenoStatus"
    );
}
