//! Single-cell crop datasets from the synthetic plates of `profiling::synthetic` (tests, benchmarks
//! and `phenocore demo`): every cell of every site, cropped as `profile` crops it, labelled with its
//! treatment's index, with its plate and well kept for the splits.

use super::trainer::Dataset;
use crate::error::Result;
use crate::profiling::crops::{crop_cells_into, Image, ImageData, Normalization};
use crate::profiling::synthetic::{layout, render_site, SyntheticConfig};
use rayon::prelude::*;

/// A crop dataset with the plate / well of every crop.
pub struct SyntheticCrops {
    pub dataset: Dataset,
    /// Plate index of each crop.
    pub plates: Vec<u32>,
    /// Well id (unique over plates) of each crop.
    pub wells: Vec<u32>,
    /// Treatment names by label.
    pub classes: Vec<String>,
}

/// Renders every site of `cfg` and crops its cells (`box_size`², `norm`), labels = treatment index
/// in `cfg.treatments`.
pub fn synthetic_crops(
    cfg: &SyntheticConfig,
    box_size: usize,
    norm: Normalization,
) -> Result<SyntheticCrops> {
    let sites = layout(cfg)?;
    let per = 5 * box_size * box_size;
    let rendered: Vec<Result<(Vec<f32>, usize, u32, u32, u32)>> = sites
        .par_iter()
        .map(|spec| {
            let img = render_site(cfg, spec)?;
            let planes: Vec<u16> = img.channels.concat();
            let image = Image::new(ImageData::U16(&planes), 5, img.size, img.size)?;
            let mut out = vec![0f32; img.centers.len() * per];
            crop_cells_into(&image, &img.centers, box_size, norm, &mut out)?;
            let label = cfg
                .treatments
                .iter()
                .position(|&t| t == spec.treatment)
                .unwrap_or(0) as u32;
            let well = (spec.plate_index * 1000 + spec.well_index) as u32;
            Ok((out, img.centers.len(), label, spec.plate_index as u32, well))
        })
        .collect();
    let (mut data, mut labels, mut plates, mut wells) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in rendered {
        let (crops, n, label, plate, well) = r?;
        data.extend_from_slice(&crops);
        labels.extend(std::iter::repeat_n(label, n));
        plates.extend(std::iter::repeat_n(plate, n));
        wells.extend(std::iter::repeat_n(well, n));
    }
    Ok(SyntheticCrops {
        dataset: Dataset::new(data, 5, box_size, box_size, labels)?,
        plates,
        wells,
        classes: cfg
            .treatments
            .iter()
            .map(|t| t.name().to_string())
            .collect(),
    })
}
