"""Where one block's forward+backward spends its time: torch.profiler's operator table.

    python scripts/profile_block.py --attention=adaptive-sparse --T=32768,131072 --out=DIR   # CUDA or CPU

Builds the block as scripts/gpu_check.py part (b) does (B=1, 6 heads of 64, n_embd 384, knobs of
config/long_<block>.py at the device's scale), runs `warmup` untimed steps, then profiles `steps`
steps and writes DIR/profile_<attention>_T<T>.txt: the operators sorted by their own device time
(CPU time without CUDA), and the step's total. On CUDA, Triton kernels show up under their names.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def profile(name, T, device, steps, warmup, rows):
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    import gpu_check
    scale = "gpu" if device == "cuda" else "cpu"
    step, dtype = gpu_check.block_step(name, T, device, scale)
    source = gpu_check.gpu_knobs(name, scale)[1]
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    head = (f"{name} T={T} B=1 n_head=6 head_dim=64 device={device} dtype={dtype} knobs from {source}\n"
            f"{steps} profiled forward+backward steps after {warmup} warm-up; times below are totals over them\n")
    return head + table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", required=True, help="comma-separated names from model.ATTENTION")
    p.add_argument("--T", type=lambda s: [int(x) for x in s.split(",")], default=[32768])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--out", default="profile_results")
    a = p.parse_args(argv)
    import torch

    from model import ATTENTION
    unknown = [n for n in a.attention.split(",") if n not in ATTENTION]
    if unknown:
        print(f"error: unknown attention {unknown[0]!r}; one of {', '.join(ATTENTION)}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(a.out, exist_ok=True)
    for name in a.attention.split(","):
        for T in a.T:
            text = profile(name, T, device, a.steps, a.warmup, a.rows)
            path = os.path.join(a.out, f"profile_{name}_T{T}.txt")
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
            print(text, flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
