// The C ABI between vissl-rs (trainer/src/dist/ffi.rs) and libtorch's c10d: rendezvous stores, process
// groups (Gloo, and NCCL when built with the `nccl` feature), collectives, DDP's Reducer, and the two
// autograd-aware pieces tch cannot express (a differentiable all-gather and SyncBatchNorm).
//
// Contract of every `vissl_dist_*` function returning `char*`: nullptr on success, otherwise a
// malloc'ed, NUL-terminated error message the caller releases with `vissl_dist_free_string`. No C++
// exception ever crosses this boundary. Tensors cross it as `at::Tensor*` (what tch's `C_tensor` is);
// a tensor handed back is heap-allocated and owned by the caller (tch frees it with `delete`).

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "dist_bridge.h"

namespace {

using c10d::ProcessGroup;
using Millis = std::chrono::milliseconds;

char* copy_message(const std::string& message) {
  char* out = static_cast<char*>(std::malloc(message.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, message.c_str(), message.size() + 1);
  }
  return out;
}

// Runs `body`, turning every exception into an error string (c10::Error without its C++ backtrace,
// which would bury libtorch's message under hundreds of frames).
template <typename F>
char* guarded(const char* what, F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(std::string(what) + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(std::string(what) + ": " + e.what());
  } catch (...) {
    return copy_message(std::string(what) + ": unknown C++ exception");
  }
}

// Autograd nodes outlive the Rust call that created them, so they refer to process groups by id
// through this registry instead of by pointer; a group freed while a graph still uses it becomes a
// clear error in backward instead of a dangling pointer.
std::mutex registry_mutex;
std::unordered_map<int64_t, c10::intrusive_ptr<ProcessGroup>> group_registry;
int64_t next_group_id = 1;

c10::intrusive_ptr<ProcessGroup> lookup_group(int64_t id) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = group_registry.find(id);
  TORCH_CHECK(it != group_registry.end(), "process group ", id, " was already destroyed");
  return it->second;
}

at::Tensor* new_tensor(at::Tensor t) { return new at::Tensor(std::move(t)); }

// Waits for a collective; a `false` from wait() (timeout without exception) becomes an error too.
void wait_for(const c10::intrusive_ptr<c10d::Work>& work, Millis timeout, const char* op) {
  if (!work->wait(timeout)) {
    TORCH_CHECK(false, op, " did not complete within ", timeout.count(), " ms");
  }
}

void all_reduce_sum_blocking(const c10::intrusive_ptr<ProcessGroup>& pg, at::Tensor& t, Millis timeout) {
  std::vector<at::Tensor> tensors{t};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  opts.timeout = timeout;
  wait_for(pg->allreduce(tensors, opts), timeout, "all_reduce");
}

// Every rank's `input` (same shape everywhere), concatenated along dim 0 in rank order.
at::Tensor all_gather_cat(const c10::intrusive_ptr<ProcessGroup>& pg, const at::Tensor& input, Millis timeout) {
  at::Tensor local = input.contiguous();
  std::vector<at::Tensor> pieces;
  pieces.reserve(pg->getSize());
  for (int i = 0; i < pg->getSize(); ++i) {
    pieces.push_back(at::empty_like(local));
  }
  std::vector<std::vector<at::Tensor>> outputs{pieces};
  std::vector<at::Tensor> inputs{local};
  c10d::AllgatherOptions opts;
  opts.timeout = timeout;
  wait_for(pg->allgather(outputs, inputs, opts), timeout, "all_gather");
  return at::cat(outputs[0], 0);
}

// VISSL's gather_from_all: forward concatenates every rank's rows; backward sums the incoming
// gradient over ranks (each rank's loss looked at every rank's rows) and keeps this rank's slice.
class GatherFromAll : public torch::autograd::Function<GatherFromAll> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, int64_t group_id,
                            int64_t timeout_ms) {
    auto pg = lookup_group(group_id);
    ctx->saved_data["group"] = group_id;
    ctx->saved_data["timeout"] = timeout_ms;
    ctx->saved_data["rows"] = input.size(0);
    ctx->saved_data["rank"] = static_cast<int64_t>(pg->getRank());
    return all_gather_cat(pg, input, Millis(timeout_ms));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto pg = lookup_group(ctx->saved_data["group"].toInt());
    int64_t rows = ctx->saved_data["rows"].toInt();
    int64_t rank = ctx->saved_data["rank"].toInt();
    at::Tensor summed = grads[0].contiguous().clone();
    all_reduce_sum_blocking(pg, summed, Millis(ctx->saved_data["timeout"].toInt()));
    return {summed.narrow(0, rank * rows, rows), at::Tensor(), at::Tensor()};
  }
};

// The dims a batch norm reduces over: all but the channel dim 1.
std::vector<int64_t> stat_dims(const at::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) {
    dims.push_back(d);
  }
  return dims;
}

// A per-channel vector shaped to broadcast against `x` ([1, C, 1, ...]).
at::Tensor per_channel(const at::Tensor& v, const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = v.numel();
  return v.view(shape);
}

// SyncBatchNorm in training mode. Each rank computes its per-channel mean and biased variance;
// all-gathering (count, mean, var) and combining them in float64 (Chan et al.'s parallel variance)
// gives the statistics of the whole group's batch without the cancellation of sum / sum-of-squares.
// Backward all-reduces the two per-channel sums the input gradient needs; the weight and bias
// gradients stay local, as DDP averages them across ranks afterwards.
class SyncBatchNormFunction : public torch::autograd::Function<SyncBatchNormFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const at::Tensor& bias, at::Tensor running_mean,
                            at::Tensor running_var, double momentum, double eps, int64_t group_id,
                            int64_t timeout_ms) {
    auto pg = lookup_group(group_id);
    TORCH_CHECK(input.dim() >= 2, "SyncBatchNorm expects [N, C, ...] input, got ", input.sizes());
    const int64_t channels = input.size(1);
    const auto dims = stat_dims(input);
    at::Tensor x = input.scalar_type() == at::kDouble ? input : input.to(at::kFloat);
    auto [local_var, local_mean] = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/false);
    const double local_count = static_cast<double>(input.numel() / std::max<int64_t>(channels, 1));
    at::Tensor stats = at::cat({local_mean.to(at::kDouble), local_var.to(at::kDouble),
                                at::full({1}, local_count, local_mean.options().dtype(at::kDouble))});
    at::Tensor gathered = all_gather_cat(pg, stats.unsqueeze(0), Millis(timeout_ms));
    at::Tensor counts = gathered.select(1, 2 * channels).unsqueeze(1);  // [W, 1]
    at::Tensor means = gathered.narrow(1, 0, channels);                // [W, C]
    at::Tensor vars = gathered.narrow(1, channels, channels);          // [W, C]
    const double total = counts.sum().item<double>();
    TORCH_CHECK(total > 1, "SyncBatchNorm needs more than 1 value per channel across the group when training, got ",
                total);
    at::Tensor mean = (counts * means).sum(0) / total;
    at::Tensor var = (counts * (vars + (means - mean).pow(2))).sum(0) / total;
    at::Tensor invstd = (var + eps).rsqrt();

    {
      at::NoGradGuard no_grad;
      if (running_mean.defined()) {
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
      }
      if (running_var.defined()) {
        at::Tensor unbiased = var * (total / (total - 1));
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.scalar_type()), momentum);
      }
    }

    at::Tensor mean_x = mean.to(x.scalar_type());
    at::Tensor invstd_x = invstd.to(x.scalar_type());
    at::Tensor scale = weight.defined() ? invstd_x * weight.to(x.scalar_type()) : invstd_x;
    at::Tensor out = (x - per_channel(mean_x, x)) * per_channel(scale, x);
    if (bias.defined()) {
      out = out + per_channel(bias.to(x.scalar_type()), x);
    }
    ctx->save_for_backward({input, weight, mean_x, invstd_x});
    ctx->saved_data["group"] = group_id;
    ctx->saved_data["timeout"] = timeout_ms;
    ctx->saved_data["total"] = total;
    ctx->saved_data["has_bias"] = bias.defined();
    return out.to(input.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& mean = saved[2];
    const at::Tensor& invstd = saved[3];
    auto pg = lookup_group(ctx->saved_data["group"].toInt());
    const double total = ctx->saved_data["total"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();

    at::Tensor x = input.to(mean.scalar_type());
    at::Tensor grad_out = grads[0].to(mean.scalar_type());
    const auto dims = stat_dims(x);
    at::Tensor xmu = x - per_channel(mean, x);
    at::Tensor sum_dy = grad_out.sum(dims);
    at::Tensor sum_dy_xmu = (grad_out * xmu).sum(dims);
    at::Tensor grad_weight = weight.defined() ? (sum_dy_xmu * invstd).to(weight.scalar_type()) : at::Tensor();
    at::Tensor grad_bias = has_bias ? sum_dy.to(weight.defined() ? weight.scalar_type() : sum_dy.scalar_type())
                                    : at::Tensor();

    at::Tensor sums = at::cat({sum_dy, sum_dy_xmu}).contiguous();
    all_reduce_sum_blocking(pg, sums, Millis(ctx->saved_data["timeout"].toInt()));
    const int64_t channels = mean.numel();
    at::Tensor mean_dy = sums.narrow(0, 0, channels) / total;
    at::Tensor mean_dy_xmu = sums.narrow(0, channels, channels) / total;
    at::Tensor scale = weight.defined() ? invstd * weight.to(invstd.scalar_type()) : invstd;
    at::Tensor grad_input = (grad_out - per_channel(mean_dy, x) - xmu * per_channel(invstd * invstd * mean_dy_xmu, x)) *
                            per_channel(scale, x);
    return {grad_input.to(input.scalar_type()),
            grad_weight,
            grad_bias,
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

std::vector<at::Tensor> tensor_list(at::Tensor* const* tensors, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(*tensors[i]);
  }
  return out;
}

}  // namespace

// The C-visible handles.
struct VisslGroup {
  int64_t id = 0;
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<ProcessGroup> pg;
  std::shared_ptr<::gloo::transport::Device> gloo_device;
  bool nccl = false;
  int cuda_device = -1;
  Millis timeout{0};
};

struct VisslWork {
  c10::intrusive_ptr<c10d::Work> work;
  Millis timeout{0};
};

struct VisslReducer {
  std::unique_ptr<c10d::Reducer> reducer;
};

#ifdef VISSL_WITH_NCCL
// Defined in nccl_backend.cpp, compiled only with the `nccl` cargo feature.
c10::intrusive_ptr<c10d::Backend> vissl_make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                          int size, Millis timeout, int cuda_device);
#endif

namespace {

// A process group over `store` with Gloo for CPU tensors and, when asked, NCCL for CUDA tensors (else
// Gloo for those too, as torch.distributed's gloo backend).
VisslGroup* make_group(const c10::intrusive_ptr<c10d::Store>& base_store, const std::string& name, int rank, int size,
                       bool nccl, int cuda_device, const std::shared_ptr<::gloo::transport::Device>& device,
                       Millis timeout) {
  auto store = c10::make_intrusive<c10d::PrefixStore>(name + "/", base_store);
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  options->devices.push_back(device);
  auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
  auto pg = c10::make_intrusive<ProcessGroup>(store, rank, size);
  pg->setBackend(c10::DeviceType::CPU, ProcessGroup::BackendType::GLOO, gloo);
  pg->setDefaultBackend(ProcessGroup::BackendType::GLOO);
  if (nccl) {
#ifdef VISSL_WITH_NCCL
    auto backend = vissl_make_nccl_backend(store, rank, size, timeout, cuda_device);
    pg->setBackend(c10::DeviceType::CUDA, ProcessGroup::BackendType::NCCL, backend);
    pg->setDefaultBackend(ProcessGroup::BackendType::NCCL);
#else
    TORCH_CHECK(false,
                "DISTRIBUTED.BACKEND is nccl but this vissl was built without NCCL; rebuild with "
                "`cargo build --features nccl` (needs the CUDA libtorch headers) or use gloo");
#endif
  } else {
    pg->setBackend(c10::DeviceType::CUDA, ProcessGroup::BackendType::GLOO, gloo);
  }
  pg->setGroupName(name);
  auto group = std::make_unique<VisslGroup>();
  group->store = base_store;
  group->pg = pg;
  group->gloo_device = device;
  group->nccl = nccl;
  group->cuda_device = cuda_device;
  group->timeout = timeout;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    group->id = next_group_id++;
    group_registry[group->id] = pg;
  }
  return group.release();
}

}  // namespace

extern "C" {

void vissl_dist_free_string(char* s) { std::free(s); }

char* vissl_dist_connect(const VisslConnectOptions* o, VisslGroup** out) {
  *out = nullptr;
  return guarded("connecting the process group", [&] {
    Millis timeout(o->timeout_ms);
    c10::intrusive_ptr<c10d::Store> store;
    if (o->file_store_path != nullptr && o->file_store_path[0] != '\0') {
      store = c10::make_intrusive<c10d::FileStore>(o->file_store_path, o->world_size);
      store->setTimeout(timeout);
    } else {
      c10d::TCPStoreOptions opts;
      opts.port = static_cast<std::uint16_t>(o->port);
      opts.isServer = o->rank == 0;
      opts.numWorkers = static_cast<std::size_t>(o->world_size);
      opts.waitWorkers = true;
      opts.timeout = timeout;
      store = c10::make_intrusive<c10d::TCPStore>(o->master_addr, opts);
    }
    std::shared_ptr<::gloo::transport::Device> device;
    if (o->gloo_interface != nullptr && o->gloo_interface[0] != '\0') {
      device = c10d::ProcessGroupGloo::createDeviceForInterface(o->gloo_interface);
    } else if (o->gloo_hostname != nullptr && o->gloo_hostname[0] != '\0') {
      device = c10d::ProcessGroupGloo::createDeviceForHostname(o->gloo_hostname);
    } else {
      device = c10d::ProcessGroupGloo::createDefaultDevice();
    }
    *out = make_group(store, "default_pg", o->rank, o->world_size, o->nccl != 0, o->cuda_device, device, timeout);
  });
}

char* vissl_dist_subgroup(VisslGroup* parent, const char* name, int32_t rank_in_group, int32_t group_size,
                          VisslGroup** out) {
  *out = nullptr;
  return guarded("creating a process subgroup", [&] {
    *out = make_group(parent->store, name, rank_in_group, group_size, parent->nccl, parent->cuda_device,
                      parent->gloo_device, parent->timeout);
  });
}

void vissl_dist_group_free(VisslGroup* group) {
  if (group == nullptr) {
    return;
  }
  try {
    std::lock_guard<std::mutex> lock(registry_mutex);
    group_registry.erase(group->id);
  } catch (...) {
  }
  try {
    delete group;
  } catch (...) {
  }
}

int32_t vissl_dist_group_rank(const VisslGroup* group) { return group->pg->getRank(); }

int32_t vissl_dist_group_size(const VisslGroup* group) { return group->pg->getSize(); }

char* vissl_dist_all_reduce(VisslGroup* group, at::Tensor* tensor, int32_t op, VisslWork** out) {
  *out = nullptr;
  return guarded("all_reduce", [&] {
    c10d::AllreduceOptions opts;
    switch (op) {
      case VISSL_REDUCE_SUM:
        opts.reduceOp = c10d::ReduceOp::SUM;
        break;
      case VISSL_REDUCE_MAX:
        opts.reduceOp = c10d::ReduceOp::MAX;
        break;
      case VISSL_REDUCE_MIN:
        opts.reduceOp = c10d::ReduceOp::MIN;
        break;
      default:
        TORCH_CHECK(false, "unknown reduce op ", op);
    }
    opts.timeout = group->timeout;
    TORCH_CHECK(tensor->is_contiguous(), "all_reduce needs a contiguous tensor");
    std::vector<at::Tensor> tensors{*tensor};
    auto work = group->pg->allreduce(tensors, opts);
    *out = new VisslWork{work, group->timeout};
  });
}

char* vissl_dist_broadcast(VisslGroup* group, at::Tensor* tensor, int32_t root, VisslWork** out) {
  *out = nullptr;
  return guarded("broadcast", [&] {
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = group->timeout;
    TORCH_CHECK(tensor->is_contiguous(), "broadcast needs a contiguous tensor");
    std::vector<at::Tensor> tensors{*tensor};
    auto work = group->pg->broadcast(tensors, opts);
    *out = new VisslWork{work, group->timeout};
  });
}

char* vissl_dist_broadcast_coalesced(VisslGroup* group, at::Tensor* const* tensors, int64_t n, int32_t root,
                                     int64_t buffer_bytes) {
  return guarded("broadcast of parameters and buffers", [&] {
    auto list = tensor_list(tensors, n);
    if (!list.empty()) {
      c10d::broadcast_coalesced(group->pg, list, static_cast<size_t>(buffer_bytes), root);
    }
  });
}

char* vissl_dist_all_gather(VisslGroup* group, const at::Tensor* input, at::Tensor** out) {
  *out = nullptr;
  return guarded("all_gather", [&] { *out = new_tensor(all_gather_cat(group->pg, *input, group->timeout)); });
}

char* vissl_dist_barrier(VisslGroup* group) {
  return guarded("barrier", [&] {
    c10d::BarrierOptions opts;
    opts.timeout = group->timeout;
    wait_for(group->pg->barrier(opts), group->timeout, "barrier");
  });
}

char* vissl_dist_work_wait(VisslWork* work) {
  return guarded("waiting for a collective", [&] { wait_for(work->work, work->timeout, "collective"); });
}

void vissl_dist_work_free(VisslWork* work) {
  try {
    delete work;
  } catch (...) {
  }
}

char* vissl_dist_gather_from_all(VisslGroup* group, const at::Tensor* input, at::Tensor** out) {
  *out = nullptr;
  return guarded("gather_from_all", [&] {
    at::Tensor x = input->dim() == 0 ? input->unsqueeze(0) : *input;
    *out = new_tensor(GatherFromAll::apply(x, group->id, static_cast<int64_t>(group->timeout.count())));
  });
}

char* vissl_dist_sync_batch_norm(VisslGroup* group, const at::Tensor* input, const at::Tensor* weight,
                                 const at::Tensor* bias, at::Tensor* running_mean, at::Tensor* running_var,
                                 double momentum, double eps, at::Tensor** out) {
  *out = nullptr;
  return guarded("SyncBatchNorm", [&] {
    at::Tensor w = weight != nullptr ? *weight : at::Tensor();
    at::Tensor b = bias != nullptr ? *bias : at::Tensor();
    at::Tensor rm = running_mean != nullptr ? *running_mean : at::Tensor();
    at::Tensor rv = running_var != nullptr ? *running_var : at::Tensor();
    *out = new_tensor(SyncBatchNormFunction::apply(*input, w, b, rm, rv, momentum, eps, group->id,
                                                   static_cast<int64_t>(group->timeout.count())));
  });
}

char* vissl_dist_reducer_new(VisslGroup* group, at::Tensor* const* params, const char* const* names, int64_t n,
                             int64_t bucket_bytes, int32_t find_unused, VisslReducer** out) {
  *out = nullptr;
  return guarded("creating the DDP reducer", [&] {
    auto list = tensor_list(params, n);
    TORCH_CHECK(!list.empty(), "DDP needs at least one trainable parameter");
    c10d::verify_params_across_processes(group->pg, list, std::nullopt);
    std::unordered_map<size_t, std::string> param_names;
    for (int64_t i = 0; i < n; ++i) {
      param_names[static_cast<size_t>(i)] = names[i];
    }
    // As torch's DistributedDataParallel: the first iteration runs with one bucket (parameter order
    // need not be backward order); after it the Reducer rebuilds buckets in the order gradients
    // actually became ready, capped at `bucket_bytes`.
    std::vector<size_t> limits{std::numeric_limits<size_t>::max() / 2};
    auto assignment = c10d::compute_bucket_assignment_by_size(list, limits, std::vector<bool>(list.size(), false));
    auto buckets = std::get<0>(assignment);
    std::reverse(buckets.begin(), buckets.end());
    auto reducer = std::make_unique<c10d::Reducer>(
        list, buckets, group->pg, std::vector<bool>(list.size(), false), bucket_bytes, find_unused != 0,
        /*gradient_as_bucket_view=*/false, param_names, /*first_bucket_bytes_cap=*/bucket_bytes,
        /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
        /*bucket_bytes_cap_list=*/std::vector<int64_t>{});
    *out = new VisslReducer{std::move(reducer)};
  });
}

char* vissl_dist_reducer_prepare_for_forward(VisslReducer* r) {
  return guarded("DDP prepare_for_forward", [&] { r->reducer->prepare_for_forward(); });
}

char* vissl_dist_reducer_prepare_for_backward(VisslReducer* r, at::Tensor* const* outputs, int64_t n) {
  return guarded("DDP prepare_for_backward", [&] { r->reducer->prepare_for_backward(tensor_list(outputs, n)); });
}

char* vissl_dist_reducer_rebuild_buckets(VisslReducer* r, int32_t* rebuilt) {
  *rebuilt = 0;
  return guarded("DDP bucket rebuild", [&] { *rebuilt = r->reducer->rebuild_buckets() ? 1 : 0; });
}

void vissl_dist_reducer_free(VisslReducer* r) {
  try {
    delete r;
  } catch (...) {
  }
}

}  // extern "C"
