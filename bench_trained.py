"""
Cost of trained models, side by side: forward+backward time of checkpoints on validation text.

    python bench_trained.py --runs=results/long-cpu/dense-s0,results/long-cpu/adaptive-sparse+budget-s0
    python bench_trained.py --runs=DIR1,DIR2,DIR3 --repeats=9 --out=results/bench-trained

bench.py times untrained blocks on random tokens: right for blocks whose work is fixed by their knobs,
wrong for adaptive-sparse, whose work is the number of blocks its scorer keeps, and an untrained
scorer keeps about k_max. This script loads each run's ckpt.pt (weights_only) and times one training
step's forward and backward (cross-entropy + auxiliary losses, gradients to every parameter, no
optimizer step) on the first validation window of block_size tokens (train.py's fixed evaluation
windows), so a learned selection sets the work. The runs are measured in one process, round-robin
(one step of each in turn) after `warmup` untimed steps each, and the median of `repeats` is
reported with the ratio to the first run, plus, for adaptive-sparse, the kept blocks per query block
and the share of causal (query, key) pairs read, from that same step. Writes <out>/bench_trained.md
and .csv with the machine facts and this command.
"""

import os
import statistics
import sys

import numpy as np
import torch

import bench
import compare
import configurator
import kept_blocks
import ngram

DEFAULTS = dict(runs="", data_dir="data", repeats=7, warmup=2, threads=0, out="results/bench-trained")


def load_run(run_dir, data_dir):
    """(model in train mode, the first validation window (1, T + 1), config of the run)."""
    model, ckpt = kept_blocks.load_model(run_dir)
    T = model.config.block_size
    data = kept_blocks.val_tokens(data_dir, ckpt["config"])
    s = ngram.fixed_windows(len(data), T, T)[0]
    window = torch.from_numpy(np.asarray(data[s:s + T + 1], dtype=np.int64)).view(1, -1)
    return model.train(), window, ckpt["config"]


def make_step(model, window):
    x, y = window[:, :-1], window[:, 1:]
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        model(x, y)[1].backward()
    return step


def main(argv):
    configurator.help_if_asked(argv, DEFAULTS, __doc__)
    try:
        o, _ = configurator.load(argv, DEFAULTS)
        configurator.check_ranges(o, dict(repeats=">=1", warmup=">=0", threads=">=0"))
        runs = [r for r in o["runs"].split(",") if r]
        if not runs:
            raise configurator.ConfigError("--runs=DIR[,DIR...] (run directories holding ckpt.pt) is required")
        loaded = [load_run(r, o["data_dir"]) for r in runs]
    except (configurator.ConfigError, ValueError) as e:
        configurator.fail(str(e))
    if o["threads"]:
        torch.set_num_threads(o["threads"])
    steps = [make_step(m, w) for m, w, _ in loaded]
    workers = [[m for m in model.modules() if hasattr(m, "work_stats")] for model, _, _ in loaded]
    for _ in range(o["warmup"]):
        for step in steps:
            step()
    times = [[] for _ in runs]
    for _ in range(o["repeats"]):
        for i, step in enumerate(steps):  # round-robin: drift hits every run alike
            times[i].append(bench.timed(step, "cpu"))
    rows = []
    for i, (run, (model, window, _)) in enumerate(zip(runs, loaded)):
        med = statistics.median(times[i])
        work = bench.work_of(workers[i]) if workers[i] else {}
        rows.append(dict(run=run, attention=model.config.attention, T=window.shape[1] - 1,
                         params=model.get_num_params(), ms_fwd_bwd=round(med, 1),
                         vs_first=round(med / statistics.median(times[0]), 3),
                         kept_per_block=round(work["kept_per_block"], 2) if work else "",
                         frac_pairs=round(work["frac_pairs"], 4) if work else ""))
    os.makedirs(o["out"], exist_ok=True)
    compare.write_csv(os.path.join(o["out"], "bench_trained.csv"), rows)
    facts = ", ".join(f"{k}: {v}" for k, v in bench.machine_facts("cpu").items())
    cols = list(rows[0])
    lines = [f"Forward + backward of trained checkpoints on their first validation window, median of {o['repeats']} "
             f"(round-robin, {o['warmup']} warm-up steps each). Command: `python bench_trained.py {' '.join(argv)}`",
             "", f"Machine: {facts}", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", "vs_first: median time over the first run's; kept_per_block and frac_pairs (adaptive-sparse): the "
              "scored blocks kept per query block and the share of causal (query, key) pairs read exactly, "
              "mean over layers and heads, in the timed step."]
    configurator.write_atomic(os.path.join(o["out"], "bench_trained.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
