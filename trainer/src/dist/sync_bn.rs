//! The batch norm every model builds, and SyncBatchNorm (`MODEL.SYNC_BN_CONFIG`).
//!
//! [`BatchNorm`] is tch's `nn::BatchNorm` with the same variables and the same forward, except that
//! once a distributed run installs a process group ([`install`]) its training-mode forward normalises
//! with the statistics of the whole group's batch (the bridge's SyncBatchNorm autograd function). This
//! is what VISSL's `convert_sync_bn` achieves by swapping module classes: here the models keep one
//! type and the run decides.
//!
//! A failed collective inside a forward pass cannot surface as an error there (`ModuleT` returns a
//! tensor), so the layer falls back to local statistics, stops syncing, and records the failure; the
//! data-parallel hook reports it right after the forward pass ([`take_failure`]).

use super::group::ProcessGroup;
use super::{ffi, DistError, Result, Session};
use std::borrow::Borrow;
use std::sync::{Arc, Mutex, RwLock};
use tch::nn::{self, ModuleT};
use tch::Tensor;
use vissl_crds::config::Config;

/// The installed SyncBN group of this process, if any.
static ACTIVE: RwLock<Option<Arc<ProcessGroup>>> = RwLock::new(None);

/// The first failure of a synced forward, kept until [`take_failure`].
static LAST_FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// tch's batch norm that syncs statistics across the installed group in training mode.
#[derive(Debug)]
pub struct BatchNorm {
    inner: nn::BatchNorm,
    eps: f64,
    momentum: f64,
}

/// `nn::batch_norm1d`, syncable.
pub fn batch_norm1d<'a, T: Borrow<nn::Path<'a>>>(
    vs: T,
    out_dim: i64,
    config: nn::BatchNormConfig,
) -> BatchNorm {
    let (eps, momentum) = (config.eps, config.momentum);
    BatchNorm {
        inner: nn::batch_norm1d(vs, out_dim, config),
        eps,
        momentum,
    }
}

/// `nn::batch_norm2d`, syncable.
pub fn batch_norm2d<'a, T: Borrow<nn::Path<'a>>>(
    vs: T,
    out_dim: i64,
    config: nn::BatchNormConfig,
) -> BatchNorm {
    let (eps, momentum) = (config.eps, config.momentum);
    BatchNorm {
        inner: nn::batch_norm2d(vs, out_dim, config),
        eps,
        momentum,
    }
}

impl BatchNorm {
    /// The tch layer (its running statistics, weight and bias).
    pub fn inner(&self) -> &nn::BatchNorm {
        &self.inner
    }

    fn input_fits(&self, xs: &Tensor) -> bool {
        match self.inner.nd {
            1 => matches!(xs.dim(), 2 | 3),
            2 => xs.dim() == 4,
            3 => xs.dim() == 5,
            _ => false,
        }
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if train && self.input_fits(xs) {
            if let Some(group) = active() {
                match forward_synced(&group, &self.inner, self.eps, self.momentum, xs) {
                    Ok(out) => return out,
                    Err(e) => {
                        LAST_FAILURE
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .get_or_insert_with(|| e.to_string());
                        uninstall();
                    }
                }
            }
        }
        self.inner.forward_t(xs, train)
    }
}

/// The training-mode SyncBatchNorm forward of `bn` over `group` (exposed for tests).
pub fn forward_synced(
    group: &ProcessGroup,
    bn: &nn::BatchNorm,
    eps: f64,
    momentum: f64,
    xs: &Tensor,
) -> Result<Tensor> {
    let opt_ptr = |t: &Option<Tensor>| t.as_ref().map_or(std::ptr::null_mut(), ffi::tensor_ptr);
    // SAFETY: every pointer is a live tensor (or null for an absent weight/bias) for the call; the
    // bridge updates the running statistics in place and hands back a new tensor.
    unsafe {
        ffi::tensor_result(|out| {
            ffi::vissl_dist_sync_batch_norm(
                group.raw(),
                ffi::tensor_ptr(xs),
                opt_ptr(&bn.ws),
                opt_ptr(&bn.bs),
                ffi::tensor_ptr(&bn.running_mean),
                ffi::tensor_ptr(&bn.running_var),
                momentum,
                eps,
                out,
            )
        })
    }
    .map_err(|reason| group.error("SyncBatchNorm", reason))
}

fn active() -> Option<Arc<ProcessGroup>> {
    ACTIVE.read().ok().and_then(|g| g.clone())
}

/// Make every [`BatchNorm`] of this process sync over `group` in training mode.
pub fn install(group: Arc<ProcessGroup>) {
    if let Ok(mut active) = ACTIVE.write() {
        *active = Some(group);
    }
}

/// Back to local batch statistics.
pub fn uninstall() {
    if let Ok(mut active) = ACTIVE.write() {
        active.take();
    }
}

/// Whether batch norms sync now.
pub fn is_active() -> bool {
    active().is_some()
}

/// The first collective failure a synced batch norm hit since the last call (it then stopped syncing).
pub fn take_failure() -> Option<String> {
    LAST_FAILURE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take()
}

/// VISSL's `split_world_in_process_groups`: consecutive ranks in chunks of `group_size` (the last
/// chunk may be smaller).
pub fn split_world_in_process_groups(world_size: usize, group_size: usize) -> Vec<Vec<usize>> {
    let size = group_size.max(1);
    (0..world_size)
        .collect::<Vec<_>>()
        .chunks(size)
        .map(<[usize]>::to_vec)
        .collect()
}

/// The SyncBN group size `MODEL.SYNC_BN_CONFIG.GROUP_SIZE` means: -1 the ranks of one node, 0 every
/// rank, n > 0 groups of n ranks (at most the world).
pub fn effective_group_size(
    group_size: i64,
    world_size: usize,
    nproc_per_node: usize,
) -> Result<usize> {
    match group_size {
        -1 => Ok(nproc_per_node.min(world_size).max(1)),
        0 => Ok(world_size),
        n if n > 0 => Ok((n as usize).min(world_size)),
        n => Err(DistError::Config(format!(
            "MODEL.SYNC_BN_CONFIG.GROUP_SIZE must be -1 (one node), 0 (all ranks) or positive, got {n}"
        ))),
    }
}

/// Installs SyncBN as `MODEL.SYNC_BN_CONFIG` says (nothing when CONVERT_BN_TO_SYNC_BN is false or the
/// group would hold a single rank).
pub(super) fn install_for_config(session: &Session, config: &Config) -> Result<()> {
    let sync = &config.model.sync_bn_config;
    if !sync.convert_bn_to_sync_bn {
        return Ok(());
    }
    if !matches!(sync.sync_bn_type.as_str(), "pytorch" | "apex") {
        return Err(DistError::Config(format!(
            "MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE must be pytorch or apex (both mean libtorch's c10d here), got `{}`",
            sync.sync_bn_type
        )));
    }
    let world = session.world_size();
    let size = effective_group_size(sync.group_size, world, session.env().local_world_size)?;
    let groups = split_world_in_process_groups(world, size);
    let rank = session.rank();
    let (index, members) = groups
        .iter()
        .enumerate()
        .find(|(_, g)| g.contains(&rank))
        .ok_or_else(|| DistError::Config(format!("rank {rank} is in no SyncBN group")))?;
    let group = if members.len() == world {
        session.group().clone()
    } else if members.len() == 1 {
        tracing::info!(rank, "SyncBN group of one rank: local batch statistics");
        return Ok(());
    } else {
        let rank_in_group = members.iter().position(|&r| r == rank).unwrap_or(0);
        Arc::new(session.group().subgroup(
            &format!("sync_bn_{index}"),
            rank_in_group,
            members.len(),
        )?)
    };
    tracing::info!(
        group_size = members.len(),
        groups = groups.len(),
        "batch norms sync statistics across ranks (SyncBatchNorm)"
    );
    install(group);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_world_as_vissl_does() {
        // The examples of VISSL's split_world_in_process_groups docstring.
        assert_eq!(
            split_world_in_process_groups(9, 3),
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8]]
        );
        assert_eq!(
            split_world_in_process_groups(9, 4),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8]]
        );
        assert_eq!(split_world_in_process_groups(15, 4).len(), 4);
        assert_eq!(split_world_in_process_groups(15, 4)[3], vec![12, 13, 14]);
    }

    #[test]
    fn group_size_follows_the_docs() {
        // 2 nodes x 4 ranks: -1 is a node, 0 the world, n capped at the world.
        assert_eq!(effective_group_size(-1, 8, 4).ok(), Some(4));
        assert_eq!(effective_group_size(0, 8, 4).ok(), Some(8));
        assert_eq!(effective_group_size(2, 8, 4).ok(), Some(2));
        assert_eq!(effective_group_size(64, 8, 4).ok(), Some(8));
        assert!(effective_group_size(-2, 8, 4).is_err());
    }

    #[test]
    fn without_a_group_it_is_tch_batch_norm() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        // Fixed affine parameters (tch's default weight init is random).
        let config = || nn::BatchNormConfig {
            ws_init: nn::Init::Const(1.5),
            bs_init: nn::Init::Const(-0.5),
            ..Default::default()
        };
        let ours = batch_norm2d(vs.root() / "a", 3, config());
        let theirs = nn::batch_norm2d(vs.root() / "b", 3, config());
        let x = Tensor::randn([4, 3, 5, 5], (tch::Kind::Float, tch::Device::Cpu));
        let diff = (ours.forward_t(&x, true) - theirs.forward_t(&x, true))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        let diff = (ours.inner().running_mean.shallow_clone() - &theirs.running_mean)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-7, "{diff}");
    }
}
