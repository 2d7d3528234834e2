//! Data sources: where a split's images come from (`DATA.<split>.DATA_SOURCES`), one file per
//! VISSL source name plus the registry table below, and the dataset catalog that maps
//! `DATASET_NAMES` to paths.

pub mod catalog;
pub mod disk_filelist;
pub mod disk_folder;
pub mod mnist_idx;
pub mod npy;
pub mod synthetic;

use std::io::Cursor;
use std::path::Path;

use image::{ImageReader, RgbImage};
use vissl_crds::config::DataSplitConfig;

use super::{DataError, Result};

/// One data source of a split: an indexable collection of images.
pub trait DataSource: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;

    /// Whether the source holds no image.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Load and decode image `index`; a missing or undecodable file is a `DataError::BadFile`.
    fn load(&self, index: usize) -> Result<RgbImage>;

    /// What image `index` is, for log lines (usually its path).
    fn describe(&self, index: usize) -> String;

    /// The labels this source knows by itself (`LABEL_SOURCES` equal to this source's name);
    /// `label_path` is the split's label file for this source, when there is one.
    fn labels(&self, label_path: Option<&Path>) -> Result<Labels>;

    /// The image paths, for sources backed by files (feature extraction writes them out).
    fn image_paths(&self) -> Option<Vec<String>> {
        None
    }
}

/// One label column: a class index per image, and the class names when the labels were names.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    pub values: Vec<i64>,
    /// `class_names[i]` is the name of class `i` (ImageFolder classes, string label files).
    pub class_names: Option<Vec<String>>,
}

/// What a source constructor gets: the split's config and this source's slot in it.
pub struct SourceSpec<'a> {
    /// `TRAIN` or `TEST`.
    pub split: &'a str,
    /// Position of this source in `DATA_SOURCES`.
    pub index: usize,
    /// `DATASET_NAMES[index]`, empty when not given.
    pub dataset_name: &'a str,
    /// Resolved data path (explicit `DATA_PATHS` or the catalog's), empty for `synthetic`.
    pub path: &'a str,
    pub cfg: &'a DataSplitConfig,
}

impl SourceSpec<'_> {
    /// Error for a bad setting of this source, naming split, source and path.
    pub fn error(&self, source: &str, reason: impl std::fmt::Display) -> DataError {
        DataError::Config(format!(
            "DATA.{}.DATA_SOURCES[{}] = {source} (path '{}'): {reason}",
            self.split, self.index, self.path
        ))
    }
}

/// A registry entry: the VISSL source name and its constructor.
pub struct SourceEntry {
    pub name: &'static str,
    pub build: fn(&SourceSpec) -> Result<Box<dyn DataSource>>,
}

/// The data sources, keyed by the names used in `DATA_SOURCES`.
pub const SOURCES: &[SourceEntry] = &[
    SourceEntry {
        name: "disk_folder",
        build: disk_folder::build,
    },
    SourceEntry {
        name: "disk_filelist",
        build: disk_filelist::build,
    },
    SourceEntry {
        name: "synthetic",
        build: synthetic::build,
    },
    SourceEntry {
        name: "mnist_idx",
        build: mnist_idx::build,
    },
];

/// Names of all registered sources (for `vissl list` and error messages).
pub fn names() -> Vec<&'static str> {
    SOURCES.iter().map(|e| e.name).collect()
}

/// Build the source called `name`.
pub fn build(name: &str, spec: &SourceSpec) -> Result<Box<dyn DataSource>> {
    let entry = SOURCES.iter().find(|e| e.name == name).ok_or_else(|| {
        DataError::Config(format!(
            "DATA.{}.DATA_SOURCES[{}]: unknown data source '{name}'; known sources: {}",
            spec.split,
            spec.index,
            names().join(", ")
        ))
    })?;
    (entry.build)(spec)
}

/// Error for an index past a source's end (a caller bug, reported rather than panicking).
pub(crate) fn index_error(source: &str, index: usize, len: usize) -> DataError {
    DataError::Config(format!(
        "{source}: index {index} is out of range (the source has {len} images)"
    ))
}

/// VISSL's replacement image: a `size x size` image of grey 128.
pub fn mean_image(size: usize) -> RgbImage {
    let side = u32::try_from(size.max(1)).unwrap_or(u32::MAX);
    RgbImage::from_pixel(side, side, image::Rgb([128, 128, 128]))
}

/// Decode an encoded image (JPEG, PNG) to 8-bit RGB, as PIL's `convert("RGB")` does:
/// grey is replicated, alpha is dropped, CMYK is converted.
pub fn decode_image(bytes: &[u8], what: &str) -> Result<RgbImage> {
    let bad = |reason: String| DataError::BadFile {
        path: what.to_string(),
        reason,
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    if reader.format().is_none() {
        return Err(bad("not a supported image format (JPEG or PNG)".to_string()));
    }
    let decoded = reader
        .decode()
        .map_err(|e| bad(format!("cannot decode: {e}")))?;
    Ok(decoded.into_rgb8())
}

/// A path given in a config that may hold an object-store URL: the URL's cached local copy, else the
/// path itself.
pub fn fetch_if_remote(path: &Path) -> Result<std::path::PathBuf> {
    let text = path.to_string_lossy();
    if !crate::storage::is_remote_url(&text) {
        return Ok(path.to_path_buf());
    }
    crate::storage::Location::parse(&text)
        .and_then(|location| crate::storage::cached_copy(&location))
        .map_err(|e| DataError::BadFile {
            path: text.to_string(),
            reason: e.to_string(),
        })
}

/// Read and decode an image from a local path or an object store (through the local cache).
pub fn load_image_at(location: &crate::storage::Location) -> Result<RgbImage> {
    if let Some(path) = location.local_path() {
        return load_image_file(path);
    }
    let what = location.to_string();
    let bytes = crate::storage::read_cached(location).map_err(|e| DataError::BadFile {
        path: what.clone(),
        reason: format!("cannot read: {e}"),
    })?;
    decode_image(&bytes, &what)
}

/// Read and decode an image file.
pub fn load_image_file(path: &Path) -> Result<RgbImage> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| DataError::BadFile {
        path: what.clone(),
        reason: format!("cannot read: {e}"),
    })?;
    decode_image(&bytes, &what)
}

/// Labels given as strings become indices into their sorted unique values (VISSL's
/// `_convert_to_numeric_ids`).
pub fn labels_from_names(names: &[String]) -> Labels {
    let mut classes: Vec<String> = names.to_vec();
    classes.sort();
    classes.dedup();
    let values = names
        .iter()
        .map(|n| classes.binary_search(n).map_or(-1, |i| i as i64))
        .collect();
    Labels {
        values,
        class_names: Some(classes),
    }
}

/// Read a label file (`.npy` of integers or strings), as `LABEL_SOURCES: disk_filelist` does; the
/// path may be an object-store URL.
pub fn read_label_file(path: &Path) -> Result<Labels> {
    let local = fetch_if_remote(path)?;
    let path = local.as_path();
    let what = path.display().to_string();
    let is_npy = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if !is_npy {
        return Err(DataError::BadFile {
            path: what,
            reason: "label files must be numpy .npy files".to_string(),
        });
    }
    let array = npy::read_npy(path)?;
    match array.data {
        npy::NpyData::Ints(_) => Ok(Labels {
            values: array.into_ints(&what)?,
            class_names: None,
        }),
        npy::NpyData::Strings(_) => Ok(labels_from_names(&array.into_strings(&what)?)),
    }
}
