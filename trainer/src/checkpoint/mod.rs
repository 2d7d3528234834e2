//! Checkpoints: tensors in safetensors files plus a JSON manifest written last, in a local folder or an
//! object store (`CHECKPOINT.DIR` may be `s3://`, `gs://`, `az://`, `file://` or a path).
//!
//! A checkpoint is the folder `<CHECKPOINT.DIR>/checkpoint_iter<NNNNNNNNN>/`. Each file is staged locally
//! and then made visible whole (a rename on disk, a single or multipart upload to a store); the manifest,
//! carrying the training position and a SHA-256 per file, is written last, so a folder without a manifest
//! is an interrupted save and is never resumed from, and a failed upload leaves no manifest behind.
//! Resume takes the newest checkpoint whose files all verify and skips a damaged one with a warning.
//! Saving in the background ([`writer::CheckpointWriter`]) keeps training going during the upload.

pub mod writer;

use crate::storage::{self, Location, Storage, StorageError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::Tensor;

/// The manifest's file name inside a checkpoint folder.
pub const MANIFEST: &str = "manifest.json";
/// The tensor group holding the model's weights.
pub const MODEL_GROUP: &str = "model";
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
    #[error("checkpoint storage: {0}")]
    Storage(#[from] StorageError),
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

/// Everything one checkpoint holds, owned, so that it can be written after training has moved on.
pub struct Snapshot {
    pub position: Position,
    pub seed: u64,
    pub config_hash: String,
    /// Tensors that nothing else writes to any more (copies taken at the step).
    pub groups: Vec<TensorGroup>,
    pub extra: serde_json::Value,
}

/// What a completed save wrote and how long it took.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveReport {
    pub folder: Location,
    pub iteration: u64,
    /// Bytes of the tensor files and the manifest.
    pub bytes: u64,
    /// Serialising and hashing the tensors.
    pub write_seconds: f64,
    /// Making the files visible: renames on disk, uploads to an object store, and the manifest.
    pub upload_seconds: f64,
}

/// A verified checkpoint; its files can be read from `folder`.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// A local folder holding the verified files: the checkpoint folder itself, or for an object store a
    /// local copy made while verifying (kept as long as this value).
    pub folder: PathBuf,
    /// Where the checkpoint lives.
    pub location: Location,
    pub manifest: Manifest,
    _download: Option<Arc<tempfile::TempDir>>,
}

impl Checkpoint {
    /// The local file of the model's tensors (the `model` group).
    pub fn model_file(&self) -> PathBuf {
        self.folder.join(format!("{MODEL_GROUP}.safetensors"))
    }

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
                path: self.location.to_string(),
                reason: format!("has no tensor group `{group}`"),
            });
        }
        Tensor::read_safetensors(&path).map_err(|source| CheckpointError::Torch {
            path: path.display().to_string(),
            source,
        })
    }
}

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The folder name of the checkpoint at `iteration`.
pub fn folder_name(iteration: u64) -> String {
    format!("{FOLDER_PREFIX}{iteration:09}")
}

fn folder_iteration(name: &str) -> Option<u64> {
    name.strip_prefix(FOLDER_PREFIX)?.parse().ok()
}

/// A CHECKPOINT.DIR: where checkpoints are saved, listed, verified and pruned.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    storage: Storage,
}

impl CheckpointDir {
    /// Open a checkpoint folder (local or object store); nothing is read or created yet.
    pub fn open(location: &Location) -> Result<Self> {
        Ok(Self {
            storage: Storage::open(location)?,
        })
    }

    /// Where the checkpoints are.
    pub fn location(&self) -> &Location {
        self.storage.location()
    }

    /// Check once that the store answers and accepts the credentials (a no-op for local folders).
    pub fn check_access(&self) -> Result<()> {
        Ok(self.storage.check_access()?)
    }

    /// Write a checkpoint; it becomes visible to [`CheckpointDir::latest`] only once complete.
    pub fn save(&self, snapshot: &Snapshot) -> Result<SaveReport> {
        let iteration = snapshot.position.iteration;
        let name = folder_name(iteration);
        let folder = self.storage.child(&name);
        // A manifest left from an earlier save at the same iteration would vouch for files we are about to replace.
        folder.delete(MANIFEST)?;
        let mut files = Vec::with_capacity(snapshot.groups.len());
        let mut write_seconds = 0.0;
        let mut upload_seconds = 0.0;
        for group in &snapshot.groups {
            let started = Instant::now();
            let file_name = format!("{}.safetensors", group.name);
            let staged = folder.stage(&file_name)?;
            let named: Vec<(&str, &Tensor)> =
                group.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
            Tensor::write_safetensors(&named, staged.path()).map_err(|source| {
                CheckpointError::Torch {
                    path: folder.location().join(&file_name).to_string(),
                    source,
                }
            })?;
            let (bytes, sha256) = sha256_file(staged.path())?;
            write_seconds += started.elapsed().as_secs_f64();
            let started = Instant::now();
            folder.commit(&file_name, staged)?;
            upload_seconds += started.elapsed().as_secs_f64();
            files.push(FileEntry {
                name: file_name,
                bytes,
                sha256,
            });
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            position: snapshot.position.clone(),
            seed: snapshot.seed,
            config_hash: snapshot.config_hash.clone(),
            files,
            extra: snapshot.extra.clone(),
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Invalid {
            path: folder.location().join(MANIFEST).to_string(),
            reason: e.to_string(),
        })?;
        let bytes = manifest.files.iter().map(|f| f.bytes).sum::<u64>() + json.len() as u64;
        let started = Instant::now();
        folder.put_bytes(MANIFEST, json)?;
        upload_seconds += started.elapsed().as_secs_f64();
        Ok(SaveReport {
            folder: folder.location().clone(),
            iteration,
            bytes,
            write_seconds,
            upload_seconds,
        })
    }

    /// Checkpoint folder names with their iteration, newest first.
    fn folders(&self) -> Result<Vec<(u64, String)>> {
        let mut found: Vec<(u64, String)> = self
            .storage
            .list_folders()?
            .into_iter()
            .filter_map(|name| Some((folder_iteration(&name)?, name)))
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        Ok(found)
    }

    /// Checkpoint folders, newest first (by iteration in the name), complete or not.
    pub fn list(&self) -> Result<Vec<Location>> {
        Ok(self
            .folders()?
            .into_iter()
            .map(|(_, name)| self.location().join(&name))
            .collect())
    }

    /// Read the manifest of checkpoint folder `name` and verify every file it lists (object-store files
    /// are downloaded to a temporary folder on the way).
    pub fn verify(&self, name: &str) -> Result<Checkpoint> {
        let folder = self.storage.child(name);
        let manifest_location = folder.location().join(MANIFEST);
        let raw = folder.get_bytes(MANIFEST)?;
        let manifest: Manifest =
            serde_json::from_slice(&raw).map_err(|e| CheckpointError::Invalid {
                path: manifest_location.to_string(),
                reason: format!("unreadable manifest: {e}"),
            })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(CheckpointError::Invalid {
                path: manifest_location.to_string(),
                reason: format!(
                    "format version {} (this build reads {FORMAT_VERSION})",
                    manifest.format_version
                ),
            });
        }
        let (local, download) = match folder.location().local_path() {
            Some(path) => (path.to_path_buf(), None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("vissl-checkpoint-")
                    .tempdir()
                    .map_err(io_err(&std::env::temp_dir()))?;
                (dir.path().to_path_buf(), Some(Arc::new(dir)))
            }
        };
        for entry in &manifest.files {
            let mut hasher = Sha256::new();
            let bytes = match &download {
                None => folder.read_stream(&entry.name, &mut |chunk| {
                    hasher.update(chunk);
                    Ok(())
                })?,
                Some(_) => storage::download_with(
                    &folder,
                    &entry.name,
                    &local.join(&entry.name),
                    &mut |chunk| hasher.update(chunk),
                )?,
            };
            let sha256 = hex(hasher.finalize());
            if bytes != entry.bytes || sha256 != entry.sha256 {
                return Err(CheckpointError::Invalid {
                    path: folder.location().join(&entry.name).to_string(),
                    reason: format!(
                        "checksum mismatch (manifest: {} bytes sha256 {}, file: {bytes} bytes sha256 {sha256})",
                        entry.bytes, entry.sha256
                    ),
                });
            }
        }
        Ok(Checkpoint {
            folder: local,
            location: folder.location().clone(),
            manifest,
            _download: download,
        })
    }

    /// The newest complete checkpoint whose files verify; damaged or partial ones are skipped with a warning.
    pub fn latest(&self) -> Result<Option<Checkpoint>> {
        for (_, name) in self.folders()? {
            let location = self.location().join(&name);
            if !self.storage.child(&name).exists(MANIFEST)? {
                tracing::warn!(folder = %location, "skipping checkpoint without manifest (interrupted save)");
                continue;
            }
            match self.verify(&name) {
                Ok(ckpt) => return Ok(Some(ckpt)),
                Err(err) => tracing::warn!("skipping damaged checkpoint {location}: {err}"),
            }
        }
        Ok(None)
    }

    /// Keep the newest `keep` complete checkpoints and delete older ones (never the newest complete one);
    /// folders without a manifest are left alone, as a save may be writing them.
    pub fn retain(&self, keep: usize) -> Result<Vec<Location>> {
        let keep = keep.max(1);
        let mut complete = 0usize;
        let mut removed = Vec::new();
        for (_, name) in self.folders()? {
            let folder = self.storage.child(&name);
            if !folder.exists(MANIFEST)? {
                continue;
            }
            complete += 1;
            if complete > keep {
                // The manifest goes first, so a deletion cut short leaves an ignored folder, not a damaged one.
                folder.delete(MANIFEST)?;
                self.storage.delete_folder(&name)?;
                removed.push(folder.location().clone());
            }
        }
        Ok(removed)
    }
}

/// The checkpoint `location` names: a checkpoint folder (verified) or a CHECKPOINT.DIR (its newest verified
/// checkpoint, the rule resume follows); `None` when it holds no complete, intact checkpoint.
pub fn find(location: &Location) -> Result<Option<Checkpoint>> {
    if !Storage::open(location)?.exists(MANIFEST)? {
        return CheckpointDir::open(location)?.latest();
    }
    let parent = location.parent().ok_or_else(|| CheckpointError::Invalid {
        path: location.to_string(),
        reason: "a checkpoint folder cannot be a bucket root".into(),
    })?;
    CheckpointDir::open(&parent)?
        .verify(&location.file_name())
        .map(Some)
}

fn sha256_file(path: &Path) -> Result<(u64, String)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
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
    Ok((total, hex(hasher.finalize())))
}

fn local_dir(dir: &Path) -> Result<CheckpointDir> {
    CheckpointDir::open(&Location::Local(dir.to_path_buf()))
}

/// The checkpoint folder's parent and name, for the path-based functions.
fn split_folder(folder: &Path) -> Result<(&Path, String)> {
    match (folder.parent(), folder.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name.to_string_lossy().into_owned())),
        _ => Err(CheckpointError::Invalid {
            path: folder.display().to_string(),
            reason: "is not a checkpoint folder".into(),
        }),
    }
}

/// Save a checkpoint under the local folder `dir`; returns its folder. Visible to [`latest`] only once complete.
pub fn save(
    dir: &Path,
    position: Position,
    seed: u64,
    config_hash: &str,
    groups: &[TensorGroup],
    extra: serde_json::Value,
) -> Result<PathBuf> {
    let snapshot = Snapshot {
        position,
        seed,
        config_hash: config_hash.to_string(),
        groups: groups
            .iter()
            .map(|g| TensorGroup {
                name: g.name.clone(),
                tensors: g
                    .tensors
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone()))
                    .collect(),
            })
            .collect(),
        extra,
    };
    let report = local_dir(dir)?.save(&snapshot)?;
    Ok(dir.join(report.folder.file_name()))
}

/// Read a local checkpoint folder's manifest and verify every file it lists.
pub fn verify(folder: &Path) -> Result<Checkpoint> {
    let (parent, name) = split_folder(folder)?;
    local_dir(parent)?.verify(&name)
}

/// Checkpoint folders under the local folder `dir`, newest first (by iteration in the name).
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(local_dir(dir)?
        .folders()?
        .into_iter()
        .map(|(_, name)| dir.join(name))
        .collect())
}

/// The newest complete checkpoint under the local folder `dir` whose files verify.
pub fn latest(dir: &Path) -> Result<Option<Checkpoint>> {
    local_dir(dir)?.latest()
}

/// Keep the newest `keep` complete checkpoints under the local folder `dir`; returns the deleted folders.
pub fn retain(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    Ok(local_dir(dir)?
        .retain(keep)?
        .iter()
        .map(|l| dir.join(l.file_name()))
        .collect())
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
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&file, bytes).unwrap();
        // And an even newer folder whose save never finished (no manifest).
        std::fs::create_dir_all(dir.path().join(folder_name(3))).unwrap();
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
