"""Every Python block in README.md and docs/*.md runs as written, in a fresh process on this
machine's device (the CPU in CI), from a scratch directory: the documentation cannot rot."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCKS = [
    (document.relative_to(REPO).as_posix(), index, code)
    for document in DOCUMENTS
    for index, code in enumerate(re.findall(r"^```python\n(.*?)^```", document.read_text(), flags=re.M | re.S))
]


def test_the_documents_have_python_blocks():
    counts = {name: sum(1 for n, _, _ in BLOCKS if n == name) for name in ("README.md", "docs/training.md")}
    assert counts["README.md"] >= 3 and counts["docs/training.md"] >= 2, counts


def test_every_document_link_points_at_a_file():
    for document in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", document.read_text()):
            if "://" in target:
                continue
            assert (document.parent / target).exists(), f"{document.relative_to(REPO)} links to missing {target}"


@pytest.fixture
def exported_encoder(tmp_path):
    """What the export block needs first: `nnclr-train --export encoder/` (1 epoch)."""
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


@pytest.mark.parametrize("document,index,code", BLOCKS, ids=[f"{name}-block{index}" for name, index, _ in BLOCKS])
def test_documented_python_block_runs(document, index, code, tmp_path, request):
    if "load_encoder(" in code:
        request.getfixturevalue("exported_encoder")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=block_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{document} block {index} failed:\n{code}\n{result.stdout}\n{result.stderr}"
