"""Build of nino_fast and its C++/CUDA extension ``nino_fast._C`` (ninja via torch.utils.cpp_extension).

Environment:
  NINO_FAST_CPU_ONLY=1     never compile CUDA sources
  NINO_FAST_FORCE_CUDA=1   compile CUDA sources even without a visible GPU (needs nvcc and a CUDA torch)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default: torch's choice, e.g. the visible GPU)
  NINO_FAST_NO_NATIVE=1    no -mavx2/-mfma (portable CPU build)
  MAX_JOBS                 parallel compile jobs (default: capped by free memory and cores)
"""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _free_mem_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return info.get("MemAvailable", info["MemTotal"]) / 2**20
    except (OSError, KeyError, ValueError):
        return 4.0


def _cap_jobs(with_cuda: bool) -> None:
    """MAX_JOBS: at most the cores, and ~1.5 GB (C++) / ~3 GB (nvcc) of free memory per job."""
    if "MAX_JOBS" in os.environ:
        return
    per_job = 3.0 if with_cuda else 1.5
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(_free_mem_gb() / per_job))))


def _compiler_accepts(flags: list[str]) -> bool:
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <immintrin.h>\nint main(){__m256 a=_mm256_set1_ps(1.f);"
                    "a=_mm256_fmadd_ps(a,a,a);return (int)_mm256_cvtss_f32(a);}\n")
        res = subprocess.run([cxx, *flags, src, "-o", os.path.join(tmp, "t")], capture_output=True)
        return res.returncode == 0


def _want_cuda() -> bool:
    if _flag("NINO_FAST_CPU_ONLY"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("NINO_FAST_FORCE_CUDA"):
        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError("NINO_FAST_FORCE_CUDA=1 needs a CUDA build of torch and CUDA_HOME (nvcc)")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = _want_cuda()
    _cap_jobs(with_cuda)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-DNINO_FAST_PYTHON_MODULE"]
    if not _flag("NINO_FAST_NO_NATIVE") and _compiler_accepts(["-mavx2", "-mfma"]):
        cxx += ["-mavx2", "-mfma"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DNINO_FAST_WITH_CUDA"]
        return [CUDAExtension("nino_fast._C", sources, extra_compile_args={"cxx": cxx + ["-DNINO_FAST_WITH_CUDA"],
                                                                           "nvcc": nvcc}, **kwargs)]
    return [CppExtension("nino_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


packages = find_packages(include=["nino_fast", "nino_fast.*"]) + ["nino_fast.triton_kernels"]
setup(
    packages=packages,
    package_dir={"nino_fast.triton_kernels": "triton_kernels"},
    ext_modules=extensions(),
    cmdclass=cmdclass(),
)
