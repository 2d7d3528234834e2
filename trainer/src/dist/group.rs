//! c10d process groups and their collectives: safe wrappers over the bridge.
//!
//! A group holds libtorch's `ProcessGroup` with a Gloo backend for CPU tensors (and NCCL for CUDA
//! tensors when the backend is `nccl`). Collectives on one group must be issued in the same order on
//! every rank, as with `torch.distributed`; the train loop guarantees it by running the same steps.

use super::ffi;
use super::launcher::WorkerEnv;
use super::{DistError, Result};
use std::ffi::CString;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::time::Duration;
use tch::Tensor;
use vissl_crds::config::Backend;

/// Buffer size of coalesced broadcasts (torch's DDP uses 250 MB for module states).
const BROADCAST_BUCKET_BYTES: i64 = 250 * 1024 * 1024;

/// How ranks find each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// A TCPStore served by rank 0 at `addr:port` (`INIT_METHOD: tcp | env`).
    Tcp { addr: String, port: u16 },
    /// A FileStore on a file every rank can reach (`INIT_METHOD: file`).
    File(PathBuf),
}

impl std::fmt::Display for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rendezvous::Tcp { addr, port } => write!(f, "tcp://{addr}:{port}"),
            Rendezvous::File(path) => write!(f, "file://{}", path.display()),
        }
    }
}

/// Everything [`ProcessGroup::connect`] needs.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How the ranks meet.
    pub rendezvous: Rendezvous,
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rendezvous and collective timeout.
    pub timeout: Duration,
    /// `DISTRIBUTED.BACKEND`.
    pub backend: Backend,
    /// `GLOO_SOCKET_IFNAME`: the network interface Gloo binds to.
    pub gloo_interface: Option<String>,
    /// The address Gloo binds to when no interface is named (loopback for single-machine runs; else
    /// the address this machine's hostname resolves to).
    pub gloo_hostname: Option<String>,
    /// The CUDA device of this rank (NCCL binds to it).
    pub cuda_device: Option<usize>,
}

impl ConnectOptions {
    /// The options of a launched worker (on a GPU machine, rank `LOCAL_RANK` drives GPU `LOCAL_RANK`).
    pub fn for_worker(env: &WorkerEnv, backend: Backend) -> Self {
        let gloo_interface = std::env::var("GLOO_SOCKET_IFNAME")
            .ok()
            .filter(|s| !s.is_empty());
        let loopback = match &env.rendezvous {
            Rendezvous::Tcp { addr, .. } => is_loopback(addr),
            Rendezvous::File(_) => env.num_nodes == 1,
        };
        Self {
            rendezvous: env.rendezvous.clone(),
            rank: env.rank,
            world_size: env.world_size,
            timeout: env.timeout,
            backend,
            gloo_interface,
            gloo_hostname: loopback.then(|| "127.0.0.1".to_string()),
            cuda_device: (backend == Backend::Nccl).then_some(env.local_rank),
        }
    }
}

/// Whether `addr` names this machine's loopback (then Gloo binds there too, with no DNS involved).
pub fn is_loopback(addr: &str) -> bool {
    addr == "localhost"
        || addr
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Reductions of [`ProcessGroup::all_reduce`]. Gloo has no average; [`ProcessGroup::all_reduce_mean_`]
/// sums and divides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

impl ReduceOp {
    fn raw(self) -> i32 {
        match self {
            ReduceOp::Sum => ffi::REDUCE_SUM,
            ReduceOp::Max => ffi::REDUCE_MAX,
            ReduceOp::Min => ffi::REDUCE_MIN,
        }
    }
}

/// A c10d process group (the default group of a run, or a subgroup).
pub struct ProcessGroup {
    raw: NonNull<ffi::Group>,
    rank: usize,
    size: usize,
    timeout: Duration,
}

// The c10d ProcessGroup is internally synchronised; torch calls it from autograd threads too.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the bridge and is freed once, here.
        unsafe { ffi::vissl_dist_group_free(self.raw.as_ptr()) }
    }
}

fn c_string(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| DistError::Config(format!("{what} contains a NUL byte: {s:?}")))
}

fn timeout_ms(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

impl ProcessGroup {
    /// Rendezvous with the other ranks and build the group (blocks until all joined or the timeout).
    pub fn connect(options: &ConnectOptions) -> Result<Self> {
        let connect_error = |reason: String| DistError::Connect {
            rank: options.rank,
            world_size: options.world_size,
            rendezvous: options.rendezvous.to_string(),
            timeout_s: options.timeout.as_secs(),
            reason,
        };
        let to_i32 = |what: &str, v: usize| {
            i32::try_from(v).map_err(|_| connect_error(format!("{what} {v} is too large")))
        };
        if options.rank >= options.world_size {
            return Err(connect_error(format!(
                "rank {} is not in a world of size {}",
                options.rank, options.world_size
            )));
        }
        let (addr, port, file) = match &options.rendezvous {
            Rendezvous::Tcp { addr, port } => (addr.clone(), *port, String::new()),
            Rendezvous::File(path) => (String::new(), 0, path.display().to_string()),
        };
        let addr = c_string("MASTER_ADDR", &addr)?;
        let file = c_string("the rendezvous file", &file)?;
        let interface = c_string(
            "GLOO_SOCKET_IFNAME",
            options.gloo_interface.as_deref().unwrap_or(""),
        )?;
        let hostname = c_string(
            "the Gloo address",
            options.gloo_hostname.as_deref().unwrap_or(""),
        )?;
        let raw_options = ffi::ConnectOptions {
            master_addr: addr.as_ptr(),
            port: i32::from(port),
            file_store_path: file.as_ptr(),
            rank: to_i32("rank", options.rank)?,
            world_size: to_i32("world size", options.world_size)?,
            timeout_ms: timeout_ms(options.timeout),
            gloo_interface: interface.as_ptr(),
            gloo_hostname: hostname.as_ptr(),
            nccl: i32::from(options.backend == Backend::Nccl),
            cuda_device: options
                .cuda_device
                .and_then(|d| i32::try_from(d).ok())
                .unwrap_or(-1),
        };
        let mut raw = std::ptr::null_mut();
        // SAFETY: the options' strings outlive the call; `raw` is written on success only.
        unsafe { ffi::check(ffi::vissl_dist_connect(&raw_options, &mut raw)) }
            .map_err(connect_error)?;
        Self::from_raw(raw, options.timeout)
            .ok_or_else(|| connect_error("the bridge returned no group".into()))
    }

    fn from_raw(raw: *mut ffi::Group, timeout: Duration) -> Option<Self> {
        let raw = NonNull::new(raw)?;
        // SAFETY: `raw` is a live group from the bridge.
        let (rank, size) = unsafe {
            (
                ffi::vissl_dist_group_rank(raw.as_ptr()),
                ffi::vissl_dist_group_size(raw.as_ptr()),
            )
        };
        Some(Self {
            raw,
            rank: usize::try_from(rank).ok()?,
            size: usize::try_from(size).ok()?,
            timeout,
        })
    }

    /// A group of some ranks of this one (every member calls this with the same `name`, its rank
    /// inside the group and the group's size; non-members do not call it).
    pub fn subgroup(&self, name: &str, rank_in_group: usize, group_size: usize) -> Result<Self> {
        let c_name = c_string("group name", name)?;
        let mut raw = std::ptr::null_mut();
        let to_i32 = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
        // SAFETY: `self.raw` is live; `raw` is written on success only.
        unsafe {
            ffi::check(ffi::vissl_dist_subgroup(
                self.raw.as_ptr(),
                c_name.as_ptr(),
                to_i32(rank_in_group),
                to_i32(group_size),
                &mut raw,
            ))
        }
        .map_err(|reason| self.error("creating a subgroup", reason))?;
        Self::from_raw(raw, self.timeout)
            .ok_or_else(|| self.error("creating a subgroup", "the bridge returned no group".into()))
    }

    /// This process's rank in the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The collective timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The bridge handle, for the other wrappers of this module.
    pub(crate) fn raw(&self) -> *mut ffi::Group {
        self.raw.as_ptr()
    }

    /// The error of a failed collective, with this rank and the timeout.
    pub(crate) fn error(&self, op: &'static str, reason: String) -> DistError {
        DistError::Collective {
            op,
            rank: self.rank,
            world_size: self.size,
            timeout_s: self.timeout.as_secs(),
            reason,
        }
    }

    /// Start reducing `tensor` (contiguous) in place across ranks; wait on the returned [`Work`].
    pub fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Work> {
        let mut work = std::ptr::null_mut();
        // SAFETY: the tensor pointer is valid for the call; c10d keeps its own reference.
        unsafe {
            ffi::check(ffi::vissl_dist_all_reduce(
                self.raw(),
                ffi::tensor_ptr(tensor),
                op.raw(),
                &mut work,
            ))
        }
        .map_err(|reason| self.error("all_reduce", reason))?;
        Work::new(self, "all_reduce", work)
    }

    /// Sum `tensor` in place across ranks and wait.
    pub fn all_reduce_sum_(&self, tensor: &Tensor) -> Result<()> {
        self.all_reduce(tensor, ReduceOp::Sum)?.wait()
    }

    /// Average `tensor` in place across ranks and wait.
    pub fn all_reduce_mean_(&self, tensor: &Tensor) -> Result<()> {
        self.all_reduce_sum_(tensor)?;
        // In place on the caller's storage (a shallow clone shares it).
        let _ = tensor.shallow_clone().f_div_scalar_(self.size as f64)?;
        Ok(())
    }

    /// The mean of a scalar over ranks (losses and meters for logging).
    pub fn mean_scalar(&self, value: f64) -> Result<f64> {
        let t = Tensor::from_slice(&[value]);
        self.all_reduce_mean_(&t)?;
        Ok(t.f_double_value(&[0])?)
    }

    /// Start broadcasting `tensor` (contiguous) from `root` into every rank's tensor.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Work> {
        let mut work = std::ptr::null_mut();
        // SAFETY: as in all_reduce.
        unsafe {
            ffi::check(ffi::vissl_dist_broadcast(
                self.raw(),
                ffi::tensor_ptr(tensor),
                i32::try_from(root).unwrap_or(i32::MAX),
                &mut work,
            ))
        }
        .map_err(|reason| self.error("broadcast", reason))?;
        Work::new(self, "broadcast", work)
    }

    /// Broadcast many tensors from `root` in flattened chunks (c10d's `broadcast_coalesced`), and wait.
    pub fn broadcast_coalesced(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        let ptrs: Vec<ffi::TensorPtr> = tensors.iter().map(ffi::tensor_ptr).collect();
        // SAFETY: the pointers stay valid for the (blocking) call.
        unsafe {
            ffi::check(ffi::vissl_dist_broadcast_coalesced(
                self.raw(),
                ptrs.as_ptr(),
                ptrs.len() as i64,
                i32::try_from(root).unwrap_or(i32::MAX),
                BROADCAST_BUCKET_BYTES,
            ))
        }
        .map_err(|reason| self.error("broadcast", reason))
    }

    /// Every rank's `tensor` (same shape on all ranks) concatenated along dim 0 in rank order; no
    /// gradient flows back (see [`super::autograd::gather_from_all`] for that).
    pub fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        // SAFETY: one bridge call that hands back a new tensor.
        unsafe {
            ffi::tensor_result(|out| {
                ffi::vissl_dist_all_gather(self.raw(), ffi::tensor_ptr(tensor), out)
            })
        }
        .map_err(|reason| self.error("all_gather", reason))
    }

    /// Block until every rank got here.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: `self.raw` is live.
        unsafe { ffi::check(ffi::vissl_dist_barrier(self.raw())) }
            .map_err(|reason| self.error("barrier", reason))
    }
}

/// An in-flight collective. Dropping it without waiting is allowed (the collective still completes;
/// c10d keeps what it needs alive).
pub struct Work {
    raw: NonNull<ffi::Work>,
    op: &'static str,
    rank: usize,
    size: usize,
    timeout: Duration,
}

// c10d work handles may be waited on from any thread.
unsafe impl Send for Work {}

impl Work {
    fn new(group: &ProcessGroup, op: &'static str, raw: *mut ffi::Work) -> Result<Self> {
        let raw = NonNull::new(raw)
            .ok_or_else(|| group.error(op, "the bridge returned no work handle".into()))?;
        Ok(Self {
            raw,
            op,
            rank: group.rank,
            size: group.size,
            timeout: group.timeout,
        })
    }

    /// Block until the collective finished (or failed, or timed out).
    pub fn wait(self) -> Result<()> {
        // SAFETY: `raw` is live until Drop.
        unsafe { ffi::check(ffi::vissl_dist_work_wait(self.raw.as_ptr())) }.map_err(|reason| {
            DistError::Collective {
                op: self.op,
                rank: self.rank,
                world_size: self.size,
                timeout_s: self.timeout.as_secs(),
                reason,
            }
        })
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: freed once, here.
        unsafe { ffi::vissl_dist_work_free(self.raw.as_ptr()) }
    }
}
