//! Distributed training on libtorch's own c10d (DESIGN.md, "Distributed engine").
//!
//! * [`group`]: process groups (TCPStore or FileStore rendezvous, Gloo for CPU tensors, NCCL for CUDA
//!   tensors with the `nccl` feature) and their collectives, through the C++ bridge in `trainer/csrc/`.
//! * [`autograd`]: VISSL's `gather_from_all`, the differentiable all-gather of SimCLR's negatives.
//! * [`sync_bn`]: the batch norm the models build, which becomes SyncBatchNorm per
//!   `MODEL.SYNC_BN_CONFIG` once a run installs its group.
//! * [`ddp`]: data parallelism as a train-loop hook: start from rank 0's weights, average gradients in
//!   `DATA.DDP_BUCKET_CAP_MB` buckets (libtorch's DDP Reducer, overlapped with backward, or explicitly
//!   after it with `DISTRIBUTED.MANUAL_GRADIENT_REDUCTION`), `BROADCAST_BUFFERS`, loss reduced for logs.
//! * [`launcher`]: `vissl train` as the per-node launcher (the pod contract, one worker process per
//!   local rank, fail-fast watching, signal forwarding).
//! * [`resume`]: which checkpoints a run of another world size may resume from.
//! * [`bench`]: `vissl bench dist`, 1 rank x 2 threads against 2 ranks x 1 thread.
//!
//! Gloo is always built. NCCL (`DISTRIBUTED.BACKEND: nccl`) is the `nccl` cargo feature: it needs the
//! CUDA libtorch (the PyPI wheel is) and the CUDA/NCCL headers of the `nvidia-cuda-runtime`,
//! `nvidia-cuda-crt`, `nvidia-cuda-cccl` and `nvidia-nccl` wheels (found next to torch, or listed in
//! `VISSL_CUDA_INCLUDE`); a binary built without it refuses `nccl` before starting any worker.

pub mod autograd;
pub mod bench;
pub mod ddp;
mod ffi;
pub mod group;
pub mod launcher;
pub mod resume;
pub mod sync_bn;

use crate::losses::LossContext;
use std::sync::Arc;
use std::time::Duration;
use vissl_crds::config::{Backend, Config};

pub use ddp::DataParallel;
pub use group::{ProcessGroup, ReduceOp, Rendezvous, Work};
pub use launcher::WorkerEnv;

/// Errors of distributed training; each names the rank, the operation and what to check.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// Joining the process group failed (rendezvous or transport).
    #[error(
        "rank {rank} of {world_size} could not join the process group at {rendezvous} within {timeout_s} s: \
         {reason} (all ranks must start with the same MASTER_ADDR/MASTER_PORT; VISSL_DIST_TIMEOUT_S sets the timeout)"
    )]
    Connect {
        rank: usize,
        world_size: usize,
        rendezvous: String,
        timeout_s: u64,
        reason: String,
    },
    /// A collective failed: a peer exited, hung past the timeout, or the inputs disagree across ranks.
    #[error(
        "{op} failed on rank {rank} of {world_size}: {reason} (a peer process probably exited or hung; \
         collectives time out after {timeout_s} s, VISSL_DIST_TIMEOUT_S)"
    )]
    Collective {
        op: &'static str,
        rank: usize,
        world_size: usize,
        timeout_s: u64,
        reason: String,
    },
    /// The ranks' states disagree (checkpoint, layout).
    #[error("{0}")]
    Inconsistent(String),
    /// The environment or config does not describe a runnable layout.
    #[error("{0}")]
    Config(String),
    /// Starting or watching worker processes failed.
    #[error("{0}")]
    Launch(String),
    /// A worker exited with a code that retrying cannot fix (see [`crate::exit`]); the node exits with it.
    #[error("{message}")]
    WorkerExit { code: u8, message: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result of this module.
pub type Result<T, E = DistError> = std::result::Result<T, E>;

/// Default c10d timeout (PyTorch's): rendezvous and every collective.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// This process's place in a multi-process run and its default process group. Cheap to clone.
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

struct SessionInner {
    env: WorkerEnv,
    group: Arc<ProcessGroup>,
    backend: Backend,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .field("local_rank", &self.inner.env.local_rank)
            .field("backend", &self.inner.backend)
            .finish()
    }
}

impl Session {
    /// Join the run described by the worker environment the launcher set, with `DISTRIBUTED.BACKEND`.
    pub fn connect(env: &WorkerEnv, config: &Config) -> Result<Self> {
        let backend = config.distributed.backend;
        let group = ProcessGroup::connect(&group::ConnectOptions::for_worker(env, backend))?;
        tracing::info!(
            rank = env.rank,
            world_size = env.world_size,
            rendezvous = %env.rendezvous,
            backend = ?backend,
            "joined the process group"
        );
        Ok(Self {
            inner: Arc::new(SessionInner {
                env: env.clone(),
                group: Arc::new(group),
                backend,
            }),
        })
    }

    /// Global rank of this process.
    pub fn rank(&self) -> usize {
        self.inner.env.rank
    }

    /// Number of processes in the run.
    pub fn world_size(&self) -> usize {
        self.inner.env.world_size
    }

    /// Rank 0 logs, checkpoints and serves metrics.
    pub fn is_primary(&self) -> bool {
        self.rank() == 0
    }

    /// Where this process sits (node, local rank, rendezvous).
    pub fn env(&self) -> &WorkerEnv {
        &self.inner.env
    }

    /// The default process group (every rank).
    pub fn group(&self) -> &Arc<ProcessGroup> {
        &self.inner.group
    }

    /// The loss context of this rank: contrastive losses gather embeddings across all ranks with
    /// [`autograd::gather_from_all`].
    pub fn loss_context(&self) -> LossContext {
        let group = self.inner.group.clone();
        let reduce_group = self.inner.group.clone();
        LossContext::distributed(
            self.rank(),
            self.world_size(),
            Box::new(move |t| autograd::gather_from_all(&group, t).map_err(|e| e.to_string())),
        )
        .with_all_reduce_sum(Box::new(move |t| {
            reduce_group.all_reduce_sum_(t).map_err(|e| e.to_string())
        }))
    }

    /// Turn the models' batch norms into SyncBatchNorm when `MODEL.SYNC_BN_CONFIG` asks for it.
    pub fn install_sync_bn(&self, config: &Config) -> Result<()> {
        sync_bn::install_for_config(self, config)
    }
}
