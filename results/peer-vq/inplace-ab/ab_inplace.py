"""Training step of the paper's unit, the chunk products of commit BEFORE against the working tree's, side by side
in one process (alternating, 0.1 s idle before each run), median ms. The loading and the alternation are
../stream-mem/ab_stream.py's (load_at, alternate).

    python results/peer-vq/inplace-ab/ab_inplace.py --before=4e30991 --T=32768,8192 --repeats=10 > results/peer-vq/inplace-ab/ab.txt
"""
import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "stream-mem"))
NAMES = ["_ChunkProbs", "_ChunkMix", "_chunk_scores", "_chunk_mix", "_chunk_mix_t"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True)
    p.add_argument("--T", default="32768,8192")
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    import bench_peer
    import kernels.vq as KV
    from ab_stream import alternate, load_at
    before = load_at(a.before, "kernels/vq.py", "vq_before")
    versions = {"before": {n: getattr(before, n) for n in NAMES}, "now": {n: getattr(KV, n) for n in NAMES}}

    def use(k):
        for n, f in versions[k].items():
            setattr(KV, n, f)
    cfg = dict(seed=0, d_model=256, d_k=128, d_v=512, L=256, S=512, beta=1e-4, batch=1, stream_len=None)
    print(f"before = {a.before}; now = the working tree; {a.repeats} runs each, alternating")
    for T in [int(t) for t in a.T.split(",")]:
        _, _, _, cases = bench_peer.ours_cases(cfg, T)
        times = alternate(cases["ours fwd+bwd"], use, a.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"T={T}: before {med['before']:.0f} ms, now {med['now']:.0f} ms, now/before {med['now'] / med['before']:.3f}"
              f"  (before {[round(t) for t in times['before']]}, now {[round(t) for t in times['now']]})", flush=True)


if __name__ == "__main__":
    main()
