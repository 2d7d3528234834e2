//! `disk_folder`: torchvision's ImageFolder layout, `path/<class>/**/<image>`; classes are the
//! sorted sub-folder names and label `i` is the `i`-th class.

use std::path::{Path, PathBuf};

use image::RgbImage;

use super::{index_error, load_image_file, DataSource, Labels, SourceSpec};
use crate::data::Result;

/// torchvision's `IMG_EXTENSIONS`, matched case-insensitively on the file name.
pub const IMG_EXTENSIONS: &[&str] = &[
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// The images of an ImageFolder tree.
pub struct DiskFolder {
    root: PathBuf,
    classes: Vec<String>,
    /// (image path, class index), classes in order and files in walk order.
    samples: Vec<(PathBuf, i64)>,
}

pub(super) fn build(spec: &SourceSpec) -> Result<Box<dyn DataSource>> {
    let folder = DiskFolder::open(Path::new(spec.path))
        .map_err(|reason| spec.error("disk_folder", reason))?;
    tracing::info!(
        split = spec.split,
        path = spec.path,
        images = folder.samples.len(),
        classes = folder.classes.len(),
        "loaded disk_folder"
    );
    Ok(Box::new(folder))
}

fn has_image_extension(name: &str) -> bool {
    let lower = name.to_lowercase();
    IMG_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
}

/// Byte-wise path order, which is Python's `str` order for UTF-8 names (Rust's `Path` order
/// compares components instead).
fn path_key(p: &Path) -> &[u8] {
    p.as_os_str().as_encoded_bytes()
}

/// Whether a directory entry is a folder, following symlinks as os.walk(followlinks=True)
/// does; plain entries use the type readdir reports, so a million files need no stat call.
fn is_dir(entry: &std::fs::DirEntry) -> std::io::Result<bool> {
    let file_type = entry.file_type()?;
    Ok(if file_type.is_symlink() {
        entry.path().is_dir()
    } else {
        file_type.is_dir()
    })
}

/// Every folder under `dir` (included) with its file names, in `sorted(os.walk(dir,
/// followlinks=True))` order.
fn walk(dir: &Path) -> std::io::Result<Vec<(PathBuf, Vec<String>)>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            let path = entry.path();
            if is_dir(&entry)? {
                pending.push(path);
            } else {
                files.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        files.sort();
        out.push((current, files));
    }
    out.sort_by(|a, b| path_key(&a.0).cmp(path_key(&b.0)));
    Ok(out)
}

impl DiskFolder {
    /// Scan an ImageFolder tree; errors say what is wrong with it.
    pub fn open(root: &Path) -> std::result::Result<Self, String> {
        if !root.is_dir() {
            return Err(
                "is not a directory (disk_folder expects path/<class>/<image>)".to_string(),
            );
        }
        let mut classes = Vec::new();
        for entry in std::fs::read_dir(root).map_err(|e| format!("cannot list: {e}"))? {
            let entry = entry.map_err(|e| format!("cannot list: {e}"))?;
            if is_dir(&entry).map_err(|e| format!("cannot list: {e}"))? {
                classes.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(
                "has no class folders (disk_folder expects path/<class>/<image>)".to_string(),
            );
        }
        let mut samples = Vec::new();
        let mut empty_classes = Vec::new();
        for (class_index, class) in classes.iter().enumerate() {
            let before = samples.len();
            let tree =
                walk(&root.join(class)).map_err(|e| format!("cannot list class '{class}': {e}"))?;
            for (dir, files) in tree {
                for name in files.into_iter().filter(|n| has_image_extension(n)) {
                    samples.push((dir.join(name), class_index as i64));
                }
            }
            if samples.len() == before {
                empty_classes.push(class.clone());
            }
        }
        if !empty_classes.is_empty() {
            return Err(format!(
                "found no image file for the classes {}; supported extensions: {}",
                empty_classes.join(", "),
                IMG_EXTENSIONS.join(", ")
            ));
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            samples,
        })
    }

    /// The class names, index order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The folder this was read from.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl DataSource for DiskFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn load(&self, index: usize) -> Result<RgbImage> {
        let (path, _) = self
            .samples
            .get(index)
            .ok_or_else(|| index_error("disk_folder", index, self.len()))?;
        load_image_file(path)
    }

    fn describe(&self, index: usize) -> String {
        self.samples
            .get(index)
            .map_or_else(|| format!("index {index}"), |s| s.0.display().to_string())
    }

    fn labels(&self, _label_path: Option<&Path>) -> Result<Labels> {
        Ok(Labels {
            values: self.samples.iter().map(|s| s.1).collect(),
            class_names: Some(self.classes.clone()),
        })
    }

    fn image_paths(&self) -> Option<Vec<String>> {
        Some(
            self.samples
                .iter()
                .map(|s| s.0.display().to_string())
                .collect(),
        )
    }
}
