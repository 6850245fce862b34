"""nnclr_fast.benchmark: the timer and the queue copies (the baselines are exercised by
benchmarks/ and by tests/test_main.py's --bench run)."""

import pytest
import torch
import torch.nn.functional as F

import nnclr_fast
from nnclr_fast import benchmark


def test_cpu_timer_is_the_host_clock_one_call_per_round():
    calls = []
    timing = benchmark.time_calls(lambda item: calls.append(item), ["a", "b"], torch.device("cpu"), rounds=4)
    assert timing.method == "host clock" and timing.calls_per_round == 1
    assert len(timing.per_call_s) == 4 and all(t >= 0 for t in timing.per_call_s)
    # Two untimed calls first, then one per round; the CPU is timed on the first input only.
    assert calls == ["a", "a", "a", "a", "a", "a"]
    assert timing.min_s <= timing.median_s and timing.iqr_s >= 0
    assert timing.as_dict()["rounds"] == 4


def test_timing_statistics():
    timing = benchmark.Timing((4.0, 1.0, 3.0, 2.0, 5.0), "host clock", 1)
    assert (timing.median_s, timing.min_s) == (3.0, 1.0)
    assert timing.iqr_s == pytest.approx(3.0)  # quartiles 1.5 and 4.5 (exclusive method)


def test_cpu_queue_is_not_copied():
    queue = torch.randn(10, 4)
    (only,) = benchmark.queue_copies(queue)
    assert only is queue


def test_naive_lookup_agrees_with_nnclr_fast():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 32, generator=gen)
    queue = F.normalize(torch.randn(500, 32, generator=gen), dim=1)
    out, idx = benchmark.naive_lookup(z, queue, "ieee")
    _, ref = nnclr_fast.nn_lookup(z, queue, precision="ieee", return_indices=True)
    assert torch.equal(idx, ref) and torch.equal(out, queue[idx])
    vals, top = benchmark.naive_topk(z, queue, 3, "ieee")
    assert torch.equal(top[:, 0], ref)


@pytest.mark.gpu
class TestCUDA:
    def test_queue_copies_exceed_twice_the_cache(self):
        queue = torch.randn(98_304, 256, device="cuda", dtype=torch.bfloat16)
        copies = benchmark.queue_copies(queue)
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        assert len(copies) >= 2 and copies[0] is queue
        assert len({c.data_ptr() for c in copies}) == len(copies)
        assert sum(c.numel() * c.element_size() for c in copies) >= 2 * max(l2, benchmark.MIN_CACHE_BYTES)
        assert all(torch.equal(c, queue) for c in copies)

    def test_lookup_is_timed_from_a_cuda_graph(self):
        z = torch.randn(512, 256, device="cuda")
        queue = F.normalize(torch.randn(32_768, 256, device="cuda"), dim=1).to(torch.bfloat16)
        copies = benchmark.queue_copies(queue)
        seen = []

        def call(q):
            seen.append(q.data_ptr())
            return nnclr_fast.nn_lookup(z, q, return_indices=True)

        timing = benchmark.time_calls(call, copies, torch.device("cuda"), rounds=5)
        assert timing.method == "cuda graph", timing.note
        assert timing.calls_per_round % len(copies) == 0
        assert timing.calls_per_round * timing.median_s >= 0.5 * benchmark.MIN_ROUND_S
        assert set(seen) == {c.data_ptr() for c in copies}
        assert len(timing.per_call_s) == 5 and 0 < timing.min_s <= timing.median_s

    def test_uncapturable_calls_are_timed_eagerly_with_events(self):
        x = torch.randn(1000, device="cuda")
        # .item() synchronises with the host, which a capture does not allow.
        timing = benchmark.time_calls(lambda t: t.sum().item(), [x], torch.device("cuda"), rounds=3)
        assert timing.method == "cuda events" and "graph capture failed" in timing.note
        assert len(timing.per_call_s) == 3 and timing.min_s > 0
