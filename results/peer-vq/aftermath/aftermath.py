"""After each of bench_peer's four cases, how fast do five 1024^3 torch matmuls run, right away and after
a gap? (Why bench_peer.py idles before each timed run.) Run from the repository root:

    /work/venv-jax/bin/python results/peer-vq/aftermath/aftermath.py --T=8192 > results/peer-vq/aftermath/aftermath.txt
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
import bench_peer  # noqa: E402
import torch  # noqa: E402
cfg, Ts, _ = bench_peer.parse_args(sys.argv[1:])
cases = bench_peer.make_cases(cfg, Ts[0])
for fn in cases.values():
    fn()
a = torch.randn(1024, 1024)
b = torch.randn(1024, 1024)


def matmuls():
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return (time.perf_counter() - t0) * 1e3


for src in ("official fwd+bwd", "ours fwd+bwd", "official fwd", "ours fwd"):
    for gap in (0.0, 0.01, 0.05, 0.1, 0.2):
        res = []
        for _ in range(5):
            cases[src]()
            time.sleep(gap)
            res.append(matmuls())
        print(f"after {src:17s} gap {gap:4.2f} s: five 1024^3 matmuls {statistics.median(res):6.1f} ms (median of 5)", flush=True)
print(f"quiet machine: {statistics.median(matmuls() for _ in range(5)):.1f} ms")
