"""
Quality at a stated budget, with seeds, error bars and the n-gram floor: train every arm N times
(or reuse finished runs from their metrics.jsonl), then write a table and loss-curve plots.

    python compare.py --seeds=3                    # all five blocks, CPU scale, each config's own budget
    python compare.py --budget=tokens --budget_value=3e6 --attentions=dense,vq
    python compare.py --budget=seconds --budget_value=120
    python compare.py --preset=long --seeds=2      # the five blocks, a dense-GAU ablation and adaptive-sparse with
                                                   # its budget regulariser, at T=4096
    python compare.py --preset=batch_overfit       # Hilsenbek 2024's batch 64 vs 16, with an equal-token control
    python compare.py --preset=mlp_cost            # generative vs dense ms/iter and memory, MLP ratio 4 and 16

Budgets: `iters` (default: each config's max_iters, or --budget_value iterations), `tokens` (each arm
runs ceil(tokens / tokens per iteration) iterations) or `seconds` (training time, evaluation excluded;
the lr decays over the time). For iters and tokens the warmup, decay and evaluation interval are
scaled with the run's length, so every arm has the same schedule shape. Seeds change the
initialisation and the data order (seed = 1337 + i). Every run is scored on the same fixed
evaluation windows (train.py's eval_tokens; see ngram.py), and the n-gram floor on those windows
is a row of every table and a line on every plot. A difference between two arms counts only when
it is larger than the seed spread (the larger of the two standard deviations).

Each run is `python train.py CONFIG --key=value ...` in <out>/<arm>-s<seed>, all in one wandb group
(with --wandb_log=True). Results: <out>/results.md, results.csv (one row per arm, mean and std over
seeds), runs.csv (one row per run), losses.png.
"""

import csv
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time

import bench
import configurator
import ngram

ROOT = os.path.dirname(os.path.abspath(__file__))

DEFAULTS = dict(
    preset="blocks",  # blocks, long, batch_overfit or mlp_cost
    attentions="all",  # for preset=blocks: comma-separated names, or all
    scale="cpu",  # which scale of each config file (cpu or gpu)
    seeds=1,  # runs per arm (seed 1337, 1338, ...)
    first_seed=0,  # run only seeds first_seed..seeds-1 (to spread one comparison over several processes)
    budget="iters",  # iters, tokens or seconds: what is held equal across arms
    budget_value=0.0,  # iterations, tokens or seconds; 0: each config's own max_iters (iters), the first arm's tokens (tokens)
    max_iters=0,  # shorthand for --budget=iters --budget_value=N
    out="",  # default: results/<preset>-<scale>
    reuse=True,  # reuse a run whose metrics.jsonl already reached its budget
    train=True,  # False: train nothing, tabulate the finished runs and name the missing ones
    floor=True,  # fit and show the n-gram floor
    wandb_log=False,
    readme=False,  # also write the table into README.md between its markers
    readme_path="README.md",
    extra="",  # extra flags for every run, e.g. "--eval_tokens=65536 --device=cpu"
)
CONFIG_FILE = {"dense": "shakespeare_dense", "vq": "shakespeare_vq", "kernel-hashing": "shakespeare_kernel_hashing",
               "adaptive-sparse": "shakespeare_adaptive_sparse", "generative-function": "shakespeare_generative"}
# Batch 64 vs 16 (Hilsenbek 2024 trains nanoGPT's shakespeare_char): tinyshakespeare's size, dropout 0.2.
# Arms: batch 64 for N iterations, batch 16 for N (the paper's protocol) and batch 16 for 4N (equal tokens).
OVERFIT_DATA = dict(dataset="shakespeare_char", name="shakespeare_char_1115k", max_chars=1_115_394)
OVERFIT_SCALES = {
    "cpu": dict(dataset=OVERFIT_DATA["name"], n_layer=4, n_head=4, n_embd=128, block_size=64, max_iters=600,
                lr_decay_iters=600, warmup_iters=30, eval_interval=50, dropout=0.2, eval_tokens=65536),
    "gpu": dict(dataset="shakespeare_char", n_layer=6, n_head=6, n_embd=384, block_size=256, max_iters=5000,
                lr_decay_iters=5000, warmup_iters=100, eval_interval=250, dropout=0.2),  # the paper's nanoGPT setting
}


LONG_AS_BUDGET = 0.01  # the long preset's adaptive-sparse arm with the budget regulariser (model.py, as_budget)


def runs_for(o):
    """[(arm name, config file, {flag: value})] for the chosen preset."""
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
        n = int(o["max_iters"] or o["budget_value"] or base["max_iters"])  # N: batch 64's iterations
        models = [("dense", "config/shakespeare_dense.py", {}),
                  ("generative", "config/shakespeare_generative.py", {}),
                  ("generative+avg", "config/shakespeare_generative.py", {"gf_avg_context": True})]
        arms = (("b64", 64, 1), ("b16", 16, 1), ("b16x4", 16, 4))  # x4: four times the iterations, equal tokens
        return [(f"{m}-{tag}", cfg, {**base, **kw, "batch_size": b, **scaled_schedule(base, n * k)})
                for m, cfg, kw in models for tag, b, k in arms]
    if o["preset"] == "long":  # T=4096, one shape for all; plus Transformer-VQ's unit with exact attention
        blocks = [(n, f"config/{CONFIG_FILE[n].replace('shakespeare_', 'long_')}.py", dict(scale)) for n in ATTENTION]
        return blocks + [("dense-gau", "config/long_vq.py", {**scale, "vq_quantize": False}),
                         ("adaptive-sparse+budget", "config/long_adaptive_sparse.py", {**scale, "as_budget": LONG_AS_BUDGET})]
    if o["preset"] == "mlp_cost":
        base = {**scale, "max_iters": 200, "lr_decay_iters": 200, "eval_interval": 200}
        return [(f"{m}-mlp{r}", f"config/{CONFIG_FILE[a]}.py", {**base, "mlp_ratio": float(r)})
                for r in (4, 16) for m, a in (("dense", "dense"), ("generative", "generative-function"))]
    raise configurator.ConfigError(f"unknown preset {o['preset']!r}; valid: blocks, long, batch_overfit, mlp_cost")


def scaled_schedule(cfg, iters):
    """max_iters = iters, with warmup, decay and evaluation interval scaled by iters / cfg's max_iters."""
    f = iters / cfg["max_iters"]
    return {"max_iters": iters, "lr_decay_iters": max(1, round(cfg["lr_decay_iters"] * f)),
            "warmup_iters": round(cfg.get("warmup_iters", 100) * f), "eval_interval": max(1, round(cfg["eval_interval"] * f))}


def resolved(config_file, flags, o):
    """The configuration train.py will run with: defaults < file < scale < flags < --extra."""
    import train
    argv = [os.path.join(ROOT, config_file)] + [f"--{k}={v}" for k, v in flags.items()] + o["extra"].split()
    cfg, _ = configurator.load(argv, train.DEFAULTS, lambda: (o["scale"], "compare.py --scale"))
    return cfg


def apply_budget(arms, o):
    """Add each arm's budget flags: the same iterations, tokens or training seconds for all."""
    if o["max_iters"]:
        o = {**o, "budget": "iters", "budget_value": float(o["max_iters"])}
    if o["budget"] not in ("iters", "tokens", "seconds"):
        raise configurator.ConfigError(f"unknown budget {o['budget']!r}; valid: iters, tokens, seconds")
    if o["budget_value"] < 0 or o["seeds"] < 1 or not 0 <= o["first_seed"] < o["seeds"]:
        raise configurator.ConfigError("budget_value must be >= 0, seeds >= 1 and 0 <= first_seed < seeds")
    if o["budget"] == "seconds" and not o["budget_value"]:
        raise configurator.ConfigError("--budget=seconds needs --budget_value=SECONDS")
    if o["preset"] == "batch_overfit":  # its arms fix their own iterations (N, N, 4N)
        if o["budget"] != "iters":
            raise configurator.ConfigError("preset batch_overfit holds its own budget; use --max_iters=N to change N")
        return [(n, c, f, resolved(c, f, o)) for n, c, f in arms]
    out, first_tokens = [], None
    for name, config_file, flags in arms:
        cfg = resolved(config_file, flags, o)
        tpi = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
        if o["budget"] == "iters" and o["budget_value"]:
            flags = {**flags, **scaled_schedule(cfg, int(o["budget_value"]))}
        elif o["budget"] == "tokens":
            first_tokens = first_tokens or (o["budget_value"] or cfg["max_iters"] * tpi)
            flags = {**flags, **scaled_schedule(cfg, max(1, math.ceil(first_tokens / tpi)))}
        elif o["budget"] == "seconds":
            flags = {**flags, "max_seconds": float(o["budget_value"]), "max_iters": 10 ** 9}
        out.append((name, config_file, flags, resolved(config_file, flags, o)))
    return out


def read_metrics(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def run_finished(log, cfg):
    if not log:
        return False
    last = log[-1]
    return last["iter"] >= cfg["max_iters"] or (cfg["max_seconds"] > 0 and last.get("train_seconds", 0) >= cfg["max_seconds"])


def run_one(name, config_file, flags, cfg, o, out_dir, group):
    args = [sys.executable, os.path.join(ROOT, "train.py"), os.path.join(ROOT, config_file), f"--out_dir={out_dir}",
            f"--wandb_group={group}", f"--wandb_run_name={name}", f"--wandb_log={o['wandb_log']}"]
    args += [f"--{k}={v}" for k, v in flags.items()] + o["extra"].split()
    log = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    old = os.path.join(out_dir, "config.json")
    same = os.path.exists(old) and all(json.load(open(old)).get(k) == cfg[k] for k in ("max_iters", "max_seconds", "seed", "batch_size"))
    if o["reuse"] and same and run_finished(log, cfg):
        print(f"[{name}] reusing {out_dir}/metrics.jsonl ({log[-1]['iter']} iterations)")
        return log
    if not o["train"]:
        print(f"[{name}] not finished: left out (--train=False)")
        return None
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


def val_at_train_loss(log, level):
    """Val loss where the train loss first reaches `level` (linear in train loss between evaluations)."""
    for a, b in zip(log, log[1:]):
        if b["train/loss"] <= level <= a["train/loss"]:
            t = (a["train/loss"] - level) / max(1e-12, a["train/loss"] - b["train/loss"])
            return a["val/loss"] + t * (b["val/loss"] - a["val/loss"])
    return None


def summarize(name, log):
    """One run's row from its metrics.jsonl."""
    best = min(log, key=lambda r: r["val/loss"])
    final = log[-1]
    ms = [r["ms_per_iter"] for r in log if r.get("ms_per_iter")]
    tps = [r["tokens_per_sec"] for r in log if r.get("tokens_per_sec")]
    mem = [v for r in log for k, v in r.items() if k.startswith("peak_mem_")]
    mem_key = next((k for k in final if k.startswith("peak_mem_")), "peak_mem")
    return {"run": name, "attention": final.get("attention"), "params": final.get("params"),
            "best_val": best["val/loss"], "best_iter": best["iter"], "final_val": final["val/loss"],
            "final_val_se": final.get("val/loss_se"), "final_train": final["train/loss"],
            "gap_final_minus_best": final["val/loss"] - best["val/loss"],
            "gap_val_minus_train": final["val/loss"] - final["train/loss"],
            "iters": final["iter"], "tokens": final.get("tokens"), "train_seconds": final.get("train_seconds"),
            "wall_seconds": final.get("wall_seconds"),
            "ms_per_iter": statistics.median(ms) if ms else None,
            "tokens_per_sec": statistics.median(tps) if tps else None, mem_key: max(mem) if mem else None}


MEASURES = ("best_val", "final_val", "final_train", "gap_val_minus_train", "gap_final_minus_best")


def aggregate(arm, rows):
    """An arm's row: mean and sample std over seeds of every measure; cost as the median run."""
    out = {"run": arm, "attention": rows[0]["attention"], "params": rows[0]["params"], "seeds": len(rows)}
    for k in MEASURES + tuple(k for k in ("val_at_matched_train",) if rows[0].get(k) is not None):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = statistics.fmean(vals) if vals else None
        out[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
    for k in rows[0]:
        if k in ("iters", "tokens", "train_seconds", "wall_seconds", "ms_per_iter", "tokens_per_sec") or k.startswith("peak_mem_"):
            vals = [r[k] for r in rows if r.get(k) is not None]
            out[k] = statistics.median(vals) if vals else None
    return out


def differs(a, b, k):
    """(difference b - a of measure k, whether it exceeds the seed spread)."""
    d = b[k] - a[k]
    spread = max(a.get(k + "_std") or 0.0, b.get(k + "_std") or 0.0)
    if a["seeds"] < 2 or b["seeds"] < 2:
        return d, None  # no spread to compare with
    return d, abs(d) > spread


def verdict_word(d, sig, lower="lower", higher="higher"):
    if sig is None:
        return f"{d:+.4f} (one seed: no spread)"
    return f"{d:+.4f} ({lower if d < 0 else higher})" if sig else f"{d:+.4f} (no difference: within seed spread)"


def block_verdicts(arms, floor):
    """Each block against dense on best val loss, and against the n-gram floor."""
    by = {a["run"]: a for a in arms}
    ref = by.get("dense")
    lines = ["| run | best val - dense's | below the n-gram floor? |", "| --- | --- | --- |"]
    for a in arms:
        vs = verdict_word(*differs(ref, a, "best_val")) if ref and a is not ref else ""
        below = ""
        if floor is not None:
            hi = a["best_val"] + (a.get("best_val_std") or 0.0)
            below = "yes" if hi < floor["val/loss"] else ("no" if a["best_val"] - (a.get("best_val_std") or 0.0)
                                                          > floor["val/loss"] else "within the seed spread")
        lines.append(f"| {a['run']} | {vs} | {below} |")
    return "\n".join(lines)


def overfit_verdicts(arms):
    """Per model: batch 16 (same iterations, and equal tokens) against batch 64, measure by measure."""
    by = {a["run"]: a for a in arms}
    keys = ("best_val", "gap_val_minus_train", "gap_final_minus_best", "val_at_matched_train")
    lines = ["| model | arm vs b64 | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 2)]
    for m in dict.fromkeys(n.rsplit("-", 1)[0] for n in by):
        a = by.get(f"{m}-b64")
        for tag in ("b16", "b16x4"):
            b = by.get(f"{m}-{tag}")
            if a and b:
                cells = [verdict_word(*differs(a, b, k)) if a.get(k) is not None and b.get(k) is not None else ""
                         for k in keys]
                lines.append(f"| {m} | {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def table(arms, floor):
    cols = ["run", "attention", "params", "seeds"] + [k for k in MEASURES + ("val_at_matched_train",) if k in arms[0]]
    cost = [k for k in arms[0] if k in ("iters", "tokens", "train_seconds", "wall_seconds", "ms_per_iter",
                                        "tokens_per_sec") or k.startswith("peak_mem_")]
    md = ["| " + " | ".join(cols + cost) + " |", "|" + " --- |" * len(cols + cost)]
    for a in arms:
        cells = []
        for k in cols:
            std = a.get(k + "_std")
            cells.append(fmt(a.get(k)) + (f" ± {std:.4f}" if std is not None else ""))
        md.append("| " + " | ".join(cells + [fmt(a.get(k)) for k in cost]) + " |")
    if floor is not None:
        cells = ["n-gram floor", f"order-{floor['order']} counts", "", ""]
        cells += [f"{floor['val/loss']:.4f} ± {floor['val/loss_se']:.4f} (SE)" if k in ("best_val", "final_val") else ""
                  for k in cols[4:]]
        md.append("| " + " | ".join(cells + [""] * len(cost)) + " |")
    return "\n".join(md)


def write_csv(path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    configurator.write_atomic(path, buf.getvalue())


def plot(logs, floor, out, title):
    """Val (and train) loss against tokens and against training seconds: seed mean with a min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, xkey, xlabel in ((axes[0], "tokens", "tokens seen"), (axes[1], "train_seconds", "training time (s)")):
        for i, (arm, runs) in enumerate(logs.items()):
            color = f"C{i % 10}"
            n = min(len(r) for r in runs)
            for key, style, alpha in (("val/loss", "-", 1.0), ("train/loss", "--", 0.5)):
                x = np.mean([[row[xkey] for row in r[:n]] for r in runs], axis=0)
                y = np.array([[row[key] for row in r[:n]] for r in runs])
                label = f"{arm} {key.split('/')[0]}" + (f" ({len(runs)} seeds)" if len(runs) > 1 and key == "val/loss" else "")
                ax.plot(x, y.mean(0), style, color=color, alpha=alpha, label=label)
                if len(runs) > 1:
                    ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.15 * alpha)
        if floor is not None:
            ax.axhline(floor["val/loss"], color="k", linestyle=":", label=f"n-gram floor (order {floor['order']}) val")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token), fixed evaluation windows")
        ax.grid(alpha=0.3)
        lo = min(min(r["val/loss"] for runs in logs.values() for rr in runs for r in rr), floor["val/loss"] if floor else 9)
        ax.set_ylim(lo - 0.1, lo + 1.2)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    configurator.write_atomic(os.path.join(out, "losses.png"), buf.getvalue())


def main(argv):
    try:
        o, _ = configurator.load(argv, DEFAULTS)
        if o["preset"] == "batch_overfit" and o["scale"] == "cpu":
            import prepare_data
            if not os.path.exists(os.path.join("data", OVERFIT_DATA["name"], "meta.json")):
                prepare_data.prepare(OVERFIT_DATA["dataset"], name=OVERFIT_DATA["name"], max_chars=OVERFIT_DATA["max_chars"])
        arms = apply_budget(runs_for(o), o)
    except configurator.ConfigError as e:
        configurator.fail(str(e))
    out = o["out"] or os.path.join("results", f"{o['preset']}-{o['scale']}")
    os.makedirs(out, exist_ok=True)
    group = f"{o['preset']}-{o['scale']}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.time()
    logs = {}
    total, trained, missing = (o["seeds"] - o["first_seed"]) * len(arms), [], []  # trained: seconds of each run that trained (not reused)
    try:
        for seed in range(o["first_seed"], o["seeds"]):
            for a, (name, cfg_file, flags, cfg) in enumerate(arms):
                k = (seed - o["first_seed"]) * len(arms) + a + 1
                eta = f", eta {(total - k + 1) * sum(trained) / len(trained) / 60:.1f} min" if trained else ""
                print(f"[run {k}/{total}] {name}-s{seed}{eta}", flush=True)
                t_run = time.time()
                flags = {**flags, "seed": cfg["seed"] + seed}
                log = run_one(f"{name}-s{seed}", cfg_file, flags, {**cfg, "seed": cfg["seed"] + seed}, o,
                              os.path.join(out, f"{name}-s{seed}"), group)
                if log is None:
                    missing.append(f"{name}-s{seed}")
                else:
                    logs.setdefault(name, []).append((seed, log))
                if time.time() - t_run > 1:  # a reused run takes no time and says nothing of the rest
                    trained.append(time.time() - t_run)
    except RuntimeError as e:
        configurator.fail(str(e))
    floor = None
    if o["floor"]:
        c = arms[0][3]
        floor = ngram.floor(os.path.join("data", c["dataset"]), c["block_size"], c["eval_tokens"])
    if not logs:
        configurator.fail("no finished run to tabulate")
    runs = {name: [summarize(f"{name}-s{seed}", log) for seed, log in ls] for name, ls in logs.items()}
    logs = {name: [log for _, log in ls] for name, ls in logs.items()}
    if o["preset"] == "batch_overfit":  # val loss at the train loss every arm of a model reaches
        for m in dict.fromkeys(n.rsplit("-", 1)[0] for n in runs):
            mine = {n: logs[n] for n in logs if n.rsplit("-", 1)[0] == m}
            level = max(min(r["train/loss"] for r in log) for ls in mine.values() for log in ls)
            for n, ls in mine.items():
                for row, log in zip(runs[n], ls):
                    row["val_at_matched_train"] = val_at_train_loss(log, level)
                    row["matched_train_loss"] = level
    agg = [aggregate(n, rs) for n, rs in runs.items()]
    machine = f"{os.cpu_count()} CPU cores" if o["scale"] == "cpu" else "GPU"
    c0 = arms[0][3]
    budget = {"iters": "iterations", "tokens": "tokens", "seconds": "training seconds"}[o["budget"] if not o["max_iters"] else "iters"]
    title = (f"preset {o['preset']}, scale {o['scale']}, {time.strftime('%Y-%m-%d')}, {machine}; equal {budget}; "
             f"up to {o['seeds']} seed(s) per arm; scored on {c0['eval_tokens'] or 'all'} val tokens in windows of {c0['block_size']}; "
             f"command: python compare.py {' '.join(argv)}")
    verdicts = overfit_verdicts(agg) if o["preset"] == "batch_overfit" else block_verdicts(agg, floor)
    text = (f"{title}\n\n{table(agg, floor)}\n\nMean ± sample std over seeds; cost columns are the median run. "
            f"A difference counts only when it exceeds the larger seed std of the two arms."
            + (f" Not finished, so left out: {', '.join(missing)}." if missing else "") + f"\n\n{verdicts}\n")
    write_csv(os.path.join(out, "results.csv"), agg)
    write_csv(os.path.join(out, "runs.csv"), [r for rs in runs.values() for r in rs])
    configurator.write_atomic(os.path.join(out, "results.md"), text)
    if floor is not None:
        configurator.write_atomic(os.path.join(out, "ngram_floor.json"), json.dumps(floor, indent=1))
    plot(logs, floor, out, title)
    print(text)
    print(f"wrote {out}/results.md, results.csv, runs.csv, losses.png in {time.time() - t0:.0f} s")
    if o["readme"]:
        try:
            bench.replace_readme_section(o["readme_path"], o["preset"], prefix="compare", section=(
                f"`python compare.py {' '.join(argv)}` ({machine}, {time.strftime('%Y-%m-%d')}, "
                f"{(time.time() - t0) / 60:.0f} minutes):\n\n{text}\n![losses]({out}/losses.png)\n"))
        except (bench.BenchError, OSError) as e:
            configurator.fail(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
