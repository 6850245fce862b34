"""nnclr_fast as an installed package: wheels built from this checkout work from outside it, and
the op library imports without the recipe's optional dependencies."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Run from a directory outside the checkout, with only the installed wheel on the path.
USE_INSTALLED = """
import sys
# An editable install of the checkout adds a finder that would serve nnclr_fast._C from the
# checkout (where `pip install --no-build-isolation -e .` builds it) to the installed package.
sys.meta_path[:] = [finder for finder in sys.meta_path if getattr(finder, "__name__", "") != "_EditableFinder"]
import torch
import nnclr_fast
from nnclr_fast.ops import enqueue as enqueue_op, extension
site = sys.argv[1]
assert nnclr_fast.__file__.startswith(site), nnclr_fast.__file__
queue = nnclr_fast.SupportQueue(16, 8)
queue.enqueue(torch.randn(5, 8))
out, idx = queue.lookup(torch.randn(3, 8), return_indices=True)
assert out.shape == (3, 8) and ((idx >= 0) & (idx < 5)).all()
vals, top = nnclr_fast.nn_topk(torch.randn(2, 8), queue.bank, 3, valid=queue.count)
assert top.shape == (2, 3)
print("backend", enqueue_op.load_extension(), extension.source_dir())
"""


def build_and_install(tmp_path: Path, **env) -> Path:
    """Build a wheel of the checkout into tmp_path/wheels, install it into tmp_path/site."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build_env = dict(os.environ, **env)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        env=build_env, check=True, capture_output=True, timeout=600,
    )
    (wheel,) = wheels.glob("nnclr_fast-*.whl")
    check_wheel_contents(wheel)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    return site


def run_outside(tmp_path: Path, site: Path) -> str:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), NNCLR_FAST_BUILD_DIR=str(tmp_path / "jit"))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", USE_INSTALLED, str(site)], cwd=outside, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_wheel_with_the_extension_built_ahead_of_time(tmp_path):
    site = build_and_install(tmp_path)
    assert list((site / "nnclr_fast").glob("_C*.so")), "setup.py did not build nnclr_fast._C"
    out = run_outside(tmp_path, site)
    assert "backend aot" in out


def check_wheel_contents(wheel: Path) -> None:
    """What every wheel carries: the C++/CUDA sources, py.typed, the licence, the version of
    nnclr_fast.__version__ and the nnclr-train console script."""
    import nnclr_fast

    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert "nnclr_fast/csrc/enqueue.cpp" in names and "nnclr_fast/csrc/cuda/enqueue.cu" in names
    assert "nnclr_fast/py.typed" in names
    dist_info = f"nnclr_fast-{nnclr_fast.__version__}.dist-info"
    assert archive.read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
    metadata = archive.read(f"{dist_info}/METADATA").decode()
    assert f"\nVersion: {nnclr_fast.__version__}\n" in metadata and "\nLicense-Expression: Apache-2.0\n" in metadata
    entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert "[console_scripts]\nnnclr-train = nnclr_fast.recipe.cli:run" in entry_points


@pytest.fixture(scope="module")
def pure_python_wheel(tmp_path_factory) -> Path:
    """A wheel without the ahead-of-time extension, installed into a directory of its own."""
    return build_and_install(tmp_path_factory.mktemp("pure"), NNCLR_FAST_BUILD_EXTENSION="0")


@pytest.mark.slow
def test_pure_python_wheel_compiles_its_packaged_sources(pure_python_wheel, tmp_path):
    site = pure_python_wheel
    assert not list((site / "nnclr_fast").glob("_C*.so"))
    out = run_outside(tmp_path, site)
    assert f"backend jit {site / 'nnclr_fast' / 'csrc'}" in out


@pytest.mark.slow
def test_the_installed_nnclr_train_command_runs_from_outside_the_checkout(pure_python_wheel, tmp_path):
    site = pure_python_wheel
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [str(site / "bin" / "nnclr-train"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("usage: nnclr-train")
    assert "nnclr-train [options]" in result.stdout and "python examples/train_nnclr.py [options]" in result.stdout
    assert "--monitor-every" in result.stdout and "--overwrite" in result.stdout


VERSION_WITHOUT_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("the build must not import torch to read the version")
sys.meta_path.insert(0, NoTorch())
from setuptools.config.expand import read_attr
print(read_attr("nnclr_fast.__version__", root_dir=sys.argv[1]))
"""


def test_the_build_reads_the_one_version_without_importing_torch():
    import nnclr_fast

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nnclr_fast.__version__"}
    result = subprocess.run([sys.executable, "-c", VERSION_WITHOUT_TORCH, str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == nnclr_fast.__version__


BLOCK_RECIPE_DEPS = """
import importlib.abc, importlib.machinery, sys, traceback
BLOCKED = ("sklearn", "torchvision", "matplotlib", "tqdm", "safetensors", "lightly")
attempts = []

class Absent(importlib.abc.Loader):
    # Found (torch probes some of these with find_spec) but never importable.
    def create_module(self, spec):
        # Who asked: torch itself tries some optionally (torch.hub and tqdm); nnclr_fast must not.
        importer = [f.filename for f in traceback.extract_stack() if not f.filename.startswith("<")][-1]
        if "nnclr_fast" in importer:
            attempts.append((spec.name, importer))
        raise ImportError(f"{spec.name} is blocked by this test")

    def exec_module(self, module):
        pass

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Absent())

sys.meta_path.insert(0, Block())
import torch
import nnclr_fast
from nnclr_fast import NNMemoryBankModule, SupportQueue, nn_lookup, nn_topk

z, bank = torch.randn(4, 8), torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
assert nn_lookup(z, bank).shape == (4, 8) and nn_topk(z, bank, 3)[1].shape == (4, 3)
queue = SupportQueue(10, 8)
queue.enqueue(z)
assert NNMemoryBankModule(size=(10, 8))(z, update=True).shape == (4, 8)
assert not attempts, attempts
print("ok")
"""


def test_op_library_needs_none_of_the_recipe_dependencies():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", BLOCK_RECIPE_DEPS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


QUIET_LIBRARY = """
import logging, sys
import nnclr_fast
from nnclr_fast.ops import extension

assert logging.getLogger("nnclr_fast").handlers == [], "a library adds no handlers"

class FakeCppExtension:  # a first-use build, without compiling
    is_ninja_available = staticmethod(lambda: True)
    load = staticmethod(lambda **kwargs: None)

extension._cpp_extension = lambda: FakeCppExtension
extension.build_and_load("nnclr_fast_quiet", with_cuda=False, build_dir=sys.argv[1])  # INFO: silent
logging.getLogger("nnclr_fast.ops.enqueue").warning("a warning still reaches stderr")
"""


def test_the_library_logs_quietly_unless_configured(tmp_path):
    result = subprocess.run([sys.executable, "-c", QUIET_LIBRARY, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # Python's last-resort handler: WARNING and above, the bare message, nothing else.
    assert result.stderr == "a warning still reaches stderr\n" and result.stdout == ""
