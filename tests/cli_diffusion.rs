//! `phenocore diffusion train` / `sample` end to end on a tiny U-Net: training lowers the loss,
//! an interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted
//! one, sampling with guidance decodes through a VAE to 16-bit TIFFs, and bad input is named.

use phenocore::io::npz::{decode_npy, encode_npy, NpyArray};
use phenocore::io::table::read_csv;
use std::path::Path;
use std::process::{Command, Output};

fn phenocore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phenocore"))
        .args(args)
        .output()
        .expect("run phenocore")
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// 24 latents 8 × 4 × 4 whose mean is ±1 by `source`, 3 compounds of 6 dims, wells with nulls.
fn write_data(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let n = 24;
    let mut lat = Vec::with_capacity(n * 128);
    let mut rows = String::from("compound,source,well\n");
    for i in 0..n {
        let src = i % 2;
        for j in 0..128 {
            let noise = (((i * 131 + j * 71) % 97) as f32 / 97.0 - 0.5) * 0.6;
            lat.push(if src == 1 { 1.0 } else { -1.0 } + noise);
        }
        let well = if i % 5 == 0 {
            "-1".to_string()
        } else {
            (i % 4).to_string()
        };
        rows.push_str(&format!("{},{src},{well}\n", i % 3));
    }
    let npy =
        |shape: Vec<usize>, data: Vec<f32>| encode_npy(&NpyArray::F32 { shape, data }).unwrap();
    std::fs::write(dir.join("lat.npy"), npy(vec![n, 8, 4, 4], lat)).unwrap();
    let emb: Vec<f32> = (0..18).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.2).collect();
    std::fs::write(dir.join("emb.npy"), npy(vec![3, 6], emb)).unwrap();
    std::fs::write(dir.join("cond.csv"), rows).unwrap();
    std::fs::write(
        dir.join("unet.json"),
        r#"{"spatial_dims": 2, "in_channels": 8, "out_channels": 8, "channels": [8, 16],
            "attention_levels": [false, true], "num_res_blocks": 1, "norm_num_groups": 4,
            "num_head_channels": [8, 8], "with_conditioning": true, "cross_attention_dim": 6,
            "confounders": {"source": 2, "well": 4}, "null_embeddings": true}"#,
    )
    .unwrap();
}

fn train_args<'a>(d: &'a str, out: &'a str, epochs: &'a str) -> Vec<&'a str> {
    vec![
        "diffusion",
        "train",
        "--unet-config",
        d,
        "--latents",
        "",
        "--conditions",
        "",
        "--compounds",
        "",
        "--out",
        out,
        "--epochs",
        epochs,
        "--batch",
        "4",
        "--lr",
        "2e-3",
        "--seed",
        "3",
        "--quiet",
        "--threads",
        "1",
    ]
}

#[test]
fn diffusion_train_resume_and_sample_through_a_vae() {
    let root = std::env::temp_dir().join(format!("pheno_cli_diff_{}", std::process::id()));
    write_data(&root);
    let s = |p: &str| root.join(p).to_str().unwrap().to_string();
    let (cfg, lat, cond, emb) = (s("unet.json"), s("lat.npy"), s("cond.csv"), s("emb.npy"));
    let run = |out: &str, epochs: &str, resume: bool| {
        let mut a = train_args(&cfg, out, epochs);
        a[5] = &lat;
        a[7] = &cond;
        a[9] = &emb;
        if resume {
            a.push("--resume");
        }
        phenocore(&a)
    };
    // Straight 6 epochs; 3 then resumed to 6.
    let full = s("full");
    ok(&run(&full, "6", false));
    let part = s("part");
    ok(&run(&part, "3", false));
    ok(&run(&part, "6", true));
    let a = std::fs::read(root.join("full/unet.safetensors")).unwrap();
    let b = std::fs::read(root.join("part/unet.safetensors")).unwrap();
    assert!(
        a == b,
        "resumed run's weights differ from the uninterrupted run's"
    );
    let hist = read_csv(&root.join("full/history.csv")).unwrap();
    assert_eq!(hist.rows.len(), 6);
    let loss: Vec<f64> = hist.rows.iter().map(|r| r[2].parse().unwrap()).collect();
    assert!(loss[5] < 0.8 * loss[0], "loss did not fall: {loss:?}");
    assert_eq!(
        read_csv(&root.join("part/history.csv")).unwrap().rows,
        hist.rows
    );

    // Sampling with guidance, decoded by the VAE fixture (3 levels: latents 4 × 4 → 16 × 16).
    let vae = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/vae/");
    let (vw, vc) = (
        format!("{vae}weights.safetensors"),
        format!("{vae}config.json"),
    );
    let out = s("samples");
    let unet = root.join("full/unet_ema.safetensors");
    let unet = unet.to_str().unwrap();
    let sample = |extra: &[&str]| {
        let mut a = vec![
            "diffusion",
            "sample",
            "--unet",
            unet,
            "--unet-config",
            &cfg,
            "--compounds",
            &emb,
            "--n",
            "2",
            "--size",
            "4",
            "--steps",
            "8",
            "--guidance",
            "2.5",
            "--seed",
            "1",
            "--out",
            &out,
            "--quiet",
            "--threads",
            "1",
        ];
        a.extend_from_slice(extra);
        phenocore(&a)
    };
    ok(&sample(&[
        "--compound",
        "1",
        "--confounder",
        "source=1",
        "--confounder",
        "well=null",
        "--vae",
        &vw,
        "--vae-config",
        &vc,
    ]));
    let lat_out = decode_npy(
        &std::fs::read(root.join("samples/latents.npy")).unwrap(),
        "l",
    )
    .unwrap();
    assert_eq!(lat_out.shape(), &[2, 8, 4, 4]);
    let img = decode_npy(
        &std::fs::read(root.join("samples/images.npy")).unwrap(),
        "i",
    )
    .unwrap();
    assert_eq!(img.shape(), &[2, 5, 16, 16]);
    for s in 0..2 {
        for c in 0..5 {
            let p = root.join(format!("samples/sample_{s:04}_ch{c}.tiff"));
            let g = phenocore::io::image::read_gray(&p).unwrap();
            assert_eq!((g.width, g.height), (16, 16), "{}", p.display());
        }
    }
    // Same seed, same samples.
    let first = std::fs::read(root.join("samples/latents.npy")).unwrap();
    ok(&sample(&[
        "--compound",
        "1",
        "--confounder",
        "source=1",
        "--confounder",
        "well=null",
    ]));
    assert_eq!(
        first,
        std::fs::read(root.join("samples/latents.npy")).unwrap()
    );

    // Bad input: unknown / missing confounders, out-of-range compound, bad conditions.
    let e = stderr(&sample(&[
        "--compound",
        "1",
        "--confounder",
        "plate=1",
        "--confounder",
        "well=0",
    ]));
    assert!(e.contains("no confounder \"plate\""), "{e}");
    let e = stderr(&sample(&["--compound", "1", "--confounder", "source=1"]));
    assert!(e.contains("--confounder well="), "{e}");
    let e = stderr(&sample(&[
        "--compound",
        "7",
        "--confounder",
        "source=1",
        "--confounder",
        "well=0",
    ]));
    assert!(e.contains("--compound 7 is out of range"), "{e}");
    let e = stderr(&sample(&[
        "--compound",
        "0",
        "--confounder",
        "source=2",
        "--confounder",
        "well=0",
    ]));
    assert!(
        e.contains("\"source\"") && e.contains("out of range"),
        "{e}"
    );
    let bad = root.join("bad.csv");
    let mut rows = std::fs::read_to_string(&cond).unwrap();
    rows = rows.replacen("\n1,1,1\n", "\n1,1,9\n", 1);
    std::fs::write(&bad, rows).unwrap();
    let mut a = train_args(&cfg, &out, "1");
    a[5] = &lat;
    let badp = bad.to_str().unwrap().to_string();
    a[7] = &badp;
    a[9] = &emb;
    let e = stderr(&phenocore(&a));
    assert!(
        e.contains("bad.csv line") && e.contains("\"well\"") && e.contains("index 9"),
        "{e}"
    );
    std::fs::remove_dir_all(&root).ok();
}
