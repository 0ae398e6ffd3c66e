"""Compile every Triton kernel for real NVIDIA targets without a GPU, and check what would stop
it launching or slow it down: registers and spills (ptxas -v, Triton's bundled ptxas) and shared
memory (the compiled kernel's metadata, pipeline stages included) against the architecture's
per-block limit. Used by tests/test_kernels_compile.py.

    python -m kernels.gpu_compile [--arch 80 90] [-k SUBSTRING] [--jobs N] [--all]

prints one line per kernel and target and exits 1 if any kernel spills or needs more shared
memory than its target has (or fails to compile). Run with TRITON_INTERPRET unset.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# largest dynamic shared memory one block may opt in to (CUDA programming guide, compute capabilities)
SHARED_LIMIT = {80: 166_912, 90: 232_448}

# Register spills measured and not yet fixed ("module.case sm_XX": bytes), per Triton release (its code
# generator decides what spills): reported as KNOWN, not failing the run; tests/test_kernels_compile.py
# checks the installed release's set is exactly what spills, so fixing one (or a new spill) shows. A
# release without a table has its spills reported, not failing. Shared memory over the limit always
# fails: that kernel would not launch. requirements.txt pins the release CI runs (3.9); 3.6 is the
# GPU machine's (results/gpu-h200), measured here with `python -m kernels.gpu_compile` under triton 3.6.0.
KNOWN_SPILLS_BY_TRITON = {"3.9": {
    # float32 IEEE dots run on the FMA units, with their operands in registers
    "kernels.adaptive_sparse.bwd_kv_b16_d64_fp32 sm_80": 412, "kernels.adaptive_sparse.bwd_kv_b16_d64_fp32 sm_90": 448,
    "kernels.kernel_hashing.fwd_hashed_fp32_d64 sm_90": 164, "kernels.kernel_hashing.bwd_hashed_fp32_d64 sm_90": 144,
    "kernels.kernel_hashing.bwd_diagonal_fp32_d64 sm_80": 48,
    # VQ: the window kernels at d_k 64 with d_v 768 (with TF32 dots as well); a few words to a few dozen
    # bytes elsewhere (the older blocks' loop of the chunked cache, the cache gradient at d_v >= 384)
    "kernels.vq.vq_bwd_q_L16_S24_dk40_dv40 sm_80": 48, "kernels.vq.vq_bwd_q_L12_S150_dk72_dv72 sm_80": 8,
    "kernels.vq.vq_bwd_q_L12_S150_dk72_dv72 sm_90": 24, "kernels.vq.vq_bwd_cache_L12_S150_dk72_dv72 sm_80": 28,
    "kernels.vq.vq_bwd_q_L12_S200_dk40_dv100 sm_80": 48, "kernels.vq.vq_bwd_q_L12_S200_dk40_dv100 sm_90": 8,
    "kernels.vq.vq_fwd_L32_S128_dk128_dv384 sm_90": 4, "kernels.vq.vq_bwd_cache_L32_S128_dk128_dv384 sm_80": 48,
    "kernels.vq.vq_bwd_cache_L32_S128_dk128_dv384 sm_90": 16, "kernels.vq.vq_bwd_q_L32_S512_dk64_dv768 sm_80": 1428,
    "kernels.vq.vq_bwd_q_L32_S512_dk64_dv768 sm_90": 1328, "kernels.vq.vq_bwd_kv_L32_S512_dk64_dv768 sm_80": 628,
    "kernels.vq.vq_bwd_kv_L32_S512_dk64_dv768 sm_90": 536, "kernels.vq.vq_lse_L32_S512_dk96_dv768 sm_90": 4,
    "kernels.vq.vq_bwd_q_L32_S512_dk96_dv768 sm_80": 4, "kernels.vq.vq_bwd_q_L32_S512_dk96_dv768 sm_90": 8,
    "kernels.vq.vq_bwd_cache_L32_S512_dk96_dv768 sm_80": 4, "kernels.vq.vq_fwd_L32_S512_dk128_dv768 sm_90": 4,
    "kernels.vq.vq_bwd_cache_L32_S512_dk128_dv768 sm_80": 32, "kernels.vq.vq_fwd_L32_S1024_dk128_dv768 sm_90": 4,
    "kernels.vq.vq_bwd_cache_L32_S1024_dk128_dv768 sm_80": 32,
}, "3.6": {
    # measured under triton 3.6.0 (the same 148 variants; 26 spill, 7 of them not under 3.9)
    "kernels.adaptive_sparse.bwd_kv_b16_d64_fp32 sm_80": 52, "kernels.adaptive_sparse.bwd_kv_b16_d64_fp32 sm_90": 40,
    "kernels.kernel_hashing.fwd_hashed_fp32_d64 sm_90": 364, "kernels.kernel_hashing.bwd_hashed_fp32_d64 sm_90": 116,
    "kernels.kernel_hashing.bwd_diagonal_fp32_d64 sm_80": 48, "kernels.vq.vq_bwd_q_L16_S24_dk40_dv40 sm_80": 56,
    "kernels.vq.vq_bwd_q_L12_S150_dk72_dv72 sm_80": 8, "kernels.vq.vq_bwd_cache_L12_S150_dk72_dv72 sm_80": 20,
    "kernels.vq.vq_lse_L12_S200_dk40_dv100 sm_80": 4, "kernels.vq.vq_lse_L12_S200_dk40_dv100 sm_90": 12,
    "kernels.vq.vq_bwd_q_L12_S200_dk40_dv100 sm_80": 68, "kernels.vq.vq_bwd_q_L12_S200_dk40_dv100 sm_90": 16,
    "kernels.vq.vq_bwd_cache_L12_S200_dk40_dv100 sm_80": 24, "kernels.vq.vq_bwd_cache_L32_S128_dk128_dv384 sm_80": 28,
    "kernels.vq.vq_bwd_cache_L32_S128_dk128_dv384 sm_90": 24, "kernels.vq.vq_bwd_q_L32_S512_dk64_dv768 sm_80": 1508,
    "kernels.vq.vq_bwd_q_L32_S512_dk64_dv768 sm_90": 1320, "kernels.vq.vq_bwd_cache_L32_S512_dk64_dv768 sm_90": 20,
    "kernels.vq.vq_bwd_kv_L32_S512_dk64_dv768 sm_80": 604, "kernels.vq.vq_bwd_kv_L32_S512_dk64_dv768 sm_90": 480,
    "kernels.vq.vq_bwd_cache_L32_S512_dk96_dv768 sm_80": 28, "kernels.vq.vq_bwd_cache_L32_S512_dk96_dv768 sm_90": 28,
    "kernels.vq.vq_bwd_cache_L32_S512_dk128_dv768 sm_80": 12,
    "kernels.vq.vq_bwd_cache_L32_S512_dk128_dv768 sm_90": 28,
    "kernels.vq.vq_bwd_cache_L32_S1024_dk128_dv768 sm_80": 12,
    "kernels.vq.vq_bwd_cache_L32_S1024_dk128_dv768 sm_90": 28,
}}
TRITON_RELEASE = ".".join(triton.__version__.split(".")[:2])
KNOWN_SPILLS = KNOWN_SPILLS_BY_TRITON.get(TRITON_RELEASE)  # None: this release's spills were not measured


def compile_for(fn, signature, constexprs, capability, num_warps=4):
    """triton.compile for sm_<capability>; returns (compiled kernel,
    {'registers', 'spill_bytes', 'shared_bytes', 'log'})."""
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
    use = ptxas_usage(kernel.asm["ptx"], capability)
    use["shared_bytes"] = int(kernel.metadata.shared)
    return kernel, use


def ptxas_usage(ptx, capability):
    """Run triton's bundled ptxas -v on the PTX and parse registers and spill stores."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)  # sm_90a for Hopper
    ptxas = next((os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas")
                  if os.path.exists(os.path.join(bindir, n))), "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([ptxas, "-v", f"-arch={arch}", "-o", os.devnull, f.name],
                           capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{capability}: {r.stderr.strip()}")
    log = r.stdout + r.stderr
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    return {"registers": max(regs) if regs else None, "spill_bytes": max(spills) if spills else 0, "log": log}


def kernel_modules():
    """Every kernels/*.py module that declares COMPILE_CASES: a list of
    (name, jit_fn, signature, constexprs[, num_warps]) tuples covering each kernel."""
    import importlib
    import pkgutil
    import kernels
    mods = []
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"kernels.{info.name}")
        if hasattr(mod, "COMPILE_CASES"):
            mods.append(mod)
    return mods


def problems(use, capability):
    """Why this compiled kernel would fail or stall on sm_<capability> (empty: none)."""
    out = []
    if use["spill_bytes"]:
        out.append(f"spills {use['spill_bytes']} bytes")
    if use["shared_bytes"] > SHARED_LIMIT[capability]:
        out.append(f"needs {use['shared_bytes']} B shared > {SHARED_LIMIT[capability]}")
    return out


def _job(args):
    """Compile case i of a module's case list for one target (in a worker process)."""
    import importlib
    mod_name, attr, i, cc = args
    case = getattr(importlib.import_module(mod_name), attr)[i]
    name, fn, sig, consts = case[:4]
    warps = case[4] if len(case) > 4 else 4
    try:
        _, use = compile_for(fn, sig, consts, cc, num_warps=warps)
    except Exception as e:  # noqa: BLE001 - reported as a failure of this kernel
        return mod_name, name, cc, None, f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    use.pop("log")
    return mod_name, name, cc, use, "; ".join(problems(use, cc))


def verdict(key):
    """How a kernel over a limit is reported: KNOWN (in the release's table), UNMEASURED (no table), FAIL."""
    return "UNMEASURED" if KNOWN_SPILLS is None else "KNOWN" if key in KNOWN_SPILLS else "FAIL"


def main(argv=None):
    """Compile every declared kernel for the chosen targets; print registers, spills and shared
    memory; exit 1 if any kernel fails the limits."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    p.add_argument("-k", dest="filter", default="", help="only cases whose module.name contains this")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--all", action="store_true", help="also each module's EXTRA_COMPILE_CASES (more head dims, "
                   "the interpreter tests' shapes); their spills are not in KNOWN_SPILLS")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    lists = ("COMPILE_CASES", "EXTRA_COMPILE_CASES") if a.all else ("COMPILE_CASES",)
    jobs = [(mod.__name__, attr, i, cc) for mod in kernel_modules() for attr in lists
            for i, case in enumerate(getattr(mod, attr, ())) for cc in a.arch if a.filter in f"{mod.__name__}.{case[0]}"]
    print(f"triton {triton.__version__}: " + (f"spills checked against the {TRITON_RELEASE} table" if KNOWN_SPILLS
          is not None else "no spill table for this release: spills are reported (UNMEASURED), not failures"))
    bad = []
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for mod_name, name, cc, use, why in pool.map(_job, jobs):
            if use is None:
                print(f"{mod_name}.{name} sm_{cc}: FAILED {why}", flush=True)
            else:
                print(f"{mod_name}.{name} sm_{cc}: {use['registers']} registers, {use['spill_bytes']} bytes spilled, "
                      f"{use['shared_bytes']} bytes shared (limit {SHARED_LIMIT[cc]})"
                      + (f"  {verdict(f'{mod_name}.{name} sm_{cc}')}: {why}" if why else ""),
                      flush=True)
            known = verdict(f"{mod_name}.{name} sm_{cc}") != "FAIL" and use is not None \
                and use["shared_bytes"] <= SHARED_LIMIT[cc]
            if why and not known:
                bad.append(f"{mod_name}.{name} sm_{cc}: {why}")
    print(f"compiled {len(jobs)} kernel variants, {len(bad)} over a limit")
    if bad:
        print("\n".join(bad), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
