"""Build of eekernels and its extension eekernels._C.

- The C++ CPU kernels are always built when torch is importable at build time
  (`pip install --no-build-isolation .`).
- The CUDA kernels are added when torch has CUDA (torch.version.cuda) and nvcc is found
  (CUDA_HOME). Target architectures: TORCH_CUDA_ARCH_LIST, default "9.0" (Hopper).
- Without torch at build time (an isolated build) the package installs pure-Python and
  eekernels/_extension.py compiles the ops with ninja on first use; the C++/CUDA sources
  ship inside the package (eekernels/_csrc) for that.
- EEKERNELS_BUILD_CUDA=0 skips the CUDA kernels; EEKERNELS_SKIP_EXT=1 skips the extension.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


class BuildPyWithSources(build_py):
    """Copy csrc/ into the package as eekernels/_csrc, for compiling on first use."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "eekernels" / "_csrc"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(CSRC, dest, ignore=shutil.ignore_patterns("*.o", "__pycache__"))


def extensions():
    if os.environ.get("EEKERNELS_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("eekernels setup: torch is not importable at build time; the C++ ops will be "
              "compiled with ninja on first use (install with --no-build-isolation to prebuild).")
        return [], {}
    sources = ["csrc/register.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cpu").glob("*.cpp"))
    # -fopenmp: at::parallel_for runs its chunks on OpenMP threads only where _OPENMP is
    # defined; without it every loop here would run on the calling thread. The library it
    # links, libgomp.so.1, is the one torch has already loaded (same soname), so ours and
    # torch's loops share one thread pool and torch.set_num_threads.
    cxx = ["-O3", "-fopenmp"]
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("EEKERNELS_BUILD_CUDA", "1") != "0"
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))
        ext = cpp_extension.CUDAExtension(
            "eekernels._C",
            sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={
                "cxx": cxx + ["-DEEKERNELS_WITH_CUDA"],
                "nvcc": ["-O3", "-lineinfo", "-DEEKERNELS_WITH_CUDA", "-Xcompiler", "-fopenmp"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension("eekernels._C", sources, include_dirs=[str(CSRC)],
                                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    print(f"eekernels setup: building eekernels._C (CPU kernels{' + CUDA kernels' if with_cuda else ''})")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
