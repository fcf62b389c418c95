"""Build of nino_fast and its C++/CUDA extension ``nino_fast._C`` (ninja via torch.utils.cpp_extension).

Install into an environment that already has torch, without build isolation (an isolated build would fetch
its own torch, possibly a different build than the one the extension must link against):

    pip install torch==2.13.0 && pip install --no-build-isolation -e '.[test]'

Environment:
  NINO_FAST_CPU_ONLY=1     never compile CUDA sources
  NINO_FAST_FORCE_CUDA=1   compile CUDA sources even if auto-detection says no (needs nvcc and a CUDA torch)
  CUDA_HOME                the CUDA toolkit root (the directory holding bin/nvcc)
  TORCH_CUDA_ARCH_LIST     CUDA architectures, e.g. "9.0" (default: torch's choice)
  NINO_FAST_NO_NATIVE=1    no -mavx2/-mfma/-mavx512f (portable CPU build; results stay correct without them)
  NINO_FAST_NO_AVX512=1    AVX2 kernels even where this machine has AVX-512 (same results, for AVX2-only hosts)
  MAX_JOBS                 parallel compile jobs (default: capped by free memory and cores)
"""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # the usual cause: pip's build isolation hid the installed torch
    raise SystemExit(
        f"nino_fast: building the extension needs torch importable ({exc}). Install torch first, then "
        "`pip install --no-build-isolation .`"
    ) from exc


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _free_mem_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return info.get("MemAvailable", info["MemTotal"]) / 2**20
    except (OSError, KeyError, ValueError, IndexError):
        return 4.0


def _cap_jobs(with_cuda: bool) -> None:
    """MAX_JOBS for ninja: at most the cores, and ~1.5 GB (g++) / ~3 GB (nvcc) of free memory per job.

    torch's templates make each translation unit heavy; uncapped ninja on a small machine runs out of memory.
    """
    if os.environ.get("MAX_JOBS"):
        return
    per_job = 3.0 if with_cuda else 1.5
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(_free_mem_gb() / per_job))))


_AVX2_PROBE = (
    "#include <immintrin.h>\nint main(){__m256 a=_mm256_set1_ps(1.f);"
    "a=_mm256_fmadd_ps(a,a,a);return (int)_mm256_cvtss_f32(a);}\n"
)
# exits 0 only where the compiler builds AVX-512F code and this (the build) machine runs it
_AVX512_PROBE = (
    '#include <immintrin.h>\nint main(){if(!__builtin_cpu_supports("avx512f"))return 1;'
    "__m512 a=_mm512_set1_ps(1.f);a=_mm512_fmadd_ps(a,a,a);return (int)_mm512_reduce_add_ps(a) - 32;}\n"
)


def _compiler_accepts(flags: list[str], probe: str = _AVX2_PROBE, run: bool = False) -> bool:
    """Whether the C++ compiler builds (not only parses) ``probe`` with ``flags``; with ``run``, also
    whether the built program exits 0 on this machine."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "t.cpp"), os.path.join(tmp, "t")
        with open(src, "w") as f:
            f.write(probe)
        try:
            res = subprocess.run([cxx, *flags, src, "-o", exe], capture_output=True)
            if res.returncode != 0:
                return False
            return not run or subprocess.run([exe], capture_output=True).returncode == 0
        except OSError:
            return False


def _native_flags() -> list[str]:
    """Vector ISA flags: AVX-512F where the build machine runs it (the kernels' 16-wide path; a
    machine without it must build with NINO_FAST_NO_AVX512=1, and nino_fast refuses to load such a
    build there), else AVX2/FMA where the compiler builds it, else none (scalar kernels)."""
    if _flag("NINO_FAST_NO_NATIVE") or not _compiler_accepts(["-mavx2", "-mfma"]):
        return []
    avx512 = ["-mavx2", "-mfma", "-mavx512f"]
    if not _flag("NINO_FAST_NO_AVX512") and _compiler_accepts(avx512, _AVX512_PROBE, run=True):
        return avx512
    return ["-mavx2", "-mfma"]


def _want_cuda() -> bool:
    """CUDA kernels when torch is a CUDA build and nvcc is found (a GPU need not be visible: build hosts
    often have none); NINO_FAST_CPU_ONLY wins over everything, NINO_FAST_FORCE_CUDA insists."""
    if _flag("NINO_FAST_CPU_ONLY"):
        return False
    found = torch.version.cuda is not None and CUDA_HOME is not None
    if _flag("NINO_FAST_FORCE_CUDA") and not found:
        raise SystemExit(
            "nino_fast: NINO_FAST_FORCE_CUDA=1 needs a CUDA build of torch (got torch "
            f"{torch.__version__}) and a CUDA toolkit (CUDA_HOME={CUDA_HOME})"
        )
    return found


def extensions() -> list:
    with_cuda = _want_cuda()
    _cap_jobs(with_cuda)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # NINO_FAST_PYTHON_MODULE: only this build defines PyInit__C (the CMake library has no Python in it).
    cxx = ["-O3", "-fopenmp", "-DNINO_FAST_PYTHON_MODULE"]
    cxx += _native_flags()
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if not with_cuda:
        return [CppExtension("nino_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)]
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DNINO_FAST_WITH_CUDA"]
    args = {"cxx": cxx + ["-DNINO_FAST_WITH_CUDA"], "nvcc": nvcc}
    return [CUDAExtension("nino_fast._C", sources, extra_compile_args=args, **kwargs)]


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """A persistent build directory per torch build, so ninja recompiles only what changed.

    ``pip install -e .`` otherwise builds in a fresh temporary directory every time (a full rebuild: minutes).
    An explicit ``--build-temp`` still wins.
    """

    def finalize_options(self) -> None:
        if self.build_temp is None:
            self.build_temp = os.path.join(ROOT, "build", "temp-torch" + torch.__version__.replace("+", "-"))
        super().finalize_options()


# The Triton kernels live in the top-level triton_kernels/ and install as nino_fast.triton_kernels;
# setuptools' editable finder maps that package name to the directory, so `pip install -e .` imports it too.
setup(
    packages=find_packages(include=["nino_fast", "nino_fast.*"]) + ["nino_fast.triton_kernels"],
    package_dir={"nino_fast.triton_kernels": "triton_kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
