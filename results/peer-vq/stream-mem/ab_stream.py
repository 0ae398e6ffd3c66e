"""One case of the paper's unit (bench_peer.ours_cases: "ours fwd" or "ours fwd+bwd"), the code of commit BEFORE
against the working tree's, side by side in one process (alternating, 0.1 s idle before each run), median ms.
Swapped: kernels.vq's _chunk_attention_nograd and model.VQGatedUnit's _stream (the streaming forward).

    python results/peer-vq/stream-mem/ab_stream.py --before=1ed34d4 --T=8192,32768 --repeats=12 > results/peer-vq/stream-mem/ab.txt
    python results/peer-vq/stream-mem/ab_stream.py --before=1ed34d4 --L=64 --S=128 --d_model=128 --d_k=64 --d_v=106 ...

The unit defaults to the paper's (bench_peer's defaults); --L, --S, --d_model, --d_k, --d_v change it (the long
config's unit: 64, 128, 128, 64, 106).
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)
SWAPPED = [("kernels/vq.py", None, "_chunk_attention_nograd"), ("model.py", "VQGatedUnit", "_stream")]


def load_at(commit, path, name):
    """The module at path as of commit, imported from a temporary file (Triton's jit wants a source file)."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:{path}"], capture_output=True, text=True,
                         check=True).stdout
    f = os.path.join(tempfile.mkdtemp(), name + ".py")
    with open(f, "w") as fh:
        fh.write(src)
    spec = importlib.util.spec_from_file_location(name, f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def commit():
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return head + (" with changes" if dirty else "")


def alternate(step, use, repeats):
    """{"before": ms, "now": ms} lists of step(), one warm-up each, then `repeats` runs of each code,
    alternating which goes first, 0.1 s idle before each; use(k) installs code k."""
    times = {"before": [], "now": []}
    for k in times:  # warm-up
        use(k)
        step()
    for r in range(repeats):
        for k in (["before", "now"] if r % 2 == 0 else ["now", "before"]):
            use(k)
            time.sleep(0.1)
            t0 = time.perf_counter()
            step()
            times[k].append((time.perf_counter() - t0) * 1000)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True)
    p.add_argument("--T", default="8192,32768")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--case", default="ours fwd", choices=["ours fwd", "ours fwd+bwd"])
    for k, d in (("L", 256), ("S", 512), ("d_model", 256), ("d_k", 128), ("d_v", 512)):
        p.add_argument(f"--{k}", type=int, default=d)
    a = p.parse_args()
    import bench_peer
    import kernels.vq
    import model
    now_mods = {"kernels/vq.py": kernels.vq, "model.py": model}
    targets, versions = [], {"before": [], "now": []}
    for path, cls, name in SWAPPED:
        old = load_at(a.before, path, "before_" + path.replace("/", "_")[:-3])
        owner, old_owner = (getattr(now_mods[path], cls), getattr(old, cls)) if cls else (now_mods[path], old)
        targets.append((owner, name))
        versions["before"].append(getattr(old_owner, name))
        versions["now"].append(getattr(owner, name))

    def use(k):
        for (owner, name), f in zip(targets, versions[k]):
            setattr(owner, name, f)
    cfg = dict(seed=0, d_model=a.d_model, d_k=a.d_k, d_v=a.d_v, L=a.L, S=a.S, beta=1e-4, batch=1, stream_len=None)
    print(f"{a.case}: before = {a.before}; now = the working tree ({commit()}); {a.repeats} runs each, alternating; "
          f"unit d_model {a.d_model}, d_k {a.d_k}, d_v {a.d_v}, L {a.L}, S {a.S}")
    for T in [int(t) for t in a.T.split(",")]:
        _, _, _, cases = bench_peer.ours_cases(cfg, T)
        times = alternate(cases[a.case], use, a.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"T={T}: before {med['before']:.1f} ms, now {med['now']:.1f} ms, now/before {med['now'] / med['before']:.3f}"
              f"  (before {[round(t) for t in times['before']]}, now {[round(t) for t in times['now']]})", flush=True)


if __name__ == "__main__":
    main()
