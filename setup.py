"""Build script: metadata lives in pyproject.toml.

The C++/CUDA sources of the enqueue op (csrc/) are always packaged, as nnclr_fast/csrc, so an
installed wheel can compile them on first use. When torch is importable at build time (a build
without isolation: `pip install --no-build-isolation .`, `pip wheel --no-build-isolation .`) the
extension is also compiled ahead of time into nnclr_fast._C, with the CUDA kernel when a CUDA
toolkit is found, as PyTorch's extension-cpp does. NNCLR_FAST_BUILD_EXTENSION=0 skips that.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCES = ["csrc/enqueue.cpp", "csrc/cuda/enqueue.cu"]


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package: setuptools packages only files inside a package."""

    def run(self):
        super().run()
        for source in SOURCES:
            target = Path(self.build_lib) / "nnclr_fast" / source
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / source, target)


def extensions():
    if os.environ.get("NNCLR_FAST_BUILD_EXTENSION", "1") == "0":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:  # an isolated build: the sources are compiled on first use instead
        return [], {}
    macros = [("NNCLR_FAST_AOT", None)]
    import torch

    toolkit = cpp_extension.CUDA_HOME is not None and (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").is_file()
    # Without a GPU nvcc needs to be told the architectures (TORCH_CUDA_ARCH_LIST).
    if toolkit and (torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST")):
        ext = cpp_extension.CUDAExtension(
            "nnclr_fast._C",
            SOURCES,
            define_macros=macros + [("NNCLR_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        )
    else:
        ext = cpp_extension.CppExtension("nnclr_fast._C", SOURCES[:1], define_macros=macros, extra_compile_args=["-O3"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
