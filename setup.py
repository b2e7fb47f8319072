import os
from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")


def cpp_extensions():
    """The C++ CPU backend (clipfast._cpu); CLIPFAST_SKIP_CPP=1 leaves it out.

    CLIPFAST_NATIVE=1 adds -march=native (faster, not portable to older CPUs).
    """
    if os.environ.get("CLIPFAST_SKIP_CPP", "0") == "1":
        return [], {}
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    # -fno-math-errno lets the exp loops vectorise (glibc's libmvec); nothing
    # reads errno. Hot loops carry their own AVX2 clones (target_clones).
    flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("CLIPFAST_NATIVE", "0") == "1":
        flags.append("-march=native")
    ext = Pybind11Extension(
        "clipfast._cpu",
        sources=["csrc/bindings.cpp", "csrc/cpu/clip_loss_cpu.cpp"],
        include_dirs=["csrc", "csrc/include"],
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )
    return [ext], {"build_ext": build_ext}


EXTENSIONS, CMDCLASS = cpp_extensions()

setup(
    name="clipfast",
    version="0.1.0",
    description="Fused, linear-memory CLIP contrastive loss (Triton kernels, PyTorch autograd)",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["clipfast", "clipfast.*"]),
    python_requires=">=3.10",
    ext_modules=EXTENSIONS,
    cmdclass=CMDCLASS,
    install_requires=[
        "torch>=2.6",
        # Triton ships with CUDA builds of torch; CPU builds need it for the
        # interpreter. Only Linux wheels exist.
        "triton>=3.2; platform_system == 'Linux'",
        "tqdm>=4.60",
    ],
    extras_require={
        "bench": ["matplotlib>=3.7"],
        # python -m clipfast.train: scikit-learn ships the digits, tokenizers
        # trains the BPE vocabulary offline.
        "train": ["scikit-learn>=1.2", "tokenizers>=0.15", "matplotlib>=3.7"],
        # numpy<2.4: Triton 3.6's interpreter converts 1-element arrays to
        # Python scalars, which numpy 2.4 turned into an error.
        "test": ["pytest>=7", "pytest-xdist>=3", "numpy<2.4", "matplotlib>=3.7",
                 "scikit-learn>=1.2", "tokenizers>=0.15"],
    },
)
