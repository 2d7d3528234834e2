//! VISSL's dataset catalog (`configs/dataset_catalog.json`): dataset name -> split ->
//! `[images_path, labels_path]`, and the resolution of a split's data and label paths from
//! `DATA_PATHS` / `LABEL_PATHS` or, when those are empty, from `DATASET_NAMES` in the catalog.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vissl_crds::config::DataSplitConfig;

use crate::data::{DataError, Result};

/// The registered datasets.
#[derive(Debug, Clone, Default)]
pub struct DatasetCatalog {
    entries: BTreeMap<String, BTreeMap<String, Vec<serde_json::Value>>>,
    /// Where it was read from, for error messages.
    source: String,
}

impl DatasetCatalog {
    /// Read a catalog file.
    pub fn load(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| DataError::BadFile {
            path: what.clone(),
            reason: format!("cannot read the dataset catalog: {e}"),
        })?;
        Self::from_json(&text, &what)
    }

    /// Parse a catalog; `source` names it in errors.
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let entries = serde_json::from_str(text).map_err(|e| DataError::BadFile {
            path: source.to_string(),
            reason: format!(
                "not a dataset catalog (expected {{name: {{split: [images_path, labels_path]}}}}): {e}"
            ),
        })?;
        Ok(Self {
            entries,
            source: source.to_string(),
        })
    }

    /// The registered dataset names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// `[images_path, labels_path]` of dataset `name` for config split `split` (`TRAIN` -> "train",
    /// `TEST` -> "val", or "test" when the entry has no "val").
    pub fn split_paths(&self, name: &str, split: &str) -> Result<(String, Option<String>)> {
        let entry = self.entries.get(name).ok_or_else(|| {
            DataError::Config(format!(
                "dataset '{name}' is not in the dataset catalog {}; available datasets: {}",
                self.source,
                self.names().join(", ")
            ))
        })?;
        let keys: &[&str] = if split.eq_ignore_ascii_case("train") {
            &["train"]
        } else {
            &["val", "test"]
        };
        let (key, paths) = keys
            .iter()
            .find_map(|k| entry.get(*k).map(|p| (*k, p)))
            .ok_or_else(|| {
                DataError::Config(format!(
                    "dataset '{name}' in {} has no '{}' entry for split {split} (it has: {})",
                    self.source,
                    keys.join("' or '"),
                    entry.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
        let as_path = |v: &serde_json::Value, what: &str| -> Result<String> {
            v.as_str().map(str::to_string).ok_or_else(|| {
                DataError::Config(format!(
                    "dataset '{name}' split '{key}' in {}: the {what} must be a string, found {v}",
                    self.source
                ))
            })
        };
        let images = paths.first().ok_or_else(|| {
            DataError::Config(format!(
                "dataset '{name}' split '{key}' in {}: the path list is empty",
                self.source
            ))
        })?;
        let images = as_path(images, "images path")?;
        let labels = paths
            .get(1)
            .map(|v| as_path(v, "labels path"))
            .transpose()?;
        Ok((images, labels))
    }
}

/// A split's resolved paths, one slot per data source.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFiles {
    /// Empty for `synthetic` sources.
    pub data_paths: Vec<String>,
    /// The label file of each source, when one is given and exists.
    pub label_paths: Vec<Option<String>>,
}

/// Resolve the data and label paths of split `split` (`TRAIN`/`TEST`) as VISSL's
/// `get_data_files` does; every data path must exist.
pub fn get_data_files(
    split: &str,
    cfg: &DataSplitConfig,
    catalog: Option<&DatasetCatalog>,
) -> Result<DataFiles> {
    let key = |k: &str| format!("DATA.{split}.{k}");
    let n = cfg.data_sources.len();
    if !cfg.data_paths.is_empty() && cfg.data_paths.len() != n {
        return Err(DataError::Config(format!(
            "{} has {} entries but {} has {n}: give one path per data source",
            key("DATA_PATHS"),
            cfg.data_paths.len(),
            key("DATA_SOURCES")
        )));
    }
    if !cfg.label_paths.is_empty() && cfg.label_paths.len() != n {
        return Err(DataError::Config(format!(
            "{} has {} entries but {} has {n}: give one path per data source",
            key("LABEL_PATHS"),
            cfg.label_paths.len(),
            key("DATA_SOURCES")
        )));
    }
    let dataset_name = |i: usize| cfg.dataset_names.get(i).map(String::as_str).unwrap_or("");
    let catalog_paths = |i: usize| -> Result<(String, Option<String>)> {
        let name = dataset_name(i);
        if name.is_empty() {
            return Err(DataError::Config(format!(
                "{}[{i}] is empty and {}[{i}] is not set: give a path or a catalog dataset name",
                key("DATA_PATHS"),
                key("DATASET_NAMES")
            )));
        }
        let catalog = catalog.ok_or_else(|| {
            DataError::Config(format!(
                "{}[{i}] = '{name}' needs the dataset catalog, which was not loaded",
                key("DATASET_NAMES")
            ))
        })?;
        catalog.split_paths(name, split)
    };

    let mut files = DataFiles {
        data_paths: Vec::with_capacity(n),
        label_paths: Vec::with_capacity(n),
    };
    for (i, source) in cfg.data_sources.iter().enumerate() {
        if source == "synthetic" {
            files.data_paths.push(String::new());
            files.label_paths.push(None);
            continue;
        }
        let (data_path, catalog_label) = if cfg.data_paths.is_empty() {
            catalog_paths(i)?
        } else {
            let from_catalog = catalog
                .filter(|c| c.names().contains(&dataset_name(i)))
                .and_then(|c| c.split_paths(dataset_name(i), split).ok());
            (cfg.data_paths[i].clone(), from_catalog.and_then(|(_, l)| l))
        };
        let data_path = local_copy(&data_path, cfg);
        // Object-store URLs are checked when the source lists them.
        if !crate::storage::is_remote_url(&data_path) && !Path::new(&data_path).exists() {
            return Err(DataError::Config(format!(
                "{}[{i}] = {source}: data path '{data_path}' does not exist (split {split}, dataset '{}')",
                key("DATA_SOURCES"),
                dataset_name(i)
            )));
        }
        // Labels are optional: a listed label file that does not exist is skipped, as in VISSL.
        let label = match cfg.label_paths.get(i) {
            Some(p) => Some(p.clone()),
            None => catalog_label,
        };
        files.label_paths.push(
            label
                .map(|p| local_copy(&p, cfg))
                .filter(|p| crate::storage::is_remote_url(p) || Path::new(p).exists()),
        );
        files.data_paths.push(data_path);
    }
    Ok(files)
}

/// With `COPY_TO_LOCAL_DISK`, the copy under `COPY_DESTINATION_DIR` when it is there (a file by
/// its name; a folder once its `copy_complete` marker exists), else the original path.
fn local_copy(path: &str, cfg: &DataSplitConfig) -> String {
    if !cfg.copy_to_local_disk || path.is_empty() {
        return path.to_string();
    }
    let original = Path::new(path);
    let dest = Path::new(&cfg.copy_destination_dir);
    let candidate: Option<PathBuf> = if original.is_file() {
        original.file_name().map(|f| dest.join(f))
    } else if original.is_dir() {
        original
            .file_name()
            .map(|f| dest.join(f))
            .filter(|d| d.join("copy_complete").is_file())
    } else {
        None
    };
    match candidate {
        Some(c) if c.exists() => c.display().to_string(),
        _ => path.to_string(),
    }
}
