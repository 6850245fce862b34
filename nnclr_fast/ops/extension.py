"""Building and loading nnclr_fast's C++/CUDA extension (the enqueue op's kernels).

Two ways, tried in this order by :func:`nnclr_fast.ops.enqueue.load_extension`:

1. the module ``nnclr_fast._C`` compiled ahead of time by setup.py (a build with torch
   importable, e.g. ``pip install --no-build-isolation .``);
2. the same C++/CUDA sources compiled on first use (``torch.utils.cpp_extension.load``, ninja,
   cached): ``nnclr_fast/csrc`` in an installed wheel, ``csrc/`` in a source checkout. The CUDA
   kernel is built in when CUDA is available and a toolkit (nvcc + headers) is found.

First-use builds go to ``$NNCLR_FAST_BUILD_DIR/<name>`` if set, else torch's extensions directory
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

AOT_MODULE = "nnclr_fast._C"
# The op the extension registers (its schema is in csrc/enqueue.cpp).
OP_NAME = "nnclr_fast::enqueue_"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent

log = logging.getLogger(__name__)


def source_dir() -> Path | None:
    """Where the C++/CUDA sources are: inside the installed package, or the checkout's csrc/."""
    for root in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (root / "enqueue.cpp").is_file() and (root / "cuda" / "enqueue.cu").is_file():
            return root
    return None


HOW_TO_GET_CUDA = (
    "install the CUDA toolkit matching torch.version.cuda (it provides nvcc), set CUDA_HOME to its "
    "root (e.g. CUDA_HOME=/usr/local/cuda) and restart Python: the CUDA build is compiled on next use"
)


@contextlib.contextmanager
def _quiet_cpp_extension():
    # Importing torch.utils.cpp_extension on a CPU-only machine with a toolkit installed logs
    # "No CUDA runtime is found, using CUDA_HOME=...": noise for users who never asked for CUDA.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _cpp_extension():
    with _quiet_cpp_extension():
        import torch.utils.cpp_extension as cpp_extension
    return cpp_extension


def _valid_toolkit(root: str | os.PathLike | None) -> bool:
    if not root:
        return False
    root = Path(root)
    return (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file()


def find_cuda_toolkit() -> str | None:
    """Root of a CUDA toolkit with nvcc and headers: $CUDA_HOME, $CUDA_PATH, the one torch
    detected, then /usr/local/cuda; None if there is none."""
    detected = _cpp_extension().CUDA_HOME
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), detected, "/usr/local/cuda"):
        if _valid_toolkit(root):
            return str(Path(root).resolve())
    return None


def cuda_build_problem() -> str | None:
    """Why the CUDA kernel cannot be built into this process's extension, or None if it can."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    detected = _cpp_extension().CUDA_HOME
    if _valid_toolkit(detected):
        return None
    found = find_cuda_toolkit()
    if detected is None:
        problem = "no CUDA toolkit was found (CUDA_HOME is unset and nvcc is not on PATH)"
    else:
        # torch derives CUDA_HOME from `which nvcc`, which a wrapper script can point elsewhere.
        problem = f"torch's CUDA_HOME={detected} lacks bin/nvcc or include/cuda_runtime.h"
    if found is not None:
        problem += f"; a toolkit exists at {found}: set CUDA_HOME={found} before starting Python"
    return problem


class ToolchainMissing(RuntimeError):
    """No ninja or no C++ compiler: the JIT build cannot even start."""


def _check_toolchain() -> None:
    if not _cpp_extension().is_ninja_available():
        raise ToolchainMissing(
            "nnclr_fast compiles its C++ extension on first use and needs ninja, which was not "
            "found: `pip install ninja` (or install your distribution's ninja-build package)"
        )
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ToolchainMissing(
            f"nnclr_fast compiles its C++ extension on first use and needs a C++ compiler, but "
            f"{compiler!r} (from $CXX, default 'c++') is not on PATH: install g++ or clang++ "
            f"(e.g. `apt-get install g++`) or set CXX to your compiler"
        )


def build_and_load(name: str, with_cuda: bool, build_dir: str | os.PathLike | None) -> None:
    _check_toolchain()
    sources = source_dir()
    if sources is None:
        raise RuntimeError(
            f"nnclr_fast's C++ sources were found neither in {_PACKAGE_DIR / 'csrc'} (an installed "
            f"wheel) nor in {_PACKAGE_DIR.parent / 'csrc'} (a source checkout): reinstall nnclr_fast"
        )
    cpp_extension = _cpp_extension()
    if build_dir is None:
        build_dir = cpp_extension._get_build_directory(name, verbose=False)
    Path(build_dir).mkdir(parents=True, exist_ok=True)
    files = [sources / "enqueue.cpp"] + ([sources / "cuda" / "enqueue.cu"] if with_cuda else [])
    built = Path(build_dir) / f"{name}.so"
    if not built.is_file() or built.stat().st_mtime < max(f.stat().st_mtime for f in files):
        # The one moment a user waits for this package: say why (INFO: shown where logging is
        # configured, e.g. by nnclr-train; a library stays quiet otherwise).
        log.info(
            "compiling the %s enqueue extension (first use only, about %s; cached in %s)",
            "C++/CUDA" if with_cuda else "C++", "a minute" if with_cuda else "10 s", build_dir,
        )
    cflags = ["-O3"] + (["-DNNCLR_FAST_WITH_CUDA"] if with_cuda else [])
    try:
        with _quiet_cpp_extension():
            cpp_extension.load(
                name=name,
                sources=[str(f) for f in files],
                extra_cflags=cflags,
                extra_cuda_cflags=["-O3"],
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=False,
            )
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(
            f"building or loading the nnclr_fast C++ extension {name!r} from {sources} failed "
            f"(build dir: {build_dir}): {exc}"
        ) from exc


def load_aot() -> bool:
    """Import the ahead-of-time build if there is one that loads with this torch."""
    try:
        importlib.import_module(AOT_MODULE)
    except ImportError:
        # Absent (a pure-Python install), or built against another torch (undefined symbols).
        return False
    return True


def build_dir_for(name: str) -> Path | None:
    root = os.environ.get("NNCLR_FAST_BUILD_DIR")
    return Path(root) / name if root else None


def compile_cuda_check(build_dir: str | os.PathLike, arch_list: str = "9.0", timeout: float = 1200) -> None:
    """Compile ``enqueue.cu`` with nvcc, link it with the CPU source and load it, in a fresh
    process: proves the CUDA source builds and registers a CUDA kernel, without a GPU.

    A separate process because the op schema can be registered only once per process, and this
    build must not replace the extension the current process uses. ``arch_list`` becomes
    TORCH_CUDA_ARCH_LIST (torch cannot pick an architecture without a GPU).

    Raises:
        RuntimeError: no CUDA toolkit, or the compile, link, load or registration check failed
            (with the compiler's output).
    """
    root = find_cuda_toolkit()
    if root is None:
        raise RuntimeError(f"no CUDA toolkit with nvcc was found: {HOW_TO_GET_CUDA}")
    env = dict(os.environ, CUDA_HOME=root, TORCH_CUDA_ARCH_LIST=arch_list)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_DIR.parent), env.get("PYTHONPATH")) if p)
    code = "import sys; from nnclr_fast.ops.extension import _cuda_check_main; _cuda_check_main(sys.argv[1])"
    result = subprocess.run(
        [sys.executable, "-c", code, str(build_dir)], env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"the CUDA build check failed (exit code {result.returncode}):\n{result.stdout}\n{result.stderr}"
        )


def _cuda_check_main(build_dir: str) -> None:
    build_and_load("nnclr_fast_enqueue_cuda_check", with_cuda=True, build_dir=build_dir)
    # The dispatcher records where each kernel was registered: the CUDA entry must come from the
    # .cu file.
    dump = torch._C._dispatch_dump(OP_NAME)
    cuda_lines = [line for line in dump.splitlines() if line.startswith("CUDA")]
    if not any("enqueue.cu" in line for line in cuda_lines):
        raise SystemExit(f"the CUDA kernel was not registered from enqueue.cu; dispatcher state:\n{dump}")
