//! The `phenocore` binary end to end on tiny synthetic plates.

use phenocore::io::npz::read_site;
use phenocore::io::table::read_csv;
use phenocore::models::efficientnet::{EfficientNet, EfficientNetConfig};
use phenocore::profiling::synthetic::{write_dataset, SyntheticConfig};
use std::path::Path;
use std::process::{Command, Output};

fn phenocore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phenocore"))
        .args(args)
        .output()
        .expect("the phenocore binary runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Synthetic small plates plus a seeded model, made through the library (no forward pass needed).
fn small_dataset(root: &Path) {
    write_dataset(&SyntheticConfig::small(), root, &mut |_, _| true).unwrap();
    let cfg = EfficientNetConfig {
        in_channels: 5,
        num_classes: 3,
        ..EfficientNetConfig::default()
    };
    EfficientNet::new(cfg, 0)
        .unwrap()
        .save(&root.join("model.safetensors"))
        .unwrap();
}

fn profile_args<'a>(root: &'a Path, metadata: &'a str) -> Vec<String> {
    let p = |s: &str| root.join(s).display().to_string();
    vec![
        "profile".into(),
        "--metadata".into(),
        p(metadata),
        "--images".into(),
        p("images"),
        "--locations".into(),
        p("locations"),
        "--output".into(),
        p("features"),
        "--weights".into(),
        p("model.safetensors"),
        "--threads".into(),
        "2".into(),
    ]
}

fn run_profile(root: &Path, metadata: &str) -> Output {
    let args = profile_args(root, metadata);
    phenocore(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn version_prints_the_crate_version() {
    let o = phenocore(&["--version"]);
    assert!(o.status.success());
    assert_eq!(
        text(&o).0.trim(),
        format!("phenocore {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn demo_small_then_profile_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let o = phenocore(&[
        "demo",
        "--small",
        "--output",
        &root.display().to_string(),
        "--threads",
        "2",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "demo failed:\n{out}\n{err}");
    assert!(out.contains("random weights (seed 0)"), "{out}");
    assert!(
        out.contains("sites:        6 (6 profiled, 0 already done, 0 with no cells)"),
        "{out}"
    );
    assert!(
        out.contains("feature dim:  672 (block6a_activation)"),
        "{out}"
    );

    // Every site of the metadata has an npz with one 672-wide row per location, in location order.
    let meta = read_csv(&root.join("metadata.csv")).unwrap();
    assert_eq!(meta.rows.len(), 6);
    let col = |n: &str| meta.column(n).unwrap();
    let mut total = 0;
    for r in &meta.rows {
        let (plate, well, site) = (
            &r[col("Metadata_Plate")],
            &r[col("Metadata_Well")],
            &r[col("Metadata_Site")],
        );
        let s = read_site(&root.join(format!("features/{plate}/{well}_{site}.npz"))).unwrap();
        let loc =
            read_csv(&root.join(format!("locations/{plate}/{well}-{site}-Nuclei.csv"))).unwrap();
        let xs = loc.f32_column(0).unwrap();
        assert_eq!((s.cells, s.dim), (loc.rows.len(), 672));
        assert_eq!(s.features.len(), s.cells * 672);
        assert!(s.cells >= 4, "{plate}/{well}_{site}: {} cells", s.cells);
        assert_eq!(s.locations.iter().map(|l| l[0]).collect::<Vec<_>>(), xs);
        assert!(s.features.iter().all(|v| v.is_finite()));
        // Different cells give different features.
        assert_ne!(s.features[..672], s.features[672..2 * 672]);
        assert_eq!(
            s.metadata_value("Metadata_Treatment"),
            Some(r[col("Metadata_Treatment")].as_str())
        );
        assert_eq!(
            s.metadata_value("phenocore_layers"),
            Some("block6a_activation:672")
        );
        total += s.cells;
    }
    assert!(out.contains(&format!("cells:        {total}\n")), "{out}");

    // Rerun: every site is done, nothing is rewritten.
    let first = root.join(format!(
        "features/{}/{}_{}.npz",
        meta.rows[0][0], meta.rows[0][1], meta.rows[0][2]
    ));
    let stamp = std::fs::metadata(&first).unwrap().modified().unwrap();
    let o = run_profile(root, "metadata.csv");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("6 (0 profiled, 6 already done"), "{out}");
    assert_eq!(
        std::fs::metadata(&first).unwrap().modified().unwrap(),
        stamp
    );

    // Remove one output and empty its locations: only it is profiled, with 0 rows.
    std::fs::remove_file(&first).unwrap();
    let loc = root.join(format!(
        "locations/{}/{}-{}-Nuclei.csv",
        meta.rows[0][0], meta.rows[0][1], meta.rows[0][2]
    ));
    std::fs::write(&loc, "Nuclei_Location_Center_X,Nuclei_Location_Center_Y\n").unwrap();
    let o = run_profile(root, "metadata.csv");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("6 (1 profiled, 5 already done, 1 with no cells)"),
        "{out}"
    );
    assert!(
        err.contains("5 of 6 sites already profiled")
            && err.contains("no cells; wrote a file with 0 rows"),
        "{err}"
    );
    let s = read_site(&first).unwrap();
    assert_eq!((s.cells, s.dim, s.features.len()), (0, 672, 0));

    // Resuming with other settings would mix feature sets: refused, naming the setting.
    let mut args = profile_args(root, "metadata.csv");
    args.extend(["--layers".into(), "top_activation".into()]);
    let o = phenocore(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("phenocore_layers=block6a_activation:672"),
        "{err}"
    );
}

#[test]
fn missing_column_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    small_dataset(root);
    let csv = std::fs::read_to_string(root.join("metadata.csv")).unwrap();
    let cut: String = csv
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let mut keep = vec![f[0]];
            keep.extend(&f[2..]);
            keep.join(",") + "\n"
        })
        .collect();
    std::fs::write(root.join("bad.csv"), cut).unwrap();
    let o = run_profile(root, "bad.csv");
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Metadata_Well") && err.contains("bad.csv"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!root.join("features").exists());
}

#[test]
fn missing_image_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    small_dataset(root);
    let meta = read_csv(&root.join("metadata.csv")).unwrap();
    let rel = meta.rows[3][meta.column("ER").unwrap()].clone();
    std::fs::remove_file(root.join("images").join(&rel)).unwrap();
    let o = run_profile(root, "metadata.csv");
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&rel) && err.contains("column ER"), "{err}");
    // Checked before any site is profiled.
    assert!(!root.join("features").exists());
}

#[test]
fn bad_options_and_weights_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    small_dataset(root);
    let mut args = profile_args(root, "metadata.csv");
    args.extend(["--layers".into(), "block9z_activation".into()]);
    let o = phenocore(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("block9z_activation"), "{err}");

    let mut args = profile_args(root, "metadata.csv");
    args.extend(["--normalize".into(), "zscore".into()]);
    let (_, err) = text(&phenocore(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(err.contains("zscore"), "{err}");

    std::fs::write(root.join("model.safetensors"), b"not weights").unwrap();
    let o = run_profile(root, "metadata.csv");
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
}
