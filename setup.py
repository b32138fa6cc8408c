"""Build recjpq's extensions: the C++ (and, with nvcc, CUDA) code under ``csrc/``, compiled with ninja
through ``torch.utils.cpp_extension``, and the Triton kernels' folder ``kernels/`` as
``recjpq.kernels``. The metadata is in pyproject.toml.

Build with the torch you installed: ``pip install --no-build-isolation -e .`` (or ``python -m build
--wheel --no-isolation``); an isolated build would download another torch. ``RECJPQ_NO_EXT=1``
skips every extension; ``RECJPQ_NO_CUDA=1`` skips the CUDA one.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("recjpq's build needs torch: install it first (see README), then build with that torch: "
             "`pip install --no-build-isolation -e .` or `python -m build --wheel --no-isolation`")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    if os.environ.get("RECJPQ_NO_EXT") == "1":
        print("recjpq: RECJPQ_NO_EXT=1, building no extension (only the reference and Triton backends)")
        return []
    exts = []
    cpu_sources = _sources("csrc/cpu/*.cpp")
    if cpu_sources:
        # SIMD paths use function target attributes and are picked at run time: no -march=native here
        exts.append(CppExtension(
            "recjpq._C", cpu_sources,
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17"], extra_link_args=["-fopenmp"]))
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    if cuda_sources:
        if os.environ.get("RECJPQ_NO_CUDA") == "1":
            print("recjpq: RECJPQ_NO_CUDA=1, skipping the CUDA extension")
        elif torch.version.cuda is None or CUDA_HOME is None:
            print("recjpq: skipping the CUDA extension (needs a CUDA-enabled torch and nvcc; "
                  f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        else:
            archs = os.environ.get("RECJPQ_CUDA_ARCHS", "80;90").split(";")
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            exts.append(CUDAExtension(
                "recjpq._C_cuda", cuda_sources,
                # -lineinfo: compute-sanitizer (bash bench/gpu.sh sanitizer) reports source lines
                extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                    "nvcc": ["-O3", "-std=c++17", "-lineinfo", *gencode]}))
    return exts


setup(
    packages=find_packages(include=["recjpq", "recjpq.*"], exclude=["recjpq.kernels"]) + ["recjpq.kernels"],
    package_dir={"recjpq.kernels": "kernels"},
    package_data={"recjpq.backends": ["gpu_dispatch.json"]},  # the measured triton/cuda dispatch table
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
