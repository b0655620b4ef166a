//! Grayscale microscope images in and out: TIFF (8-bit, 16-bit, 32-bit float; first page of a
//! multi-page file) and PNG (1/2/4/8/16-bit grayscale). The format is taken from the file's magic bytes,
//! not its extension. Every error names the file. Writers (16-bit TIFF, 8/16-bit PNG) are atomic.

use super::write_atomic;
use crate::error::{Error, Result};
use crate::profiling::crops::ImageData;
use std::io::Cursor;
use std::path::Path;

/// Pixels of one grayscale plane, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Pixels {
    U8(Vec<u8>),
    U16(Vec<u16>),
    F32(Vec<f32>),
}

impl Pixels {
    pub fn len(&self) -> usize {
        match self {
            Pixels::U8(v) => v.len(),
            Pixels::U16(v) => v.len(),
            Pixels::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Pixels::U8(_) => "8-bit",
            Pixels::U16(_) => "16-bit",
            Pixels::F32(_) => "32-bit float",
        }
    }

    pub fn as_image_data(&self) -> ImageData<'_> {
        match self {
            Pixels::U8(v) => ImageData::U8(v),
            Pixels::U16(v) => ImageData::U16(v),
            Pixels::F32(v) => ImageData::F32(v),
        }
    }
}

/// One grayscale plane.
#[derive(Clone, Debug, PartialEq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Pixels,
}

impl GrayImage {
    pub fn new(width: usize, height: usize, pixels: Pixels) -> Result<Self> {
        if width.checked_mul(height) != Some(pixels.len()) {
            return Err(Error::Shape(format!(
                "a {width}×{height} image needs {} pixels, got {}",
                width * height,
                pixels.len()
            )));
        }
        Ok(GrayImage {
            width,
            height,
            pixels,
        })
    }
}

const TIFF_LE: &[u8] = b"II*\0";
const TIFF_BE: &[u8] = b"MM\0*";
const BIGTIFF_LE: &[u8] = b"II+\0";
const BIGTIFF_BE: &[u8] = b"MM\0+";
const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Reads a grayscale TIFF or PNG.
pub fn read_gray(path: &Path) -> Result<GrayImage> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Io(format!("cannot read image {}: {e}", path.display())))?;
    decode_gray(&bytes).map_err(|e| name_file(e, path))
}

/// Decodes grayscale TIFF or PNG bytes (errors do not name a file; `read_gray` adds it).
pub fn decode_gray(bytes: &[u8]) -> Result<GrayImage> {
    if [TIFF_LE, TIFF_BE, BIGTIFF_LE, BIGTIFF_BE]
        .iter()
        .any(|m| bytes.starts_with(m))
    {
        decode_tiff(bytes)
    } else if bytes.starts_with(PNG_MAGIC) {
        decode_png(bytes)
    } else {
        Err(Error::Format(
            "not a TIFF or PNG file (unrecognised magic bytes)".into(),
        ))
    }
}

fn name_file(e: Error, path: &Path) -> Error {
    let p = path.display();
    match e {
        Error::Format(m) => Error::Format(format!("image {p}: {m}")),
        Error::Unsupported(m) => Error::Unsupported(format!("image {p}: {m}")),
        Error::Shape(m) => Error::Shape(format!("image {p}: {m}")),
        Error::Io(m) => Error::Io(format!("image {p}: {m}")),
        other => other,
    }
}

fn decode_tiff(bytes: &[u8]) -> Result<GrayImage> {
    use tiff::decoder::{Decoder, DecodingResult};
    use tiff::ColorType;
    let fmt = |e: tiff::TiffError| Error::Format(format!("bad TIFF: {e}"));
    let mut dec = Decoder::new(Cursor::new(bytes)).map_err(fmt)?;
    let (w, h) = dec.dimensions().map_err(fmt)?;
    let color = dec.colortype().map_err(fmt)?;
    if !matches!(
        color,
        ColorType::Gray(8) | ColorType::Gray(16) | ColorType::Gray(32)
    ) {
        return Err(Error::Unsupported(format!(
            "TIFF colour type {color:?}; expected 8-, 16- or 32-bit grayscale"
        )));
    }
    let pixels = match dec.read_image().map_err(fmt)? {
        DecodingResult::U8(v) => Pixels::U8(v),
        DecodingResult::U16(v) => Pixels::U16(v),
        DecodingResult::F32(v) => Pixels::F32(v),
        DecodingResult::I16(v) => {
            return Err(Error::Unsupported(format!(
                "signed 16-bit TIFF ({} pixels); expected unsigned",
                v.len()
            )))
        }
        _ => {
            return Err(Error::Unsupported(format!(
                "TIFF sample format of {color:?}; expected unsigned 8/16-bit or float32"
            )))
        }
    };
    GrayImage::new(w as usize, h as usize, pixels)
}

fn decode_png(bytes: &[u8]) -> Result<GrayImage> {
    let fmt = |e: png::DecodingError| Error::Format(format!("bad PNG: {e}"));
    let mut dec = png::Decoder::new(Cursor::new(bytes));
    // EXPAND turns 1/2/4-bit grayscale into 8-bit and keeps 16-bit as is.
    dec.set_transformations(png::Transformations::EXPAND);
    let mut reader = dec.read_info().map_err(fmt)?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(fmt)?;
    buf.truncate(info.buffer_size());
    if info.color_type != png::ColorType::Grayscale {
        return Err(Error::Unsupported(format!(
            "PNG colour type {:?}; expected grayscale",
            info.color_type
        )));
    }
    let pixels = match info.bit_depth {
        png::BitDepth::Eight => Pixels::U8(buf),
        png::BitDepth::Sixteen => Pixels::U16(
            buf.chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect(),
        ),
        d => {
            return Err(Error::Unsupported(format!(
                "PNG bit depth {d:?} after expansion"
            )))
        }
    };
    GrayImage::new(info.width as usize, info.height as usize, pixels)
}

fn check_len(path: &Path, width: usize, height: usize, len: usize) -> Result<()> {
    if width == 0
        || height == 0
        || width > u32::MAX as usize
        || height > u32::MAX as usize
        || width.checked_mul(height) != Some(len)
    {
        return Err(Error::Shape(format!(
            "cannot write {}: a {width}×{height} image needs {} pixels, got {len}",
            path.display(),
            width.saturating_mul(height)
        )));
    }
    Ok(())
}

/// Encodes a 16-bit grayscale TIFF (uncompressed, little-endian).
pub fn encode_tiff_u16(width: usize, height: usize, pixels: &[u16]) -> Result<Vec<u8>> {
    check_len(Path::new("<memory>"), width, height, pixels.len())?;
    let mut cur = Cursor::new(Vec::new());
    let err = |e: tiff::TiffError| Error::Internal(format!("TIFF encoder: {e}"));
    let mut enc = tiff::encoder::TiffEncoder::new(&mut cur).map_err(err)?;
    enc.write_image::<tiff::encoder::colortype::Gray16>(width as u32, height as u32, pixels)
        .map_err(err)?;
    Ok(cur.into_inner())
}

/// Writes a 16-bit grayscale TIFF atomically.
pub fn write_tiff_u16(path: &Path, width: usize, height: usize, pixels: &[u16]) -> Result<()> {
    check_len(path, width, height, pixels.len())?;
    write_atomic(path, &encode_tiff_u16(width, height, pixels)?)
}

fn encode_png(width: usize, height: usize, depth: png::BitDepth, data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let err = |e: png::EncodingError| Error::Internal(format!("PNG encoder: {e}"));
    let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(depth);
    let mut w = enc.write_header().map_err(err)?;
    w.write_image_data(data).map_err(err)?;
    w.finish().map_err(err)?;
    Ok(out)
}

/// Writes an 8-bit grayscale PNG atomically.
pub fn write_png_u8(path: &Path, width: usize, height: usize, pixels: &[u8]) -> Result<()> {
    check_len(path, width, height, pixels.len())?;
    write_atomic(
        path,
        &encode_png(width, height, png::BitDepth::Eight, pixels)?,
    )
}

/// Writes a 16-bit grayscale PNG atomically.
pub fn write_png_u16(path: &Path, width: usize, height: usize, pixels: &[u16]) -> Result<()> {
    check_len(path, width, height, pixels.len())?;
    let be: Vec<u8> = pixels.iter().flat_map(|v| v.to_be_bytes()).collect();
    write_atomic(
        path,
        &encode_png(width, height, png::BitDepth::Sixteen, &be)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp16(w: usize, h: usize) -> Vec<u16> {
        (0..w * h)
            .map(|i| (i as u32 * 977 % 65536) as u16)
            .collect()
    }

    #[test]
    fn tiff_u16_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.tif");
        let px = ramp16(37, 23);
        write_tiff_u16(&p, 37, 23, &px).unwrap();
        let img = read_gray(&p).unwrap();
        assert_eq!((img.width, img.height), (37, 23));
        assert_eq!(img.pixels, Pixels::U16(px));
    }

    #[test]
    fn tiff_u8_and_f32_read() {
        let mut cur = Cursor::new(Vec::new());
        let mut enc = tiff::encoder::TiffEncoder::new(&mut cur).unwrap();
        let px: Vec<u8> = (0..12).map(|i| i * 20).collect();
        enc.write_image::<tiff::encoder::colortype::Gray8>(4, 3, &px)
            .unwrap();
        let img = decode_gray(&cur.into_inner()).unwrap();
        assert_eq!((img.width, img.height, img.pixels), (4, 3, Pixels::U8(px)));

        let mut cur = Cursor::new(Vec::new());
        let mut enc = tiff::encoder::TiffEncoder::new(&mut cur).unwrap();
        let fx: Vec<f32> = (0..6).map(|i| i as f32 * 0.25 - 0.5).collect();
        enc.write_image::<tiff::encoder::colortype::Gray32Float>(3, 2, &fx)
            .unwrap();
        assert_eq!(
            decode_gray(&cur.into_inner()).unwrap().pixels,
            Pixels::F32(fx)
        );
    }

    #[test]
    fn png_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p8 = dir.path().join("a.png");
        let px8: Vec<u8> = (0..5 * 7).map(|i| (i * 7) as u8).collect();
        write_png_u8(&p8, 5, 7, &px8).unwrap();
        let img = read_gray(&p8).unwrap();
        assert_eq!((img.width, img.height), (5, 7));
        assert_eq!(img.pixels, Pixels::U8(px8));

        let p16 = dir.path().join("b.png");
        let px16 = ramp16(9, 4);
        write_png_u16(&p16, 9, 4, &px16).unwrap();
        assert_eq!(read_gray(&p16).unwrap().pixels, Pixels::U16(px16));
    }

    #[test]
    fn rgb_png_and_garbage_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rgb.png");
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, 2, 2);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .unwrap()
            .write_image_data(&[0u8; 12])
            .unwrap();
        std::fs::write(&p, &out).unwrap();
        let e = read_gray(&p).unwrap_err();
        assert!(
            matches!(e, Error::Unsupported(_)) && e.to_string().contains("rgb.png"),
            "{e}"
        );

        let g = dir.path().join("junk.tif");
        std::fs::write(&g, b"hello").unwrap();
        let e = read_gray(&g).unwrap_err();
        assert!(e.to_string().contains("junk.tif"), "{e}");

        // Truncated TIFF: header fine, pixel data cut.
        let t = dir.path().join("cut.tif");
        let full = encode_tiff_u16(64, 64, &ramp16(64, 64)).unwrap();
        std::fs::write(&t, &full[..full.len() / 2]).unwrap();
        let e = read_gray(&t).unwrap_err();
        assert!(e.to_string().contains("cut.tif"), "{e}");

        let missing = dir.path().join("nope.tif");
        assert!(read_gray(&missing)
            .unwrap_err()
            .to_string()
            .contains("nope.tif"));
        assert!(write_tiff_u16(&dir.path().join("x.tif"), 3, 3, &[0; 8]).is_err());
    }
}
