"""
Quality at equal budget: train several runs with the same data, seed and iteration budget
(or reuse finished ones from their metrics.jsonl), then write a table and loss-curve plot.

    python compare.py                          # all registered attentions, CPU scale
    python compare.py --preset=batch_overfit   # Hilsenbek 2024: batch 64 vs 16, dense vs generative
    python compare.py --preset=mlp_cost        # generative vs dense ms/iter and memory, MLP ratio 4 and 16 (4x)

Each run is `python train.py CONFIG --key=value ...` in its own out_dir under --out, all in one
wandb group (with --wandb_log=True). Results: <out>/results.md, results.csv, losses.png.
"""

import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time

import bench
import configurator

ROOT = os.path.dirname(os.path.abspath(__file__))

DEFAULTS = dict(
    preset="blocks",  # blocks, batch_overfit or mlp_cost
    attentions="all",  # for preset=blocks: comma-separated names, or all
    scale="cpu",  # which scale of each config file (cpu or gpu)
    max_iters=0,  # 0: the config's own budget
    out="",  # default: results/<preset>-<scale>
    reuse=True,  # reuse a run whose metrics.jsonl already reached the budget
    wandb_log=False,
    readme=False,  # also write the table into README.md between its markers
    readme_path="README.md",
    extra="",  # extra flags for every run, e.g. "--eval_iters=50 --device=cpu"
)
CONFIG_FILE = {"dense": "shakespeare_dense", "vq": "shakespeare_vq", "kernel-hashing": "shakespeare_kernel_hashing",
               "adaptive-sparse": "shakespeare_adaptive_sparse", "generative-function": "shakespeare_generative"}
# the batch size 64 vs 16 reproduction: a small corpus and enough epochs that overfitting shows on a CPU
OVERFIT_DATA = dict(dataset="shakespeare_char", name="shakespeare_char_100k", max_chars=100_000)
OVERFIT_SCALES = {
    "cpu": dict(dataset=OVERFIT_DATA["name"], n_layer=4, n_head=4, n_embd=128, block_size=64, max_iters=1500,
                lr_decay_iters=1500, eval_interval=100, eval_iters=20, dropout=0.0),
    "gpu": dict(dataset="shakespeare_char", n_layer=6, n_head=6, n_embd=384, block_size=256, max_iters=5000,
                lr_decay_iters=5000, eval_interval=250, eval_iters=200, dropout=0.2),  # the paper's nanoGPT setting
}


def runs_for(o):
    """[(run name, config file, {flag: value})] for the chosen preset."""
    from model import ATTENTION
    scale = {"scale": o["scale"]}
    if o["preset"] == "blocks":
        names = list(ATTENTION) if o["attentions"] == "all" else o["attentions"].split(",")
        bad = [n for n in names if n not in ATTENTION]
        if bad:
            raise configurator.ConfigError(f"unknown attention {bad[0]!r}; valid: {', '.join(ATTENTION)}")
        return [(n, f"config/{CONFIG_FILE[n]}.py", dict(scale)) for n in names]
    if o["preset"] == "batch_overfit":
        base = {**scale, **OVERFIT_SCALES[o["scale"]]}
        models = [("dense", "config/shakespeare_dense.py", {}),
                  ("generative", "config/shakespeare_generative.py", {}),
                  ("generative+avg", "config/shakespeare_generative.py", {"gf_avg_context": True})]
        return [(f"{m}-b{b}", cfg, {**base, **kw, "batch_size": b}) for m, cfg, kw in models for b in (64, 16)]
    if o["preset"] == "mlp_cost":
        base = {**scale, "max_iters": 200, "lr_decay_iters": 200, "eval_interval": 200}
        return [(f"{m}-mlp{r}", f"config/{CONFIG_FILE[a]}.py", {**base, "mlp_ratio": float(r)})
                for r in (4, 16) for m, a in (("dense", "dense"), ("generative", "generative-function"))]
    raise configurator.ConfigError(f"unknown preset {o['preset']!r}; valid: blocks, batch_overfit, mlp_cost")


def read_metrics(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def run_one(name, config_file, flags, o, out_dir, group):
    args = [sys.executable, os.path.join(ROOT, "train.py"), os.path.join(ROOT, config_file), f"--out_dir={out_dir}", f"--wandb_group={group}",
            f"--wandb_run_name={name}", f"--wandb_log={o['wandb_log']}"]
    if o["max_iters"]:
        flags = {**flags, "max_iters": o["max_iters"], "lr_decay_iters": o["max_iters"]}
    args += [f"--{k}={v}" for k, v in flags.items()] + o["extra"].split()
    log = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    done = os.path.join(out_dir, "config.json")
    target = flags.get("max_iters") or (json.load(open(done))["max_iters"] if os.path.exists(done) else None)
    if o["reuse"] and log and target is not None and log[-1]["iter"] >= target:
        print(f"[{name}] reusing {out_dir}/metrics.jsonl ({log[-1]['iter']} iterations)")
        return log
    print(f"[{name}] train.py {config_file} " + " ".join(args[3:]), flush=True)
    t0 = time.time()
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if os.path.isdir(out_dir):  # train.py made it, unless it failed on its arguments
        configurator.write_atomic(os.path.join(out_dir, "train.log"), r.stdout)
    if r.returncode != 0:
        tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "no output"
        raise RuntimeError(f"run {name} failed: {tail}")
    log = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    print(f"[{name}] done in {time.time() - t0:.0f} s: val loss {log[-1]['val/loss']:.4f}", flush=True)
    return log


def summarize(name, log):
    """One table row from a run's metrics.jsonl."""
    best = min(log, key=lambda r: r["val/loss"])
    final = log[-1]
    ms = [r["ms_per_iter"] for r in log if r.get("ms_per_iter")]
    tps = [r["tokens_per_sec"] for r in log if r.get("tokens_per_sec")]
    mem = [v for r in log for k, v in r.items() if k.startswith("peak_mem_")]
    mem_key = next((k for k in final if k.startswith("peak_mem_")), "peak_mem")
    return {"run": name, "attention": final.get("attention"), "params": final.get("params"),
            "best_val": best["val/loss"], "best_iter": best["iter"], "final_val": final["val/loss"],
            "final_train": final["train/loss"], "gap_final_minus_best": final["val/loss"] - best["val/loss"],
            "gap_val_minus_train": final["val/loss"] - final["train/loss"],
            "ms_per_iter": statistics.median(ms) if ms else None,
            "tokens_per_sec": statistics.median(tps) if tps else None, mem_key: max(mem) if mem else None}


def overfit_verdicts(rows):
    """Per model: did batch 16 narrow the overfitting gap compared with batch 64?"""
    by = {r["run"]: r for r in rows}
    lines = ["| model | gap final-best, b64 | b16 | gap val-train, b64 | b16 | batch 16 narrowed the gap? |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m in dict.fromkeys(n.rsplit("-b", 1)[0] for n in by):
        a, b = by.get(f"{m}-b64"), by.get(f"{m}-b16")
        if a and b:
            narrowed = [b[k] < a[k] for k in ("gap_final_minus_best", "gap_val_minus_train")]
            verdict = {(True, True): "yes, both gaps", (False, False): "no"}.get(tuple(narrowed), "mixed: " + (
                "final-best only" if narrowed[0] else "val-train only"))
            lines.append(f"| {m} | {a['gap_final_minus_best']:.4f} | {b['gap_final_minus_best']:.4f} | "
                         f"{a['gap_val_minus_train']:.4f} | {b['gap_val_minus_train']:.4f} | {verdict} |")
    return "\n".join(lines)


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_outputs(rows, logs, out, title, extra=""):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    configurator.write_atomic(os.path.join(out, "results.csv"), buf.getvalue())
    md = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    md += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    table = "\n".join(md) + (f"\n\n{extra}" if extra else "")
    configurator.write_atomic(os.path.join(out, "results.md"), f"{title}\n\n{table}\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, log) in enumerate(logs.items()):
        it = [r["iter"] for r in log]
        color = f"C{i % 10}"
        ax.plot(it, [r["val/loss"] for r in log], color=color, label=f"{name} val")
        ax.plot(it, [r["train/loss"] for r in log], color=color, linestyle="--", alpha=0.6, label=f"{name} train")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    configurator.write_atomic(os.path.join(out, "losses.png"), buf.getvalue())
    print(table)
    return table


def main(argv):
    try:
        o, _ = configurator.load(argv, DEFAULTS)
        runs = runs_for(o)
    except configurator.ConfigError as e:
        configurator.fail(str(e))
    out = o["out"] or os.path.join("results", f"{o['preset']}-{o['scale']}")
    os.makedirs(out, exist_ok=True)
    group = f"{o['preset']}-{o['scale']}-{time.strftime('%Y%m%d-%H%M%S')}"
    if o["preset"] == "batch_overfit" and o["scale"] == "cpu":
        import prepare_data
        if not os.path.exists(os.path.join("data", OVERFIT_DATA["name"], "meta.json")):
            prepare_data.prepare(OVERFIT_DATA["dataset"], name=OVERFIT_DATA["name"], max_chars=OVERFIT_DATA["max_chars"])
    t0 = time.time()
    logs = {}
    try:
        for name, cfg, flags in runs:
            logs[name] = run_one(name, cfg, flags, o, os.path.join(out, name), group)
    except RuntimeError as e:
        configurator.fail(str(e))
    rows = [summarize(n, log) for n, log in logs.items()]
    machine = f"{os.cpu_count()} CPU cores" if o["scale"] == "cpu" else "GPU"
    title = (f"preset {o['preset']}, scale {o['scale']}, {time.strftime('%Y-%m-%d')}, {machine}; "
             f"command: python compare.py {' '.join(argv)}")
    table = write_outputs(rows, logs, out, title, overfit_verdicts(rows) if o["preset"] == "batch_overfit" else "")
    print(f"wrote {out}/results.md, results.csv, losses.png in {time.time() - t0:.0f} s")
    if o["readme"]:
        try:
            bench.replace_readme_section(o["readme_path"], o["preset"], prefix="compare", section=(
                f"`python compare.py {' '.join(argv)}` ({machine}, {time.strftime('%Y-%m-%d')}):\n\n"
                f"{table}\n\n![losses]({out}/losses.png)\n"))
        except (bench.BenchError, OSError) as e:
            configurator.fail(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
