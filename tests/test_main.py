"""``python -m nnclr_fast`` on the CPU: the report, the self-check on the PyTorch path and under
the Triton interpreter, ``--bench``, and exit status 1 when a path disagrees with the oracle."""

import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
import triton

from nnclr_fast import info, selfcheck
from nnclr_fast.ops.nn_search_triton import interpreter_incompatibility

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, interpret: bool, timeout=600):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    # The checkout's package, whatever the current directory.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-m", "nnclr_fast", *args], env=env, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def assert_report(out: str):
    for heading in ("Versions", "Devices", "Search plans at B=512, D=48", "Enqueue op", "Triton interpreter", "Self-check"):
        assert heading in out, heading
    for name in ("torch", "Triton", "NumPy", "Python"):
        assert f"  {name} " in out, name
    assert "FAIL" not in out
    assert out.rstrip().endswith("OK: every check agrees with the oracle")


@pytest.mark.slow
def test_cli_pytorch_path():
    code, out = run_cli("--dim", "48", interpret=False)
    assert code == 0, out
    assert_report(out)
    assert "CPU tensors run the PyTorch path" in out
    assert "ok   cpu     nn_lookup / nn_topk (PyTorch path): B=20 K=700 D=48" in out
    assert "Triton interpreter):" not in out
    # The enqueue op, as dispatched and in its PyTorch implementation, for every bank dtype.
    assert "enqueue x float32, bfloat16, float16 (3 of 3 agree)" in out


@pytest.mark.slow
@pytest.mark.skipif(
    interpreter_incompatibility(triton.__version__, numpy.__version__) is not None,
    reason="Triton's interpreter cannot run with these versions",
)
def test_cli_interpreter_and_pytorch_path():
    code, out = run_cli("--dim", "48", interpret=True)
    assert code == 0, out
    assert_report(out)
    # The interpreter's plan for every queue dtype and precision.
    plans = [line for line in out.splitlines() if "fused kernel, config any_" in line]
    assert len(plans) == 6, out
    for shape in ("B=20 K=700 D=48", "B=9 K=301 D=40", "B=5 K=200 D=300"):
        assert f"ok   cpu     nn_lookup / nn_topk (Triton interpreter): {shape}" in out
        assert f"ok   cpu     PyTorch path: {shape}" in out
    assert "valid=100 tensor, valid=0 tensor, raw bank, strided rows" in out


@pytest.mark.slow
def test_cli_bench_on_cpu():
    code, out = run_cli("--no-check", "--bench", "--batch", "32", "--dim", "32", "--rows", "2048", "--rounds", "2", interpret=False)
    assert code == 0, out
    assert "Headline lookup on cpu: B=32, D=32, K=2,048" in out
    assert "nnclr_fast runs its PyTorch path here" in out
    for dtype in ("float32", "bfloat16"):
        assert f"{dtype} queue: nnclr_fast is" in out and "as fast as naive" in out
    assert "host clock, 2 rounds of 1 call(s)" in out


def test_cli_bench_refuses_to_time_the_interpreter():
    code, out = run_cli("--no-check", "--bench", "--rows", "64", interpret=True, timeout=300)
    assert code == 0, out
    assert "skipped: TRITON_INTERPRET=1 would time Triton's interpreter" in out


def test_bad_arguments_exit_2():
    code, out = run_cli("--dim", "0", "--no-check", interpret=False, timeout=300)
    assert code == 2 and "--dim must be a positive int" in out


# --------------------------------------------------------------------------------------------
# Forced mismatches, in process: a corrupted path must fail its checks and the run exit 1.


def _shifted_lookup(lookup):
    def wrong(z, queue, valid, ieee, normalize_queue):
        out, idx = lookup(z, queue, valid, ieee, normalize_queue)
        idx = (idx + 1) % queue.shape[0]
        return queue[idx].to(z.dtype), idx

    return wrong


def _swapped_topk(topk):
    def wrong(z, queue, k, valid, ieee, normalize_queue):
        vals, idx = topk(z, queue, k, valid, ieee, normalize_queue)
        return vals, idx.flip(1)

    return wrong


def _raising(*args):
    raise RuntimeError("this path is broken")


CORRUPTIONS = {
    "lookup": lambda p: selfcheck.SearchPath(p.label, _shifted_lookup(p.lookup), p.topk, p.interpreted),
    "topk": lambda p: selfcheck.SearchPath(p.label, p.lookup, _swapped_topk(p.topk), p.interpreted),
    "raises": lambda p: selfcheck.SearchPath(p.label, _raising, p.topk, p.interpreted),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupted_search_path_exits_1(monkeypatch, capsys, corruption):
    real = selfcheck.search_paths
    monkeypatch.setattr(selfcheck, "search_paths", lambda device: [CORRUPTIONS[corruption](p) for p in real(device)])
    assert info.main(["--quick", "--dim", "32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED: " in out
    if corruption == "raises":
        assert "RuntimeError: this path is broken" in out


def test_a_corrupted_enqueue_exits_1(monkeypatch, capsys):
    real = selfcheck.check_enqueue

    def off_by_one(bank, ptr, count, x):
        torch.ops.nnclr_fast.enqueue_(bank, ptr, count, x)
        ptr.add_(1).remainder_(bank.shape[0])

    monkeypatch.setattr(selfcheck, "check_enqueue", lambda device, op, label: real(device, off_by_one, label))
    assert info.main(["--quick", "--dim", "32"]) == 1
    out = capsys.readouterr().out
    assert "FAILED enqueue float32: after a batch of 5: ptr, count" in out
