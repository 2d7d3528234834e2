// C ABI of the c10d bridge; mirrored by trainer/src/dist/ffi.rs (keep the two in step).
//
// Functions returning `char*` return nullptr on success or a malloc'ed error message that the caller
// frees with `vissl_dist_free_string`. `at::Tensor*` is what tch calls `C_tensor*`.
#pragma once

#include <cstdint>

namespace at {
class Tensor;
}

struct VisslGroup;
struct VisslWork;
struct VisslReducer;

enum VisslReduceOp : int32_t { VISSL_REDUCE_SUM = 0, VISSL_REDUCE_MAX = 1, VISSL_REDUCE_MIN = 2 };

// Rendezvous and transport of the default process group.
struct VisslConnectOptions {
  // TCPStore host (rank 0 serves it on `port`); ignored with a file store.
  const char* master_addr;
  int32_t port;
  // Non-empty: rendezvous through a FileStore at this path instead of TCP.
  const char* file_store_path;
  int32_t rank;
  int32_t world_size;
  // Rendezvous and collective timeout.
  int64_t timeout_ms;
  // Gloo transport: bind to this interface, else to this hostname/address, else to the address this
  // machine's hostname resolves to.
  const char* gloo_interface;
  const char* gloo_hostname;
  // Non-zero: CUDA tensors go through NCCL (needs the `nccl` build).
  int32_t nccl;
  // The CUDA device this rank uses (made current before NCCL starts), or -1.
  int32_t cuda_device;
};

extern "C" {
void vissl_dist_free_string(char* s);

char* vissl_dist_connect(const VisslConnectOptions* options, VisslGroup** out);
char* vissl_dist_subgroup(VisslGroup* parent, const char* name, int32_t rank_in_group, int32_t group_size,
                          VisslGroup** out);
void vissl_dist_group_free(VisslGroup* group);
int32_t vissl_dist_group_rank(const VisslGroup* group);
int32_t vissl_dist_group_size(const VisslGroup* group);

char* vissl_dist_all_reduce(VisslGroup* group, at::Tensor* tensor, int32_t op, VisslWork** out);
char* vissl_dist_broadcast(VisslGroup* group, at::Tensor* tensor, int32_t root, VisslWork** out);
char* vissl_dist_broadcast_coalesced(VisslGroup* group, at::Tensor* const* tensors, int64_t n, int32_t root,
                                     int64_t buffer_bytes);
char* vissl_dist_all_gather(VisslGroup* group, const at::Tensor* input, at::Tensor** out);
char* vissl_dist_barrier(VisslGroup* group);
char* vissl_dist_work_wait(VisslWork* work);
void vissl_dist_work_free(VisslWork* work);

char* vissl_dist_gather_from_all(VisslGroup* group, const at::Tensor* input, at::Tensor** out);
char* vissl_dist_sync_batch_norm(VisslGroup* group, const at::Tensor* input, const at::Tensor* weight,
                                 const at::Tensor* bias, at::Tensor* running_mean, at::Tensor* running_var,
                                 double momentum, double eps, at::Tensor** out);

char* vissl_dist_reducer_new(VisslGroup* group, at::Tensor* const* params, const char* const* names, int64_t n,
                             int64_t bucket_bytes, int32_t find_unused, VisslReducer** out);
char* vissl_dist_reducer_prepare_for_forward(VisslReducer* reducer);
char* vissl_dist_reducer_prepare_for_backward(VisslReducer* reducer, at::Tensor* const* outputs, int64_t n);
char* vissl_dist_reducer_rebuild_buckets(VisslReducer* reducer, int32_t* rebuilt);
void vissl_dist_reducer_free(VisslReducer* reducer);
}
