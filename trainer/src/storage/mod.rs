//! Object storage for checkpoints, data and TensorBoard logs: one blocking API over the `object_store`
//! crate for local paths, `file://`, `s3://` (and S3-compatible stores), `gs://` and `az://`.
//!
//! The trainer is synchronous, so every call blocks on a small shared tokio runtime. Credentials and
//! endpoints come from the standard environment variables (see [`credentials`]); retry, timeout, part
//! size and concurrency come from the `STORAGE` config group ([`configure`]). Request-level retries with
//! exponential backoff are object_store's; whole uploads are retried on top of that ([`Storage::commit`]).

pub mod credentials;
mod location;

pub use location::{absolute_lexical, Location, Scheme, SUPPORTED_SCHEMES};

use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use vissl_crds::config::StorageConfig;

/// The store's error code when a request was refused for its credentials (S3's codes; GCS and Azure
/// answer 401/403), so the message can say so in one line instead of echoing the response body.
fn refused_credentials(err: &object_store::Error) -> Option<&'static str> {
    let text = err.to_string();
    [
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
        "AuthenticationFailed",
    ]
    .into_iter()
    .find(|code| text.contains(code))
    .or_else(|| {
        (text.contains("401 Unauthorized") || text.contains("403 Forbidden"))
            .then_some("HTTP 401/403")
    })
}

/// Storage errors; each names the location it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{location}: {reason}")]
    InvalidLocation { location: String, reason: String },
    #[error("{location}: {reason}")]
    Credentials { location: String, reason: String },
    #[error("{location}: not found")]
    NotFound { location: String },
    #[error("{location}: {op} failed: {source}")]
    Store {
        location: String,
        op: &'static str,
        source: object_store::Error,
    },
    #[error("{location}: {op}: {source}")]
    Io {
        location: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("object storage runtime: {0}")]
    Runtime(String),
}

impl StorageError {
    /// Whether trying again later may succeed (network trouble, server errors), as opposed to a missing
    /// object, a bad path or refused credentials.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Store {
                source: object_store::Error::Generic { .. } | object_store::Error::JoinError { .. },
                ..
            }
        )
    }

    fn store(location: impl ToString, op: &'static str, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => StorageError::NotFound {
                location: location.to_string(),
            },
            source => StorageError::Store {
                location: location.to_string(),
                op,
                source,
            },
        }
    }

    fn io(location: impl ToString, op: &'static str, source: std::io::Error) -> Self {
        StorageError::Io {
            location: location.to_string(),
            op,
            source,
        }
    }
}

type Result<T> = std::result::Result<T, StorageError>;

/// How object stores are reached: the `STORAGE` config group in effect.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageSettings {
    /// Retries of one request after a transient error.
    pub max_retries: usize,
    /// No retry of a request starts later than this after its first attempt.
    pub retry_timeout: Duration,
    /// First backoff between retries; it doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts of a whole file upload (the request retries above happen within each).
    pub upload_attempts: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Part size of multipart uploads; smaller files go up in one request.
    pub multipart_part_bytes: usize,
    /// Requests in flight at once per bucket (data reads, upload parts).
    pub max_concurrent_requests: usize,
    /// Local copies of objects read as data.
    pub cache_dir: PathBuf,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            max_retries: 5,
            retry_timeout: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            upload_attempts: 3,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(120),
            multipart_part_bytes: 16 << 20,
            max_concurrent_requests: 16,
            cache_dir: default_cache_dir(),
        }
    }
}

fn default_cache_dir() -> PathBuf {
    std::env::temp_dir().join("vissl-cache")
}

impl StorageSettings {
    /// The settings of a `STORAGE` config group.
    pub fn from_config(cfg: &StorageConfig) -> Self {
        let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
        Self {
            max_retries: cfg.max_retries,
            retry_timeout: secs(cfg.retry_timeout_sec),
            initial_backoff: secs(cfg.initial_backoff_sec),
            max_backoff: secs(cfg.max_backoff_sec),
            upload_attempts: cfg.upload_attempts.max(1),
            connect_timeout: secs(cfg.connect_timeout_sec),
            request_timeout: secs(cfg.request_timeout_sec),
            // S3 refuses parts under 5 MiB (except the last).
            multipart_part_bytes: (cfg.multipart_part_mb.max(5)) << 20,
            max_concurrent_requests: cfg.max_concurrent_requests.max(1),
            cache_dir: if cfg.cache_dir.is_empty() {
                default_cache_dir()
            } else {
                PathBuf::from(&cfg.cache_dir)
            },
        }
    }
}

static SETTINGS: RwLock<Option<StorageSettings>> = RwLock::new(None);
/// Clients per (scheme, bucket), so that reading many objects reuses connections.
type StoreCache = HashMap<(Scheme, String), Arc<dyn ObjectStore>>;
static STORES: Mutex<Option<StoreCache>> = Mutex::new(None);

/// Use `settings` for every store opened from now on (the trainer calls this with the config's STORAGE).
pub fn configure(settings: StorageSettings) {
    let mut current = SETTINGS.write().unwrap_or_else(|e| e.into_inner());
    if current.as_ref() != Some(&settings) {
        *current = Some(settings);
        // Clients hold the old retry and timeout settings.
        *STORES.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The settings in effect.
pub fn settings() -> StorageSettings {
    SETTINGS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// The runtime object_store's futures run on; calls block the calling thread until they finish.
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("vissl-storage")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| StorageError::Runtime(e.clone()))
}

fn block_on<F: std::future::Future>(future: F) -> Result<F::Output> {
    Ok(runtime()?.block_on(future))
}

fn local_store() -> Arc<dyn ObjectStore> {
    static LOCAL: OnceLock<Arc<dyn ObjectStore>> = OnceLock::new();
    LOCAL
        .get_or_init(|| Arc::new(LocalFileSystem::new().with_fsync(true)))
        .clone()
}

fn remote_store(scheme: Scheme, bucket: &str, location: &Location) -> Result<Arc<dyn ObjectStore>> {
    let mut stores = STORES.lock().unwrap_or_else(|e| e.into_inner());
    let stores = stores.get_or_insert_with(HashMap::new);
    if let Some(store) = stores.get(&(scheme, bucket.to_string())) {
        return Ok(store.clone());
    }
    let store = credentials::build_store(scheme, bucket, &settings(), location)?;
    stores.insert((scheme, bucket.to_string()), store.clone());
    Ok(store)
}

/// A folder in some store: a local directory or a prefix in a bucket. Names passed to its methods are
/// `/`-separated paths relative to it.
#[derive(Clone)]
pub struct Storage {
    location: Location,
    store: Arc<dyn ObjectStore>,
    root: ObjPath,
    /// The absolute directory, for local storage.
    local_root: Option<PathBuf>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({})", self.location)
    }
}

impl Storage {
    /// Open the folder at `location`. Remote stores check here that credentials are configured;
    /// nothing is read or created yet.
    pub fn open(location: &Location) -> Result<Self> {
        match location {
            Location::Local(path) => {
                let absolute = absolute_lexical(path)
                    .map_err(|e| StorageError::io(location, "resolving the path", e))?;
                let root = ObjPath::from_absolute_path(&absolute).map_err(|e| {
                    StorageError::InvalidLocation {
                        location: location.to_string(),
                        reason: e.to_string(),
                    }
                })?;
                Ok(Self {
                    location: location.clone(),
                    store: local_store(),
                    root,
                    local_root: Some(absolute),
                })
            }
            Location::Remote {
                scheme,
                bucket,
                key,
            } => Ok(Self {
                location: location.clone(),
                store: remote_store(*scheme, bucket, location)?,
                root: object_key(key),
                local_root: None,
            }),
        }
    }

    /// Parse `text` ([`Location::parse`]) and open it.
    pub fn open_str(text: &str) -> Result<Self> {
        Self::open(&Location::parse(text)?)
    }

    /// Where this folder is.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The sub-folder `name`, on the same client.
    pub fn child(&self, name: &str) -> Storage {
        Storage {
            location: self.location.join(name),
            store: self.store.clone(),
            root: self.key(name),
            local_root: self.local_root.as_ref().map(|r| r.join(name)),
        }
    }

    fn key(&self, name: &str) -> ObjPath {
        name.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.root.clone(), |key, part| key.join(part))
    }

    fn local_file(&self, name: &str) -> Option<PathBuf> {
        self.local_root.as_ref().map(|root| root.join(name))
    }

    /// Check that the folder can be listed: the endpoint answers and the credentials are accepted.
    /// Uses one quick attempt, so a wrong endpoint fails in seconds instead of after every retry.
    pub fn check_access(&self) -> Result<()> {
        if self.local_root.is_some() {
            return Ok(());
        }
        let Location::Remote { scheme, bucket, .. } = &self.location else {
            return Ok(());
        };
        let mut quick = settings();
        quick.max_retries = 1;
        quick.retry_timeout = quick.connect_timeout;
        let store = credentials::build_store(*scheme, bucket, &quick, &self.location)?;
        block_on(store.list_with_delimiter(Some(&self.root)))?
            .map(|_| ())
            .map_err(|e| match refused_credentials(&e) {
                Some(code) => StorageError::Credentials {
                    location: self.location.to_string(),
                    reason: format!(
                        "the store refused the credentials ({code}); check the key and secret in the \
                         environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_*, AZURE_*)"
                    ),
                },
                None => StorageError::store(&self.location, "listing (access check)", e),
            })
    }

    /// Write `bytes` as file `name` in one request (replacing it); visible all at once or not at all.
    pub fn put_bytes(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let location = self.location.join(name);
        self.with_retries("upload", &location, || {
            block_on(self.store.put(&self.key(name), bytes.clone().into()))?
                .map(|_| ())
                .map_err(|e| StorageError::store(&location, "upload", e))
        })
    }

    /// A local file to write `name` into before [`Storage::commit`]: next to its destination for local
    /// storage (so committing is a rename), in a temporary folder otherwise.
    pub fn stage(&self, name: &str) -> Result<StagedFile> {
        match self.local_file(name) {
            Some(dest) => {
                let parent = dest.parent().unwrap_or(Path::new("/")).to_path_buf();
                fs::create_dir_all(&parent)
                    .map_err(|e| StorageError::io(parent.display(), "creating the folder", e))?;
                let file_name = dest
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok(StagedFile {
                    path: parent.join(format!(".{file_name}.tmp")),
                    _dir: None,
                })
            }
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("vissl-upload-")
                    .tempdir()
                    .map_err(|e| StorageError::io("temporary folder", "creating", e))?;
                let file_name = self.location.join(name).file_name();
                Ok(StagedFile {
                    path: dir.path().join(file_name),
                    _dir: Some(dir),
                })
            }
        }
    }

    /// Make a staged file visible as `name`: a durable rename locally, an upload (multipart when larger
    /// than one part, retried as a whole on transient errors) to an object store. Returns its size.
    pub fn commit(&self, name: &str, staged: StagedFile) -> Result<u64> {
        let location = self.location.join(name);
        let size = fs::metadata(&staged.path)
            .map_err(|e| StorageError::io(staged.path.display(), "reading the staged file", e))?
            .len();
        if let Some(dest) = self.local_file(name) {
            sync_path(&staged.path)?;
            fs::rename(&staged.path, &dest)
                .map_err(|e| StorageError::io(&location, "renaming into place", e))?;
            if let Some(parent) = dest.parent() {
                // The rename is durable only once the folder is.
                let _ = fs::File::open(parent).and_then(|d| d.sync_all());
            }
            return Ok(size);
        }
        self.upload(name, &staged.path)
    }

    /// Upload a copy of the local file `file` as `name` (multipart when larger than one part, retried as
    /// a whole on transient errors); for local storage, a copy made visible at once. Returns its size.
    pub fn upload(&self, name: &str, file: &Path) -> Result<u64> {
        let location = self.location.join(name);
        let size = fs::metadata(file)
            .map_err(|e| StorageError::io(file.display(), "reading the file to upload", e))?
            .len();
        if self.local_root.is_some() {
            let staged = self.stage(name)?;
            fs::copy(file, &staged.path).map_err(|e| StorageError::io(&location, "copying", e))?;
            return self.commit(name, staged);
        }
        self.with_retries("upload", &location, || {
            block_on(upload_file(
                self.store.as_ref(),
                &self.key(name),
                file,
                size,
                &location,
            ))?
        })?;
        Ok(size)
    }

    /// Read file `name` whole.
    pub fn get_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_stream(name, &mut |chunk| {
            out.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(out)
    }

    /// Stream file `name` through `sink` chunk by chunk (bounded memory); returns the bytes read.
    pub fn read_stream(
        &self,
        name: &str,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64> {
        let location = self.location.join(name);
        if let Some(path) = self.local_file(name) {
            // Plain reads: no runtime hop for the common local case.
            let mut file = fs::File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => StorageError::NotFound {
                    location: location.to_string(),
                },
                _ => StorageError::io(&location, "opening", e),
            })?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(|e| StorageError::io(&location, "reading", e))?;
                if n == 0 {
                    return Ok(total);
                }
                sink(&buf[..n]).map_err(|e| StorageError::io(&location, "reading", e))?;
                total += n as u64;
            }
        }
        block_on(async {
            let result = self
                .store
                .get(&self.key(name))
                .await
                .map_err(|e| StorageError::store(&location, "download", e))?;
            let mut stream = result.into_stream();
            let mut total = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| StorageError::store(&location, "download", e))?;
                sink(&chunk).map_err(|e| StorageError::io(&location, "reading", e))?;
                total += chunk.len() as u64;
            }
            Ok(total)
        })?
    }

    /// Download file `name` to `dest` (written under a temporary name, then renamed).
    pub fn download(&self, name: &str, dest: &Path) -> Result<u64> {
        download_with(self, name, dest, &mut |_| {})
    }

    /// Whether file `name` exists.
    pub fn exists(&self, name: &str) -> Result<bool> {
        if let Some(path) = self.local_file(name) {
            return Ok(path.is_file());
        }
        let location = self.location.join(name);
        match block_on(self.store.head(&self.key(name)))? {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StorageError::store(&location, "checking existence", e)),
        }
    }

    /// Names of the sub-folders directly inside this folder (none when it does not exist).
    pub fn list_folders(&self) -> Result<Vec<String>> {
        if let Some(root) = &self.local_root {
            let entries = match fs::read_dir(root) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(StorageError::io(&self.location, "listing", e)),
            };
            return Ok(entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect());
        }
        let listed = block_on(self.store.list_with_delimiter(Some(&self.root)))?
            .map_err(|e| StorageError::store(&self.location, "listing", e))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Every file under this folder, recursively: (relative name, size in bytes), in no set order.
    pub fn list_files(&self) -> Result<Vec<(String, u64)>> {
        let root_parts = self.root.parts().count();
        let listed: Vec<_> = block_on(self.store.list(Some(&self.root)).collect::<Vec<_>>())?;
        let mut out = Vec::with_capacity(listed.len());
        for meta in listed {
            let meta = meta.map_err(|e| StorageError::store(&self.location, "listing", e))?;
            let rel: Vec<String> = meta
                .location
                .parts()
                .skip(root_parts)
                .map(|p| p.as_ref().to_string())
                .collect();
            out.push((rel.join("/"), meta.size));
        }
        Ok(out)
    }

    /// Delete file `name`; a missing file is not an error.
    pub fn delete(&self, name: &str) -> Result<()> {
        if let Some(path) = self.local_file(name) {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(StorageError::io(path.display(), "deleting", e))
                }
                _ => Ok(()),
            };
        }
        let location = self.location.join(name);
        match block_on(self.store.delete(&self.key(name)))? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StorageError::store(&location, "deleting", e)),
        }
    }

    /// Delete sub-folder `name` with everything in it.
    pub fn delete_folder(&self, name: &str) -> Result<()> {
        if let Some(path) = self.local_file(name) {
            return match fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(StorageError::io(path.display(), "deleting", e))
                }
                _ => Ok(()),
            };
        }
        let folder = self.child(name);
        for (file, _) in folder.list_files()? {
            folder.delete(&file)?;
        }
        Ok(())
    }

    fn with_retries<T>(
        &self,
        op: &str,
        location: &Location,
        mut attempt: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let settings = settings();
        let mut delay = settings.initial_backoff;
        let mut tries = 1;
        loop {
            match attempt() {
                Err(err) if err.is_transient() && tries < settings.upload_attempts => {
                    tracing::warn!(
                        "{op} of {location} failed (attempt {tries} of {}), retrying in {:.1} s: {err}",
                        settings.upload_attempts,
                        delay.as_secs_f64()
                    );
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(settings.max_backoff);
                    tries += 1;
                }
                other => return other,
            }
        }
    }
}

/// A local file waiting to be committed; removed on drop if it was not.
pub struct StagedFile {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl StagedFile {
    /// Where to write the file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        // After a local commit the file was renamed away and this finds nothing.
        let _ = fs::remove_file(&self.path);
    }
}

fn object_key(key: &str) -> ObjPath {
    key.split('/')
        .filter(|p| !p.is_empty())
        .fold(ObjPath::default(), |path, part| path.join(part))
}

fn sync_path(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StorageError::io(path.display(), "syncing", e))
}

/// Upload a local file: one request when it fits in a part, else a multipart upload with bounded
/// parallelism that is aborted (leaving nothing visible) when any part fails.
async fn upload_file(
    store: &dyn ObjectStore,
    key: &ObjPath,
    file: &Path,
    size: u64,
    location: &Location,
) -> Result<()> {
    let settings = settings();
    let read_err = |e| StorageError::io(file.display(), "reading the staged file", e);
    if size <= settings.multipart_part_bytes as u64 {
        let bytes = fs::read(file).map_err(read_err)?;
        return store
            .put(key, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| StorageError::store(location, "upload", e));
    }
    let upload = store
        .put_multipart(key)
        .await
        .map_err(|e| StorageError::store(location, "starting a multipart upload", e))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, settings.multipart_part_bytes);
    let mut reader = fs::File::open(file).map_err(read_err)?;
    let mut buf = vec![0u8; settings.multipart_part_bytes];
    // Parts in flight at once: enough to keep a link busy, few enough to bound memory.
    let parallel = settings.max_concurrent_requests.clamp(1, 4);
    loop {
        let n = match read_full(&mut reader, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(read_err(e));
            }
        };
        if n == 0 {
            break;
        }
        if let Err(e) = writer.wait_for_capacity(parallel).await {
            let _ = writer.abort().await;
            return Err(StorageError::store(location, "multipart upload", e));
        }
        writer.write(&buf[..n]);
    }
    writer
        .finish()
        .await
        .map(|_| ())
        .map_err(|e| StorageError::store(location, "completing a multipart upload", e))
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Download `name` from `storage` to `dest` through a temporary file, showing each chunk to `tap`.
pub fn download_with(
    storage: &Storage,
    name: &str,
    dest: &Path,
    tap: &mut dyn FnMut(&[u8]),
) -> Result<u64> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent)
        .map_err(|e| StorageError::io(parent.display(), "creating the folder", e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent)
        .map_err(|e| StorageError::io(parent.display(), "creating a temporary file", e))?;
    let total = storage.read_stream(name, &mut |chunk| {
        tap(chunk);
        tmp.write_all(chunk)
    })?;
    tmp.persist(dest)
        .map_err(|e| StorageError::io(dest.display(), "saving the download", e.error))?;
    Ok(total)
}

/// A local file holding the contents of `location`: the file itself for a path, else its copy in the
/// cache (`STORAGE.CACHE_DIR`), keyed by URL and downloaded on first use. Objects are assumed not to
/// change once written, as datasets don't.
pub fn cached_copy(location: &Location) -> Result<PathBuf> {
    let Location::Remote {
        scheme,
        bucket,
        key,
    } = location
    else {
        return Ok(location
            .local_path()
            .map(Path::to_path_buf)
            .unwrap_or_default());
    };
    let cached = settings()
        .cache_dir
        .join(scheme.as_str())
        .join(bucket)
        .join(key);
    if !cached.is_file() {
        let bucket_root = Storage::open(&Location::Remote {
            scheme: *scheme,
            bucket: bucket.clone(),
            key: String::new(),
        })?;
        bucket_root.download(key, &cached)?;
    }
    Ok(cached)
}

/// The bytes of a file given as a path or URL (objects through [`cached_copy`]).
pub fn read_cached(location: &Location) -> Result<Vec<u8>> {
    let path = cached_copy(location)?;
    fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => StorageError::NotFound {
            location: location.to_string(),
        },
        _ => StorageError::io(location, "reading", e),
    })
}

/// Whether `text` is an object-store URL rather than a local path or `file://` URL.
pub fn is_remote_url(text: &str) -> bool {
    Location::parse(text).is_ok_and(|l| l.is_remote())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_storage_stages_commits_lists_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&Location::Local(dir.path().join("root"))).unwrap();
        assert!(storage.list_folders().unwrap().is_empty());
        let staged = storage.stage("a/x.bin").unwrap();
        fs::create_dir_all(staged.path().parent().unwrap()).unwrap();
        fs::write(staged.path(), b"hello").unwrap();
        assert_eq!(storage.commit("a/x.bin", staged).unwrap(), 5);
        storage.put_bytes("a/y.json", b"{}".to_vec()).unwrap();
        storage.put_bytes("b/z", b"z".to_vec()).unwrap();
        assert_eq!(storage.get_bytes("a/x.bin").unwrap(), b"hello");
        assert!(storage.exists("a/y.json").unwrap());
        assert!(!storage.exists("a/missing").unwrap());
        let mut folders = storage.list_folders().unwrap();
        folders.sort();
        assert_eq!(folders, vec!["a", "b"]);
        let mut files = storage.child("a").list_files().unwrap();
        files.sort();
        assert_eq!(
            files,
            vec![("x.bin".to_string(), 5), ("y.json".to_string(), 2)]
        );
        // No staging leftovers next to the committed file.
        assert!(!dir.path().join("root/a/.x.bin.tmp").exists());
        storage.delete_folder("a").unwrap();
        assert_eq!(storage.list_folders().unwrap(), vec!["b"]);
        assert!(matches!(
            storage.get_bytes("a/x.bin"),
            Err(StorageError::NotFound { .. })
        ));
    }

    #[test]
    fn read_stream_streams_in_chunks_and_download_lands_whole() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&Location::Local(dir.path().to_path_buf())).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        storage.put_bytes("big", data.clone()).unwrap();
        let mut chunks = 0;
        let mut seen = Vec::new();
        let mut tap = |c: &[u8]| {
            chunks += 1;
            seen.extend_from_slice(c);
        };
        let dest = dir.path().join("copy/big");
        assert_eq!(
            download_with(&storage, "big", &dest, &mut tap).unwrap(),
            3_000_000
        );
        assert!(chunks > 1);
        assert_eq!(seen, data);
        assert_eq!(fs::read(&dest).unwrap(), data);
    }
}
