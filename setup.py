"""Build: the pure-Python package (the Triton kernels in ``metapeft/kernels/`` included) and, where a CUDA toolkit is
found, the C++/CUDA extension ``metapeft._C`` (from ``csrc/``; the same library CMakeLists.txt builds).

Environment:
  METAPEFT_BUILD_CUDA    ``auto`` (default: build when torch has CUDA and a toolkit whose major version
                         matches is found), ``1`` (build or fail), ``0`` (never build: pure Python + Triton).
  CUDA_HOME / CUDA_PATH  the toolkit; otherwise found from ``nvcc`` on PATH, following wrapper scripts.
  TORCH_CUDA_ARCH_LIST   target archs (default ``8.0;9.0``: A100 and H100/H200).
  MAX_JOBS               parallel compile jobs for ninja.
"""

import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.sdist import sdist

BUILD_ENV = "METAPEFT_BUILD_CUDA"
DEFAULT_ARCH_LIST = "8.0;9.0"
SOURCES = ["csrc/scaled_lora.cpp", "csrc/scaled_lora_kernels.cu", "csrc/autograd.cpp"]
HEADERS = ["csrc/scaled_lora.h"]


def log(message):
    print(f"metapeft setup: {message}", file=sys.stderr)


def find_cuda_home():
    """The CUDA toolkit root, or None. ``nvcc`` on PATH may be a wrapper script (then torch's guess,
    ``dirname(dirname(which nvcc))``, is wrong): ask nvcc itself where it lives (``_HERE_`` in --dryrun)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    try:
        dryrun = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log(f"could not run {nvcc} --dryrun: {error}")
        return None
    here = re.search(r"_HERE_=(\S+)", dryrun.stdout + dryrun.stderr)
    return os.path.dirname(here.group(1)) if here else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def toolkit_version(cuda_home):
    """(major, minor) of the toolkit's nvcc, or None."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except OSError:
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def cuda_build_reason():
    """(build?, toolkit version or why not) from METAPEFT_BUILD_CUDA, torch and the toolkit; sets CUDA_HOME
    (and the default TORCH_CUDA_ARCH_LIST) when building."""
    mode = os.environ.get(BUILD_ENV, "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"{BUILD_ENV} must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, f"{BUILD_ENV}=0"
    try:
        import torch
    except ImportError:
        if mode == "1":
            raise SystemExit(f"{BUILD_ENV}=1 but torch is not importable in the build environment") from None
        return False, "torch is not importable in the build environment"
    cuda_home = find_cuda_home()
    version = toolkit_version(cuda_home) if cuda_home else None
    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    elif version is None:
        problem = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    elif version[0] != int(torch.version.cuda.split(".")[0]):
        problem = f"CUDA toolkit {version[0]}.{version[1]} at {cuda_home} does not match torch's {torch.version.cuda}"
    if problem is not None:
        if mode == "1":
            raise SystemExit(f"{BUILD_ENV}=1 but {problem}")
        return False, problem
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    return True, f"{version[0]}.{version[1]}"


class SdistWithCsrc(sdist):
    """The sdist always carries the C++/CUDA sources and CMakeLists.txt, even when made without a toolkit."""

    def make_distribution(self):
        self.filelist.extend([*SOURCES, *HEADERS, "CMakeLists.txt"])
        super().make_distribution()


def extension_kwargs():
    """``ext_modules``/``cmdclass`` for setup(): the CUDA extension (when built) and the sdist command."""
    build, detail = cuda_build_reason()
    if not build:
        log(f"building without the CUDA extension metapeft._C ({detail})")
        return {"cmdclass": {"sdist": SdistWithCsrc}}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # after CUDA_HOME is set

    archs = ",".join(os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split())
    log(f"building the CUDA extension metapeft._C (CUDA {detail} at {os.environ['CUDA_HOME']}, archs {archs})")
    # Bare tokens, stringified in csrc/scaled_lora.cpp (quotes would not survive the ninja command line).
    facts = [f"-DMETAPEFT_BUILD_TORCH={torch.__version__}", f"-DMETAPEFT_BUILD_CUDA={detail}",
             f"-DMETAPEFT_BUILD_ARCHS={archs}"]

    extension = CUDAExtension(
        "metapeft._C",
        sources=SOURCES,
        depends=HEADERS,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3", *facts], "nvcc": ["-O3"]},
    )
    build_ext = BuildExtension.with_options(use_ninja=True)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": build_ext, "sdist": SdistWithCsrc}}


setup(
    packages=find_packages(include=["metapeft", "metapeft.*"]),
    **extension_kwargs(),
)
