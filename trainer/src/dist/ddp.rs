//! Data-parallel training as a train-loop hook (VISSL wraps its model in torch's
//! DistributedDataParallel; this hook does DDP's work at the matching events).
//!
//! * `on_start` (after a resume): every rank takes rank 0's parameters and buffers, and the ranks
//!   check they stand at the same position.
//! * Gradients are averaged over ranks in buckets of `DATA.DDP_BUCKET_CAP_MB`. By default libtorch's
//!   own DDP `Reducer` does it: autograd hooks launch each bucket's all-reduce as soon as its
//!   gradients are ready, overlapping communication with the rest of the backward pass; after the
//!   first iteration the buckets are rebuilt in the order gradients actually arrive.
//!   `DISTRIBUTED.MANUAL_GRADIENT_REDUCTION` instead all-reduces the flattened buckets after backward
//!   (all buckets in flight at once), which is also what measures the all-reduce time on its own.
//! * The logged loss is the mean over ranks: its all-reduce starts at `on_loss_and_meter` and is
//!   collected at `on_update` (by then backward has synchronised the ranks anyway), so from
//!   `on_update` on `task.last_loss` is the global mean.
//! * `on_step`: with `DISTRIBUTED.BROADCAST_BUFFERS`, rank 0's buffers (batch-norm running statistics)
//!   go to every rank before the next forward pass, as DDP does before each forward.

use super::group::{ProcessGroup, Work};
use super::{ffi, sync_bn, DistError, Result, Session};
use crate::engine::hooks::Hook;
use crate::engine::{Phase, Task};
use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// Time spent in collectives the hook runs itself (the overlapped Reducer's time is inside backward).
#[derive(Debug, Clone, Copy, Default)]
pub struct CommTimings {
    /// Explicit gradient all-reduce (manual reduction only).
    pub gradient_all_reduce: Duration,
    /// Broadcast of buffers before forward passes.
    pub buffer_broadcast: Duration,
    /// All-reduce of the logged loss.
    pub loss_all_reduce: Duration,
}

/// libtorch's DDP gradient reducer (`c10d::Reducer`) over one process group.
pub struct Reducer {
    raw: NonNull<ffi::Reducer>,
    group: Arc<ProcessGroup>,
}

// The Reducer locks internally; autograd threads call into it during backward.
unsafe impl Send for Reducer {}

impl Drop for Reducer {
    fn drop(&mut self) {
        // SAFETY: freed once, here; it removes its autograd hooks first.
        unsafe { ffi::vissl_dist_reducer_free(self.raw.as_ptr()) }
    }
}

impl Reducer {
    /// Hook `params` (the trainable parameters, in the same order on every rank) into autograd.
    /// Fails when the ranks' parameter lists differ (c10d's own check).
    pub fn new(
        group: Arc<ProcessGroup>,
        params: &[(String, Tensor)],
        bucket_bytes: i64,
    ) -> Result<Self> {
        let names = params
            .iter()
            .map(|(n, _)| {
                CString::new(n.as_str())
                    .map_err(|_| DistError::Config(format!("parameter name {n:?} has a NUL byte")))
            })
            .collect::<Result<Vec<_>>>()?;
        let name_ptrs: Vec<_> = names.iter().map(|n| n.as_ptr()).collect();
        let ptrs: Vec<_> = params.iter().map(|(_, t)| ffi::tensor_ptr(t)).collect();
        let mut raw = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call; the Reducer keeps its own tensor references.
        unsafe {
            ffi::check(ffi::vissl_dist_reducer_new(
                group.raw(),
                ptrs.as_ptr(),
                name_ptrs.as_ptr(),
                ptrs.len() as i64,
                bucket_bytes,
                0,
                &mut raw,
            ))
        }
        .map_err(|reason| group.error("DDP setup", reason))?;
        let raw = NonNull::new(raw)
            .ok_or_else(|| group.error("DDP setup", "the bridge returned no reducer".into()))?;
        Ok(Self { raw, group })
    }

    fn call(
        &self,
        op: &'static str,
        f: impl FnOnce(*mut ffi::Reducer) -> *mut std::ffi::c_char,
    ) -> Result<()> {
        // SAFETY: `raw` is live; `f` calls one bridge function on it.
        unsafe { ffi::check(f(self.raw.as_ptr())) }.map_err(|reason| self.group.error(op, reason))
    }

    /// Before a forward pass whose gradients will be reduced.
    pub fn prepare_for_forward(&self) -> Result<()> {
        // SAFETY: see `call`.
        self.call("DDP", |r| unsafe {
            ffi::vissl_dist_reducer_prepare_for_forward(r)
        })
    }

    /// After the forward pass: the next backward reduces gradients.
    pub fn prepare_for_backward(&self) -> Result<()> {
        // SAFETY: see `call`; no outputs are passed (every parameter is used every iteration).
        self.call("DDP", |r| unsafe {
            ffi::vissl_dist_reducer_prepare_for_backward(r, std::ptr::null(), 0)
        })
    }

    /// After the first backward: re-bucket in the order gradients arrived (true when it did).
    pub fn rebuild_buckets(&self) -> Result<bool> {
        let mut rebuilt = 0;
        // SAFETY: see `call`.
        self.call("DDP bucket rebuild", |r| unsafe {
            ffi::vissl_dist_reducer_rebuild_buckets(r, &mut rebuilt)
        })?;
        Ok(rebuilt != 0)
    }
}

/// Gradient buckets for the explicit reduction: parameters in reverse order (roughly the order
/// backward produces their gradients), cut when a bucket reaches the byte cap.
pub struct Buckets {
    buckets: Vec<Vec<Tensor>>,
}

impl Buckets {
    /// Bucket `params` with at most `cap_bytes` per bucket (a larger parameter gets its own).
    pub fn new(params: &[Tensor], cap_bytes: usize) -> Self {
        let mut buckets: Vec<Vec<Tensor>> = Vec::new();
        let mut current: Vec<Tensor> = Vec::new();
        let mut bytes = 0usize;
        for p in params.iter().rev() {
            let size = p.numel() * p.kind().elt_size_in_bytes();
            if !current.is_empty() && bytes + size > cap_bytes {
                buckets.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += size;
            current.push(p.shallow_clone());
        }
        if !current.is_empty() {
            buckets.push(current);
        }
        Self { buckets }
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether there is nothing to reduce.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Average every parameter's gradient over the group: flatten each bucket, start all of their
    /// all-reduces, then wait and copy the means back. A parameter without a gradient counts as zero.
    pub fn all_reduce_mean(&self, group: &ProcessGroup) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let flats: Vec<Tensor> = self
            .buckets
            .iter()
            .map(|bucket| {
                let pieces: Vec<Tensor> = bucket
                    .iter()
                    .map(|p| {
                        let g = p.grad();
                        if g.defined() {
                            g.reshape([-1])
                        } else {
                            Tensor::zeros([p.numel() as i64], (p.kind(), p.device()))
                        }
                    })
                    .collect();
                Tensor::f_cat(&pieces, 0)
            })
            .collect::<Result<_, _>>()?;
        let works = flats
            .iter()
            .map(|flat| group.all_reduce(flat, super::ReduceOp::Sum))
            .collect::<Result<Vec<_>>>()?;
        let world = group.size() as f64;
        for ((work, flat), bucket) in works.into_iter().zip(&flats).zip(&self.buckets) {
            work.wait()?;
            let mean = flat.f_div_scalar(world)?;
            let mut offset = 0i64;
            for p in bucket {
                let n = p.numel() as i64;
                let mut g = p.grad();
                if g.defined() {
                    g.copy_(&mean.narrow(0, offset, n).view_as(&g));
                }
                offset += n;
            }
        }
        Ok(())
    }
}

enum GradientReduction {
    /// libtorch's Reducer, overlapped with backward.
    Overlapped(Reducer),
    /// Flattened buckets after backward.
    Manual(Buckets),
    /// Nothing trains.
    Nothing,
}

/// The data-parallel hook of one rank.
pub struct DataParallel {
    session: Session,
    reduction: GradientReduction,
    broadcast_buffers: bool,
    /// Every model tensor by name (initial sync from rank 0).
    states: Vec<Tensor>,
    /// Model tensors that are not trained (batch-norm statistics), for BROADCAST_BUFFERS.
    buffers: Vec<Tensor>,
    /// The loss being averaged over ranks, and its all-reduce.
    pending_loss: Option<(Tensor, Work)>,
    /// Time in the hook's own collectives.
    pub timings: CommTimings,
}

impl DataParallel {
    /// Set up DDP for `task`'s model: `DATA.DDP_BUCKET_CAP_MB`, `DISTRIBUTED.BROADCAST_BUFFERS`,
    /// `DISTRIBUTED.MANUAL_GRADIENT_REDUCTION`.
    pub fn new(task: &Task, session: &Session) -> Result<Self> {
        let config = &task.config;
        let cap_mb = config.data.ddp_bucket_cap_mb;
        if !cap_mb.is_finite() || cap_mb <= 0.0 {
            return Err(DistError::Config(format!(
                "DATA.DDP_BUCKET_CAP_MB must be positive, got {cap_mb}"
            )));
        }
        let cap_bytes = (cap_mb * 1024.0 * 1024.0) as usize;
        let mut variables = task.vs.variables().into_iter().collect::<Vec<_>>();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let buffers = variables
            .iter()
            .filter(|(_, t)| !t.requires_grad())
            .map(|(_, t)| t.shallow_clone())
            .collect();
        let states = variables.iter().map(|(_, t)| t.shallow_clone()).collect();
        let mut params = task.model.trainable_parameters();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let reduction = if params.is_empty() {
            GradientReduction::Nothing
        } else if config.distributed.manual_gradient_reduction {
            let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
            GradientReduction::Manual(Buckets::new(&tensors, cap_bytes))
        } else {
            GradientReduction::Overlapped(Reducer::new(
                session.group().clone(),
                &params,
                cap_bytes as i64,
            )?)
        };
        Ok(Self {
            session: session.clone(),
            reduction,
            broadcast_buffers: config.distributed.broadcast_buffers,
            states,
            buffers,
            pending_loss: None,
            timings: CommTimings::default(),
        })
    }

    fn group(&self) -> &ProcessGroup {
        self.session.group()
    }

    /// Every rank must stand where rank 0 stands (they resumed from the same checkpoint).
    fn check_positions(&self, task: &Task) -> Result<()> {
        let mine = [
            task.iteration as i64,
            task.epoch as i64,
            task.iteration_in_epoch as i64,
        ];
        let all = self
            .group()
            .all_gather(&Tensor::from_slice(&mine).view([1, 3]))?;
        let all = Vec::<i64>::try_from(all.to_kind(Kind::Int64).reshape([-1]))?;
        let positions: Vec<&[i64]> = all.chunks(3).collect();
        if positions.iter().any(|p| *p != mine.as_slice()) {
            let listed: Vec<String> = positions
                .iter()
                .enumerate()
                .map(|(r, p)| format!("rank {r} at iteration {} (epoch {})", p[0], p[1]))
                .collect();
            return Err(DistError::Inconsistent(format!(
                "ranks resumed at different positions: {}; CHECKPOINT.DIR must be storage every rank \
                 reads (the same local folder on one machine, a shared volume or an object store across nodes)",
                listed.join(", ")
            )));
        }
        Ok(())
    }

    fn broadcast_from_primary(&self, tensors: &[Tensor]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.group().broadcast_coalesced(tensors, 0)
    }
}

impl Hook for DataParallel {
    fn on_start(&mut self, task: &mut Task) -> anyhow::Result<()> {
        self.check_positions(task)?;
        self.broadcast_from_primary(&self.states)?;
        if let GradientReduction::Overlapped(reducer) = &self.reduction {
            reducer.prepare_for_forward()?;
        }
        Ok(())
    }

    fn on_forward(&mut self, task: &mut Task) -> anyhow::Result<()> {
        if let Some(failure) = sync_bn::take_failure() {
            anyhow::bail!("{failure}");
        }
        if task.phase == Phase::Train {
            if let GradientReduction::Overlapped(reducer) = &self.reduction {
                reducer.prepare_for_backward()?;
            }
        }
        Ok(())
    }

    fn on_loss_and_meter(&mut self, task: &mut Task) -> anyhow::Result<()> {
        let loss = Tensor::from_slice(&[task.last_loss]);
        let work = self.group().all_reduce(&loss, super::ReduceOp::Sum)?;
        self.pending_loss = Some((loss, work));
        Ok(())
    }

    fn on_backward(&mut self, _task: &mut Task) -> anyhow::Result<()> {
        if let GradientReduction::Manual(buckets) = &self.reduction {
            let started = Instant::now();
            buckets.all_reduce_mean(self.group())?;
            self.timings.gradient_all_reduce += started.elapsed();
        }
        Ok(())
    }

    fn on_update(&mut self, task: &mut Task) -> anyhow::Result<()> {
        if let Some((loss, work)) = self.pending_loss.take() {
            let started = Instant::now();
            work.wait()?;
            task.last_loss = loss.f_double_value(&[0])? / self.group().size() as f64;
            self.timings.loss_all_reduce += started.elapsed();
        }
        Ok(())
    }

    fn on_step(&mut self, _task: &mut Task) -> anyhow::Result<()> {
        if self.broadcast_buffers && !self.buffers.is_empty() {
            let started = Instant::now();
            self.broadcast_from_primary(&self.buffers)?;
            self.timings.buffer_broadcast += started.elapsed();
        }
        if let GradientReduction::Overlapped(reducer) = &self.reduction {
            if reducer.rebuild_buckets()? {
                tracing::debug!("DDP buckets rebuilt in gradient order");
            }
            reducer.prepare_for_forward()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_respect_the_cap_in_reverse_parameter_order() {
        // 4-byte floats: 10, 20, 30, 5 elements = 40, 80, 120, 20 bytes; cap 100 bytes.
        let params: Vec<Tensor> = [10, 20, 30, 5]
            .iter()
            .map(|&n| Tensor::zeros([n], (Kind::Float, tch::Device::Cpu)))
            .collect();
        let buckets = Buckets::new(&params, 100);
        let sizes: Vec<Vec<i64>> = buckets
            .buckets
            .iter()
            .map(|b| b.iter().map(|t| t.numel() as i64).collect())
            .collect();
        // Reverse order: 5 (20 B) + 30 (120 B) would pass 100 -> [5], [30], then 20 + 10 = 120 B -> [20], [10].
        assert_eq!(sizes, vec![vec![5], vec![30], vec![20], vec![10]]);
        assert_eq!(Buckets::new(&params, 1 << 20).len(), 1);
    }
}
