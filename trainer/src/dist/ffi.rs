//! Raw bindings to the c10d bridge (`trainer/csrc/dist_bridge.h`; keep the two in step), and the one
//! helper that turns its error strings into Rust errors.

use std::ffi::{c_char, c_void, CStr};

/// `at::Tensor*`, what tch calls `C_tensor*`.
pub type TensorPtr = *mut c_void;

/// `VisslGroup`: a c10d process group (opaque).
#[repr(C)]
pub struct Group {
    _private: [u8; 0],
}

/// `VisslWork`: an in-flight collective (opaque).
#[repr(C)]
pub struct Work {
    _private: [u8; 0],
}

/// `VisslReducer`: libtorch's DDP Reducer (opaque).
#[repr(C)]
pub struct Reducer {
    _private: [u8; 0],
}

/// `VisslReduceOp` values.
pub const REDUCE_SUM: i32 = 0;
/// See [`REDUCE_SUM`].
pub const REDUCE_MAX: i32 = 1;
/// See [`REDUCE_SUM`].
pub const REDUCE_MIN: i32 = 2;

/// `VisslConnectOptions`.
#[repr(C)]
pub struct ConnectOptions {
    pub master_addr: *const c_char,
    pub port: i32,
    pub file_store_path: *const c_char,
    pub rank: i32,
    pub world_size: i32,
    pub timeout_ms: i64,
    pub gloo_interface: *const c_char,
    pub gloo_hostname: *const c_char,
    pub nccl: i32,
    pub cuda_device: i32,
}

extern "C" {
    pub fn vissl_dist_free_string(s: *mut c_char);

    pub fn vissl_dist_connect(options: *const ConnectOptions, out: *mut *mut Group) -> *mut c_char;
    pub fn vissl_dist_subgroup(
        parent: *mut Group,
        name: *const c_char,
        rank_in_group: i32,
        group_size: i32,
        out: *mut *mut Group,
    ) -> *mut c_char;
    pub fn vissl_dist_group_free(group: *mut Group);
    pub fn vissl_dist_group_rank(group: *const Group) -> i32;
    pub fn vissl_dist_group_size(group: *const Group) -> i32;

    pub fn vissl_dist_all_reduce(
        group: *mut Group,
        tensor: TensorPtr,
        op: i32,
        out: *mut *mut Work,
    ) -> *mut c_char;
    pub fn vissl_dist_broadcast(
        group: *mut Group,
        tensor: TensorPtr,
        root: i32,
        out: *mut *mut Work,
    ) -> *mut c_char;
    pub fn vissl_dist_broadcast_coalesced(
        group: *mut Group,
        tensors: *const TensorPtr,
        n: i64,
        root: i32,
        buffer_bytes: i64,
    ) -> *mut c_char;
    pub fn vissl_dist_all_gather(
        group: *mut Group,
        input: TensorPtr,
        out: *mut TensorPtr,
    ) -> *mut c_char;
    pub fn vissl_dist_barrier(group: *mut Group) -> *mut c_char;
    pub fn vissl_dist_work_wait(work: *mut Work) -> *mut c_char;
    pub fn vissl_dist_work_free(work: *mut Work);

    pub fn vissl_dist_gather_from_all(
        group: *mut Group,
        input: TensorPtr,
        out: *mut TensorPtr,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub fn vissl_dist_sync_batch_norm(
        group: *mut Group,
        input: TensorPtr,
        weight: TensorPtr,
        bias: TensorPtr,
        running_mean: TensorPtr,
        running_var: TensorPtr,
        momentum: f64,
        eps: f64,
        out: *mut TensorPtr,
    ) -> *mut c_char;

    pub fn vissl_dist_reducer_new(
        group: *mut Group,
        params: *const TensorPtr,
        names: *const *const c_char,
        n: i64,
        bucket_bytes: i64,
        find_unused: i32,
        out: *mut *mut Reducer,
    ) -> *mut c_char;
    pub fn vissl_dist_reducer_prepare_for_forward(reducer: *mut Reducer) -> *mut c_char;
    pub fn vissl_dist_reducer_prepare_for_backward(
        reducer: *mut Reducer,
        outputs: *const TensorPtr,
        n: i64,
    ) -> *mut c_char;
    pub fn vissl_dist_reducer_rebuild_buckets(
        reducer: *mut Reducer,
        rebuilt: *mut i32,
    ) -> *mut c_char;
    pub fn vissl_dist_reducer_free(reducer: *mut Reducer);
}

/// Turns a bridge return value into `Ok` or the message it carries (and frees it).
///
/// # Safety
/// `err` must be null or a string returned by the bridge that nobody else frees.
pub unsafe fn check(err: *mut c_char) -> Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    let message = CStr::from_ptr(err).to_string_lossy().into_owned();
    vissl_dist_free_string(err);
    Err(message)
}

/// A tch tensor as the bridge sees it. The bridge never replaces the `at::Tensor` object itself
/// (collectives write into its storage), so a shared borrow is enough.
pub fn tensor_ptr(t: &tch::Tensor) -> TensorPtr {
    t.as_ptr() as TensorPtr
}

/// Runs a bridge call that hands back a new tensor through its out-pointer, and takes ownership
/// of that tensor.
///
/// # Safety
/// `call` must invoke one bridge function that, on success, stores a fresh `new at::Tensor(...)`
/// (owned by nobody else) through the pointer it is given.
pub unsafe fn tensor_result(
    call: impl FnOnce(*mut TensorPtr) -> *mut c_char,
) -> Result<tch::Tensor, String> {
    let mut out: TensorPtr = std::ptr::null_mut();
    check(call(&mut out))?;
    if out.is_null() {
        return Err("the bridge returned no tensor".into());
    }
    Ok(tch::Tensor::from_ptr(out as *mut _))
}
