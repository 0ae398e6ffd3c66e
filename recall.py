"""
Recall probe: multi-query associative recall (MQAR, Arora et al. 2023, "Zoology") for every block.

    python recall.py                                  # every block, T=128 and 256, 8/16/32/64 pairs
    python recall.py --attention=dense,vq --T=256 --iters=300

A sequence first lists n key-value pairs (k1 v1 k2 v2 ... kn vn), then, at random places in the
rest of the window, asks for every key again (in a new order): a query key is followed by its
value, and the model is scored only on predicting that value from the key (the other positions
hold a filler token and carry no loss). Keys and values come from disjoint vocabularies, so the
answer cannot be guessed from the query's neighbours: a block must retrieve the pair seen up to
T positions earlier. Blocks that summarise the past (a running mean, a codebook) and blocks that
retrieve (softmax over the exact keys, selected blocks) part ways here.

One model per (block, T), 1 layer with a short causal convolution (width 4) before the mixer as
Zoology's models have: the convolution hands each value its key, so one retrieval answers a query.
Without it, or with 2 layers, dense stayed at the guessing floor for thousands of steps at T=256
(results/recall-sizing/conv/). Trained on a mix of pair counts (each batch draws n from `train_pairs`;
the small counts are what let it leave the plateau) at lr 1e-2 (dense left the plateau by step 1,000
at T=256 in 3 of 3 seeds; at 3e-3 the step varied from 900 to past 2,000), only the answer positions
running the head and the last MLP (GPT.forward's labelled_only), then scored on a fixed test set per pair count
(`test_examples` sequences each, the same for every block). Positions and other knobs come from each
block's long-context config (config/long_<block>.py); the budget knobs from PROBE_KNOBS below
(--knobs=config keeps the long configs', which read all of a few hundred tokens exactly). Writes
<out>/recall.md, recall.csv and recall.png (accuracy against pairs, one panel per T). Accuracy is
per query; chance is 1/n_values. Lengths 128 and 256: at T=512 dense left the plateau within 2,500
steps in 1 of 5 sizing settings (results/recall-sizing/lr/), and more steps do not fit 30 minutes.
"""

import datetime
import os
import statistics
import sys
import time

import numpy as np
import torch

import bench
import compare
import configurator
from model import ATTENTION, GPT

# -----------------------------------------------------------------------------
attention = "all"  # comma-separated names from model.ATTENTION, or 'all'
T = "128,256"  # sequence lengths, comma-separated
pairs = "8,16,32,64"  # key-value pairs per test sequence, comma-separated (4 * pairs <= T)
train_pairs = "4,8,16,32,64"  # a training batch draws its pair count from these
n_keys = 64  # key vocabulary (needs n_keys >= max pairs)
n_values = 64  # value vocabulary
n_layer = 1
n_head = 2
n_embd = 64
short_conv = 4  # causal depthwise convolution of this width before every mixer (Zoology's models have one); 0: off
iters = 2500  # optimizer steps per (block, T)
tokens_per_iter = 8192  # batch size = tokens_per_iter // T sequences
learning_rate = 1e-2
weight_decay = 0.1
warmup_iters = 50
test_examples = 256  # fixed test sequences per pair count
seed = 1337
threads = 0  # torch intra-op threads; 0 keeps torch's default
config = "long"  # positions and other knobs from config/<config>_<block>.py ...
knobs = "probe"  # ... with each block's budget knobs set for short T (PROBE_KNOBS), or "config": the file's own
out = "results/recall"
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
FILLER = 0  # token of the positions that are neither pairs nor queries
# Budget knobs for the probe's lengths (a few hundred tokens), where the long configs' knobs read
# everything exactly (kernel-hashing's 256-token chunks, adaptive-sparse's 18 blocks of 64, vq's
# 64-token blocks). These keep each approximate block's exact reading a minority of T=256 and shrink
# it with T: vq holds the past beyond its 16-token blocks in 32 codes; kernel-hashing attends exactly
# within 32-token chunks and to 8 hashed + 8 sampled keys per level beyond; adaptive-sparse reads at
# most 4 + 2 blocks of 16. dense and generative-function have no budget.
PROBE_KNOBS = {"vq": dict(vq_block_len=16, vq_codebook_size=32),
               "kernel-hashing": dict(kh_min_seq_len=32, kh_bucket_block=8, kh_samples=8,
                                      kh_sampling="sorted-strata"),  # the design results/recall was measured with
               "adaptive-sparse": dict(as_block=16, as_k_max=4)}


def vocab_size(o):
    return 1 + o["n_keys"] + o["n_values"]


def mqar_batch(rng, batch, T, n, n_keys, n_values):
    """(inputs, targets), int64 arrays of shape (batch, T). Keys are tokens 1..n_keys, values
    n_keys+1..n_keys+n_values. Targets are -1 (no loss) except at query keys, whose target is
    the value paired with them in the prefix."""
    if 4 * n > T:
        raise ValueError(f"{n} pairs need T >= {4 * n} (pairs, then a key and a value per query); got T={T}")
    if n > n_keys:
        raise ValueError(f"{n} pairs need n_keys >= {n}; got {n_keys}")
    keys = np.argsort(rng.random((batch, n_keys)), axis=1)[:, :n] + 1  # n distinct keys per sequence
    values = rng.integers(0, n_values, size=(batch, n)) + 1 + n_keys
    x = np.full((batch, T), FILLER, dtype=np.int64)
    y = np.full((batch, T), -1, dtype=np.int64)
    x[:, 0:2 * n:2], x[:, 1:2 * n:2] = keys, values
    # queries: every key once, in a new order, at n distinct even offsets of the remaining window
    slots = (T - 2 * n) // 2
    where = np.sort(np.argsort(rng.random((batch, slots)), axis=1)[:, :n], axis=1) * 2 + 2 * n
    order = np.argsort(rng.random((batch, n)), axis=1)
    rows = np.arange(batch)[:, None]
    x[rows, where] = keys[rows, order]
    x[rows, where + 1] = values[rows, order]
    y[rows, where] = values[rows, order]
    return x, y


def model_config(name, T_, o):
    knobs = bench.config_knobs(name, o["config"])
    if o["knobs"] == "probe":
        knobs.update(PROBE_KNOBS.get(name, {}))
    shape = dict(n_layer=o["n_layer"], n_head=o["n_head"], n_embd=o["n_embd"], block_size=T_, attention=name,
                 dropout=0.0, vocab_size=vocab_size(o), short_conv=o["short_conv"])
    return bench.GPTConfig(**{**knobs, **shape})


@torch.no_grad()
def accuracy(model, x, y, batch):
    """Fraction of query positions whose argmax prediction is the stored value."""
    model.eval()
    hit = total = 0
    for i in range(0, len(x), batch):
        xb, yb = torch.from_numpy(x[i:i + batch]), torch.from_numpy(y[i:i + batch])
        logits, _ = model(xb, yb, labelled_only=True)  # logits at the query positions only
        want = yb[yb >= 0]
        hit += (logits.argmax(-1) == want).sum().item()
        total += want.numel()
    model.train()
    return hit / total


def context_guess(x, n):
    """Expected accuracy of answering every query with a value drawn uniformly from the distinct values
    stored in its sequence's pairs: what a model reaches that has learned which tokens are values, but
    not which key each belongs to (accuracy near 1/pairs). x: inputs of one test set with n pairs."""
    vals = np.sort(x[:, 1:2 * n:2], axis=1)
    distinct = 1 + (np.diff(vals, axis=1) != 0).sum(1)
    return float(np.mean(1.0 / distinct))


def lr_at(it, o):
    """Linear warmup, then cosine decay to a tenth of the peak at the last step."""
    peak, warm = o["learning_rate"], o["warmup_iters"]
    if it < warm:
        return peak * (it + 1) / warm
    progress = (it - warm) / max(1, o["iters"] - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def train_one(name, T_, o, test_sets):
    """Trains one model; returns one row per test pair count."""
    torch.manual_seed(o["seed"])
    rng = np.random.default_rng(o["seed"])
    cfg = model_config(name, T_, o)
    model = GPT(cfg)
    opt = model.configure_optimizers(o["weight_decay"], o["learning_rate"], (0.9, 0.99), "cpu")
    batch = max(1, o["tokens_per_iter"] // T_)
    mix = [n for n in (int(p) for p in str(o["train_pairs"]).split(",")) if 4 * n <= T_]
    t0, losses = time.perf_counter(), []
    for it in range(o["iters"]):
        lr = lr_at(it, o)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = mqar_batch(rng, batch, T_, int(rng.choice(mix)), o["n_keys"], o["n_values"])
        # the head and the last MLP run at the query positions only (the same loss, 30-55% less time per step)
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y), labelled_only=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.commit_codebook_updates()  # vq's EMA codebook moves once per optimizer step
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    rows = []
    for n, (x, y) in test_sets.items():
        rows.append(dict(attention=name, T=T_, pairs=n, accuracy=accuracy(model, x, y, batch),
                         final_train_loss=statistics.mean(losses[-20:]), train_seconds=round(seconds, 1),
                         ms_per_iter=round(1000 * seconds / o["iters"], 1), params=model.get_num_params()))
    return rows


def plot(rows, lengths, path, chance, guess):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, T_ in zip(axes[0], lengths):
        for name in dict.fromkeys(r["attention"] for r in rows):
            pts = [(r["pairs"], r["accuracy"]) for r in rows if r["attention"] == name and r["T"] == T_]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(chance, color="gray", ls=":", label="chance")
        pts = sorted((n, g) for (t, n), g in guess.items() if t == T_)
        ax.plot(*zip(*pts), color="gray", ls="--", label="guess among the stored values")
        ax.set(title=f"MQAR recall, T={T_}", xlabel="key-value pairs", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    fig.tight_layout()
    configurator.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv):
    configurator.help_if_asked(argv, DEFAULTS, __doc__)
    try:
        o, _ = configurator.load(argv, DEFAULTS)
        configurator.check_ranges(o, dict(n_keys=">=1", n_values=">=2", n_layer=">=1", n_head=">=1", n_embd=">=1", short_conv=">=0",
                                          iters=">=1", tokens_per_iter=">=1", learning_rate=">0", warmup_iters=">=0",
                                          test_examples=">=1", seed=">=0", threads=">=0", weight_decay=">=0"))
        if o["knobs"] not in ("probe", "config"):
            raise configurator.ConfigError(f"unknown knobs {o['knobs']!r}; valid: probe, config")
        names = list(ATTENTION) if o["attention"] == "all" else o["attention"].split(",")
        bad = [n for n in names if n not in ATTENTION]
        if bad:
            raise configurator.ConfigError(f"unknown attention {bad[0]!r}; valid: {', '.join(ATTENTION)}")
        lengths = [int(t) for t in str(o["T"]).split(",")]
        tests = [int(p) for p in str(o["pairs"]).split(",")]
        train_mix = [int(p) for p in str(o["train_pairs"]).split(",")]
        for T_ in lengths:
            for n in tests + train_mix:
                if n < 1 or n > o["n_keys"] or 4 * n > max(lengths):
                    raise ValueError(f"pair count {n} needs 1 <= n <= n_keys ({o['n_keys']}) and 4 n <= T")
            if not [n for n in train_mix if 4 * n <= T_]:
                raise ValueError(f"no training pair count fits T={T_} (4 * pairs <= T)")
            if not [n for n in tests if 4 * n <= T_]:
                raise ValueError(f"no test pair count fits T={T_} (4 * pairs <= T)")
    except (configurator.ConfigError, ValueError) as e:
        configurator.fail(str(e))
    if o["threads"]:
        torch.set_num_threads(o["threads"])
    os.makedirs(o["out"], exist_ok=True)
    rows, guess, t_all = [], {}, time.perf_counter()
    for T_ in lengths:
        test_rng = np.random.default_rng(10_000 + T_)  # one fixed test set per (T, pairs), shared by every block
        test_sets = {n: mqar_batch(test_rng, o["test_examples"], T_, n, o["n_keys"], o["n_values"])
                     for n in tests if 4 * n <= T_}
        guess.update({(T_, n): context_guess(x, n) for n, (x, _) in test_sets.items()})
        for name in names:
            new = train_one(name, T_, o, test_sets)
            rows += new
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in new[0].items()
                           if k not in ("pairs", "accuracy")),
                  "accuracy:", ", ".join(f"{r['pairs']} pairs {r['accuracy']:.3f}" for r in new), flush=True)
    minutes = (time.perf_counter() - t_all) / 60
    chance = 1.0 / o["n_values"]
    compare.write_csv(os.path.join(o["out"], "recall.csv"),
                      rows + [dict(attention="guess among the stored values", T=t, pairs=n, accuracy=g)
                              for (t, n), g in guess.items()])
    facts = ", ".join(f"{k}: {v}" for k, v in bench.machine_facts("cpu").items())
    lines = [f"MQAR accuracy (fraction of queries answered with the stored value; chance {chance:.4f}). "
             f"Command: `python recall.py {' '.join(argv)}`; {minutes:.1f} minutes in all.", "",
             f"Machine: {facts}", "",
             f"Models: {o['n_layer']} layers, {o['n_head']} heads, {o['n_embd']} wide, {o['iters']} steps of "
             f"{o['tokens_per_iter']} tokens, lr {o['learning_rate']}, trained on pair counts {o['train_pairs']}; "
             f"short convolution of width {o['short_conv']} before every mixer; block knobs from "
             f"config/{o['config']}_<block>.py" + (f", budgets from recall.PROBE_KNOBS {PROBE_KNOBS}" if o["knobs"] == "probe" else "")
             + f"; {o['test_examples']} fixed test sequences per cell.", ""]
    for T_ in lengths:
        cols = [n for n in tests if 4 * n <= T_]
        lines += [f"T={T_}", "", "| attention | " + " | ".join(f"{n} pairs" for n in cols) + " | ms/iter | params |",
                  "|" + " --- |" * (len(cols) + 3)]
        for name in names:
            r = {x["pairs"]: x for x in rows if x["attention"] == name and x["T"] == T_}
            any_r = next(iter(r.values()))
            lines.append(f"| {name} | " + " | ".join(f"{r[n]['accuracy']:.3f}" for n in cols)
                         + f" | {any_r['ms_per_iter']} | {any_r['params']} |")
        lines += ["| guess among the stored values | " + " | ".join(f"{guess[(T_, n)]:.3f}" for n in cols) + " | - | - |",
                  "", "A block at the guessing row has learned which tokens are values, not which key each belongs "
                  "to; recall is accuracy above it.", ""]
    configurator.write_atomic(os.path.join(o["out"], "recall.md"), "\n".join(lines))
    plot(rows, lengths, os.path.join(o["out"], "recall.png"), chance, guess)
    print("\n".join(lines))
    print(f"wrote {o['out']}/recall.md, recall.csv, recall.png ({datetime.datetime.now():%H:%M})")


if __name__ == "__main__":
    main(sys.argv[1:])
