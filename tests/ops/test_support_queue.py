"""SupportQueue and NNMemoryBankModule: FIFO state, checkpointing, lookup and top-k over the filled
rows only, input checks, torch.distributed, and lightly's module side by side."""

import io
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from nnclr_fast import NNMemoryBankModule, SupportQueue
from nnclr_fast.ops.reference import reference_enqueue, reference_nn_lookup, reference_nn_topk

BANK_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def state(queue):
    return queue.bank.clone(), queue.ptr.clone(), queue.count.clone()


def assert_state_equal(queue, expected, atol=0.0):
    bank, ptr, count = expected
    assert int(queue.ptr) == int(ptr) and int(queue.count) == int(count)
    assert queue.bank.dtype == bank.dtype
    torch.testing.assert_close(queue.bank.cpu(), bank.cpu(), atol=atol, rtol=0)


def test_initial_state_and_properties():
    queue = SupportQueue(12, 5, dtype=torch.bfloat16)
    assert queue.size == 12 and queue.dim == 5
    assert queue.bank.shape == (12, 5) and queue.bank.dtype == torch.bfloat16
    assert torch.equal(queue.bank, torch.zeros(12, 5, dtype=torch.bfloat16))
    for buf in (queue.ptr, queue.count):
        assert buf.dtype == torch.int64 and buf.dim() == 0 and int(buf) == 0
    assert set(queue.state_dict()) == {"bank", "ptr", "count"}
    assert dict(queue.named_buffers()).keys() == {"bank", "ptr", "count"}
    assert list(queue.parameters()) == []
    assert repr(queue) == "SupportQueue(size=12, dim=5, dtype=torch.bfloat16)"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(size=0, dim=4), ValueError, "size"),
        (dict(size=-3, dim=4), ValueError, "size"),
        (dict(size=2.5, dim=4), TypeError, "size"),
        (dict(size=True, dim=4), TypeError, "size"),
        (dict(size=8, dim=0), ValueError, "dim"),
        (dict(size=8, dim=-1), ValueError, "dim"),
        (dict(size=8, dim=4, dtype=torch.float64), ValueError, "dtype"),
        (dict(size=8, dim=4, dtype=torch.int64), ValueError, "dtype"),
        (dict(size=8, dim=4, gather_distributed=1), TypeError, "gather_distributed"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SupportQueue(**kwargs)


@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
def test_enqueue_matches_reference(bank_dtype):
    queue = SupportQueue(9, 6, dtype=bank_dtype)
    expected = state(queue)
    x_dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    for step, batch in enumerate([4, 4, 4, 9, 1, 20, 2, 8]):
        x = torch.randn(batch, 6, dtype=x_dtypes[step % 4]) * 3
        expected = reference_enqueue(*expected, x)
        queue.enqueue(x)
        assert_state_equal(queue, expected, atol=torch.finfo(bank_dtype).eps)


def test_enqueue_detaches():
    queue = SupportQueue(4, 3)
    x = torch.randn(2, 3, requires_grad=True)
    queue.enqueue(x * 2)
    assert not queue.bank.requires_grad and queue.bank.grad_fn is None


BAD_BATCHES = [
    ("list", lambda: [[1.0, 2.0, 3.0]], TypeError, "x must be a torch.Tensor"),
    ("integer", lambda: torch.ones(2, 3, dtype=torch.int64), TypeError, "x must be a floating-point"),
    ("1-D", lambda: torch.randn(3), ValueError, "x must be 2-D"),
    ("3-D", lambda: torch.randn(2, 3, 1), ValueError, "x must be 2-D"),
    ("wrong dim", lambda: torch.randn(2, 4), ValueError, "x must have dim 3"),
    ("empty", lambda: torch.randn(0, 3), ValueError, "x is empty"),
    ("device", lambda: torch.randn(2, 3, device="meta"), ValueError, "x must be on the queue's device"),
]


@pytest.mark.parametrize("name,make,error,match", BAD_BATCHES, ids=[b[0] for b in BAD_BATCHES])
def test_enqueue_rejects_bad_input_and_keeps_state(name, make, error, match):
    queue = SupportQueue(5, 3)
    queue.enqueue(torch.randn(3, 3))
    before = state(queue)
    with pytest.raises(error, match=match):
        queue.enqueue(make())
    assert_state_equal(queue, before)


def test_state_dict_round_trip_and_resume():
    queue = SupportQueue(16, 8, dtype=torch.float16)
    for batch in (5, 7, 6):
        queue.enqueue(torch.randn(batch, 8))
    buffer = io.BytesIO()
    torch.save(queue.state_dict(), buffer)
    buffer.seek(0)
    restored = SupportQueue(16, 8, dtype=torch.float16)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.bank, queue.bank)
    assert torch.equal(restored.ptr, queue.ptr) and torch.equal(restored.count, queue.count)
    # Training resumed from the checkpoint continues exactly like the uninterrupted run.
    for batch in (3, 16, 9):
        z = torch.randn(4, 8)
        out, idx = queue.lookup(z, return_indices=True)
        out_r, idx_r = restored.lookup(z, return_indices=True)
        assert torch.equal(idx, idx_r) and torch.equal(out, out_r)
        x = torch.randn(batch, 8)
        queue.enqueue(x)
        restored.enqueue(x)
        assert torch.equal(restored.bank, queue.bank)
        assert torch.equal(restored.ptr, queue.ptr) and torch.equal(restored.count, queue.count)


def good_state(size=6, dim=3, dtype=torch.float32, ptr=2, count=2):
    return {"bank": torch.zeros(size, dim, dtype=dtype), "ptr": torch.tensor(ptr), "count": torch.tensor(count)}


CORRUPTED = [
    ("ptr", torch.tensor(10**9), r"ptr must be in \[0, 6\), got 1000000000"),
    ("ptr", torch.tensor(-1), r"ptr must be in \[0, 6\), got -1"),
    ("ptr", torch.tensor(-(2**63)), r"ptr must be in \[0, 6\)"),
    ("ptr", torch.tensor(6), r"ptr must be in \[0, 6\), got 6"),
    ("ptr", torch.tensor(float("nan")), r"ptr must be torch.int64, got torch.float32"),
    ("ptr", torch.tensor([2]), r"ptr must be 0-D, got shape \(1,\)"),
    ("ptr", torch.tensor(2, dtype=torch.int32), r"ptr must be torch.int64"),
    ("ptr", 2, r"ptr must be a tensor, got int"),
    ("ptr", torch.tensor(3), r"ptr = 3 and count = 2 are inconsistent"),
    ("count", torch.tensor(7), r"count must be in \[0, 6\], got 7"),
    ("count", torch.tensor(-5), r"count must be in \[0, 6\], got -5"),
    ("count", torch.tensor(2, device="meta"), r"count is a meta tensor"),
    ("bank", torch.zeros(6, 4), r"bank must have shape \(6, 3\), got \(6, 4\)"),
    ("bank", torch.zeros(7, 3), r"bank must have shape \(6, 3\), got \(7, 3\)"),
    ("bank", torch.zeros(6, 3, dtype=torch.float16), r"bank must be torch.float32, got torch.float16"),
    ("bank", torch.zeros(18), r"bank must be 2-D"),
]


@pytest.mark.parametrize("key,value,match", CORRUPTED, ids=[f"{c[0]}-{i}" for i, c in enumerate(CORRUPTED)])
def test_corrupted_checkpoint_is_rejected_on_load(key, value, match):
    queue = SupportQueue(6, 3)
    queue.enqueue(torch.randn(4, 3))
    before = state(queue)
    bad = good_state()
    bad[key] = value
    with pytest.raises(ValueError, match=match):
        queue.load_state_dict(bad)
    assert_state_equal(queue, before)
    # Nested, the message names the full key.
    holder = torch.nn.Module()
    holder.queue = SupportQueue(6, 3)
    with pytest.raises(ValueError, match=f"queue.{key}"):
        holder.load_state_dict({f"queue.{k}": v for k, v in bad.items()})


def test_every_state_enqueue_can_reach_loads():
    # Below capacity ptr == count; once full, ptr can be anywhere in [0, size).
    for ptr, count in [(0, 0), (2, 2), (5, 5), (0, 6), (3, 6), (5, 6)]:
        queue = SupportQueue(6, 3)
        queue.load_state_dict(good_state(ptr=ptr, count=count))
        assert (int(queue.ptr), int(queue.count)) == (ptr, count)
    queue = SupportQueue(6, 3)
    for batch in (1, 2, 5, 4, 13):
        queue.enqueue(torch.randn(batch, 3))
        SupportQueue(6, 3).load_state_dict(queue.state_dict())


def test_memory_bank_module_checks_the_checkpoint():
    with pytest.raises(ValueError, match="queue.bank has 8 rows but this module's size is 32"):
        NNMemoryBankModule(size=32).load_state_dict({f"queue.{k}": v for k, v in good_state(size=8).items()})
    with pytest.raises(ValueError, match="queue.bank must be torch.float32 or torch.bfloat16 or torch.float16"):
        NNMemoryBankModule(size=6).load_state_dict({f"queue.{k}": v for k, v in good_state(dtype=torch.float64).items()})
    with pytest.raises(ValueError, match="queue.count must be in"):
        NNMemoryBankModule(size=6).load_state_dict({f"queue.{k}": v for k, v in good_state(count=9).items()})
    with pytest.raises(ValueError, match=r"queue.bank must have shape \(6, 3\)"):
        NNMemoryBankModule(size=(6, 3)).load_state_dict({f"queue.{k}": v for k, v in good_state(dim=5).items()})
    bank = NNMemoryBankModule(size=6)
    bank.load_state_dict({f"queue.{k}": v for k, v in good_state(dtype=torch.bfloat16, ptr=4, count=4).items()})
    assert bank.queue.bank.dtype == torch.bfloat16 and int(bank.queue.count) == 4


def test_lookup_searches_only_filled_rows():
    queue = SupportQueue(32, 8)
    # Every stored row has a positive first coordinate, so a query along -e1 scores below 0
    # against all of them while the zero (unfilled) rows would score exactly 0: a lookup that
    # searched past `count` would return an unfilled row.
    x = torch.randn(10, 8)
    x[:, 0] = x[:, 0].abs() + 1.0
    queue.enqueue(x)
    z = torch.randn(12, 8)
    z[:6] = -F.one_hot(torch.zeros(6, dtype=torch.int64), 8).float() + 0.1 * torch.randn(6, 8)
    out, idx = queue.lookup(z, precision="ieee", return_indices=True)
    assert int(queue.count) == 10
    assert (idx >= 0).all() and (idx < 10).all()
    assert torch.equal(out, queue.bank[idx])
    assert_same_neighbours(z, queue.bank[:10], idx, reference_nn_lookup(z, queue.bank, valid=10)[1])


def assert_same_neighbours(z, rows, idx, ref_idx, tol=1e-5):
    """idx is within `tol` of the best row of `rows`, and equals ref_idx wherever the best row is
    more than `tol` ahead of the runner-up (summation order may flip a closer near-tie)."""
    scores = F.normalize(z.double(), dim=1) @ F.normalize(rows.double(), dim=1).T
    top2 = scores.topk(min(2, rows.shape[0]), dim=1).values
    assert (scores.gather(1, idx[:, None]).squeeze(1) >= top2[:, 0] - tol).all()
    clear = (top2[:, 0] - top2[:, -1] > tol) if rows.shape[0] > 1 else torch.ones(len(idx), dtype=torch.bool)
    assert torch.equal(idx[clear], ref_idx[clear])


def test_topk_over_filled_rows_marks_empty_slots():
    queue = SupportQueue(16, 6)
    z = torch.randn(4, 6)
    vals, idx = queue.topk(z, k=3)
    assert (idx == -1).all() and torch.isneginf(vals).all()
    queue.enqueue(torch.randn(2, 6))
    vals, idx = queue.topk(z, k=3, precision="ieee")
    assert (idx[:, 2] == -1).all() and torch.isneginf(vals[:, 2]).all()
    assert sorted(idx[0, :2].tolist()) == [0, 1]
    ref_vals, _ = reference_nn_topk(z, queue.bank, k=3, valid=2)
    torch.testing.assert_close(vals, ref_vals, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 16\]"):
        queue.topk(z, k=17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_on_empty_queue_returns_normalised_query(dtype):
    queue = SupportQueue(8, 5)
    z = (torch.randn(4, 5) * 7).to(dtype)
    out, idx = queue.lookup(z, return_indices=True)
    assert out.dtype == dtype
    # The kernel multiplies by 1/||z|| (F.normalize divides) and sums in its own order: ulps apart.
    torch.testing.assert_close(out, F.normalize(z.float(), dim=1).to(dtype), atol=torch.finfo(dtype).eps, rtol=0)
    assert torch.equal(idx, torch.full((4,), -1))
    assert torch.equal(queue.lookup(z), out)


@pytest.mark.parametrize("filled", [False, True])
def test_lookup_gradient_is_straight_through(filled):
    queue = SupportQueue(8, 5)
    if filled:
        queue.enqueue(torch.randn(3, 5))
    z = torch.randn(4, 5, requires_grad=True)
    weight = torch.randn(4, 5)
    (queue.lookup(z) * weight).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (F.normalize(z_ref, dim=1) * weight).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad)


@pytest.mark.parametrize("filled", [False, True])
def test_lookup_stop_gradient(filled):
    queue = SupportQueue(8, 5)
    if filled:
        queue.enqueue(torch.randn(3, 5))
    z = torch.randn(4, 5, requires_grad=True)
    assert not queue.lookup(z, straight_through=False).requires_grad


def test_lookup_rejects_bad_query():
    queue = SupportQueue(8, 5)
    with pytest.raises(ValueError, match="z"):
        queue.lookup(torch.randn(4, 6))


def test_to_moves_every_buffer():
    queue = SupportQueue(6, 4).to("meta")
    assert {b.device.type for b in (queue.bank, queue.ptr, queue.count)} == {"meta"}


def test_torch_compile_step_matches_eager():
    compiled_queue, eager_queue = SupportQueue(10, 6), SupportQueue(10, 6)

    def step(queue, z, x):
        out = queue.lookup(z)
        queue.enqueue(x)
        return out

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for _ in range(4):
        z, x = torch.randn(4, 6), torch.randn(4, 6)
        torch.testing.assert_close(compiled(compiled_queue, z, x), step(eager_queue, z, x), atol=0, rtol=0)
        assert torch.equal(compiled_queue.bank, eager_queue.bank)
        assert torch.equal(compiled_queue.ptr, eager_queue.ptr)
        assert torch.equal(compiled_queue.count, eager_queue.count)


@pytest.mark.gpu
class TestCUDA:
    @pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
    def test_enqueue_matches_reference(self, bank_dtype):
        queue = SupportQueue(37, 64, dtype=bank_dtype).cuda()
        assert {b.device.type for b in (queue.bank, queue.ptr, queue.count)} == {"cuda"}
        expected = tuple(t.cpu() for t in state(queue))
        for batch in (16, 16, 37, 5, 100, 3):
            x = torch.randn(batch, 64, device="cuda", dtype=torch.bfloat16)
            expected = reference_enqueue(*expected, x.cpu())
            queue.enqueue(x)
            assert_state_equal(queue, expected, atol=torch.finfo(bank_dtype).eps)

    def test_checkpoint_moves_between_devices(self):
        queue = SupportQueue(20, 16).cuda()
        queue.enqueue(torch.randn(13, 16, device="cuda"))
        restored = SupportQueue(20, 16)
        restored.load_state_dict({k: v.cpu() for k, v in queue.state_dict().items()})
        assert_state_equal(restored, tuple(t.cpu() for t in state(queue)))

    def test_lookup_and_enqueue_in_cuda_graph(self):
        size, dim, batch = 64, 32, 24
        queue = SupportQueue(size, dim, dtype=torch.bfloat16).cuda()
        twin = SupportQueue(size, dim, dtype=torch.bfloat16).cuda()
        static_z = torch.randn(batch, dim, device="cuda")
        static_x = torch.randn(batch, dim, device="cuda")

        def step():
            return queue.lookup(static_z, return_indices=True)

        # Warm up (Triton compiles and autotunes) on a side stream, as capture requires, then
        # start the captured run from an empty queue.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
                queue.enqueue(static_x)
        torch.cuda.current_stream().wait_stream(side)
        for buf in (queue.bank, queue.ptr, queue.count):
            buf.zero_()

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, static_idx = step()
            queue.enqueue(static_x)
        # Capturing records the kernels without running them.
        assert int(queue.count) == 0

        for i in range(6):  # the first replay sees an empty queue, the fourth wraps around
            z = torch.randn(batch, dim, device="cuda")
            x = torch.randn(batch, dim, device="cuda")
            static_z.copy_(z)
            static_x.copy_(x)
            graph.replay()
            out, idx = twin.lookup(z, return_indices=True)
            twin.enqueue(x)
            torch.cuda.synchronize()
            assert torch.equal(static_idx, idx), f"replay {i}"
            assert torch.equal(static_out, out), f"replay {i}"
            assert torch.equal(queue.bank, twin.bank)
            assert torch.equal(queue.ptr, twin.ptr) and torch.equal(queue.count, twin.count)
        assert int(queue.count) == size and int(queue.ptr) == (6 * batch) % size


# ------------------------------------------------------------------------------------------
# NNMemoryBankModule: lightly's call on a SupportQueue


def test_memory_bank_module_call_and_update_order():
    bank = NNMemoryBankModule(size=(8, 4))
    x = torch.randn(3, 4, requires_grad=True)
    out = bank(x, update=False)
    # Empty: the query itself, normalised, detached; no update without update=True.
    torch.testing.assert_close(out, F.normalize(x.detach(), dim=1), atol=1e-6, rtol=0)
    assert not out.requires_grad
    assert int(bank.queue.count) == 0
    bank(x, update=True)
    assert int(bank.queue.count) == 3
    # The lookup sees the bank before the update: x's own rows are neighbours now.
    out, idx = bank.queue.lookup(x.detach(), return_indices=True, precision="ieee")
    assert torch.equal(bank(x.detach()), out)


def test_memory_bank_module_int_size_takes_dim_from_first_batch():
    bank = NNMemoryBankModule(size=32, dtype=torch.bfloat16)
    assert bank.queue is None and dict(bank.state_dict()) == {}
    out = bank(torch.randn(5, 7), update=True)
    assert out.dtype == torch.float32 and bank.queue.bank.shape == (32, 7) and bank.queue.bank.dtype == torch.bfloat16
    restored = NNMemoryBankModule(size=32)
    restored.load_state_dict(bank.state_dict())
    for key, value in bank.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@pytest.mark.parametrize("size,error,match", [((8,), ValueError, "size must be"), ((0, 4), ValueError, "size"), (2.5, TypeError, "size")])
def test_memory_bank_module_rejects_bad_size(size, error, match):
    with pytest.raises(error, match=match):
        NNMemoryBankModule(size=size)


def test_memory_bank_module_low_precision_outputs():
    bank = NNMemoryBankModule(size=(16, 8), dtype=torch.bfloat16)
    for _ in range(3):
        out = bank(torch.randn(6, 8, dtype=torch.bfloat16), update=True)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_memory_bank_returns_a_nan_row_only_when_nothing_else_scores():
    bank = NNMemoryBankModule(size=(8, 4))
    poisoned = torch.randn(1, 4)
    poisoned[0, 1] = float("nan")
    bank(poisoned, update=True)
    out = bank(torch.randn(3, 4))
    assert out.isnan().all(), "the only filled row is returned, NaN and all"
    bank(torch.randn(2, 4), update=True)
    assert torch.isfinite(bank(torch.randn(3, 4))).all()


@pytest.mark.parametrize("dtype", BANK_DTYPES)
def test_enqueue_stores_unit_rows_at_any_scale(dtype):
    queue = SupportQueue(8, 16, dtype=dtype)
    x = torch.randn(8, 16)
    scales = [1e-30, 1e-20, 1e-6, 1.0, 1e6, 1e20, 1e30, 0.0]
    queue.enqueue(x * torch.tensor(scales)[:, None])
    norms = queue.bank.double().norm(dim=1)
    torch.testing.assert_close(norms[:7], torch.ones(7, dtype=torch.float64), atol=4 * torch.finfo(dtype).eps, rtol=0)
    assert (queue.bank[7] == 0).all()
    expected = F.normalize(x[:7].double(), dim=1).to(dtype)
    torch.testing.assert_close(queue.bank[:7], expected, atol=torch.finfo(dtype).eps, rtol=0)


def lightly_bank(size):
    modules = pytest.importorskip("lightly.models.modules", reason="lightly (the dev extra) is not installed")
    return modules.NNMemoryBankModule(size=size)


def stream(batches, batch, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g) * 3 for _ in range(batches)]


def test_same_neighbours_as_lightly_once_both_banks_hold_the_same_rows():
    size, batch, dim = 64, 16, 8  # the bank is a multiple of the batch: lightly drops nothing
    theirs, ours = lightly_bank((size, dim)), NNMemoryBankModule(size=(size, dim))
    for step, x in enumerate(stream(12, batch, dim)):
        before = ours.queue.bank.clone()
        mine = ours(x, update=True)
        lightly_out = theirs(x, update=True)
        if step < size // batch:
            continue  # lightly still holds some of its random start-up vectors
        # lightly returns raw rows, ours unit rows: the same neighbours, normalised.
        idx_ours = (F.normalize(mine, dim=1) @ before.T).argmax(dim=1)
        idx_theirs = (F.normalize(lightly_out, dim=1) @ before.T).argmax(dim=1)
        assert_same_neighbours(x, before, idx_ours, idx_theirs)
        torch.testing.assert_close(mine, before[idx_ours])
    assert torch.equal(ours.queue.count, torch.tensor(size))


def test_differs_from_lightly_at_the_wrap_around():
    # 60 rows, batches of 16: lightly keeps only the 12 rows that fit before the end and drops
    # the other 4 of every wrapping batch; ours wraps them to the front (a FIFO of the last 60).
    size, batch, dim = 60, 16, 8
    theirs, ours = lightly_bank((size, dim)), NNMemoryBankModule(size=(size, dim))
    xs = stream(4, batch, dim, seed=1)
    for x in xs:
        ours(x, update=True)
        theirs(x, update=True)
    last = F.normalize(torch.cat(xs)[-size:], dim=1)
    ours_rows = F.normalize(ours.queue.bank.float(), dim=1)
    theirs_rows = F.normalize(theirs.bank.float().reshape(-1, dim) if theirs.bank.shape[0] == size else theirs.bank.float().T, dim=1)
    held = lambda rows: ((last @ rows.T) > 1 - 1e-5).any(dim=1)  # noqa: E731
    assert held(ours_rows).all()
    assert held(theirs_rows).sum() == size - 4


def test_differs_from_lightly_at_start_up_and_with_nan():
    size, dim = 32, 8
    theirs, ours = lightly_bank((size, dim)), NNMemoryBankModule(size=(size, dim))
    x = torch.randn(4, dim)
    # Start-up: lightly's bank is random unit vectors, so the first "neighbours" are noise;
    # ours returns each query itself.
    assert torch.allclose(ours(x), F.normalize(x, dim=1))
    assert not torch.allclose(F.normalize(theirs(x), dim=1), F.normalize(x, dim=1), atol=1e-3)
    # One NaN row in the stream: lightly's argmax returns it for every query; ours ranks its NaN
    # scores as -inf, below every other filled row.
    poisoned = torch.randn(8, dim)
    poisoned[3] = float("nan")
    for bank in (ours, theirs):
        bank(poisoned, update=True)
    queries = torch.randn(5, dim)
    assert torch.isnan(theirs(queries)).all(dim=1).all()
    assert torch.isfinite(ours(queries)).all()


def test_a_checkpoint_saved_with_lightly_loads_with_strict_false():
    # lightly's bank buffers are not persistent: its state_dict has no bank, ours has queue.*.
    theirs = nn.Sequential(nn.Linear(8, 8))
    theirs.add_module("nn_replacer", lightly_bank((32, 8)))
    theirs[1](torch.randn(4, 8), update=True)
    saved = theirs.state_dict()
    assert set(saved) == {"0.weight", "0.bias"}
    ours = nn.Sequential(nn.Linear(8, 8))
    ours.add_module("nn_replacer", NNMemoryBankModule(size=(32, 8)))
    with pytest.raises(RuntimeError, match="Missing key.*nn_replacer.queue.bank.*nn_replacer.queue.ptr.*nn_replacer.queue.count"):
        ours.load_state_dict(saved)
    result = ours.load_state_dict(saved, strict=False)
    assert result.missing_keys == ["nn_replacer.queue.bank", "nn_replacer.queue.ptr", "nn_replacer.queue.count"]
    assert torch.equal(ours[0].weight, theirs[0].weight) and int(ours[1].queue.count) == 0


# ------------------------------------------------------------------------------------------
# torch.distributed: two CPU processes (gloo) end with identical queues

WORLD_SIZE = 2
SIZE, DIM = 11, 6
# Per-rank batch sizes: 2 ranks x 4 rows wrap the 11-slot queue on the second step; the last
# step gathers 2 x 7 = 14 rows, more than the queue holds.
BATCHES = [4, 4, 1, 3, 7]
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
TIMEOUT_S = 180


def rank_batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return (torch.randn(BATCHES[step], DIM, generator=g) * (rank + 1)).to(X_DTYPES[step])


def worker(rank, store_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE)
    try:
        queue = SupportQueue(SIZE, DIM, dtype=torch.bfloat16)
        local = NNMemoryBankModule(size=(SIZE, DIM), dtype=torch.bfloat16, gather_distributed=False)
        for step in range(len(BATCHES)):
            queue.enqueue(rank_batch(rank, step))
            local(rank_batch(rank, step), update=True)
        torch.save(queue.state_dict(), f"{out_dir}/rank{rank}.pt")
        torch.save(local.queue.state_dict(), f"{out_dir}/rank{rank}_local.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_ranks_hold_identical_queues(tmp_path):
    context = mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")

    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for key in ("bank", "ptr", "count"):
        assert torch.equal(states[0][key], states[1][key]), key

    # The same queue a single process gets by enqueueing the gathered batches in rank order.
    expected = (torch.zeros(SIZE, DIM, dtype=torch.bfloat16), torch.tensor(0), torch.tensor(0))
    for step in range(len(BATCHES)):
        gathered = torch.cat([rank_batch(rank, step) for rank in range(WORLD_SIZE)])
        expected = reference_enqueue(*expected, gathered)
    assert int(states[0]["ptr"]) == int(expected[1]) == (2 * sum(BATCHES)) % SIZE
    assert int(states[0]["count"]) == int(expected[2]) == SIZE
    torch.testing.assert_close(states[0]["bank"], expected[0], atol=torch.finfo(torch.bfloat16).eps, rtol=0)

    # gather_distributed=False (lightly's behaviour): each rank's bank holds its own rows only.
    for rank in range(WORLD_SIZE):
        local = torch.load(tmp_path / f"rank{rank}_local.pt")
        expected = (torch.zeros(SIZE, DIM, dtype=torch.bfloat16), torch.tensor(0), torch.tensor(0))
        for step in range(len(BATCHES)):
            expected = reference_enqueue(*expected, rank_batch(rank, step))
        assert int(local["ptr"]) == int(expected[1]) == sum(BATCHES) % SIZE
        torch.testing.assert_close(local["bank"], expected[0], atol=torch.finfo(torch.bfloat16).eps, rtol=0)
