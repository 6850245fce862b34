// nnclr_fast::enqueue_ : append a batch of L2-normalised rows to the FIFO support queue.
//
// Schema registration and the CPU kernel live here; the CUDA kernel is in cuda/enqueue.cu and
// is compiled into the same library only when a CUDA toolkit is available (setup.py and
// nnclr_fast/ops/enqueue.py define NNCLR_FAST_WITH_CUDA then). A build without it registers no
// CUDA kernel, and nnclr_fast/ops/enqueue.py serves CUDA tensors with its PyTorch fallback.
//
// Semantics (nnclr_fast.ops.reference.reference_enqueue is the executable definition):
//   row i of x, taken as float32, is normalised as the search contract says (v / ||v|| with no
//   overflow, underflow or eps: unit length for every finite non-zero row, an all-zero row stays
//   zero, a row holding NaN or Inf becomes all NaN), rounded to float32, cast to bank's dtype and
//   written at (ptr + i) % K; then ptr = (ptr + B) % K and count = min(count + B, K). With B > K
//   rows i and i + K land on the same slot and the later one wins, so the bank ends up holding
//   the last K rows of x.

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace nnclr_fast {

// Shared by the CPU and CUDA kernels (declared again in cuda/enqueue.cu). Reads only metadata,
// so it never syncs with the device.
void check_enqueue_args(
    const at::Tensor& bank,
    const at::Tensor& ptr,
    const at::Tensor& count,
    const at::Tensor& x) {
  TORCH_CHECK_VALUE(
      bank.dim() == 2, "enqueue_: bank must be 2-D (K, D), got shape ", bank.sizes());
  const auto bank_dtype = bank.scalar_type();
  TORCH_CHECK_TYPE(
      bank_dtype == at::kFloat || bank_dtype == at::kBFloat16 || bank_dtype == at::kHalf,
      "enqueue_: bank must be float32, bfloat16 or float16, got ",
      bank_dtype);
  TORCH_CHECK_VALUE(bank.size(0) > 0, "enqueue_: bank must have at least one row (K > 0)");
  TORCH_CHECK_VALUE(bank.size(1) > 0, "enqueue_: bank must have at least one column (D > 0)");

  const auto check_state = [&bank](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(
        t.dim() == 0, "enqueue_: ", name, " must be a 0-dim tensor, got shape ", t.sizes());
    TORCH_CHECK_TYPE(
        t.scalar_type() == at::kLong, "enqueue_: ", name, " must be int64, got ", t.scalar_type());
    TORCH_CHECK_VALUE(
        t.device() == bank.device(),
        "enqueue_: ",
        name,
        " must be on bank's device (",
        bank.device(),
        "), got ",
        t.device());
  };
  check_state("ptr", ptr);
  check_state("count", count);

  TORCH_CHECK_VALUE(x.dim() == 2, "enqueue_: x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK_TYPE(
      x.is_floating_point(), "enqueue_: x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(
      x.size(1) == bank.size(1),
      "enqueue_: x must have bank's feature dim D = ",
      bank.size(1),
      ", got shape ",
      x.sizes());
  TORCH_CHECK_VALUE(
      x.device() == bank.device(),
      "enqueue_: x must be on bank's device (",
      bank.device(),
      "), got ",
      x.device());

  // Every slot must be written by exactly one row and no row may be read after another row
  // overwrote it, which aliasing would break.
  at::assert_no_internal_overlap(bank);
  at::assert_no_overlap(bank, x);
}

namespace {

template <typename bank_t, typename x_t>
void enqueue_rows_cpu(const at::Tensor& bank, const at::Tensor& x, int64_t p) {
  const int64_t num_slots = bank.size(0);
  const int64_t dim = bank.size(1);
  const int64_t batch = x.size(0);
  // Rows that a later row overwrites are skipped, so each slot is written once (keeps the
  // parallel loop race-free when batch > num_slots).
  const int64_t first = std::max<int64_t>(0, batch - num_slots);
  bank_t* bank_data = bank.data_ptr<bank_t>();
  const x_t* x_data = x.const_data_ptr<x_t>();
  const int64_t bank_s0 = bank.stride(0), bank_s1 = bank.stride(1);
  const int64_t x_s0 = x.stride(0), x_s1 = x.stride(1);

  // In double, the square of any float32 value and the sum of D of them can neither overflow
  // nor underflow: that is the contract's overflow-free norm without a scaling pass. The row scaled
  // by it is rounded to float32, then to bank_t, as the reference does.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / dim);
  at::parallel_for(first, batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const x_t* src = x_data + row * x_s0;
      // Four partial sums: the additions of one long chain would bound the loop by their latency.
      double partial[4] = {0, 0, 0, 0};
      int64_t j = 0;
      for (; j + 4 <= dim; j += 4) {
        for (int k = 0; k < 4; ++k) {
          const double v = static_cast<float>(src[(j + k) * x_s1]);
          partial[k] += v * v;
        }
      }
      for (; j < dim; ++j) {
        const double v = static_cast<float>(src[j * x_s1]);
        partial[0] += v * v;
      }
      const double norm = std::sqrt((partial[0] + partial[1]) + (partial[2] + partial[3]));
      bank_t* dst = bank_data + ((p + row) % num_slots) * bank_s0;
      // Decided once per row, so the per-element loop has no branch and can be vectorised.
      if (!std::isfinite(norm) || norm == 0) {
        const bank_t fill = static_cast<bank_t>(norm == 0 ? 0.f : std::numeric_limits<float>::quiet_NaN());
        for (int64_t c = 0; c < dim; ++c) dst[c * bank_s1] = fill;
        continue;
      }
      // A double product with the reciprocal differs from the quotient by at most one double ulp,
      // which changes the float32 result only for quotients within 2^-29 of a float32 rounding
      // boundary; a division per element would be several times slower.
      const double inv_norm = 1.0 / norm;
      for (int64_t c = 0; c < dim; ++c) {
        dst[c * bank_s1] = static_cast<bank_t>(static_cast<float>(static_cast<float>(src[c * x_s1]) * inv_norm));
      }
    }
  });
}

void enqueue_cpu(at::Tensor bank, at::Tensor ptr, at::Tensor count, const at::Tensor& x) {
  check_enqueue_args(bank, ptr, count, x);
  const int64_t num_slots = bank.size(0);
  const int64_t batch = x.size(0);
  // Host reads are free on the CPU; the CUDA kernel checks the same invariants on the device.
  const int64_t p = *ptr.const_data_ptr<int64_t>();
  const int64_t c = *count.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(
      p >= 0 && p < num_slots,
      "enqueue_: ptr must be in [0, K) = [0, ",
      num_slots,
      "), got ",
      p,
      " (corrupted queue state?)");
  TORCH_CHECK_VALUE(
      c >= 0 && c <= num_slots,
      "enqueue_: count must be in [0, K] = [0, ",
      num_slots,
      "], got ",
      c,
      " (corrupted queue state?)");
  if (batch == 0) {
    return;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, bank.scalar_type(), "enqueue_cpu_bank", [&] {
        using bank_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, x.scalar_type(), "enqueue_cpu_x", [&] {
              enqueue_rows_cpu<bank_t, scalar_t>(bank, x, p);
            });
      });

  // batch % num_slots first: p + batch could overflow for absurd batch sizes, p + (< K) cannot.
  *ptr.data_ptr<int64_t>() = (p + batch % num_slots) % num_slots;
  *count.data_ptr<int64_t>() = batch >= num_slots - c ? num_slots : c + batch;
}

// Bumps the mutated tensors' version counters, as every in-place ATen op does: autograd then
// refuses to backpropagate through a graph that saved the bank before this enqueue (nn_topk
// saves its queue) instead of silently using the new rows.
void enqueue_ad_inplace_or_view(
    c10::DispatchKeySet keys,
    at::Tensor bank,
    at::Tensor ptr,
    at::Tensor count,
    const at::Tensor& x) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nnclr_fast::enqueue_", "")
                             .typed<void(at::Tensor, at::Tensor, at::Tensor, const at::Tensor&)>();
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, bank, ptr, count, x);
  }
  bank.unsafeGetTensorImpl()->bump_version();
  ptr.unsafeGetTensorImpl()->bump_version();
  count.unsafeGetTensorImpl()->bump_version();
}

} // namespace

} // namespace nnclr_fast

TORCH_LIBRARY_FRAGMENT(nnclr_fast, m) {
  // The fake (meta) implementation is registered from Python, in this module.
  m.set_python_module("nnclr_fast.ops.enqueue");
  m.def("enqueue_(Tensor(a!) bank, Tensor(b!) ptr, Tensor(c!) count, Tensor x) -> ()");
}

TORCH_LIBRARY_IMPL(nnclr_fast, CPU, m) {
  m.impl("enqueue_", &nnclr_fast::enqueue_cpu);
}

TORCH_LIBRARY_IMPL(nnclr_fast, ADInplaceOrView, m) {
  m.impl("enqueue_", &nnclr_fast::enqueue_ad_inplace_or_view);
}

#ifdef NNCLR_FAST_AOT
// setup.py builds this file ahead of time as the Python module nnclr_fast._C: importing it
// runs the registrations above. The module itself is empty.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
