//! The trained weights a benchmark evaluates, from a path or an object-store URL: a weights file, one
//! checkpoint folder, or a CHECKPOINT.DIR (its newest verified checkpoint, as resume picks it). Remote
//! files are downloaded to a temporary folder that lives as long as the [`Weights`].

use crate::checkpoint::{self, Checkpoint, CheckpointError};
use crate::exit;
use crate::storage::{Location, Storage, StorageError};
use std::path::PathBuf;

/// Why the weights cannot be had; each names the location the user gave.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The text is neither a path nor a supported URL.
    #[error("weights location {location}: {reason}")]
    InvalidLocation { location: String, reason: String },
    /// Nothing to load there: no file, no complete and intact checkpoint.
    #[error(
        "no verified checkpoint at {location} (a weights file, a checkpoint folder with its manifest, or a \
         CHECKPOINT.DIR holding one; damaged ones are skipped with a warning)"
    )]
    NotFound { location: String },
    /// The checkpoint named is damaged (checksum mismatch, unreadable manifest).
    #[error("checkpoint at {location} is damaged: {reason}")]
    Damaged { location: String, reason: String },
}

impl WeightsError {
    /// The process exit code (see [`crate::exit`]): a wrong location is a config error, missing or damaged
    /// weights are invalid data; neither heals by retrying.
    pub fn exit_code(&self) -> u8 {
        match self {
            WeightsError::InvalidLocation { .. } => exit::INVALID_CONFIG,
            WeightsError::NotFound { .. } | WeightsError::Damaged { .. } => exit::INVALID_DATA,
        }
    }
}

/// Keeps downloaded files alive (they are deleted when it drops).
#[derive(Debug)]
enum Holder {
    Nothing,
    Checkpoint { _checkpoint: Box<Checkpoint> },
    Download { _dir: tempfile::TempDir },
}

/// Weights ready to load from a local file.
#[derive(Debug)]
pub struct Weights {
    /// The local file to load (a download for remote locations).
    pub file: PathBuf,
    /// Where the weights actually came from: the resolved checkpoint folder, or the file.
    pub location: Location,
    _holder: Holder,
}

/// Find and fetch the weights at `text` (see the module docs).
pub fn resolve(text: &str) -> anyhow::Result<Weights> {
    let location = Location::parse(text).map_err(|e| WeightsError::InvalidLocation {
        location: text.to_string(),
        reason: e.to_string(),
    })?;
    if let Some(weights) = single_file(&location)? {
        return Ok(weights);
    }
    let not_found = || WeightsError::NotFound {
        location: location.to_string(),
    };
    match checkpoint::find(&location) {
        Ok(Some(ckpt)) => Ok(Weights {
            file: ckpt.model_file(),
            location: ckpt.location.clone(),
            _holder: Holder::Checkpoint {
                _checkpoint: Box::new(ckpt),
            },
        }),
        Ok(None) | Err(CheckpointError::Storage(StorageError::NotFound { .. })) => {
            Err(not_found().into())
        }
        Err(CheckpointError::Invalid { path, reason }) => Err(WeightsError::Damaged {
            location: path,
            reason,
        }
        .into()),
        Err(other) => {
            Err(anyhow::Error::new(other).context(format!("reading weights at {location}")))
        }
    }
}

/// `location` as one file, downloaded when remote; `None` when no file is there.
fn single_file(location: &Location) -> anyhow::Result<Option<Weights>> {
    if let Some(path) = location.local_path() {
        return Ok(path.is_file().then(|| Weights {
            file: path.to_path_buf(),
            location: location.clone(),
            _holder: Holder::Nothing,
        }));
    }
    let (Some(parent), name) = (location.parent(), location.file_name()) else {
        return Ok(None);
    };
    let folder = Storage::open(&parent)?;
    if !folder.exists(&name)? {
        return Ok(None);
    }
    let dir = tempfile::Builder::new()
        .prefix("vissl-weights-")
        .tempdir()
        .map_err(|e| anyhow::anyhow!("creating a temporary folder for {location}: {e}"))?;
    let file = dir.path().join(&name);
    folder.download(&name, &file)?;
    Ok(Some(Weights {
        file,
        location: location.clone(),
        _holder: Holder::Download { _dir: dir },
    }))
}
