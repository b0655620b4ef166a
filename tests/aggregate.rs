//! Aggregation against pycytominer / pandas, the npz streaming path against the in-memory one, and
//! profile-table I/O against pandas-written files. Fixture: tests/fixtures/make_aggregate_fixture.py.

use phenocore::io::npz::{decode_npy, write_site, NpyArray, SiteFeatures};
use phenocore::io::profiles::{read_profiles, write_profiles, Profiles, ReadOptions, WriteOptions};
use phenocore::profiling::aggregate::{
    aggregate_cells, aggregate_npz_dir, aggregate_profiles, AggregateOptions, Aggregated, Cells,
    Level, NanPolicy, Reduce, OBJECT_COUNT, SITE_COUNT, WELL_COUNT,
};
use phenocore::Error;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/aggregate")
        .join(name)
}

struct Input {
    x: Vec<f32>,
    d: usize,
    meta: Profiles,
}

fn input() -> Input {
    let bytes = std::fs::read(fixture("cells.npy")).unwrap();
    let NpyArray::F32 { shape, data } = decode_npy(&bytes, "cells.npy").unwrap() else {
        panic!("cells.npy is not float32")
    };
    let meta = read_profiles(&fixture("cells_meta.csv"), &ReadOptions::default()).unwrap();
    assert_eq!(meta.n_rows(), shape[0]);
    Input {
        x: data,
        d: shape[1],
        meta,
    }
}

fn feature_names(d: usize) -> Vec<String> {
    (0..d).map(|j| format!("Cells_F{j}")).collect()
}

fn run(inp: &Input, opts: &AggregateOptions) -> Aggregated {
    let names = feature_names(inp.d);
    aggregate_cells(
        &Cells {
            features: &inp.x,
            n_features: inp.d,
            feature_names: &names,
            meta_names: &inp.meta.meta_names,
            meta: &inp.meta.meta,
        },
        opts,
    )
    .unwrap()
}

/// Largest |a - b| / max(|b|, 1e-3) over all features; rows and key columns must match in order.
fn compare(got: &Profiles, want: &Profiles, keys: &[&str], what: &str) -> f64 {
    assert_eq!(got.n_rows(), want.n_rows(), "{what}: row count");
    assert_eq!(got.feature_names, want.feature_names, "{what}: features");
    for k in keys {
        assert_eq!(
            got.meta_column(k).unwrap(),
            want.meta_column(k).unwrap(),
            "{what}: column {k}"
        );
    }
    let mut worst = 0.0f64;
    for (a, b) in got.data.iter().zip(&want.data) {
        if b.is_nan() {
            assert!(a.is_nan(), "{what}: {a} where the peer has NaN");
            continue;
        }
        worst = worst.max((a - b).abs() / b.abs().max(1e-3));
    }
    assert!(worst <= 1e-12, "{what}: relative difference {worst:e}");
    worst
}

const SITE_KEYS: [&str; 3] = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"];
const WELL_KEYS: [&str; 2] = ["Metadata_Plate", "Metadata_Well"];

#[test]
fn chain_matches_pandas_for_every_preset() {
    let inp = input();
    let mut worst = 0.0f64;
    for preset in ["paper", "mean", "median"] {
        let agg = run(&inp, &AggregateOptions::preset(preset).unwrap());
        for (level, keys) in [
            (Level::Site, &SITE_KEYS[..]),
            (Level::Well, &WELL_KEYS[..]),
            (Level::Treatment, &["Metadata_Treatment"][..]),
        ] {
            let want = read_profiles(
                &fixture(&format!("chain_{preset}_{}.csv", level.name())),
                &ReadOptions::default(),
            )
            .unwrap();
            let got = agg.level(level).unwrap();
            worst = worst.max(compare(
                got,
                &want,
                keys,
                &format!("{preset}/{}", level.name()),
            ));
        }
        // Annotations constant per treatment survive; the per-cell id never does.
        let t = agg.treatments.as_ref().unwrap();
        let want = read_profiles(
            &fixture(&format!("chain_{preset}_treatment.csv")),
            &ReadOptions::default(),
        )
        .unwrap();
        for c in ["Metadata_MoA", "Metadata_Control"] {
            assert_eq!(t.meta_column(c).unwrap(), want.meta_column(c).unwrap());
        }
        for p in [&agg.sites, &agg.wells, t] {
            assert!(p.meta_column("Metadata_CellId").is_err());
        }
        assert_eq!(
            agg.wells.meta_column("Metadata_Treatment").unwrap().len(),
            agg.wells.n_rows()
        );
        assert!(agg.wells.meta_column("Metadata_Site").is_err());
    }
    eprintln!("chain vs pandas: max relative difference {worst:e}");
}

#[test]
fn empty_sites_wells_and_treatments_are_reported_with_counts() {
    let inp = input();
    let agg = run(&inp, &AggregateOptions::default());
    let labels: Vec<String> = agg.empty.iter().map(|e| e.label()).collect();
    // P1/A01 site 10 and every site of P2/B01 hold only NaN rows; so well P2/B01 and cmpd_c
    // (its only well) have no profile.
    assert_eq!(agg.empty.len(), 4 + 2, "{labels:#?}");
    assert!(labels[0].starts_with("site Metadata_Plate=P1, Metadata_Well=A01, Metadata_Site=10"));
    assert_eq!(agg.empty[4].level, Level::Well);
    assert_eq!(agg.empty[4].rows, 3);
    assert_eq!(
        agg.empty[5].key,
        vec![("Metadata_Treatment".to_string(), "cmpd_c".to_string())]
    );
    // Counts: cells used add up over the levels; NaN rows are the only ones dropped.
    let nan_rows = inp
        .x
        .chunks(inp.d)
        .filter(|r| r.iter().any(|v| v.is_nan()))
        .count();
    assert_eq!(agg.dropped_cells, nan_rows);
    let sum = |p: &Profiles, c: &str| -> usize {
        p.meta_column(c)
            .unwrap()
            .iter()
            .map(|v| v.parse::<usize>().unwrap())
            .sum()
    };
    let used = agg.cells - agg.dropped_cells;
    assert_eq!(sum(&agg.sites, OBJECT_COUNT), used);
    assert_eq!(sum(&agg.wells, OBJECT_COUNT), used);
    let t = agg.treatments.as_ref().unwrap();
    assert_eq!(sum(t, OBJECT_COUNT), used);
    assert_eq!(sum(&agg.wells, SITE_COUNT), agg.sites.n_rows());
    assert_eq!(sum(t, SITE_COUNT), agg.sites.n_rows());
    assert_eq!(sum(t, WELL_COUNT), agg.wells.n_rows());
    assert_eq!(
        t.meta_column(WELL_COUNT).unwrap(),
        ["2", "2", "1"],
        "DMSO and cmpd_a on two plates"
    );

    let strict = AggregateOptions {
        on_empty: phenocore::profiling::aggregate::EmptyPolicy::Error,
        ..Default::default()
    };
    let names = feature_names(inp.d);
    let e = aggregate_cells(
        &Cells {
            features: &inp.x,
            n_features: inp.d,
            feature_names: &names,
            meta_names: &inp.meta.meta_names,
            meta: &inp.meta.meta,
        },
        &strict,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("Metadata_Site=10") && e.contains("3 more"),
        "{e}"
    );
}

#[test]
fn one_level_matches_pycytominer_aggregate() {
    let inp = input();
    let mut cells = inp.meta.clone();
    cells.feature_names = feature_names(inp.d);
    cells.data = inp.x.iter().map(|&v| v as f64).collect();
    let mut worst = 0.0f64;
    for (sname, keys) in [("site", &SITE_KEYS[..]), ("well", &WELL_KEYS[..])] {
        for op in [Reduce::Median, Reduce::Mean] {
            for (nname, nan) in [
                ("drop", NanPolicy::DropRows),
                ("skip", NanPolicy::PerFeature),
            ] {
                let want = read_profiles(
                    &fixture(&format!("pycy_{sname}_{}_{nname}.csv", op.name())),
                    &ReadOptions::default(),
                )
                .unwrap();
                let (got, used, empty) = aggregate_profiles(&cells, keys, op, nan).unwrap();
                let what = format!("pycytominer {sname} {} {nname}", op.name());
                worst = worst.max(compare(&got, &want, keys, &what));
                assert_eq!(used.len(), got.n_rows());
                match nan {
                    // Groups with only NaN rows are absent from pycytominer's output too.
                    NanPolicy::DropRows => assert!(!empty.is_empty()),
                    NanPolicy::PerFeature => assert!(empty.is_empty()),
                }
            }
        }
    }
    eprintln!("aggregate_profiles vs pycytominer: max relative difference {worst:e}");
}

/// Writes the cells as per-site npz files in `phenocore profile`'s layout, plus one 0-cell site.
fn write_sites(inp: &Input, dir: &Path) -> usize {
    let meta = &inp.meta;
    let mut start = 0;
    let mut files = 0;
    let key = |i: usize| -> Vec<&str> {
        SITE_KEYS
            .iter()
            .map(|k| meta.meta_column(k).unwrap()[i].as_str())
            .collect()
    };
    let n = meta.n_rows();
    while start < n {
        let mut end = start + 1;
        while end < n && key(end) == key(start) {
            end += 1;
        }
        let k = key(start);
        let site = SiteFeatures {
            cells: end - start,
            dim: inp.d,
            features: inp.x[start * inp.d..end * inp.d].to_vec(),
            locations: vec![[1.0, 2.0]; end - start],
            metadata: meta
                .meta_names
                .iter()
                .zip(&meta.meta)
                .filter(|(name, _)| *name != "Metadata_CellId")
                .map(|(name, col)| (name.clone(), col[start].clone()))
                .chain([
                    (
                        "DNA".to_string(),
                        format!("{}/{}_{}_dna.tif", k[0], k[1], k[2]),
                    ),
                    (
                        "phenocore_layers".to_string(),
                        format!("block6a_activation:{}", inp.d),
                    ),
                ])
                .collect(),
        };
        let out = dir.join(k[0]).join(format!("{}_{}.npz", k[1], k[2]));
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        write_site(&out, &site).unwrap();
        files += 1;
        start = end;
    }
    // A site without cells (and without metadata: keys come from the path).
    let empty = SiteFeatures {
        cells: 0,
        dim: inp.d,
        features: vec![],
        locations: vec![],
        metadata: vec![("Metadata_Treatment".into(), "DMSO".into())],
    };
    write_site(&dir.join("P1").join("A01_7.npz"), &empty).unwrap();
    files + 1
}

#[test]
fn streaming_npz_equals_in_memory_and_can_be_cancelled() {
    let inp = input();
    let dir = tempfile::tempdir().unwrap();
    let files = write_sites(&inp, dir.path());
    let opts = AggregateOptions::default();
    let mut calls = Vec::new();
    let streamed = aggregate_npz_dir(dir.path(), &opts, &mut |d, t| {
        calls.push((d, t));
        true
    })
    .unwrap();
    assert_eq!(calls.first(), Some(&(0, files)));
    assert_eq!(calls.last(), Some(&(files, files)));

    // In memory without the per-cell id (it is not in the site files).
    let mut meta = inp.meta.clone();
    let c = meta
        .meta_names
        .iter()
        .position(|n| n == "Metadata_CellId")
        .unwrap();
    meta.meta_names.remove(c);
    meta.meta.remove(c);
    let names = feature_names(inp.d);
    let mem = aggregate_cells(
        &Cells {
            features: &inp.x,
            n_features: inp.d,
            feature_names: &names,
            meta_names: &meta.meta_names,
            meta: &meta.meta,
        },
        &opts,
    )
    .unwrap();
    // Same numbers bit for bit; only the feature names (from phenocore_layers) and the extra
    // 0-cell site differ.
    let strip = |mut p: Profiles| {
        p.feature_names.clear();
        p
    };
    assert_eq!(
        streamed.sites.feature_names[0], "block6a_activation_0",
        "names from phenocore_layers"
    );
    for level in [Level::Site, Level::Well, Level::Treatment] {
        assert_eq!(
            strip(streamed.level(level).unwrap().clone()).data,
            strip(mem.level(level).unwrap().clone()).data,
            "{}",
            level.name()
        );
        assert_eq!(
            streamed.level(level).unwrap().meta,
            mem.level(level).unwrap().meta,
            "{}",
            level.name()
        );
    }
    assert_eq!(streamed.cells, mem.cells);
    assert_eq!(streamed.empty.len(), mem.empty.len() + 1);
    assert!(streamed
        .empty
        .iter()
        .any(|e| e.label().contains("Metadata_Site=7 (no rows)")));

    // Cancel after the first report.
    let mut n = 0;
    let r = aggregate_npz_dir(dir.path(), &opts, &mut |_, _| {
        n += 1;
        n < 2
    });
    assert_eq!(r.unwrap_err(), Error::Cancelled);

    // Two files for one site are an error naming both.
    let dup = dir.path().join("copy");
    std::fs::create_dir_all(&dup).unwrap();
    std::fs::copy(
        dir.path().join("P1").join("A02_1.npz"),
        dup.join("A02_1.npz"),
    )
    .unwrap();
    let e = aggregate_npz_dir(dir.path(), &opts, &mut |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("A02_1.npz") && e.contains("same site"), "{e}");
}

#[test]
fn reads_what_pandas_to_parquet_writes() {
    let p = read_profiles(&fixture("pandas_types.parquet"), &ReadOptions::default()).unwrap();
    assert_eq!(
        p.meta_names,
        [
            "Metadata_Plate",
            "Metadata_Cat",
            "Metadata_Site",
            "Metadata_Flag",
            "Metadata_Opt"
        ]
    );
    assert_eq!(
        p.feature_names,
        ["f_int32", "f_uint8", "f_float32", "f_float64", "f_nullable"]
    );
    assert_eq!(p.n_rows(), 5);
    assert_eq!(
        p.meta_column("Metadata_Cat").unwrap(),
        ["ctrl", "trt", "trt", "ctrl", "trt"]
    );
    assert_eq!(
        p.meta_column("Metadata_Site").unwrap(),
        ["1", "2", "3", "4", "5"]
    );
    assert_eq!(
        p.meta_column("Metadata_Flag").unwrap(),
        ["True", "False", "True", "True", "False"]
    );
    assert_eq!(
        p.meta_column("Metadata_Opt").unwrap(),
        ["a", "", "µé", "", "z"]
    );
    let col = |j: usize| -> Vec<f64> { (0..5).map(|i| p.row(i)[j]).collect() };
    assert_eq!(col(0), [1.0, -2.0, 3.0, 2147483647.0, -2147483648.0]);
    assert_eq!(col(1), [0.0, 255.0, 7.0, 1.0, 2.0]);
    assert_eq!(col(2), [0.5, -1.25, 3.0e-8f32 as f64, 1e30f32 as f64, 0.0]);
    let f64s = col(3);
    assert_eq!(f64s[0], 0.1);
    assert!(f64s[1].is_nan());
    assert_eq!(&f64s[2..], [-2.5, 1e-300, 123456789.125]);
    let nullable = col(4);
    assert_eq!((nullable[0], nullable[2], nullable[4]), (1.0, 3.0, -5.0));
    assert!(nullable[1].is_nan() && nullable[3].is_nan());

    // Explicit metadata columns: a string column named as a feature is an error naming it.
    let e = read_profiles(
        &fixture("pandas_types.parquet"),
        &ReadOptions {
            metadata_columns: Some(vec!["Metadata_Plate".into()]),
            npy_metadata: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("Metadata_Cat"), "{e}");
}

fn same(a: &Profiles, b: &Profiles) {
    assert_eq!(a.meta_names, b.meta_names);
    assert_eq!(a.meta, b.meta);
    assert_eq!(a.feature_names, b.feature_names);
    assert_eq!(a.data.len(), b.data.len());
    for (x, y) in a.data.iter().zip(&b.data) {
        assert!(
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
            "{x} vs {y}"
        );
    }
}

#[test]
fn every_format_round_trips() {
    let agg = run(&input(), &AggregateOptions::default());
    let mut p = agg.wells.clone();
    // Awkward values: NaN, ±inf, tiny, huge, negative zero; metadata with separators and quotes.
    p.data[0] = f64::NAN;
    p.data[1] = f64::INFINITY;
    p.data[2] = -1e-300;
    p.data[3] = 6.02214076e23;
    p.data[4] = -0.0;
    p.meta[0][0] = "P,1 \"q\"\tµ".into();
    let dir = tempfile::tempdir().unwrap();
    for name in ["w.csv", "w.tsv", "w.csv.gz", "w.parquet"] {
        let path = dir.path().join(name);
        write_profiles(&path, &p, &WriteOptions::default()).unwrap();
        let back = read_profiles(&path, &ReadOptions::default()).unwrap();
        same(&back, &p);
    }
    let npy = dir.path().join("w.npy");
    let side = dir.path().join("w_meta.csv");
    let wo = WriteOptions {
        npy_f32: false,
        npy_metadata: Some(side.clone()),
    };
    write_profiles(&npy, &p, &wo).unwrap();
    let back = read_profiles(
        &npy,
        &ReadOptions {
            metadata_columns: None,
            npy_metadata: Some(side),
        },
    )
    .unwrap();
    assert_eq!(back.meta, p.meta);
    assert_eq!(back.feature_names[0], "feature_0");
    assert!(back.data[0].is_nan() && back.data[1..] == p.data[1..]);
}
