"""The enqueue op, ``torch.ops.nnclr_fast.enqueue_(bank, ptr, count, x)``: its Python side.

The op appends the L2-normalised rows of ``x`` to the ring buffer ``bank`` at the device-side
pointer ``ptr`` and advances ``ptr`` / ``count`` on the device (``nnclr_fast.ops.reference.
reference_enqueue`` is its definition). Its kernels come from the first of these that works:

1. the extension ``nnclr_fast._C`` compiled ahead of time by setup.py (a build with torch
   importable, e.g. ``pip install --no-build-isolation .``);
2. the same C++/CUDA sources compiled on first use (``torch.utils.cpp_extension.load``, ninja,
   cached): ``nnclr_fast/csrc`` in an installed wheel, ``csrc/`` in a source checkout. The CUDA
   kernel is built in when CUDA is available and a toolkit (nvcc + headers) is found;
3. where no C++ compiler exists, :func:`enqueue_torch`: the same semantics in plain PyTorch
   (indices computed on the device, no host sync, CUDA-graph safe), with one warning naming
   the fix. It also serves CUDA tensors when the C++ build has no CUDA kernel.

JIT builds go to ``$NNCLR_FAST_BUILD_DIR/<name>`` if set, else torch's extensions directory
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
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

OP_NAME = "nnclr_fast::enqueue_"
SCHEMA = "enqueue_(Tensor(a!) bank, Tensor(b!) ptr, Tensor(c!) count, Tensor x) -> ()"
AOT_MODULE = "nnclr_fast._C"
BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def source_dir() -> Path | None:
    """Where the C++/CUDA sources are: inside the installed package, or the checkout's csrc/."""
    for root in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (root / "enqueue.cpp").is_file() and (root / "cuda" / "enqueue.cu").is_file():
            return root
    return None


_lock = threading.Lock()
_backend: str | None = None  # "aot", "jit" or "torch" once loaded
_cuda_kernel_missing: str | None = "the extension is not loaded yet"
_torch_fallback_lib = None  # keeps the Python registrations alive

_HOW_TO_GET_CUDA = (
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


def _cuda_build_problem() -> str | None:
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


def _build_and_load(name: str, with_cuda: bool, build_dir: str | os.PathLike | None) -> None:
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
        # The one moment a user waits for this package: say why, once.
        print(
            f"nnclr_fast: compiling the {'C++/CUDA' if with_cuda else 'C++'} enqueue extension "
            f"(first use only, about {'a minute' if with_cuda else '10 s'}; cached in {build_dir})",
            file=sys.stderr,
            flush=True,
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


def _load_aot() -> bool:
    """Import the ahead-of-time build if there is one that loads with this torch."""
    try:
        importlib.import_module(AOT_MODULE)
    except ImportError:
        # Absent (a pure-Python install), or built against another torch (undefined symbols).
        return False
    return True


def _check_args(bank, ptr, count, x) -> None:
    # The C++ op's checks (check_enqueue_args in csrc/enqueue.cpp), with the same messages.
    if bank.dim() != 2:
        raise ValueError(f"enqueue_: bank must be 2-D (K, D), got shape {list(bank.shape)}")
    if bank.dtype not in BANK_DTYPES:
        raise TypeError(f"enqueue_: bank must be float32, bfloat16 or float16, got {bank.dtype}")
    if bank.shape[0] == 0:
        raise ValueError("enqueue_: bank must have at least one row (K > 0)")
    if bank.shape[1] == 0:
        raise ValueError("enqueue_: bank must have at least one column (D > 0)")
    for name, t in (("ptr", ptr), ("count", count)):
        if t.dim() != 0:
            raise ValueError(f"enqueue_: {name} must be a 0-dim tensor, got shape {list(t.shape)}")
        if t.dtype != torch.int64:
            raise TypeError(f"enqueue_: {name} must be int64, got {t.dtype}")
    if x.dim() != 2:
        raise ValueError(f"enqueue_: x must be 2-D (B, D), got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"enqueue_: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] != bank.shape[1]:
        raise ValueError(f"enqueue_: x must have bank's feature dim D = {bank.shape[1]}, got shape {list(x.shape)}")
    for name, t in (("ptr", ptr), ("count", count), ("x", x)):
        if t.device != bank.device:
            raise ValueError(f"enqueue_: {name} must be on bank's device ({bank.device}), got {t.device}")


def enqueue_torch(bank: torch.Tensor, ptr: torch.Tensor, count: torch.Tensor, x: torch.Tensor) -> None:
    """The enqueue op in plain PyTorch: same semantics and checks as the C++/CUDA kernels.

    The slots are computed on the device from ``ptr``, so nothing is read back to the host and
    the step can be captured in a CUDA graph. Four small kernels instead of one fused op.
    """
    _check_args(bank, ptr, count, x)
    num_slots, batch = bank.shape[0], x.shape[0]
    if batch == 0:
        return
    # Only the last num_slots rows survive a batch larger than the bank; each slot is written once.
    first = max(0, batch - num_slots)
    rows = F.normalize(x[first:].float(), dim=1).to(bank.dtype)
    slots = (ptr + first + torch.arange(batch - first, device=bank.device)) % num_slots
    bank.index_copy_(0, slots, rows)
    ptr.copy_((ptr + batch % num_slots) % num_slots)
    count.copy_(torch.clamp(count + batch, max=num_slots))


def _fake(bank, ptr, count, x):
    # Also the Meta kernel, which the dispatcher prefers over CPU when devices are mixed: without
    # these checks a meta x with a CPU bank would be a silent no-op. They read metadata only.
    _check_args(bank, ptr, count, x)


def _register_torch_fallback(define: bool) -> None:
    """Register :func:`enqueue_torch` for every device (``define``: the op does not exist yet) or
    only for CUDA (the C++ build has a CPU kernel but no CUDA one)."""
    global _torch_fallback_lib
    if define:
        lib = torch.library.Library("nnclr_fast", "FRAGMENT")
        lib.define(SCHEMA)
        for key in ("CPU", "CUDA"):
            lib.impl("enqueue_", enqueue_torch, key)
        # Version counters of the mutated tensors must move, as with any in-place op: autograd
        # then refuses a graph that saved the bank before this enqueue.
        lib.impl("enqueue_", _bump_versions, "ADInplaceOrView", with_keyset=True)
    else:
        lib = torch.library.Library("nnclr_fast", "IMPL")
        lib.impl("enqueue_", enqueue_torch, "CUDA")
    _torch_fallback_lib = lib


def _bump_versions(keyset, bank, ptr, count, x):
    with torch._C._AutoDispatchBelowADInplaceOrView():
        torch.ops.nnclr_fast.enqueue_.default.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, bank, ptr, count, x)
    torch.autograd.graph.increment_version((bank, ptr, count))


def _build_dir(name: str) -> Path | None:
    root = os.environ.get("NNCLR_FAST_BUILD_DIR")
    return Path(root) / name if root else None


def load_extension() -> str:
    """Make ``torch.ops.nnclr_fast.enqueue_`` available; idempotent and thread-safe.

    Returns which implementation serves it: "aot", "jit" or "torch" (see the module docstring).

    Raises:
        RuntimeError: a C++ toolchain exists but the build failed (with the compiler's output).
    """
    global _backend, _cuda_kernel_missing
    if _backend is not None:
        return _backend
    with _lock:
        if _backend is not None:
            return _backend
        if _load_aot():
            backend = "aot"
        else:
            problem = _cuda_build_problem()
            name = "nnclr_fast_enqueue_cpu" if problem else "nnclr_fast_enqueue_cuda"
            try:
                _build_and_load(name, with_cuda=problem is None, build_dir=_build_dir(name))
                backend = "jit"
            except ToolchainMissing as exc:
                warnings.warn(
                    f"{exc}. Until then SupportQueue.enqueue runs nnclr_fast's plain-PyTorch "
                    f"implementation (same results, a few small kernels instead of one fused op).",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _register_torch_fallback(define=True)
                backend = "torch"
        torch.library.register_fake(OP_NAME)(_fake)
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA")
        if backend != "torch" and not has_cuda:
            _cuda_kernel_missing = _cuda_build_problem() or "the extension was built without CUDA"
            if torch.cuda.is_available():
                warnings.warn(
                    f"nnclr_fast's enqueue extension has no CUDA kernel ({_cuda_kernel_missing}), so "
                    f"CUDA queues use its plain-PyTorch implementation. For the fused kernel: {_HOW_TO_GET_CUDA}.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _register_torch_fallback(define=False)
        else:
            _cuda_kernel_missing = None if backend != "torch" else "no C++ compiler"
        _backend = backend
        return backend


def has_cuda_kernel() -> bool:
    """Whether CUDA queues get the fused C++/CUDA kernel (rather than the PyTorch fallback)."""
    return _backend is not None and _cuda_kernel_missing is None


def require_device(device: torch.device) -> None:
    """Raise a RuntimeError if the enqueue op cannot run on ``device`` at all."""
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"nnclr_fast's enqueue op runs on cpu and cuda devices only, got {device}")


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
        raise RuntimeError(f"no CUDA toolkit with nvcc was found: {_HOW_TO_GET_CUDA}")
    env = dict(os.environ, CUDA_HOME=root, TORCH_CUDA_ARCH_LIST=arch_list)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_DIR.parent), env.get("PYTHONPATH")) if p)
    code = "import sys; from nnclr_fast.ops.enqueue import _cuda_check_main; _cuda_check_main(sys.argv[1])"
    result = subprocess.run(
        [sys.executable, "-c", code, str(build_dir)], env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"the CUDA build check failed (exit code {result.returncode}):\n{result.stdout}\n{result.stderr}"
        )


def _cuda_check_main(build_dir: str) -> None:
    _build_and_load("nnclr_fast_enqueue_cuda_check", with_cuda=True, build_dir=build_dir)
    # The dispatcher records where each kernel was registered: the CUDA entry must come from the
    # .cu file.
    dump = torch._C._dispatch_dump(OP_NAME)
    cuda_lines = [line for line in dump.splitlines() if line.startswith("CUDA")]
    if not any("enqueue.cu" in line for line in cuda_lines):
        raise SystemExit(f"the CUDA kernel was not registered from enqueue.cu; dispatcher state:\n{dump}")
