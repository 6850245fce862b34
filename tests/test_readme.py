"""Every Python block in README.md runs as written, in a fresh process on this machine's device
(the CPU in CI), from a scratch directory: the README cannot rot."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.M | re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.fixture
def exported_encoder(tmp_path):
    """What the README's export block needs first: `train_nnclr.py --export encoder/` (1 epoch)."""
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_nnclr.py"), "--epochs", "1", "--out-dir", "run",
         "--export", "encoder", "--no-progress", "--few-shot-draws", "1"],
        cwd=tmp_path, env=block_env(), check=True, capture_output=True, timeout=600,
    )


def block_env():
    env = dict(os.environ)
    # What a user's process sees: the CPU path on CPU tensors, not the test suite's interpreter.
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_python_block_runs(index, tmp_path, request):
    code = BLOCKS[index]
    if "load_encoder(" in code:
        request.getfixturevalue("exported_encoder")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=block_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README block {index} failed:\n{code}\n{result.stdout}\n{result.stderr}"
