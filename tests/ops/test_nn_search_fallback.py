"""The fallback of nn_lookup / nn_topk: where the fused kernel cannot run, the PyTorch path answers.

A failure of the fused path is forced (a launch that raises Triton's OutOfResources or a
CompilationError, a plan that is a fallback, Triton missing) and the answer must still be the
oracle's (nnclr_fast.ops.reference), each kernel tried once per device and each distinct warning
given once however often it is called, also under torch.compile; strict mode (NNCLR_FAST_STRICT=1, which tests/conftest.py sets
for every other test) raises instead. On a machine without CUDA the fused path is the
interpreter's; on a GPU, the compiled kernel's.
"""

import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from nnclr_fast import nn_lookup, nn_topk
from nnclr_fast.ops import nn_search, nn_search_triton
from nnclr_fast.ops.nn_search_plan import FusedSearchUnavailable, fallback_plan
from nnclr_fast.ops.reference import reference_nn_lookup, reference_nn_topk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOGGER = "nnclr_fast.ops.nn_search"

pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not nn_search.interpreting(), reason="the fused path on the CPU needs TRITON_INTERPRET=1"
)

ERRORS = {
    "OutOfResources": OutOfResources(196_608, 101_376, "shared memory"),
    "CompilationError": CompilationError(None, None, "input_precision must be one of ('ieee',). Got tf32"),
}


@pytest.fixture
def lenient(monkeypatch):
    """Not strict, and fresh decisions: nothing learned or warned by earlier tests."""
    monkeypatch.delenv("NNCLR_FAST_STRICT", raising=False)
    monkeypatch.setattr(nn_search_triton, "_FAILED", {})
    monkeypatch.setattr(nn_search_triton, "_LAUNCHED", set())
    monkeypatch.setattr(nn_search, "_WARNED", set())


def failing_launch(monkeypatch, error):
    """Every launch of the fused kernel raises `error`; returns the list of attempts."""
    attempts = []

    def launch(*args):
        attempts.append(args)
        raise error

    monkeypatch.setattr(nn_search_triton, "_launch", launch)
    return attempts


def inputs():
    # Exactly representable scores (one-hot queries, small-integer rows): the oracle's ties and
    # values are exact, whatever path computes them.
    z = F.one_hot(torch.arange(12) % 10, 10).float() * 2
    queue = torch.randint(-2, 3, (500, 10), generator=torch.Generator().manual_seed(0)).float()
    return z.to(DEVICE), queue.to(DEVICE)


def assert_lookup_is_oracle(z, queue):
    out, idx = nn_lookup(z, queue, return_indices=True)
    ref_out, ref_idx = reference_nn_lookup(z, queue)
    assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out)


def assert_topk_is_oracle(z, queue, k=5):
    vals, idx = nn_topk(z, queue, k=k)
    ref_vals, ref_idx = reference_nn_topk(z, queue, k=k)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)


def warnings_of(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


@pytest.mark.parametrize("error", list(ERRORS), ids=str)
def test_a_kernel_that_fails_falls_back_once(lenient, monkeypatch, caplog, error):
    attempts = failing_launch(monkeypatch, ERRORS[error])
    z, queue = inputs()
    with caplog.at_level(logging.WARNING, logger="nnclr_fast"):
        for _ in range(3):
            assert_lookup_is_oracle(z, queue)
    assert len(attempts) == 1, "the failure is learned once, not retried per call"
    (record,) = warnings_of(caplog)
    message = record.getMessage()
    assert f"cannot run on {z.device}" in message and error in message and "Fix:" in message
    assert "the PyTorch path" in message
    # Top-5 is another kernel: tried once; its warning would say the same, so it is not repeated.
    with caplog.at_level(logging.WARNING, logger="nnclr_fast"):
        for _ in range(3):
            assert_topk_is_oracle(z, queue)
    assert len(attempts) == 2 and len(warnings_of(caplog)) == 1


def test_a_fallback_plan_never_launches(lenient, monkeypatch, caplog):
    attempts = failing_launch(monkeypatch, AssertionError("the fallback plan must not launch"))
    plan = fallback_plan(nn_search_triton.INTERPRETER, "a reason", "a fix")
    monkeypatch.setattr(nn_search_triton, "plan_search", lambda problem, device: plan)
    z, queue = inputs()
    with caplog.at_level(logging.WARNING, logger="nnclr_fast"):
        for _ in range(2):
            assert_lookup_is_oracle(z, queue)
            assert_topk_is_oracle(z, queue)
    assert not attempts
    (record,) = warnings_of(caplog)
    assert "a reason" in record.getMessage() and "Fix: a fix" in record.getMessage()


def test_a_kernel_that_launched_is_not_second_guessed(lenient, monkeypatch, caplog):
    # After a successful launch of a kernel, its later errors are the caller's (no fallback).
    z, queue = inputs()
    assert_lookup_is_oracle(z, queue)
    failing_launch(monkeypatch, ERRORS["OutOfResources"])
    with pytest.raises(OutOfResources):
        nn_lookup(z, queue)
    assert not warnings_of(caplog)


@pytest.mark.parametrize("error", list(ERRORS), ids=str)
def test_strict_mode_raises_with_the_message(lenient, monkeypatch, error):
    monkeypatch.setenv("NNCLR_FAST_STRICT", "1")
    failing_launch(monkeypatch, ERRORS[error])
    z, queue = inputs()
    for call in (lambda: nn_lookup(z, queue), lambda: nn_topk(z, queue, k=3)):
        with pytest.raises(FusedSearchUnavailable, match=f"cannot run on {z.device}: .*{error}.*Fix:") as info:
            call()
        assert "NNCLR_FAST_STRICT" in str(info.value)


def test_strict_mode_raises_for_a_fallback_plan(lenient, monkeypatch):
    monkeypatch.setenv("NNCLR_FAST_STRICT", "1")
    plan = fallback_plan(nn_search_triton.INTERPRETER, "a reason", "a fix")
    monkeypatch.setattr(nn_search_triton, "plan_search", lambda problem, device: plan)
    z, queue = inputs()
    with pytest.raises(FusedSearchUnavailable, match="a reason.*Fix: a fix"):
        nn_lookup(z, queue)


def test_without_triton_the_pytorch_path_answers(lenient, monkeypatch, caplog):
    # None in sys.modules makes the import fail as a missing package would.
    monkeypatch.setitem(sys.modules, "nnclr_fast.ops.nn_search_triton", None)
    z, queue = inputs()
    with caplog.at_level(logging.WARNING, logger="nnclr_fast"):
        assert_lookup_is_oracle(z, queue)
        assert_lookup_is_oracle(z, queue)
    (record,) = warnings_of(caplog)
    assert "Triton cannot be imported" in record.getMessage() and "pip install triton" in record.getMessage()


@pytest.mark.slow
def test_fallback_under_torch_compile(lenient, monkeypatch, caplog):
    attempts = failing_launch(monkeypatch, ERRORS["OutOfResources"])
    z, queue = inputs()

    def step(z, queue):
        out, idx = nn_lookup(z, queue, return_indices=True)
        vals, top = nn_topk(z, queue, k=5)
        return out, idx, vals, top

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with caplog.at_level(logging.WARNING, logger="nnclr_fast"):
        for _ in range(3):
            out, idx, vals, top = compiled(z, queue)
            ref_out, ref_idx = reference_nn_lookup(z, queue)
            ref_vals, ref_top = reference_nn_topk(z, queue, k=5)
            assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out)
            assert torch.equal(top, ref_top) and torch.equal(vals, ref_vals)
    # Lookup and top-5 are two kernels, each tried once, failing alike: one warning.
    assert len(attempts) == 2 and len(warnings_of(caplog)) == 1
