//! Collectives that autograd differentiates through (C++ `torch::autograd::Function`s in the bridge).

use super::ffi;
use super::group::ProcessGroup;
use super::Result;
use tch::Tensor;

/// VISSL's `gather_from_all`: every rank's `tensor` concatenated along dim 0 in rank order (a 0-dim
/// tensor counts as one row). The backward pass sums the gathered gradient over ranks and keeps this
/// rank's rows, because every rank's loss looked at every rank's rows. Every rank must pass the same
/// shape. A group of one returns the tensor itself.
pub fn gather_from_all(group: &ProcessGroup, tensor: &Tensor) -> Result<Tensor> {
    if group.size() == 1 {
        return Ok(tensor.shallow_clone());
    }
    // SAFETY: one bridge call that hands back a new tensor.
    unsafe {
        ffi::tensor_result(|out| {
            ffi::vissl_dist_gather_from_all(group.raw(), ffi::tensor_ptr(tensor), out)
        })
    }
    .map_err(|reason| group.error("gather_from_all", reason))
}
