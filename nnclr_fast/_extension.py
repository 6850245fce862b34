"""Builds and loads the C++/CUDA extension that provides ``torch.ops.nnclr_fast.enqueue_``.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, cached:
later processes rebuild only if a source changed), so ``pip install -e .`` needs no compiler flags
and no torch in the build environment. Sources live in ``<repo>/csrc``:

* ``csrc/enqueue.cpp``: op schema, CPU kernel;
* ``csrc/cuda/enqueue.cu``: CUDA kernel, compiled in only when ``torch.cuda.is_available()`` and
  the CUDA toolkit torch detected (``torch.utils.cpp_extension.CUDA_HOME``) has nvcc and headers.
  Otherwise CUDA tensors get an error that says what is missing.

The build goes to ``$NNCLR_FAST_BUILD_DIR/<name>`` if that variable is set, else to torch's
extensions directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
CPP_SOURCE = CSRC_DIR / "enqueue.cpp"
CUDA_SOURCE = CSRC_DIR / "cuda" / "enqueue.cu"
OP_NAME = "nnclr_fast::enqueue_"

_lock = threading.Lock()
_loaded = False
_cuda_missing_reason: str | None = "the extension is not loaded yet"

_HOW_TO_GET_CUDA = (
    "install the CUDA toolkit matching torch.version.cuda (it provides nvcc), set CUDA_HOME to its "
    "root (e.g. CUDA_HOME=/usr/local/cuda) and restart Python: the CUDA build is compiled on next use"
)


def _valid_toolkit(root: str | os.PathLike | None) -> bool:
    if not root:
        return False
    root = Path(root)
    return (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file()


def find_cuda_toolkit() -> str | None:
    """Root of a CUDA toolkit with nvcc and headers: $CUDA_HOME, $CUDA_PATH, the one torch
    detected, then /usr/local/cuda; None if there is none."""
    from torch.utils.cpp_extension import CUDA_HOME

    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME, "/usr/local/cuda"):
        if _valid_toolkit(root):
            return str(Path(root).resolve())
    return None


def _cuda_build_problem() -> str | None:
    """Why the CUDA kernel cannot be built into this process's extension, or None if it can."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    from torch.utils.cpp_extension import CUDA_HOME

    if _valid_toolkit(CUDA_HOME):
        return None
    found = find_cuda_toolkit()
    if CUDA_HOME is None:
        problem = "no CUDA toolkit was found (CUDA_HOME is unset and nvcc is not on PATH)"
    else:
        # torch derives CUDA_HOME from `which nvcc`, which a wrapper script can point elsewhere.
        problem = f"torch's CUDA_HOME={CUDA_HOME} lacks bin/nvcc or include/cuda_runtime.h"
    if found is not None:
        problem += f"; a toolkit exists at {found}: set CUDA_HOME={found} before starting Python"
    return problem


def _check_toolchain() -> None:
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        raise RuntimeError(
            "nnclr_fast compiles its C++ extension on first use and needs ninja, which was not "
            "found: `pip install ninja` (or install your distribution's ninja-build package)"
        )
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"nnclr_fast compiles its C++ extension on first use and needs a C++ compiler, but "
            f"{compiler!r} (from $CXX, default 'c++') is not on PATH: install g++ or clang++ "
            f"(e.g. `apt-get install g++`) or set CXX to your compiler"
        )
    for source in (CPP_SOURCE, CUDA_SOURCE):
        if not source.is_file():
            raise RuntimeError(
                f"nnclr_fast's C++ sources were not found at {source}: install nnclr_fast from a "
                f"source checkout (`pip install -e .`) so that csrc/ sits next to the package"
            )


def _build_and_load(name: str, with_cuda: bool, build_dir: str | os.PathLike | None) -> None:
    from torch.utils.cpp_extension import load

    _check_toolchain()
    if build_dir is not None:
        Path(build_dir).mkdir(parents=True, exist_ok=True)
    sources = [str(CPP_SOURCE)] + ([str(CUDA_SOURCE)] if with_cuda else [])
    cflags = ["-O3"] + (["-DNNCLR_FAST_WITH_CUDA"] if with_cuda else [])
    logger.info("loading the nnclr_fast extension %s (compiled on first use: about a minute)", name)
    try:
        load(
            name=name,
            sources=sources,
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3"],
            build_directory=None if build_dir is None else str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(
            f"building or loading the nnclr_fast C++ extension {name!r} from {CSRC_DIR} failed "
            f"(build dir: {build_dir or 'torch extensions dir'}): {exc}"
        ) from exc


def _register_fake() -> None:
    # Lets FakeTensor / torch.compile trace the op: it only mutates its inputs and returns nothing.
    @torch.library.register_fake(OP_NAME)
    def _(bank, ptr, count, x):
        # This also serves as the Meta kernel, which the dispatcher prefers over CPU when
        # devices are mixed: without this check a meta x with a CPU bank would be a silent no-op.
        for name, t in (("ptr", ptr), ("count", count), ("x", x)):
            if t.device != bank.device:
                raise ValueError(f"enqueue_: {name} must be on bank's device ({bank.device}), got {t.device}")
        return None


def _build_dir(name: str) -> Path | None:
    root = os.environ.get("NNCLR_FAST_BUILD_DIR")
    return Path(root) / name if root else None


def load_extension() -> None:
    """Compile (first time only) and load the extension; idempotent and thread-safe.

    Raises:
        RuntimeError: no ninja, no C++ compiler, no sources, or the build failed; the message
            says which.
    """
    global _loaded, _cuda_missing_reason
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        problem = _cuda_build_problem()
        name = "nnclr_fast_enqueue_cpu" if problem else "nnclr_fast_enqueue_cuda"
        _build_and_load(name, with_cuda=problem is None, build_dir=_build_dir(name))
        _register_fake()
        _cuda_missing_reason = problem
        _loaded = True


def has_cuda_kernel() -> bool:
    """Whether the loaded extension holds the CUDA kernel."""
    return _loaded and _cuda_missing_reason is None


def require_device(device: torch.device) -> None:
    """Raise a RuntimeError saying what is missing if the loaded op cannot run on ``device``."""
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"nnclr_fast's enqueue op runs on cpu and cuda devices only, got {device}")
    if device.type == "cuda" and not has_cuda_kernel():
        raise RuntimeError(
            f"nnclr_fast's enqueue op has no CUDA kernel in this process ({_cuda_missing_reason}). "
            f"To fix it: {_HOW_TO_GET_CUDA}."
        )


def compile_cuda_check(build_dir: str | os.PathLike, arch_list: str = "9.0", timeout: float = 1200) -> None:
    """Compile ``csrc/cuda/enqueue.cu`` with nvcc, link it with the CPU source and load it, in a
    fresh process: proves the CUDA source builds and registers a CUDA kernel, without a GPU.

    A separate process because the op schema can be registered only once per process, and this
    build must not replace the extension the current process uses. ``arch_list`` becomes
    TORCH_CUDA_ARCH_LIST (torch cannot pick an architecture without a GPU).

    Raises:
        RuntimeError: no CUDA toolkit, or the compile, link, load or registration check failed
            (with the compiler's output).
    """
    root = find_cuda_toolkit()
    if root is None:
        raise RuntimeError(f"no CUDA toolkit with nvcc was found: {_HOW_TO_GET_CUDA}")
    env = dict(os.environ, CUDA_HOME=root, TORCH_CUDA_ARCH_LIST=arch_list)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    code = "import sys; from nnclr_fast._extension import _cuda_check_main; _cuda_check_main(sys.argv[1])"
    result = subprocess.run(
        [sys.executable, "-c", code, str(build_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"the CUDA build check failed (exit code {result.returncode}):\n{result.stdout}\n{result.stderr}"
        )


def _cuda_check_main(build_dir: str) -> None:
    _build_and_load("nnclr_fast_enqueue_cuda_check", with_cuda=True, build_dir=build_dir)
    # The dispatcher records where each kernel was registered: the CUDA entry must come from the
    # .cu file, not from enqueue.cpp's "built without CUDA" fallback.
    dump = torch._C._dispatch_dump(OP_NAME)
    cuda_lines = [line for line in dump.splitlines() if line.startswith("CUDA")]
    if not any("enqueue.cu" in line for line in cuda_lines):
        raise SystemExit(f"the CUDA kernel was not registered from enqueue.cu; dispatcher state:\n{dump}")
