//! `disk_folder`: torchvision's ImageFolder layout, `path/<class>/**/<image>`; classes are the
//! sorted sub-folder names and label `i` is the `i`-th class. The path may be an object-store URL
//! (`s3://bucket/train`): the prefix is listed once, and images are read through the local cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;

use super::{index_error, load_image_at, DataSource, Labels, SourceSpec};
use crate::data::Result;
use crate::storage::{Location, Storage};

/// torchvision's `IMG_EXTENSIONS`, matched case-insensitively on the file name.
pub const IMG_EXTENSIONS: &[&str] = &[
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// The images of an ImageFolder tree.
pub struct DiskFolder {
    root: Location,
    classes: Vec<String>,
    /// (image location, class index), classes in order and files in walk order.
    samples: Vec<(Location, i64)>,
}

pub(super) fn build(spec: &SourceSpec) -> Result<Box<dyn DataSource>> {
    let folder = Location::parse(spec.path)
        .map_err(|e| e.to_string())
        .and_then(|location| DiskFolder::open_location(&location))
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
    /// Scan an ImageFolder tree in a local folder or under an object-store prefix.
    pub fn open_location(root: &Location) -> std::result::Result<Self, String> {
        match root.local_path() {
            Some(path) => Self::open(path),
            None => Self::open_remote(root),
        }
    }

    /// Scan a local ImageFolder tree; errors say what is wrong with it.
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
        Self::assemble(Location::Local(root.to_path_buf()), classes, |class| {
            let tree =
                walk(&root.join(class)).map_err(|e| format!("cannot list class '{class}': {e}"))?;
            Ok(tree
                .into_iter()
                .flat_map(|(dir, files)| {
                    files
                        .into_iter()
                        .map(move |name| Location::Local(dir.join(name)))
                })
                .collect())
        })
    }

    /// Scan an ImageFolder tree under an object-store prefix: one listing, in the order a local walk of
    /// the same tree gives (folders by path, files by name within each).
    pub fn open_remote(root: &Location) -> std::result::Result<Self, String> {
        let storage = Storage::open(root).map_err(|e| e.to_string())?;
        let listed = storage
            .list_files()
            .map_err(|e| format!("cannot list: {e}"))?;
        // class -> (folder below the class, file name), sorted as the local walk sorts.
        let mut by_class: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for (rel, _) in listed {
            let mut parts: Vec<&str> = rel.split('/').collect();
            // Files directly under the root belong to no class, as in ImageFolder.
            if parts.len() < 2 {
                continue;
            }
            let name = parts.pop().unwrap_or_default().to_string();
            let class = parts[0].to_string();
            by_class
                .entry(class)
                .or_default()
                .push((parts.join("/"), name));
        }
        let classes: Vec<String> = by_class.keys().cloned().collect();
        Self::assemble(root.clone(), classes, |class| {
            let mut files = by_class.remove(class).unwrap_or_default();
            files.sort_by(|a, b| {
                (a.0.as_bytes(), a.1.as_bytes()).cmp(&(b.0.as_bytes(), b.1.as_bytes()))
            });
            Ok(files
                .into_iter()
                .map(|(dir, name)| root.join(&dir).join(&name))
                .collect())
        })
    }

    /// Number the sorted classes and keep each class's image files (every class must have one).
    fn assemble(
        root: Location,
        mut classes: Vec<String>,
        mut files_of: impl FnMut(&str) -> std::result::Result<Vec<Location>, String>,
    ) -> std::result::Result<Self, String> {
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
            for file in files_of(class)? {
                if has_image_extension(&file.file_name()) {
                    samples.push((file, class_index as i64));
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
            root,
            classes,
            samples,
        })
    }

    /// The class names, index order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The folder or prefix this was read from.
    pub fn root(&self) -> &Location {
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
        load_image_at(path)
    }

    fn describe(&self, index: usize) -> String {
        self.samples
            .get(index)
            .map_or_else(|| format!("index {index}"), |s| s.0.to_string())
    }

    fn labels(&self, _label_path: Option<&Path>) -> Result<Labels> {
        Ok(Labels {
            values: self.samples.iter().map(|s| s.1).collect(),
            class_names: Some(self.classes.clone()),
        })
    }

    fn image_paths(&self) -> Option<Vec<String>> {
        Some(self.samples.iter().map(|s| s.0.to_string()).collect())
    }
}
