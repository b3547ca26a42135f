#!/usr/bin/env python3
"""Compiles Sources/Peregrine/Backend/CUDA/Kernels.cu with NVRTC for sm_90a (what the backend takes on
Hopper, whose wgmma kernels compile only there), sm_90, sm_80 and sm_75 on a machine
without a GPU, with the options the CUDA backend uses, and prints NVRTC's log: a syntax and type
check of the kernels before they travel to a GPU machine. NVRTC comes from PyPI:
    pip install nvidia-cuda-nvrtc nvidia-cuda-runtime
Usage: python scripts/check_kernels.py [--resources [REGEX]] [--no-spills REGEX] [--source FILE] [ARCH ...]

--resources prints, for each kernel (those whose name matches REGEX, if given), what ptxas gave
it: registers a thread, bytes of stack, and bytes of spill stores and loads, as a table. A kernel
that moves registers between warpgroups (setmaxnreg) is compiled at the count its launch gives
every thread, and ptxas reports that count; the warpgroups that take more use more than it.
--no-spills fails (exit 1) if any kernel matching REGEX spills. --source compiles another copy of
Kernels.cu (a variant being considered) in place of the repository's. VERBOSE=1 prints ptxas's
own lines too."""
import argparse, ctypes, glob, os, re, site, sys

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

def resources(log):
    """ptxas's -v lines as {kernel: (registers, stack, spill stores, spill loads)}."""
    table, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            table[name] = [None, int(m.group(1)), int(m.group(2)), int(m.group(3))]
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name in table:
            table[name][0] = int(m.group(1))
    return table

def main():
    parser = argparse.ArgumentParser(add_help=True, description="NVRTC's check of Kernels.cu without a GPU.")
    parser.add_argument("--resources", nargs="?", const="", default=None, metavar="REGEX")
    parser.add_argument("--no-spills", metavar="REGEX")
    parser.add_argument("--source")
    parser.add_argument("archs", nargs="*")
    args = parser.parse_args()
    nv = libnvrtc()
    here = os.path.dirname(os.path.abspath(__file__))
    path = args.source or os.path.join(here, "..", "Sources", "Peregrine", "Backend", "CUDA", "Kernels.cu")
    src = open(path, "rb").read()
    wantResources = args.resources is not None or args.no_spills is not None
    failed = False
    for arch in args.archs or ["sm_90a", "sm_90", "sm_80", "sm_75"]:
        prog = ctypes.c_void_p()
        assert nv.nvrtcCreateProgram(ctypes.byref(prog), src, b"Kernels.cu", 0, None, None) == 0
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device", b"--use_fast_math"] + includes() \
            + ([b"--ptxas-options=-v"] if os.environ.get("VERBOSE") or wantResources else [])
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value + 1)
        nv.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace").strip()
        shown = text if os.environ.get("VERBOSE") or rc != 0 else "\n".join(l for l in text.splitlines() if not l.startswith("ptxas"))
        print(f"{arch}: {'ok' if rc == 0 else 'FAILED'}" + (f"\n{shown}" if shown.strip() else ""))
        failed |= rc != 0
        nv.nvrtcDestroyProgram(ctypes.byref(prog))
        if rc != 0 or not wantResources:
            continue
        table = resources(text)
        if args.resources is not None:
            rows = sorted(k for k in table if re.search(args.resources, k))
            width = max([len(k) for k in rows] + [6])
            print(f"{'kernel':<{width}}  registers  stack  spill stores  spill loads")
            for k in rows:
                r, stack, st, ld = table[k]
                print(f"{k:<{width}}  {r if r is not None else '?':>9}  {stack:>5}  {st:>12}  {ld:>11}")
        if args.no_spills is not None:
            spilling = sorted(k for k, v in table.items() if re.search(args.no_spills, k) and (v[2] or v[3]))
            for k in spilling:
                print(f"{arch}: {k} spills {table[k][2]} bytes (stores), {table[k][3]} (loads)")
            failed |= bool(spilling)
    sys.exit(1 if failed else 0)

main()
