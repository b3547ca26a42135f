#!/usr/bin/env python3
"""Compiles Sources/Peregrine/Backend/CUDA/Kernels.cu with NVRTC for sm_90a (what the backend takes on
Hopper, whose wgmma kernels compile only there), sm_90, sm_80 and sm_75 on a machine
without a GPU, with the options the CUDA backend uses, and prints NVRTC's log: a syntax and type
check of the kernels before they travel to a GPU machine. NVRTC comes from PyPI:
    pip install nvidia-cuda-nvrtc nvidia-cuda-runtime
Usage: python scripts/check_kernels.py [ARCH ...]"""
import ctypes, glob, os, site, sys

def libnvrtc():
    for d in site.getsitepackages() + [site.getusersitepackages()]:
        for p in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", "libnvrtc.so*"))):
            if "builtins" not in p:
                return ctypes.CDLL(p)
    return ctypes.CDLL("libnvrtc.so")

def includes():
    # NVRTC finds cuda_fp16.h and cuda_bf16.h beside it in CUDA's include folder; from PyPI
    # they come with nvidia-cuda-runtime.
    for d in site.getsitepackages() + [site.getusersitepackages(), "/usr/local/cuda"]:
        for p in glob.glob(os.path.join(d, "nvidia", "*", "include")) + [os.path.join(d, "include")]:
            if os.path.exists(os.path.join(p, "cuda_fp16.h")):
                return [b"-I" + p.encode()]
    return []

def main():
    nv = libnvrtc()
    here = os.path.dirname(os.path.abspath(__file__))
    src = open(os.path.join(here, "..", "Sources", "Peregrine", "Backend", "CUDA", "Kernels.cu"), "rb").read()
    failed = False
    for arch in sys.argv[1:] or ["sm_90a", "sm_90", "sm_80", "sm_75"]:
        prog = ctypes.c_void_p()
        assert nv.nvrtcCreateProgram(ctypes.byref(prog), src, b"Kernels.cu", 0, None, None) == 0
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device", b"--use_fast_math"] + includes() \
            + ([b"--ptxas-options=-v"] if os.environ.get("VERBOSE") else [])
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value + 1)
        nv.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace").strip()
        print(f"{arch}: {'ok' if rc == 0 else 'FAILED'}" + (f"\n{text}" if text else ""))
        failed |= rc != 0
        nv.nvrtcDestroyProgram(ctypes.byref(prog))
    sys.exit(1 if failed else 0)

main()
