"""SupportQueue: FIFO state, checkpointing, lookup over the filled rows only, input checks."""

import io

import pytest
import torch
import torch.nn.functional as F

from nnclr_fast import SupportQueue
from nnclr_fast.reference import reference_enqueue, reference_nn_lookup

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


def test_corrupted_checkpoint_is_rejected_on_enqueue():
    queue = SupportQueue(6, 3)
    queue.load_state_dict({"bank": torch.zeros(6, 3), "ptr": torch.tensor(6), "count": torch.tensor(2)})
    before = state(queue)
    with pytest.raises(ValueError, match="ptr must be in"):
        queue.enqueue(torch.randn(2, 3))
    assert_state_equal(queue, before)


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
    _, ref_idx = reference_nn_lookup(z, queue.bank, valid=10)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_on_empty_queue_returns_normalised_query(dtype):
    queue = SupportQueue(8, 5)
    z = (torch.randn(4, 5) * 7).to(dtype)
    out, idx = queue.lookup(z, return_indices=True)
    assert out.dtype == dtype
    assert torch.equal(out, F.normalize(z.float(), dim=1).to(dtype))
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
