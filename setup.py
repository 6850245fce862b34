# The C++/CUDA support-queue extension is compiled on first use (torch.utils.cpp_extension.load,
# cached by ninja), so a plain `pip install -e .` needs no compiler flags and no torch in the
# build environment. Metadata lives in pyproject.toml.
from setuptools import setup

setup()
