"""The runs' ratios (ours / official) in one markdown table, from each run's peer.csv.

    python results/peer-vq/session-c/summary.py > results/peer-vq/session-c/summary.md
"""
import argparse
import csv
import os

HERE = os.path.dirname(os.path.abspath(__file__))
BOUNDS = {"fwdbwd": 0.7, "fwd": 0.8}  # the time bounds; memory: the forward within 2x


def read(run):
    with open(os.path.join(HERE, run, "peer.csv")) as f:
        return {(int(r["T"]), r["name"]): float(r["value"]) for r in csv.DictReader(f) if r["kind"] != "rel_error"}


def cell(v, ours, theirs, bound, digits=2):
    r = v[ours] / v[theirs]
    text = f"{v[ours]:.0f}/{v[theirs]:.0f} = {r:.{digits}f}"
    return f"**{text}**" if r <= bound else text


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    runs = sorted(d for d in os.listdir(HERE) if os.path.exists(os.path.join(HERE, d, "peer.csv")))
    print("| run | T | fwd+bwd ms | forward ms | forward MiB (probe) | forward MiB vs XLA's plan | fwd+bwd MiB (probe) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in runs:
        v = read(run)
        for T in sorted({t for t, _ in v}):
            def get(name):
                return (T, name)
            row = [cell(v, get("ours_fwdbwd_ms"), get("official_fwdbwd_ms"), BOUNDS["fwdbwd"]),
                   cell(v, get("ours_fwd_ms"), get("official_fwd_ms"), BOUNDS["fwd"]),
                   cell(v, get("mem_ours_fwd_mib"), get("mem_official_fwd_mib"), 2.0),
                   cell(v, get("mem_ours_fwd_mib"), get("plan_official_fwd_mib"), 2.0),
                   cell(v, get("mem_ours_fwdbwd_mib"), get("mem_official_fwdbwd_mib"), 1.0)]
            print(f"| `{run}` | {T} | " + " | ".join(row) + " |")
    print()
    print("Each cell: ours / official = ratio; bold: within the bound (time: fwd+bwd 0.7, forward 0.8; forward memory "
          "2x; training memory: at most the official's).")


if __name__ == "__main__":
    main()
