import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")


def _nvcc():
    """Path of nvcc (CUDA_HOME/bin, then PATH), or None."""
    import shutil

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def _cuda_root(nvcc):
    """The toolkit folder: CUDA_HOME, the folder above nvcc's bin (nvcc may be
    a wrapper script elsewhere on PATH), or /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    for root in filter(None, roots):
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if Path(root, lib, "libcudart_static.a").exists():
                return root, str(Path(root, lib))
    raise RuntimeError(f"found {nvcc} but no CUDA toolkit with libcudart_static.a; set CUDA_HOME")


def cpp_extensions():
    """clipfast._cpu always (CLIPFAST_SKIP_CPP=1 leaves all out); clipfast._cuda
    whenever nvcc is found (CLIPFAST_CUDA=0 skips it, =1 requires it);
    clipfast._cuda_emulated, the CUDA kernels compiled for the CPU emulation
    that lets the tests run them without a GPU, unless CLIPFAST_CUDA_EMULATION=0.

    CUDA code is built for explicit architectures (CLIPFAST_CUDA_ARCHS, default
    "80;90") plus PTX of the newest, never for whatever GPU happens to be
    present; cudart is linked statically, so the module loads on machines
    without a GPU (calls then raise). CLIPFAST_NATIVE=1 adds -march=native.
    """
    if os.environ.get("CLIPFAST_SKIP_CPP", "0") == "1":
        return [], {}
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    # -fno-math-errno lets the exp loops vectorise (glibc's libmvec); nothing
    # reads errno. Hot loops carry their own AVX2 clones (target_clones).
    flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("CLIPFAST_NATIVE", "0") == "1":
        flags.append("-march=native")
    extensions = [Pybind11Extension(
        "clipfast._cpu",
        # siglip_cpu.cpp includes clip_loss_cpu.cpp: one translation unit,
        # so that SigLIP calls the CLIP backend's tile helpers.
        sources=["csrc/bindings.cpp", "csrc/cpu/siglip_cpu.cpp"],
        include_dirs=["csrc", "csrc/include"],
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )]

    if os.environ.get("CLIPFAST_CUDA_EMULATION", "1") != "0":
        sys.path.insert(0, str(Path(__file__).parent / "csrc" / "emulate"))
        from rewrite_launches import emulated_cuda_sources

        extensions.append(Pybind11Extension(
            "clipfast._cuda_emulated",
            sources=["csrc/cuda_bindings.cpp", *emulated_cuda_sources("build/emulated_cuda")],
            # The emulation headers stand in for the CUDA toolkit's.
            include_dirs=["csrc/emulate", "csrc", "csrc/include"],
            define_macros=[("CLIPFAST_CUDA_MODULE", "_cuda_emulated")],
            extra_compile_args=["-O2", "-pthread", "-fno-strict-aliasing", "-Wno-unknown-pragmas"],
            extra_link_args=["-pthread"],
            cxx_std=20,
        ))

    mode = os.environ.get("CLIPFAST_CUDA", "auto")
    nvcc = _nvcc() if mode != "0" else None
    if mode == "1" and nvcc is None:
        raise RuntimeError("CLIPFAST_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    if nvcc is not None:
        cuda_root, cuda_lib = _cuda_root(nvcc)
        extensions.append(Pybind11Extension(
            "clipfast._cuda",
            sources=["csrc/cuda_bindings.cpp", "csrc/cuda/clip_loss_cuda.cu",
                     "csrc/cuda/siglip.cu", "csrc/cuda/tiles.cu"],
            include_dirs=["csrc", "csrc/include", str(Path(cuda_root, "include"))],
            library_dirs=[cuda_lib],
            libraries=["cudart_static", "dl", "rt", "pthread"],
            extra_compile_args=["-O3"],
            cxx_std=17,
        ))

    class BuildExt(build_ext):
        """build_ext that hands .cu sources to nvcc and links the objects."""

        def build_extension(self, ext):
            cu_sources = [src for src in ext.sources if src.endswith(".cu")]
            if cu_sources:
                archs = os.environ.get("CLIPFAST_CUDA_ARCHS", "80;90").split(";")
                gencode = []
                for arch in archs:
                    gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
                gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
                build_dir = Path(self.build_temp)
                build_dir.mkdir(parents=True, exist_ok=True)
                for src in cu_sources:
                    obj = build_dir / (Path(src).stem + ".o")
                    cmd = [nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", *gencode,
                           *[f"-I{inc}" for inc in ext.include_dirs], "-c", src, "-o", str(obj)]
                    self.spawn(cmd)
                    ext.extra_objects.append(str(obj))
                ext.sources = [src for src in ext.sources if not src.endswith(".cu")]
            super().build_extension(ext)

    return extensions, {"build_ext": BuildExt}


EXTENSIONS, CMDCLASS = cpp_extensions()

setup(
    name="clipfast",
    version="0.1.0",
    description="Fused, linear-memory CLIP contrastive loss (Triton kernels, PyTorch autograd)",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["clipfast", "clipfast.*"]),
    # backend="auto"'s measured choices (clipfast/autoselect.py).
    package_data={"clipfast": ["auto_table.json"]},
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
        # pybind11: scripts/asan_emulated.sh compiles the sanitised CUDA
        # emulation outside pip's isolated build environment.
        # clipfast.integrations: the clients it plugs into (tests run against
        # them; importing clipfast never imports them). datasets/accelerate:
        # sentence-transformers' trainer.
        "integrations": ["open_clip_torch>=3.0", "transformers>=4.45",
                         "sentence-transformers>=6.3", "datasets>=2.19", "accelerate>=0.26"],
        "test": ["pytest>=7", "pytest-xdist>=3", "numpy<2.4", "matplotlib>=3.7",
                 "scikit-learn>=1.2", "tokenizers>=0.15", "pybind11>=2.10"],
    },
)
