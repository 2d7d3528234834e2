// ProcessGroupNCCL for CUDA tensors. Compiled only with the `nccl` cargo feature: its headers need CUDA
// (nvidia-cuda-runtime, -crt, -cccl and nvidia-nccl wheels' include dirs; see trainer/build.rs).

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>

c10::intrusive_ptr<c10d::Backend> vissl_make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                          int size, std::chrono::milliseconds timeout,
                                                          int cuda_device) {
  // NCCL binds communicators to the current device; each rank drives its own GPU.
  if (cuda_device >= 0) {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(cuda_device));
  }
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, options);
}
