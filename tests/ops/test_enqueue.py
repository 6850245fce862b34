"""The enqueue op against reference_enqueue: torch.ops.nnclr_fast.enqueue_ (C++ CPU kernel, CUDA
kernel on a GPU) and its plain-PyTorch fallback (nnclr_fast.ops.enqueue.enqueue_torch), which
must behave the same wherever the fallback can run."""

import logging
import shutil

import pytest
import torch

import nnclr_fast  # noqa: F401  (registers the Python-defined ops of the nnclr_fast namespace)
from nnclr_fast.ops import enqueue as enqueue_op
from nnclr_fast.ops import extension
from nnclr_fast.ops.reference import reference_enqueue

BANK_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
X_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Batch sizes per (K, sequence): wrap-around, B == K, B > K (several times K), B == 1.
SEQUENCES = [
    (1, [1, 1, 3, 1, 2]),
    (5, [2, 2, 2, 5, 1, 7, 13, 3, 4, 5, 5]),
    (16, [3, 7, 6, 16, 1, 40, 9, 9, 9, 2, 15, 17]),
]


@pytest.fixture(scope="module")
def enqueue_():
    enqueue_op.load_extension()
    return torch.ops.nnclr_fast.enqueue_


@pytest.fixture(params=["op", "torch_fallback"])
def any_enqueue(request, enqueue_):
    """The registered op, then the plain-PyTorch fallback called directly."""
    return enqueue_ if request.param == "op" else enqueue_op.enqueue_torch


def atol(dtype):
    # Rows are unit vectors: one ulp at magnitude 1 bounds the rounding differences that a
    # different float32 summation order can cause, and is far below any misplaced row.
    return torch.finfo(dtype).eps


def check_state(bank, ptr, count, ref):
    ref_bank, ref_ptr, ref_count = ref
    assert ptr.dtype == torch.int64 and ptr.dim() == 0
    assert count.dtype == torch.int64 and count.dim() == 0
    assert int(ptr) == int(ref_ptr)
    assert int(count) == int(ref_count)
    assert bank.dtype == ref_bank.dtype
    torch.testing.assert_close(bank.cpu(), ref_bank.cpu(), atol=atol(bank.dtype), rtol=0)


def random_batch(batch, dim, dtype, generator, device="cpu"):
    scale = float(torch.empty(()).uniform_(0.01, 100.0, generator=generator))
    return (torch.randn(batch, dim, generator=generator) * scale).to(device=device, dtype=dtype)


def run_sequence(enqueue_, num_slots, batches, bank_dtype, x_dtype, dim=7, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # Non-zero sentinel contents (far outside [-1, 1]) expose any slot written by mistake.
    bank = (torch.randn(num_slots, dim, generator=g) * 10).to(device=device, dtype=bank_dtype)
    ptr = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    ref = (bank.cpu().clone(), ptr.cpu().clone(), count.cpu().clone())
    for batch in batches:
        x = random_batch(batch, dim, x_dtype, g, device)
        ref = reference_enqueue(*ref, x.cpu())
        enqueue_(bank, ptr, count, x)
        check_state(bank, ptr, count, ref)
    return bank, ptr, count


@pytest.mark.parametrize("num_slots,batches", SEQUENCES)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
def test_matches_reference(any_enqueue, num_slots, batches, bank_dtype, x_dtype):
    run_sequence(any_enqueue, num_slots, batches, bank_dtype, x_dtype)


def test_long_random_sequence(any_enqueue):
    g = torch.Generator().manual_seed(1)
    for num_slots in (1, 2, 9, 64):
        batches = torch.randint(1, 3 * num_slots + 2, (40,), generator=g).tolist()
        for bank_dtype in BANK_DTYPES:
            run_sequence(any_enqueue, num_slots, batches, bank_dtype, torch.float32, dim=5, seed=num_slots)


def test_exact_pointer_arithmetic(any_enqueue):
    bank, ptr, count = torch.zeros(10, 3), torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    expected = [(3, 3, 3), (4, 7, 7), (3, 0, 10), (10, 0, 10), (25, 5, 10), (1, 6, 10)]
    for batch, want_ptr, want_count in expected:
        any_enqueue(bank, ptr, count, torch.randn(batch, 3))
        assert (int(ptr), int(count)) == (want_ptr, want_count)


def test_batch_larger_than_queue_keeps_last_rows(any_enqueue):
    bank, ptr, count = torch.zeros(4, 2), torch.tensor(1), torch.tensor(1)
    x = torch.arange(1, 23, dtype=torch.float32).reshape(11, 2)
    any_enqueue(bank, ptr, count, x)
    # Row i goes to (1 + i) % 4: the last four rows 7..10 land in slots 0, 1, 2, 3.
    expected = torch.nn.functional.normalize(x[7:], dim=1)
    torch.testing.assert_close(bank, expected, atol=1e-7, rtol=0)
    assert (int(ptr), int(count)) == ((1 + 11) % 4, 4)


def test_large_batch_uses_parallel_rows(any_enqueue):
    # Enough rows for at::parallel_for to split the work across threads.
    run_sequence(any_enqueue, 1000, [3000, 700, 1999], torch.float32, torch.float32, dim=64)


def test_zero_rows_stay_zero(any_enqueue):
    bank, ptr, count = torch.ones(3, 4), torch.tensor(0), torch.tensor(0)
    any_enqueue(bank, ptr, count, torch.zeros(2, 4))
    assert torch.equal(bank[:2], torch.zeros(2, 4))
    assert not bank.isnan().any()


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
def test_rows_of_any_scale_are_stored_as_unit_rows(any_enqueue, bank_dtype, x_dtype):
    # The search contract's normalisation: no overflow (1e20^2 in float32), no underflow
    # (1e-30^2), no eps; zero rows stay zero, rows holding NaN or Inf become all NaN.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 24, generator=g, dtype=torch.float64)
    scales = [1e-30, 1e-20, 1e-5, 1.0, 1e5, 1e20, 1e30, 3e37, 0.0, 1.0, 1.0, 1.0]
    x = x * torch.tensor(scales, dtype=torch.float64)[:, None]
    x[9, 3] = float("nan")
    x[10, 0] = float("inf")
    x[11, 5] = float("-inf")
    finite = torch.isfinite(x.to(x_dtype).float()).all(dim=1) & (x.to(x_dtype).float().abs().amax(dim=1) > 0)
    bank, ptr, count = torch.ones(12, 24, dtype=bank_dtype), torch.tensor(0), torch.tensor(0)
    ref = reference_enqueue(bank, ptr, count, x.to(x_dtype))
    any_enqueue(bank, ptr, count, x.to(x_dtype))
    assert torch.equal(bank.isnan(), ref[0].isnan())
    torch.testing.assert_close(bank.nan_to_num(7.0), ref[0].nan_to_num(7.0), atol=torch.finfo(bank_dtype).eps, rtol=0)
    norms = bank[finite].double().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=4 * torch.finfo(bank_dtype).eps, rtol=0)
    assert bank[9:].isnan().all()
    zero = x.to(x_dtype).float().abs().amax(dim=1) == 0
    assert zero[8] and (bank[zero] == 0).all()


@pytest.mark.parametrize(
    "ptr,count,match",
    [
        (5, 5, r"ptr must be in \[0, K\) = \[0, 5\), got 5"),
        (-1, 2, "got -1"),
        (10**9, 5, "got 1000000000"),
        (2, -5, r"count must be in \[0, K\] = \[0, 5\], got -5"),
        (0, 6, "got 6"),
    ],
)
def test_corrupted_state_is_rejected_by_every_implementation(any_enqueue, ptr, count, match):
    # The fallback included: with ptr == K it would otherwise write rows 0 and 1.
    bank, p, c = torch.randn(5, 3), torch.tensor(ptr), torch.tensor(count)
    before = bank.clone()
    with pytest.raises(ValueError, match=match):
        any_enqueue(bank, p, c, torch.randn(2, 3))
    assert torch.equal(bank, before) and int(p) == ptr and int(c) == count


def test_empty_batch_is_a_no_op(any_enqueue):
    bank, ptr, count = torch.randn(3, 4), torch.tensor(2), torch.tensor(3)
    before = bank.clone()
    any_enqueue(bank, ptr, count, torch.empty(0, 4))
    assert torch.equal(bank, before) and int(ptr) == 2 and int(count) == 3


@pytest.mark.parametrize("layout", ["transposed", "column_slice", "row_slice", "broadcast"])
def test_non_contiguous_x(any_enqueue, layout):
    g = torch.Generator().manual_seed(3)
    if layout == "transposed":
        x = torch.randn(6, 9, generator=g).T
    elif layout == "column_slice":
        x = torch.randn(9, 12, generator=g)[:, ::2]
    elif layout == "row_slice":
        x = torch.randn(18, 6, generator=g)[::2]
    else:
        x = torch.randn(1, 6, generator=g).expand(9, 6)
    assert not x.is_contiguous()
    bank, ptr, count = torch.zeros(5, 6), torch.tensor(3), torch.tensor(2)
    ref = reference_enqueue(bank, ptr, count, x)
    any_enqueue(bank, ptr, count, x)
    check_state(bank, ptr, count, ref)


def test_non_contiguous_bank(any_enqueue):
    storage = torch.randn(6, 8)
    bank = storage[:, ::2]
    ptr, count = torch.tensor(4), torch.tensor(4)
    x = torch.randn(3, 4)
    ref = reference_enqueue(bank, ptr, count, x)
    untouched = storage[:, 1::2].clone()
    any_enqueue(bank, ptr, count, x)
    check_state(bank, ptr, count, ref)
    assert torch.equal(storage[:, 1::2], untouched)


def test_bumps_version_counters(enqueue_):
    # Autograd must notice the mutation, as with any in-place ATen op.
    queue = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    ptr, count = torch.tensor(0), torch.tensor(6)
    z = torch.randn(3, 4, requires_grad=True)
    values, _ = nnclr_fast.nn_topk(z, queue, 2)  # saves the queue for backward
    enqueue_(queue, ptr, count, torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        values.sum().backward()


@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_opcheck(enqueue_, bank_dtype, x_dtype):
    for batch in (3, 7, 12):
        args = (torch.zeros(7, 5, dtype=bank_dtype), torch.tensor(4), torch.tensor(4), torch.randn(batch, 5).to(x_dtype))
        torch.library.opcheck(enqueue_, args)


def test_opcheck_x_requires_grad(enqueue_):
    torch.library.opcheck(enqueue_, (torch.zeros(4, 3), torch.tensor(0), torch.tensor(0), torch.randn(2, 3, requires_grad=True)))


def test_coexists_with_python_ops_in_namespace(enqueue_):
    # The C++ TORCH_LIBRARY_FRAGMENT and the Python torch.library.custom_op ops share "nnclr_fast".
    assert hasattr(torch.ops.nnclr_fast, "nn_lookup") and hasattr(torch.ops.nnclr_fast, "nn_topk")
    schema = str(torch.ops.nnclr_fast.enqueue_.default._schema)
    assert "Tensor(a!) bank" in schema and "Tensor(b!) ptr" in schema and "Tensor(c!) count" in schema
    queue = torch.zeros(4, 3)
    ptr, count = torch.tensor(0), torch.tensor(0)
    enqueue_(queue, ptr, count, torch.eye(3)[:2])
    out, idx = nnclr_fast.nn_lookup(torch.eye(3)[1:2], queue, valid=count, return_indices=True)
    assert int(idx) == 1 and torch.equal(out, torch.eye(3)[1:2])


def test_torch_compile(enqueue_):
    def step(bank, ptr, count, x):
        enqueue_(bank, ptr, count, x * 2)
        return bank.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    state = [torch.zeros(5, 3), torch.tensor(0), torch.tensor(0)]
    ref = (state[0].clone(), state[1].clone(), state[2].clone())
    for batch in (2, 4, 7):
        x = torch.randn(batch, 3)
        compiled(*state, x)
        ref = reference_enqueue(*ref, x * 2)
        check_state(*state, ref)


INVALID = [
    ("bank", lambda b, p, c, x: (b.double(), p, c, x), TypeError, "bank must be float32"),
    ("bank", lambda b, p, c, x: (b[0], p, c, x), ValueError, "bank must be 2-D"),
    ("bank", lambda b, p, c, x: (b[:0], p, c, x), ValueError, "bank must have at least one row"),
    ("ptr", lambda b, p, c, x: (b, p.int(), c, x), TypeError, "ptr must be int64"),
    ("ptr", lambda b, p, c, x: (b, p.reshape(1), c, x), ValueError, "ptr must be a 0-dim"),
    ("ptr", lambda b, p, c, x: (b, p.fill_(5), c, x), ValueError, r"ptr must be in \[0, K\)"),
    ("ptr", lambda b, p, c, x: (b, p.fill_(-1), c, x), ValueError, r"ptr must be in \[0, K\)"),
    ("count", lambda b, p, c, x: (b, p, c.float(), x), TypeError, "count must be int64"),
    ("count", lambda b, p, c, x: (b, p, c.fill_(6), x), ValueError, r"count must be in \[0, K\]"),
    ("x", lambda b, p, c, x: (b, p, c, x.long()), TypeError, "x must be a floating-point"),
    ("x", lambda b, p, c, x: (b, p, c, x[0]), ValueError, "x must be 2-D"),
    ("x", lambda b, p, c, x: (b, p, c, x[:, :2]), ValueError, "x must have bank's feature dim"),
    ("x", lambda b, p, c, x: (b, p, c, x.to("meta")), ValueError, "x must be on bank's device"),
    ("x", lambda b, p, c, x: (b, p, c, b[:2]), RuntimeError, "single memory location"),
]


@pytest.mark.parametrize("name,mutate,error,message", INVALID, ids=[f"{e[0]}-{e[3][:24]}" for e in INVALID])
def test_invalid_arguments(any_enqueue, name, mutate, error, message):
    if any_enqueue is enqueue_op.enqueue_torch and "memory location" in message:
        pytest.skip("the fallback normalises x into a new tensor before writing: aliasing is harmless")
    bank, ptr, count, x = torch.randn(5, 3), torch.tensor(1), torch.tensor(2), torch.randn(2, 3)
    args = mutate(bank, ptr, count, x)
    before = [a.clone() if a.device.type != "meta" else a for a in args]
    with pytest.raises(error, match=message):
        any_enqueue(*args)
    for a, b in zip(args, before):
        if a.device.type != "meta":
            assert torch.equal(a, b), f"{name}: state changed by a rejected call"


def test_cuda_tensors_always_have_a_kernel(enqueue_):
    # The fused CUDA kernel when the build has it, the PyTorch fallback otherwise: never the
    # dispatcher's "could not run with the CUDA backend".
    assert torch._C._dispatch_has_kernel_for_dispatch_key(enqueue_op.OP_NAME, "CUDA")
    if not enqueue_op.has_cuda_kernel():
        dump = torch._C._dispatch_dump(enqueue_op.OP_NAME)
        assert any(line.startswith("CUDA") and "enqueue.py" in line for line in dump.splitlines()), dump


def test_missing_ninja_is_reported(monkeypatch, tmp_path):
    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(extension.ToolchainMissing, match="needs ninja.*pip install ninja"):
        extension.build_and_load("nnclr_fast_enqueue_no_ninja", with_cuda=False, build_dir=tmp_path)


def test_missing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(extension.ToolchainMissing, match="needs a C\\+\\+ compiler.*no-such-c\\+\\+"):
        extension.build_and_load("nnclr_fast_enqueue_no_cxx", with_cuda=False, build_dir=tmp_path)


def test_a_first_use_build_is_announced_on_the_package_logger_at_info(monkeypatch, tmp_path, caplog):
    loads = []

    class FakeCppExtension:  # the build itself is proven by the packaging and CUDA tests
        @staticmethod
        def is_ninja_available():
            return True

        @staticmethod
        def load(**kwargs):
            loads.append(kwargs)

    monkeypatch.setattr(extension, "_cpp_extension", lambda: FakeCppExtension)
    with caplog.at_level(logging.INFO, logger="nnclr_fast"):
        extension.build_and_load("nnclr_fast_enqueue_announce", with_cuda=False, build_dir=tmp_path)
    (record,) = [r for r in caplog.records if r.name == "nnclr_fast.ops.extension"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == f"compiling the C++ enqueue extension (first use only, about 10 s; cached in {tmp_path})"
    assert [kw["build_directory"] for kw in loads] == [str(tmp_path)]


NO_COMPILER_SCRIPT = """
import logging, torch
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("nnclr_fast").addHandler(handler)
import nnclr_fast
from nnclr_fast.ops import enqueue as enqueue_op
from nnclr_fast.ops.reference import reference_enqueue
queue = nnclr_fast.SupportQueue(5, 3)
nnclr_fast.SupportQueue(4, 3)
messages = [r.getMessage() for r in records if r.levelno == logging.WARNING and r.name == "nnclr_fast.ops.enqueue"]
assert len(messages) == 1 and "needs a C++ compiler" in messages[0] and "plain-PyTorch" in messages[0], messages
assert enqueue_op.load_extension() == "torch"
ref = (queue.bank.clone(), queue.ptr.clone(), queue.count.clone())
for batch in (2, 4, 7, 1):
    x = torch.randn(batch, 3)
    queue.enqueue(x)
    ref = reference_enqueue(*ref, x)
    torch.testing.assert_close(queue.bank, ref[0], atol=1e-6, rtol=0)
    assert int(queue.ptr) == int(ref[1]) and int(queue.count) == int(ref[2])
torch.library.opcheck(torch.ops.nnclr_fast.enqueue_.default, (torch.zeros(7, 5), torch.tensor(4), torch.tensor(4), torch.randn(9, 5)))
values, _ = nnclr_fast.nn_topk(torch.randn(2, 3, requires_grad=True), queue.bank, 2)
queue.enqueue(torch.randn(2, 3))
try:
    values.sum().backward()
except RuntimeError as exc:
    assert "modified by an inplace operation" in str(exc)
else:
    raise AssertionError("the fallback did not bump the bank's version counter")
print("ok")
"""


def test_without_a_compiler_the_pytorch_fallback_takes_over(tmp_path):
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec(extension.AOT_MODULE) is not None:
        pytest.skip("an ahead-of-time build of the extension is installed, so no compiler is needed")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), NNCLR_FAST_BUILD_DIR=str(tmp_path / "build"))
    result = subprocess.run([sys.executable, "-c", NO_COMPILER_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


@pytest.mark.slow
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """Compiles csrc/cuda/enqueue.cu with nvcc, links and loads it in a subprocess (no GPU needed)."""
    if shutil.which("nvcc") is None and extension.find_cuda_toolkit() is None:
        pytest.skip("nvcc not found (no CUDA toolkit on PATH, in CUDA_HOME or /usr/local/cuda)")
    extension.compile_cuda_check(tmp_path / "cuda_build")
    assert (tmp_path / "cuda_build" / "enqueue.cuda.o").is_file()


@pytest.mark.gpu
class TestCUDA:
    @pytest.mark.parametrize("num_slots,batches", SEQUENCES + [(98_304, [4096, 60_000, 40_000, 200_000, 512])])
    @pytest.mark.parametrize("x_dtype", X_DTYPES)
    @pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
    def test_matches_reference(self, enqueue_, num_slots, batches, bank_dtype, x_dtype):
        dim = 7 if num_slots < 1000 else 256
        if num_slots >= 1000 and (bank_dtype, x_dtype) != (torch.bfloat16, torch.float32):
            pytest.skip("the large queue is checked for one dtype pair (the reference is a slow loop)")
        run_sequence(enqueue_, num_slots, batches, bank_dtype, x_dtype, dim=dim, device="cuda")

    def test_non_contiguous_x(self, enqueue_):
        # (17, 150) with strides (2, 80): a transposed, doubly strided view of a (300, 40) tensor.
        x = torch.randn(300, 40, device="cuda")[::2, ::2].T[:17]
        assert x.shape == (17, 150) and not x.is_contiguous()
        bank = torch.zeros(8, 150, device="cuda")
        ptr = torch.tensor(5, device="cuda")
        count = torch.tensor(8, device="cuda")
        ref = reference_enqueue(bank.cpu(), ptr.cpu(), count.cpu(), x.cpu())
        enqueue_(bank, ptr, count, x)
        check_state(bank, ptr, count, ref)

    def test_no_host_sync(self, enqueue_):
        bank = torch.zeros(64, 32, device="cuda")
        ptr = torch.zeros((), dtype=torch.int64, device="cuda")
        count = torch.zeros((), dtype=torch.int64, device="cuda")
        x = torch.randn(40, 32, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                enqueue_(bank, ptr, count, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert (int(ptr), int(count)) == (120 % 64, 64)

    def test_graph_capture_replays_on_device_state(self, enqueue_):
        # Capture fails if a kernel is launched outside the current (capturing) stream or syncs.
        bank = torch.zeros(16, 8, device="cuda")
        ptr = torch.zeros((), dtype=torch.int64, device="cuda")
        count = torch.zeros((), dtype=torch.int64, device="cuda")
        static_x = torch.randn(5, 8, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            enqueue_(bank, ptr, count, static_x)
        ref = (bank.cpu(), ptr.cpu(), count.cpu())
        for _ in range(6):
            static_x.copy_(torch.randn(5, 8, device="cuda"))
            graph.replay()
            ref = reference_enqueue(*ref, static_x.cpu())
            check_state(bank, ptr, count, ref)

    @pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
    def test_device_guard(self, enqueue_):
        with torch.cuda.device(0):
            bank = torch.zeros(16, 8, device="cuda:1")
            ptr = torch.zeros((), dtype=torch.int64, device="cuda:1")
            count = torch.zeros((), dtype=torch.int64, device="cuda:1")
            x = torch.randn(5, 8, device="cuda:1")
            ref = reference_enqueue(bank.cpu(), ptr.cpu(), count.cpu(), x.cpu())
            enqueue_(bank, ptr, count, x)
        check_state(bank, ptr, count, ref)

    def test_opcheck(self, enqueue_):
        args = (torch.zeros(7, 5, device="cuda"), torch.tensor(4, device="cuda"), torch.tensor(4, device="cuda"), torch.randn(9, 5, device="cuda"))
        torch.library.opcheck(enqueue_, args)

    def test_state_on_another_device_is_rejected(self, enqueue_):
        bank = torch.zeros(4, 3, device="cuda")
        with pytest.raises(ValueError, match="ptr must be on bank's device"):
            enqueue_(bank, torch.tensor(0), torch.tensor(0, device="cuda"), torch.randn(2, 3, device="cuda"))
