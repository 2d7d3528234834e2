//! `mnist_idx`: (Fashion-)MNIST in the IDX format they ship in, gzipped or raw: an `idx3` image
//! file and an `idx1` label file. Grey images become RGB by replicating the channel (what VISSL's
//! `MNISTImgPil2RGB` does after torchvision's MNIST dataset).
//!
//! The data path is the images file, or a folder holding `train-images-idx3-ubyte[.gz]`
//! (split TRAIN) / `t10k-images-idx3-ubyte[.gz]` (split TEST). The label file is the split's
//! label path, else the images file's name with `images-idx3` -> `labels-idx1`.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use image::RgbImage;

use super::{index_error, DataSource, Labels, SourceSpec};
use crate::data::{DataError, Result};

/// IDX element type code of unsigned bytes, the only one MNIST uses.
const IDX_UBYTE: u8 = 0x08;

/// All images of one IDX file, in memory (60k MNIST images are 47 MB).
pub struct MnistIdx {
    images_path: PathBuf,
    pixels: Vec<u8>,
    rows: usize,
    cols: usize,
    count: usize,
}

pub(super) fn build(spec: &SourceSpec) -> Result<Box<dyn DataSource>> {
    let images =
        images_file(Path::new(spec.path), spec.split).map_err(|e| spec.error("mnist_idx", e))?;
    let source = MnistIdx::open(&images)?;
    tracing::info!(split = spec.split, path = %images.display(), images = source.count, "loaded mnist_idx");
    Ok(Box::new(source))
}

/// The images file a data path stands for.
fn images_file(path: &Path, split: &str) -> std::result::Result<PathBuf, String> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err("does not exist".into());
    }
    let stem = if split.eq_ignore_ascii_case("train") {
        "train"
    } else {
        "t10k"
    };
    let base = format!("{stem}-images-idx3-ubyte");
    [format!("{base}.gz"), base.clone()]
        .iter()
        .map(|name| path.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("folder has no {base}[.gz] for split {split}"))
}

/// The label file next to an images file.
fn default_labels_file(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    name.contains("images-idx3")
        .then(|| images.with_file_name(name.replace("images-idx3", "labels-idx1")))
}

/// The whole content of a file, un-gzipped when it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let what = path.display().to_string();
    let raw = std::fs::read(path).map_err(|e| DataError::BadFile {
        path: what.clone(),
        reason: format!("cannot read: {e}"),
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::BadFile {
                path: what,
                reason: format!("corrupt gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parse an IDX header; returns the dimensions and the offset of the data.
fn parse_idx(bytes: &[u8], ndims: usize, what: &str) -> Result<(Vec<usize>, usize)> {
    let bad = |reason: String| DataError::BadFile {
        path: what.to_string(),
        reason,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (bad magic number)".into()));
    }
    if bytes[2] != IDX_UBYTE {
        return Err(bad(format!(
            "IDX element type {:#04x} is not unsigned byte",
            bytes[2]
        )));
    }
    if usize::from(bytes[3]) != ndims {
        return Err(bad(format!(
            "expected a {ndims}-dimensional IDX file, found {} dimensions",
            bytes[3]
        )));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(bad("truncated IDX header".into()));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = header + dims.iter().product::<usize>();
    if bytes.len() < expected {
        return Err(bad(format!(
            "truncated IDX data: {} bytes, dims {dims:?} need {expected}",
            bytes.len()
        )));
    }
    Ok((dims, header))
}

impl MnistIdx {
    /// Read an `idx3` images file.
    pub fn open(images: &Path) -> Result<Self> {
        let what = images.display().to_string();
        let mut bytes = read_maybe_gz(images)?;
        let (dims, offset) = parse_idx(&bytes, 3, &what)?;
        let (count, rows, cols) = (dims[0], dims[1], dims[2]);
        bytes.drain(..offset);
        bytes.truncate(count * rows * cols);
        Ok(Self {
            images_path: images.to_path_buf(),
            pixels: bytes,
            rows,
            cols,
            count,
        })
    }

    /// Read an `idx1` labels file.
    pub fn read_labels(path: &Path) -> Result<Vec<i64>> {
        let what = path.display().to_string();
        let bytes = read_maybe_gz(path)?;
        let (dims, offset) = parse_idx(&bytes, 1, &what)?;
        Ok(bytes[offset..offset + dims[0]]
            .iter()
            .map(|&b| i64::from(b))
            .collect())
    }
}

impl DataSource for MnistIdx {
    fn len(&self) -> usize {
        self.count
    }

    fn load(&self, index: usize) -> Result<RgbImage> {
        if index >= self.count {
            return Err(index_error("mnist_idx", index, self.count));
        }
        let plane = self.rows * self.cols;
        let grey = &self.pixels[index * plane..(index + 1) * plane];
        let rgb: Vec<u8> = grey.iter().flat_map(|&v| [v, v, v]).collect();
        RgbImage::from_raw(self.cols as u32, self.rows as u32, rgb).ok_or_else(|| {
            DataError::BadFile {
                path: self.describe(index),
                reason: "image buffer does not match its size".into(),
            }
        })
    }

    fn describe(&self, index: usize) -> String {
        format!("{}[{index}]", self.images_path.display())
    }

    fn labels(&self, label_path: Option<&Path>) -> Result<Labels> {
        let path = match label_path {
            Some(p) => p.to_path_buf(),
            None => default_labels_file(&self.images_path).ok_or_else(|| {
                DataError::Config(format!(
                    "mnist_idx labels: no label path given and none derivable from {}",
                    self.images_path.display()
                ))
            })?,
        };
        let values = Self::read_labels(&path)?;
        if values.len() != self.count {
            return Err(DataError::BadFile {
                path: path.display().to_string(),
                reason: format!("has {} labels for {} images", values.len(), self.count),
            });
        }
        Ok(Labels {
            values,
            class_names: None,
        })
    }
}
