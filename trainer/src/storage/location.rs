//! Where a file or folder lives: a local path or an object-store URL, parsed once so that every user of
//! storage (checkpoints, data, TensorBoard logs) accepts the same spellings.

use super::StorageError;
use serde::{Serialize, Serializer};
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// The object stores a URL can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Amazon S3 and S3-compatible stores (MinIO, Ceph), `s3://bucket/key`.
    S3,
    /// Google Cloud Storage, `gs://bucket/key`.
    Gcs,
    /// Azure Blob Storage, `az://container/key` (the account comes from `AZURE_STORAGE_ACCOUNT_NAME`).
    Azure,
}

impl Scheme {
    /// The URL scheme as written (`s3`, `gs`, `az`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::S3 => "s3",
            Scheme::Gcs => "gs",
            Scheme::Azure => "az",
        }
    }

    fn parse(scheme: &str) -> Option<Self> {
        match scheme.to_ascii_lowercase().as_str() {
            "s3" | "s3a" => Some(Scheme::S3),
            "gs" | "gcs" => Some(Scheme::Gcs),
            "az" | "azure" | "abfs" | "abfss" => Some(Scheme::Azure),
            _ => None,
        }
    }
}

/// The URL schemes [`Location::parse`] accepts, for error messages and docs.
pub const SUPPORTED_SCHEMES: &str = "s3://, gs://, az://, file:// or a plain path";

/// A local path or an object in a bucket; `key` is `/`-separated without leading or trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A path on this machine (plain paths and `file://` URLs).
    Local(PathBuf),
    /// An object or prefix in an object store.
    Remote {
        scheme: Scheme,
        bucket: String,
        key: String,
    },
}

impl Location {
    /// Parse a plain path or a URL (`s3://`, `gs://`, `az://`, `file://`); other schemes are errors.
    pub fn parse(text: &str) -> Result<Self, StorageError> {
        let invalid = |reason: String| StorageError::InvalidLocation {
            location: text.to_string(),
            reason,
        };
        let Some((scheme, rest)) = text.split_once("://") else {
            return Ok(Location::Local(PathBuf::from(text)));
        };
        if scheme.eq_ignore_ascii_case("file") {
            // file:///abs/path and file://localhost/abs/path; a relative file URL has no meaning.
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(invalid(
                    "a file:// URL needs an absolute path (file:///data/x)".into(),
                ));
            }
            return Ok(Location::Local(PathBuf::from(path)));
        }
        let scheme = Scheme::parse(scheme).ok_or_else(|| {
            invalid(format!(
                "unsupported scheme `{scheme}://`; use {SUPPORTED_SCHEMES}"
            ))
        })?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid(format!(
                "no bucket name ({}://<bucket>/<prefix>)",
                scheme.as_str()
            )));
        }
        let key = key
            .split('/')
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>();
        if key.iter().any(|part| *part == "." || *part == "..") {
            return Err(invalid(
                "`.` and `..` are not allowed in object keys".into(),
            ));
        }
        Ok(Location::Remote {
            scheme,
            bucket: bucket.to_string(),
            key: key.join("/"),
        })
    }

    /// The location of `name` inside this folder (`name` may hold `/`).
    pub fn join(&self, name: &str) -> Location {
        match self {
            Location::Local(path) => Location::Local(path.join(name)),
            Location::Remote {
                scheme,
                bucket,
                key,
            } => {
                let name = name.trim_matches('/');
                let key = match (key.is_empty(), name.is_empty()) {
                    (_, true) => key.clone(),
                    (true, false) => name.to_string(),
                    (false, false) => format!("{key}/{name}"),
                };
                Location::Remote {
                    scheme: *scheme,
                    bucket: bucket.clone(),
                    key,
                }
            }
        }
    }

    /// The folder holding this file or folder; `None` for a bucket root or a path without a parent.
    pub fn parent(&self) -> Option<Location> {
        match self {
            // A bare file name lives in the working directory.
            Location::Local(path) => path.parent().map(|p| match p.as_os_str().is_empty() {
                true => Location::Local(".".into()),
                false => Location::Local(p.to_path_buf()),
            }),
            Location::Remote {
                scheme,
                bucket,
                key,
            } => (!key.is_empty()).then(|| Location::Remote {
                scheme: *scheme,
                bucket: bucket.clone(),
                key: key
                    .rsplit_once('/')
                    .map_or("", |(head, _)| head)
                    .to_string(),
            }),
        }
    }

    /// The local path, when this is one.
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            Location::Local(path) => Some(path),
            Location::Remote { .. } => None,
        }
    }

    /// Whether this names an object store rather than a local path.
    pub fn is_remote(&self) -> bool {
        matches!(self, Location::Remote { .. })
    }

    /// The last path component (the file or folder name); empty for a bucket root.
    pub fn file_name(&self) -> String {
        match self {
            Location::Local(path) => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Location::Remote { key, .. } => key.rsplit('/').next().unwrap_or("").to_string(),
        }
    }

    /// Something to print, as `Path::display` gives (the URL for remote locations).
    pub fn display(&self) -> &Self {
        self
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(path) => write!(f, "{}", path.display()),
            Location::Remote {
                scheme,
                bucket,
                key,
            } if key.is_empty() => write!(f, "{}://{bucket}", scheme.as_str()),
            Location::Remote {
                scheme,
                bucket,
                key,
            } => write!(f, "{}://{bucket}/{key}", scheme.as_str()),
        }
    }
}

impl Serialize for Location {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl From<&Path> for Location {
    fn from(path: &Path) -> Self {
        Location::Local(path.to_path_buf())
    }
}

impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Self {
        Location::Local(path)
    }
}

/// `path` made absolute against the working directory, with `.` and `..` resolved by name (the path
/// need not exist yet, so it cannot be canonicalised).
pub fn absolute_lexical(path: &Path) -> std::io::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let mut out = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(scheme: Scheme, bucket: &str, key: &str) -> Location {
        Location::Remote {
            scheme,
            bucket: bucket.into(),
            key: key.into(),
        }
    }

    #[test]
    fn parent_steps_one_folder_up() {
        let parent = |text: &str| Location::parse(text).unwrap().parent();
        assert_eq!(
            parent("s3://b/ckpt/run1/x.json"),
            Some(remote(Scheme::S3, "b", "ckpt/run1"))
        );
        assert_eq!(parent("s3://b/x.json"), Some(remote(Scheme::S3, "b", "")));
        assert_eq!(parent("s3://b"), None);
        assert_eq!(
            parent("/data/x.json"),
            Some(Location::Local("/data".into()))
        );
        assert_eq!(parent("x.json"), Some(Location::Local(".".into())));
        assert_eq!(parent("/"), None);
    }

    #[test]
    fn urls_and_paths_parse_to_their_store() {
        let cases = [
            ("s3://b/ckpt/run1/", remote(Scheme::S3, "b", "ckpt/run1")),
            ("s3a://b//x", remote(Scheme::S3, "b", "x")),
            ("gs://bucket", remote(Scheme::Gcs, "bucket", "")),
            (
                "az://container/a/b",
                remote(Scheme::Azure, "container", "a/b"),
            ),
            ("file:///data/x", Location::Local("/data/x".into())),
            ("file://localhost/data/x", Location::Local("/data/x".into())),
            ("checkpoints/run", Location::Local("checkpoints/run".into())),
            ("/abs/run", Location::Local("/abs/run".into())),
        ];
        for (text, want) in cases {
            assert_eq!(Location::parse(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let cases = [
            ("ftp://host/x", "unsupported scheme `ftp://`"),
            ("s3:///key", "no bucket name"),
            ("file://relative/x", "absolute path"),
            ("gs://b/a/../c", "not allowed"),
        ];
        for (text, want) in cases {
            let err = Location::parse(text).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains(text), "{text}: {err}");
        }
    }

    #[test]
    fn join_and_display_round_trip() {
        let root = Location::parse("s3://b/runs").unwrap();
        let file = root.join("checkpoint_iter000000001/model.safetensors");
        assert_eq!(
            file.to_string(),
            "s3://b/runs/checkpoint_iter000000001/model.safetensors"
        );
        assert_eq!(file.file_name(), "model.safetensors");
        assert_eq!(Location::parse(&file.to_string()).unwrap(), file);
        assert_eq!(
            Location::parse("gs://b").unwrap().join("x").to_string(),
            "gs://b/x"
        );
        assert_eq!(
            absolute_lexical(Path::new("/a/./b/../c")).unwrap(),
            PathBuf::from("/a/c")
        );
    }
}
