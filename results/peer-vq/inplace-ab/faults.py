"""Fresh buffers against reused ones: the cost of mapping and faulting in a large output, and the large fresh
allocations of one training step of the paper's unit at T (tensors of at least 32 MiB, glibc's largest mmap
threshold, that an operator creates rather than writes into one of its inputs).

    python results/peer-vq/inplace-ab/faults.py --T=32768 > results/peer-vq/inplace-ab/faults.txt
"""
import argparse
import collections
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=32768)
    a = p.parse_args()
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import bench_peer
    n, C, S, dv = 128, 256, 512, 512  # the chunks of the paper's unit at 32k: a (C x S) by (C x dv) product each
    x, y = torch.rand(n, C, S), torch.randn(n, C, dv)
    out = torch.empty(n, S, dv)
    times = {"fresh": [], "reused": []}
    for _ in range(15):
        t0 = time.perf_counter()
        x.transpose(1, 2) @ y
        times["fresh"].append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        torch.bmm(x.transpose(1, 2), y, out=out)
        times["reused"].append((time.perf_counter() - t0) * 1000)
    mib = out.numel() * 4 / 2**20
    f, r = statistics.median(times["fresh"]), statistics.median(times["reused"])
    print(f"bmm into a fresh {mib:.0f} MiB output: {f:.1f} ms; into a reused one: {r:.1f} ms; "
          f"{(f - r) / mib:.3f} ms per MiB (medians of 15)")

    cfg = dict(seed=0, d_model=256, d_k=128, d_v=512, L=256, S=512, beta=1e-4, batch=1, stream_len=None)
    _, _, _, cases = bench_peer.ours_cases(cfg, a.T)
    step = cases["ours fwd+bwd"]
    step()
    made = collections.Counter()
    rows = []

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ins = {t.untyped_storage().data_ptr() for t in list(args) + list((kwargs or {}).values())
                   if isinstance(t, torch.Tensor)}
            res = func(*args, **(kwargs or {}))
            for t in res if isinstance(res, (tuple, list)) else [res]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= 32 * 2**20 \
                        and t.untyped_storage().data_ptr() not in ins:
                    made[str(func)] += t.untyped_storage().nbytes() / 2**20
                    rows.append(f"  {str(func):34s} {str(tuple(t.shape)):26s} {t.untyped_storage().nbytes() / 2**20:6.0f} MiB")
            return res

    with Census():
        step()
    print(f"\nfresh allocations of at least 32 MiB in one training step at T={a.T}, in order:")
    print("\n".join(rows))
    print(f"total {sum(made.values()):.0f} MiB in {len(rows)} tensors")


if __name__ == "__main__":
    main()
