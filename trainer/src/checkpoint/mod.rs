//! Checkpoints: tensors in safetensors files plus a JSON manifest written last.
//!
//! A checkpoint is the folder `<CHECKPOINT.DIR>/checkpoint_iter<NNNNNNNNN>/`. Its files are written under
//! temporary names and renamed; the manifest, carrying the training position and a SHA-256 per file, is
//! renamed into place last, so a folder without a manifest is an interrupted save and is never resumed
//! from. Resume takes the newest checkpoint whose files all verify and skips a damaged one with a warning.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The manifest's file name inside a checkpoint folder.
pub const MANIFEST: &str = "manifest.json";
const FOLDER_PREFIX: &str = "checkpoint_iter";
const FORMAT_VERSION: u32 = 1;

/// Checkpoint errors; each names the folder or file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("checkpoint {path}: {source}")]
    Torch { path: String, source: tch::TchError },
}

type Result<T> = std::result::Result<T, CheckpointError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Where training stands: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Optimizer steps taken so far.
    pub iteration: u64,
    /// The epoch in progress (equal to completed epochs when `iteration_in_epoch` is 0).
    pub epoch: u64,
    /// Steps already taken within `epoch`; the sampler resumes after them.
    pub iteration_in_epoch: u64,
}

/// One file of a checkpoint with its integrity data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The manifest: written last, read first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub position: Position,
    /// Seed the run was started with; every data-side random choice derives from it and the position.
    pub seed: u64,
    /// Hash of the resolved config, to warn when resuming under a different config.
    pub config_hash: String,
    pub files: Vec<FileEntry>,
    /// Free-form state that is not a tensor (meter values, loss bookkeeping).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// A named group of tensors saved as one safetensors file (`model`, `optimizer`, `loss`, ...).
pub struct TensorGroup {
    pub name: String,
    pub tensors: Vec<(String, Tensor)>,
}

/// A verified checkpoint on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub folder: PathBuf,
    pub manifest: Manifest,
}

impl Checkpoint {
    /// Read one tensor group (`model`, `optimizer`, ...) of this checkpoint.
    pub fn tensors(&self, group: &str) -> Result<Vec<(String, Tensor)>> {
        let path = self.folder.join(format!("{group}.safetensors"));
        if !self
            .manifest
            .files
            .iter()
            .any(|f| f.name == format!("{group}.safetensors"))
        {
            return Err(CheckpointError::Invalid {
                path: self.folder.display().to_string(),
                reason: format!("has no tensor group `{group}`"),
            });
        }
        Tensor::read_safetensors(&path).map_err(|source| CheckpointError::Torch {
            path: path.display().to_string(),
            source,
        })
    }
}

fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((total, hex))
}

fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

/// The folder name of the checkpoint at `iteration`.
pub fn folder_name(iteration: u64) -> String {
    format!("{FOLDER_PREFIX}{iteration:09}")
}

/// Save a checkpoint under `dir`; returns its folder. Visible to [`latest`] only once complete.
pub fn save(
    dir: &Path,
    position: Position,
    seed: u64,
    config_hash: &str,
    groups: &[TensorGroup],
    extra: serde_json::Value,
) -> Result<PathBuf> {
    let folder = dir.join(folder_name(position.iteration));
    fs::create_dir_all(&folder).map_err(io_err(&folder))?;
    // A manifest left from an earlier save at the same iteration would vouch for files we are about to replace.
    let manifest_path = folder.join(MANIFEST);
    if manifest_path.exists() {
        fs::remove_file(&manifest_path).map_err(io_err(&manifest_path))?;
    }
    let mut files = Vec::with_capacity(groups.len());
    for group in groups {
        let name = format!("{}.safetensors", group.name);
        let tmp = folder.join(format!(".{name}.tmp"));
        let final_path = folder.join(&name);
        let named: Vec<(&str, &Tensor)> =
            group.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&named, &tmp).map_err(|source| CheckpointError::Torch {
            path: tmp.display().to_string(),
            source,
        })?;
        sync_file(&tmp)?;
        fs::rename(&tmp, &final_path).map_err(io_err(&final_path))?;
        let (bytes, sha256) = sha256_file(&final_path)?;
        files.push(FileEntry {
            name,
            bytes,
            sha256,
        });
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        position,
        seed,
        config_hash: config_hash.to_string(),
        files,
        extra,
    };
    let tmp = folder.join(format!(".{MANIFEST}.tmp"));
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Invalid {
        path: tmp.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(&json)
        .and_then(|_| file.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, &manifest_path).map_err(io_err(&manifest_path))?;
    if let Ok(d) = fs::File::open(&folder) {
        let _ = d.sync_all();
    }
    Ok(folder)
}

/// Read a checkpoint folder's manifest and verify every file it lists.
pub fn verify(folder: &Path) -> Result<Checkpoint> {
    let manifest_path = folder.join(MANIFEST);
    let raw = fs::read(&manifest_path).map_err(io_err(&manifest_path))?;
    let manifest: Manifest =
        serde_json::from_slice(&raw).map_err(|e| CheckpointError::Invalid {
            path: manifest_path.display().to_string(),
            reason: format!("unreadable manifest: {e}"),
        })?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(CheckpointError::Invalid {
            path: manifest_path.display().to_string(),
            reason: format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                manifest.format_version
            ),
        });
    }
    for entry in &manifest.files {
        let path = folder.join(&entry.name);
        let (bytes, sha256) = sha256_file(&path)?;
        if bytes != entry.bytes || sha256 != entry.sha256 {
            return Err(CheckpointError::Invalid {
                path: path.display().to_string(),
                reason: format!(
                    "checksum mismatch (manifest: {} bytes sha256 {}, file: {bytes} bytes sha256 {sha256})",
                    entry.bytes, entry.sha256
                ),
            });
        }
    }
    Ok(Checkpoint {
        folder: folder.to_path_buf(),
        manifest,
    })
}

/// Checkpoint folders under `dir`, newest first (by iteration in the name).
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let iter = name.strip_prefix(FOLDER_PREFIX)?.parse::<u64>().ok()?;
            Some((iter, e.path()))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// The newest complete checkpoint whose files verify; damaged or partial ones are skipped with a warning.
pub fn latest(dir: &Path) -> Result<Option<Checkpoint>> {
    for folder in list(dir)? {
        if !folder.join(MANIFEST).exists() {
            tracing::warn!(folder = %folder.display(), "skipping checkpoint without manifest (interrupted save)");
            continue;
        }
        match verify(&folder) {
            Ok(ckpt) => return Ok(Some(ckpt)),
            Err(err) => tracing::warn!("skipping damaged checkpoint: {err}"),
        }
    }
    Ok(None)
}

/// Keep the newest `keep` complete checkpoints and delete older ones (never the newest complete one).
pub fn retain(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let keep = keep.max(1);
    let mut complete = 0usize;
    let mut removed = Vec::new();
    for folder in list(dir)? {
        if !folder.join(MANIFEST).exists() {
            continue;
        }
        complete += 1;
        if complete > keep {
            fs::remove_dir_all(&folder).map_err(io_err(&folder))?;
            removed.push(folder);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(value: f32) -> TensorGroup {
        TensorGroup {
            name: "model".into(),
            tensors: vec![("w".into(), Tensor::from_slice(&[value, value + 1.0]))],
        }
    }

    fn pos(iteration: u64) -> Position {
        Position {
            iteration,
            epoch: 0,
            iteration_in_epoch: iteration,
        }
    }

    #[test]
    fn save_then_latest_round_trips_tensors_and_position() {
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path(),
            pos(3),
            7,
            "abc",
            &[group(1.0)],
            serde_json::json!({"k": 1}),
        )
        .unwrap();
        save(
            dir.path(),
            pos(5),
            7,
            "abc",
            &[group(2.0)],
            serde_json::Value::Null,
        )
        .unwrap();
        let ckpt = latest(dir.path()).unwrap().unwrap();
        assert_eq!(ckpt.manifest.position, pos(5));
        let tensors = ckpt.tensors("model").unwrap();
        assert_eq!(Vec::<f32>::try_from(&tensors[0].1).unwrap(), vec![2.0, 3.0]);
        assert!(ckpt.tensors("optimizer").is_err());
    }

    #[test]
    fn corrupted_or_partial_newest_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path(),
            pos(1),
            0,
            "h",
            &[group(1.0)],
            serde_json::Value::Null,
        )
        .unwrap();
        let newer = save(
            dir.path(),
            pos(2),
            0,
            "h",
            &[group(2.0)],
            serde_json::Value::Null,
        )
        .unwrap();
        // Flip one byte of the newest checkpoint's tensor file.
        let file = newer.join("model.safetensors");
        let mut bytes = fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&file, bytes).unwrap();
        // And an even newer folder whose save never finished (no manifest).
        fs::create_dir_all(dir.path().join(folder_name(3))).unwrap();
        let ckpt = latest(dir.path()).unwrap().unwrap();
        assert_eq!(ckpt.manifest.position.iteration, 1);
        assert!(verify(&newer)
            .unwrap_err()
            .to_string()
            .contains("checksum mismatch"));
    }

    #[test]
    fn retain_keeps_the_newest_complete_ones() {
        let dir = tempfile::tempdir().unwrap();
        for i in 1..=4 {
            save(
                dir.path(),
                pos(i),
                0,
                "h",
                &[group(i as f32)],
                serde_json::Value::Null,
            )
            .unwrap();
        }
        let removed = retain(dir.path(), 2).unwrap();
        assert_eq!(removed.len(), 2);
        let left: Vec<_> = list(dir.path()).unwrap();
        assert_eq!(
            left,
            vec![
                dir.path().join(folder_name(4)),
                dir.path().join(folder_name(3))
            ]
        );
    }
}
