//! `disk_filelist`: a numpy `.npy` array of image paths (`<U..` or `|S..`; one path per line in a
//! `.txt` works too), with VISSL's `REMOVE_IMG_PATH_PREFIX` / `NEW_IMG_PATH_PREFIX` rewrite. The list,
//! the label file and the image paths (after the rewrite) may be object-store URLs, so
//! `NEW_IMG_PATH_PREFIX: s3://bucket/imagenet/` moves a dataset to a bucket without a new list.

use std::path::Path;

use image::RgbImage;

use super::{
    fetch_if_remote, index_error, load_image_at, npy, read_label_file, DataSource, Labels,
    SourceSpec,
};
use crate::data::{DataError, Result};
use crate::storage::Location;

/// Images listed in a file.
pub struct DiskFilelist {
    paths: Vec<String>,
    remove_prefix: String,
    new_prefix: String,
}

pub(super) fn build(spec: &SourceSpec) -> Result<Box<dyn DataSource>> {
    let paths = read_path_list(Path::new(spec.path)).map_err(|e| spec.error("disk_filelist", e))?;
    tracing::info!(
        split = spec.split,
        path = spec.path,
        images = paths.len(),
        "loaded disk_filelist"
    );
    Ok(Box::new(DiskFilelist::new(
        paths,
        &spec.cfg.remove_img_path_prefix,
        &spec.cfg.new_img_path_prefix,
    )))
}

/// Read a list of paths from `.npy` (string array) or `.txt` (one per line); `path` may be a URL.
pub fn read_path_list(path: &Path) -> Result<Vec<String>> {
    let local = fetch_if_remote(path)?;
    let path = local.as_path();
    let what = path.display().to_string();
    if !path.is_file() {
        return Err(DataError::BadFile {
            path: what,
            reason: "file list does not exist".into(),
        });
    }
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("npy") => npy::read_npy(path)?.into_strings(&what),
        Some("txt") => {
            let text = std::fs::read_to_string(path).map_err(|e| DataError::BadFile {
                path: what.clone(),
                reason: e.to_string(),
            })?;
            Ok(text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect())
        }
        _ => Err(DataError::BadFile {
            path: what,
            reason:
                "a disk_filelist must be a .npy array of paths (or a .txt with one path per line)"
                    .into(),
        }),
    }
}

impl DiskFilelist {
    /// A file list with the prefix rewrite of `REMOVE_IMG_PATH_PREFIX` -> `NEW_IMG_PATH_PREFIX`.
    pub fn new(paths: Vec<String>, remove_prefix: &str, new_prefix: &str) -> Self {
        Self {
            paths,
            remove_prefix: remove_prefix.to_string(),
            new_prefix: new_prefix.to_string(),
        }
    }

    /// The path image `index` is read from, after the prefix rewrite.
    // VISSL calls str.replace, which would also rewrite later occurrences (and with an empty
    // prefix insert the new one between every character); only the leading prefix is meant.
    pub fn resolved_path(&self, index: usize) -> Option<String> {
        let raw = self.paths.get(index)?;
        Some(match raw.strip_prefix(self.remove_prefix.as_str()) {
            Some(rest) if !self.remove_prefix.is_empty() => format!("{}{rest}", self.new_prefix),
            _ => raw.clone(),
        })
    }
}

impl DataSource for DiskFilelist {
    fn len(&self) -> usize {
        self.paths.len()
    }

    fn load(&self, index: usize) -> Result<RgbImage> {
        let path = self
            .resolved_path(index)
            .ok_or_else(|| index_error("disk_filelist", index, self.len()))?;
        let location = Location::parse(&path).map_err(|e| DataError::BadFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        load_image_at(&location)
    }

    fn describe(&self, index: usize) -> String {
        self.resolved_path(index)
            .unwrap_or_else(|| format!("index {index}"))
    }

    fn labels(&self, label_path: Option<&Path>) -> Result<Labels> {
        let path = label_path.ok_or_else(|| {
            DataError::Config(
                "LABEL_SOURCES disk_filelist needs a label .npy file in LABEL_PATHS".into(),
            )
        })?;
        read_label_file(path)
    }

    fn image_paths(&self) -> Option<Vec<String>> {
        Some(
            (0..self.len())
                .filter_map(|i| self.resolved_path(i))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrite_touches_only_the_leading_prefix() {
        let list = DiskFilelist::new(
            vec!["/old/a/old/x.jpg".into(), "/other/y.jpg".into()],
            "/old",
            "/new",
        );
        assert_eq!(list.resolved_path(0).as_deref(), Some("/new/a/old/x.jpg"));
        assert_eq!(list.resolved_path(1).as_deref(), Some("/other/y.jpg"));
        let untouched = DiskFilelist::new(vec!["/a.jpg".into()], "", "/new");
        assert_eq!(untouched.resolved_path(0).as_deref(), Some("/a.jpg"));
    }
}
