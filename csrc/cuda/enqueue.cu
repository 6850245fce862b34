// CUDA kernel of nnclr_fast::enqueue_ (schema, semantics and the CPU kernel: ../enqueue.cpp).
//
// Nothing here reads ptr or count on the host: both stay on the device, so a training step that
// enqueues never syncs and can be captured in a CUDA graph (a replay reads the pointer the
// previous replay left behind).
//
// Why it is race-free: two kernels are launched in order on the current stream.
//   1. enqueue_rows_kernel: one block per surviving row of x. Every block reads *ptr and none
//      writes it; surviving rows map to distinct slots, so no two blocks write the same memory.
//   2. advance_state_kernel (one thread): reads ptr and count, writes the new values.
// Kernels on one stream run in launch order, so (2) starts only after every block of (1) has
// finished reading the old ptr; any later kernel on the stream (the next lookup) sees the
// new state.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header, not ATen/cuda/CUDAContext.h (which provides the same
// getCurrentCUDAStream): that one pulls in cuBLAS/cuSPARSE headers, which a minimal toolkit
// (nvcc + cudart) lacks.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <math_constants.h>

#include <algorithm>
#include <limits>

namespace nnclr_fast {

// Defined in ../enqueue.cpp, linked into the same library.
void check_enqueue_args(
    const at::Tensor& bank,
    const at::Tensor& ptr,
    const at::Tensor& count,
    const at::Tensor& x);

namespace {

// Projection dims are 128 to 2048, i.e. 1 to 16 elements per thread.
constexpr int kThreads = 128;

template <typename bank_t, typename x_t>
__global__ void __launch_bounds__(kThreads) enqueue_rows_kernel(
    bank_t* __restrict__ bank,
    int64_t bank_s0,
    int64_t bank_s1,
    const x_t* __restrict__ x,
    int64_t x_s0,
    int64_t x_s1,
    const int64_t* __restrict__ ptr,
    int64_t first_row,
    int64_t num_slots,
    int64_t dim) {
  const int64_t p = *ptr;
  // An out-of-range ptr would turn into an out-of-bounds write below.
  CUDA_KERNEL_ASSERT_MSG(p >= 0 && p < num_slots, "enqueue_: ptr must be in [0, K)");
  const int64_t row = first_row + blockIdx.x;
  const x_t* src = x + row * x_s0;

  // The CPU kernel's arithmetic (see ../enqueue.cpp): in double the squares of float32 values
  // and their sum can neither overflow nor underflow, so the norm needs no eps and no scaling
  // pass. A block handles one row of at most a few thousand entries: the double work is small.
  double sum_sq = 0.0;
  for (int64_t j = threadIdx.x; j < dim; j += kThreads) {
    const double v = static_cast<float>(src[j * x_s1]);
    sum_sq += v * v;
  }
  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  __shared__ double norm_shared;
  const double total = BlockReduce(temp).Sum(sum_sq);
  if (threadIdx.x == 0) {
    norm_shared = sqrt(total);
  }
  __syncthreads();
  const double norm = norm_shared;
  // The CPU kernel's product with the reciprocal (not a division per element); the two differ only
  // in the order of the double sum, i.e. in a float32 result at most once in about 2^29 entries.
  const double inv_norm = 1.0 / norm;

  bank_t* dst = bank + ((p + row) % num_slots) * bank_s0;
  for (int64_t j = threadIdx.x; j < dim; j += kThreads) {
    float value;
    if (!isfinite(norm)) {
      // NaN or Inf in the row: all NaN.
      value = CUDART_NAN_F;
    } else if (norm == 0.0) {
      value = 0.f;
    } else {
      value = static_cast<float>(static_cast<float>(src[j * x_s1]) * inv_norm);
    }
    dst[j * bank_s1] = static_cast<bank_t>(value);
  }
}

__global__ void advance_state_kernel(
    int64_t* __restrict__ ptr,
    int64_t* __restrict__ count,
    int64_t batch,
    int64_t num_slots) {
  const int64_t p = *ptr;
  const int64_t c = *count;
  CUDA_KERNEL_ASSERT_MSG(c >= 0 && c <= num_slots, "enqueue_: count must be in [0, K]");
  // p < K and batch % K < K, so this cannot overflow whatever the batch size.
  *ptr = (p + batch % num_slots) % num_slots;
  *count = batch >= num_slots - c ? num_slots : c + batch;
}

void enqueue_cuda(at::Tensor bank, at::Tensor ptr, at::Tensor count, const at::Tensor& x) {
  check_enqueue_args(bank, ptr, count, x);
  const c10::cuda::CUDAGuard device_guard(bank.device());
  const int64_t num_slots = bank.size(0);
  const int64_t dim = bank.size(1);
  const int64_t batch = x.size(0);
  if (batch == 0) {
    return;
  }
  // With batch > K only the last K rows survive; skipping the others gives every slot exactly
  // one writer (see the file comment).
  const int64_t first_row = std::max<int64_t>(0, batch - num_slots);
  const int64_t rows = batch - first_row;
  TORCH_CHECK(
      rows <= std::numeric_limits<int32_t>::max(),
      "enqueue_: at most 2^31 - 1 rows per call, got ",
      rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, bank.scalar_type(), "enqueue_cuda_bank", [&] {
        using bank_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, x.scalar_type(), "enqueue_cuda_x", [&] {
              enqueue_rows_kernel<bank_t, scalar_t>
                  <<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
                      bank.data_ptr<bank_t>(),
                      bank.stride(0),
                      bank.stride(1),
                      x.const_data_ptr<scalar_t>(),
                      x.stride(0),
                      x.stride(1),
                      ptr.const_data_ptr<int64_t>(),
                      first_row,
                      num_slots,
                      dim);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      });

  advance_state_kernel<<<1, 1, 0, stream>>>(
      ptr.data_ptr<int64_t>(), count.data_ptr<int64_t>(), batch, num_slots);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

} // namespace
} // namespace nnclr_fast

TORCH_LIBRARY_IMPL(nnclr_fast, CUDA, m) {
  m.impl("enqueue_", &nnclr_fast::enqueue_cuda);
}
