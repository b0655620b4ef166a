//! Device crops and augmentation against src/profiling/crops.rs and src/train/augment.rs, bit for
//! bit: every pixel type, normalisation, layout, border case and augmentation step.

use super::*;
use phenocore::backend::gpu::crop::{AugmentPlan, CropLayout, CropPlan, PixelType};
use phenocore::backend::gpu::Gpu;
use phenocore::profiling::crops::{crop_cells, Image, ImageData, Normalization};
use phenocore::train::augment::{apply, AugmentParams, Augmentation};
use phenocore::Error;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const C: usize = 3;
const H: usize = 23;
const W: usize = 31;

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} of {} differs: got {:e} ({:#010x}), want {:e} ({:#010x})",
            got.len(),
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

/// [N, C, S, S'] → [N, S, S', C].
fn to_nhwc(v: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for s in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                out[(s * h * w + p) * c + ch] = v[(s * c + ch) * h * w + p];
            }
        }
    }
    out
}

/// Interior, fractional (x.5 rounds up, x.49 down), every border and corner, partly and wholly
/// outside, negative.
const CENTERS: [[f32; 2]; 9] = [
    [15.0, 11.0],
    [10.5, 7.49],
    [0.0, 0.0],
    [30.2, 22.7],
    [-3.0, 12.0],
    [16.0, 24.9],
    [100.0, -50.0],
    [2.6, 21.5],
    [29.4, 1.0],
];

/// Pixels as (bytes to upload, their f32 values): channel 1 is constant 0 in the integer images
/// and constant −0.25 in the f32 one, so crops reaching past the border have max = 0 (the legacy
/// normalisation's zero-scale case).
fn image(pixel: PixelType) -> (Vec<u8>, Vec<f32>) {
    let n = C * H * W;
    let r = uniform(n, 42);
    let plane = H * W;
    match pixel {
        PixelType::U8 => {
            let px: Vec<u8> = (0..n)
                .map(|i| {
                    if i / plane == 1 {
                        0
                    } else {
                        ((r[i] + 1.0) * 127.9) as u8
                    }
                })
                .collect();
            (px.clone(), px.iter().map(|&v| v as f32).collect())
        }
        PixelType::U16 => {
            let px: Vec<u16> = (0..n)
                .map(|i| {
                    if i / plane == 1 {
                        0
                    } else {
                        ((r[i] + 1.0) * 32767.0) as u16
                    }
                })
                .collect();
            (
                bytemuck::cast_slice(&px).to_vec(),
                px.iter().map(|&v| v as f32).collect(),
            )
        }
        PixelType::F32 => {
            let px: Vec<f32> = (0..n)
                .map(|i| if i / plane == 1 { -0.25 } else { r[i] * 3.0 })
                .collect();
            (bytemuck::cast_slice(&px).to_vec(), px)
        }
    }
}

fn cpu_crops(
    pixel: PixelType,
    bytes: &[u8],
    centers: &[[f32; 2]],
    b: usize,
    norm: Normalization,
) -> Vec<f32> {
    let data = match pixel {
        PixelType::U8 => ImageData::U8(bytes),
        PixelType::U16 => ImageData::U16(bytemuck::cast_slice(bytes)),
        PixelType::F32 => ImageData::F32(bytemuck::cast_slice(bytes)),
    };
    let img = Image::new(data, C, H, W).unwrap();
    crop_cells(&img, centers, b, norm)
        .unwrap()
        .as_f32()
        .unwrap()
        .to_vec()
}

pub fn crop_extract_matches_cpu<G: Gpu>(g: &G) {
    for pixel in [PixelType::U8, PixelType::U16, PixelType::F32] {
        let (bytes, _) = image(pixel);
        let img = g.upload(&bytes).unwrap();
        for norm in [
            Normalization::None,
            Normalization::DeepProfilerLegacy,
            Normalization::MinMax,
        ] {
            for b in [16usize, 15, 1, 40] {
                let want = cpu_crops(pixel, &bytes, &CENTERS, b, norm);
                let n = CENTERS.len();
                for layout in [CropLayout::Nchw, CropLayout::Nhwc] {
                    let what = format!("crop {pixel:?} {norm:?} box {b} {layout:?}");
                    let plan = CropPlan::new(pixel, [C, H, W], b, norm, layout).unwrap();
                    assert_eq!(plan.output_len(n), want.len());
                    let out = g.alloc(plan.output_len(n) * 4).unwrap();
                    unsafe { plan.extract(g, g.ptr(&img), &CENTERS, g.ptr(&out)).unwrap() };
                    let got = g.download_vec::<f32>(&out, plan.output_len(n)).unwrap();
                    let want = match layout {
                        CropLayout::Nchw => want.clone(),
                        CropLayout::Nhwc => to_nhwc(&want, n, C, b, b),
                    };
                    assert_bits(&what, &got, &want);
                }
            }
        }
    }
}

/// Hand-picked draws covering every step alone and together, on (C, S, S) crops.
fn hand_params(s: usize) -> Vec<AugmentParams> {
    let none = AugmentParams {
        crop: None,
        flip: false,
        rot_k: 0,
        brightness: vec![],
        contrast: vec![],
    };
    let mut v = vec![none.clone()];
    for k in 1..4u8 {
        v.push(AugmentParams {
            rot_k: k,
            ..none.clone()
        });
        v.push(AugmentParams {
            rot_k: k,
            flip: true,
            ..none.clone()
        });
    }
    v.push(AugmentParams {
        flip: true,
        ..none.clone()
    });
    v.push(AugmentParams {
        crop: Some((1, 2, s - 3, s - 3)),
        ..none.clone()
    });
    v.push(AugmentParams {
        crop: Some((0, 0, s, s)),
        ..none.clone()
    });
    v.push(AugmentParams {
        crop: Some((3, 0, s - 3, s - 3)),
        flip: true,
        rot_k: 3,
        ..none.clone()
    });
    v.push(AugmentParams {
        brightness: vec![0.05, -0.1, 0.0],
        ..none.clone()
    });
    v.push(AugmentParams {
        contrast: vec![0.8, 1.0, 1.2],
        ..none.clone()
    });
    v.push(AugmentParams {
        brightness: vec![0.1, 0.02, -0.07],
        contrast: vec![1.1, 0.9, 1.0],
        ..none.clone()
    });
    v.push(AugmentParams {
        crop: Some((2, 1, s - 2, s - 2)),
        flip: true,
        rot_k: 1,
        brightness: vec![-0.03, 0.08, 0.01],
        contrast: vec![0.85, 1.15, 1.05],
    });
    v
}

fn check_augment<G: Gpu>(
    g: &G,
    what: &str,
    crops: &[f32],
    params: &[AugmentParams],
    [n, c, h, w]: [usize; 4],
) {
    let mut want = crops.to_vec();
    let mut scratch = Vec::new();
    for (i, p) in params.iter().enumerate() {
        apply(
            p,
            &mut want[i * c * h * w..(i + 1) * c * h * w],
            c,
            h,
            w,
            &mut scratch,
        )
        .unwrap();
    }
    check_augment_against(g, what, crops, params, [n, c, h, w], &want);
}

fn check_augment_against<G: Gpu>(
    g: &G,
    what: &str,
    crops: &[f32],
    params: &[AugmentParams],
    [n, c, h, w]: [usize; 4],
    want: &[f32],
) {
    let input = g.upload_slice(crops).unwrap();
    for layout in [CropLayout::Nchw, CropLayout::Nhwc] {
        let plan = AugmentPlan::new([n, c, h, w], layout).unwrap();
        let out = g.alloc(plan.len() * 4).unwrap();
        unsafe { plan.apply(g, params, g.ptr(&input), g.ptr(&out)).unwrap() };
        let got = g.download_vec::<f32>(&out, plan.len()).unwrap();
        let want = match layout {
            CropLayout::Nchw => want.to_vec(),
            CropLayout::Nhwc => to_nhwc(want, n, c, h, w),
        };
        assert_bits(&format!("{what} {layout:?}"), &got, &want);
    }
}

pub fn crop_augment_matches_cpu<G: Gpu>(g: &G) {
    // Crops as the trainer gets them: normalised u16 crops of the test image.
    let s = 16;
    let (bytes, _) = image(PixelType::U16);
    let params = hand_params(s);
    let centers: Vec<[f32; 2]> = (0..4).flat_map(|_| CENTERS).take(params.len()).collect();
    let crops = cpu_crops(PixelType::U16, &bytes, &centers, s, Normalization::MinMax);
    assert_eq!(params.len(), centers.len());
    check_augment(
        g,
        "augment, hand-picked draws",
        &crops,
        &params,
        [params.len(), C, s, s],
    );

    // Draws from the CPU's RNG with the default augmentation: the device result equals
    // Augmentation::augment_batch from the same RNG state.
    let n = 12;
    let crops = &crops[..n * C * s * s];
    let aug = Augmentation::default();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut draw_rng = rng.clone();
    let params: Vec<AugmentParams> = (0..n)
        .map(|_| aug.draw(C, s, s, &mut draw_rng).unwrap())
        .collect();
    assert!(params.iter().any(|p| p.crop.is_some()) && params.iter().any(|p| p.crop.is_none()));
    let mut want = crops.to_vec();
    aug.augment_batch(&mut want, n, C, s, s, &mut rng, &mut Vec::new())
        .unwrap();
    check_augment_against(
        g,
        "augment, default draws",
        crops,
        &params,
        [n, C, s, s],
        &want,
    );

    // Non-square crops (no rot90): crop windows of both aspect ratios, odd sizes.
    let (h, w) = (11, 14);
    let raw: Vec<f32> = uniform(n * C * h * w, 5)
        .iter()
        .map(|v| v * 0.5 + 0.5)
        .collect();
    let aug = Augmentation {
        rot90: false,
        crop_p: 0.7,
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let params: Vec<AugmentParams> = (0..n)
        .map(|_| aug.draw(C, h, w, &mut rng).unwrap())
        .collect();
    assert!(params.iter().any(|p| p.crop.is_some()));
    check_augment(g, "augment, non-square", &raw, &params, [n, C, h, w]);
}

pub fn crop_rejects_bad_plans<G: Gpu>(g: &G) {
    let r = CropPlan::new(
        PixelType::U8,
        [C, H, W],
        0,
        Normalization::None,
        CropLayout::Nchw,
    );
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "box 0: {r:?}");
    let r = CropPlan::new(
        PixelType::U8,
        [C, H, W],
        4097,
        Normalization::None,
        CropLayout::Nchw,
    );
    assert!(
        matches!(r, Err(Error::InvalidArgument(_))),
        "box 4097: {r:?}"
    );
    let r = CropPlan::new(
        PixelType::U8,
        [C, 0, W],
        8,
        Normalization::None,
        CropLayout::Nchw,
    );
    assert!(matches!(r, Err(Error::Shape(_))), "zero height: {r:?}");
    let plan = CropPlan::new(
        PixelType::F32,
        [C, H, W],
        8,
        Normalization::MinMax,
        CropLayout::Nchw,
    )
    .unwrap();
    let img = g.alloc(plan.image_len() * 4).unwrap();
    let out = g.alloc(plan.output_len(2) * 4).unwrap();
    for bad in [[f32::NAN, 1.0], [1.0, f32::INFINITY], [2e9, 0.0]] {
        let r = unsafe { plan.extract(g, g.ptr(&img), &[[1.0, 1.0], bad], g.ptr(&out)) };
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "centre {bad:?}: {r:?}"
        );
    }

    let r = AugmentPlan::new([0, C, 8, 8], CropLayout::Nchw);
    assert!(matches!(r, Err(Error::Shape(_))), "no crops: {r:?}");
    let plan = AugmentPlan::new([2, C, 8, 10], CropLayout::Nchw).unwrap();
    let ok = AugmentParams {
        crop: None,
        flip: false,
        rot_k: 0,
        brightness: vec![],
        contrast: vec![],
    };
    let input = g.alloc(plan.len() * 4).unwrap();
    let output = g.alloc(plan.len() * 4).unwrap();
    let run = |p: &[AugmentParams]| unsafe { plan.apply(g, p, g.ptr(&input), g.ptr(&output)) };
    let r = run(std::slice::from_ref(&ok));
    assert!(
        matches!(r, Err(Error::Shape(_))),
        "1 parameter set for 2 crops: {r:?}"
    );
    let r = run(&[
        ok.clone(),
        AugmentParams {
            crop: Some((1, 3, 8, 7)),
            ..ok.clone()
        },
    ]);
    assert!(
        matches!(r, Err(Error::InvalidArgument(_))),
        "window past the bottom: {r:?}"
    );
    let r = run(&[
        ok.clone(),
        AugmentParams {
            crop: Some((0, 0, 0, 4)),
            ..ok.clone()
        },
    ]);
    assert!(
        matches!(r, Err(Error::InvalidArgument(_))),
        "empty window: {r:?}"
    );
    let r = run(&[
        AugmentParams {
            rot_k: 1,
            ..ok.clone()
        },
        ok.clone(),
    ]);
    assert!(
        matches!(r, Err(Error::Shape(_))),
        "rot90 of 8×10 crops: {r:?}"
    );
    let r = run(&[
        ok.clone(),
        AugmentParams {
            brightness: vec![0.1; 2],
            ..ok.clone()
        },
    ]);
    assert!(
        matches!(r, Err(Error::InvalidArgument(_))),
        "2 brightness values for 3 channels: {r:?}"
    );
}
