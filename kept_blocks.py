"""
Adaptive-sparse selection on a trained checkpoint: how many key blocks each query block keeps.

    python kept_blocks.py --out_dir=results/long-cpu/adaptive-sparse-s0
    python kept_blocks.py --out_dir=out-long-adaptive-sparse --windows=32 --report_dir=reports/as

Runs validation windows (the fixed evaluation windows of train.py: the first windows x block_size
tokens of val) through the checkpoint and reads each layer's selection (module.last_kept: scored
candidates kept per query block and head, beyond the two always-attended blocks). Reports, per layer
and head, the mean, min and max kept count over query blocks that have candidates, the share of
those at the cap (kept = k_max while more candidates exist: the cap, not the threshold, decided),
the spread of the per-window mean across windows (how selection varies with the input), and the
fraction of causal (query, key) pairs read exactly. Writes kept_blocks.md, kept_blocks.json and
kept_blocks.png (histogram of kept counts per layer, one line per head) into report_dir.
"""

import json
import os
import sys

import numpy as np
import torch

import configurator
import ngram
from model import GPT, GPTConfig

DEFAULTS = dict(out_dir="", report_dir="", data_dir="data", windows=16, batch=4, device="cpu")


def load_model(out_dir, device="cpu"):
    """(GPT with the weights of out_dir/ckpt.pt, the checkpoint); a ConfigError naming the file otherwise."""
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = configurator.read_checkpoint(path, ("model", "model_args", "config"), device)
    try:
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise configurator.ConfigError(f"checkpoint {path}: not a model of this model.py ({str(e).splitlines()[0][:150]})")
    return model, ckpt


def val_tokens(data_dir, cfg):
    """The validation split (a uint16 memmap) of the run whose config is cfg."""
    path = os.path.join(data_dir, cfg.get("dataset", "shakespeare_char"), "val.bin")
    if not os.path.isfile(path):
        raise configurator.ConfigError(f"no validation data at {path}")
    return np.memmap(path, dtype=np.uint16, mode="r")


def load(out_dir, device):
    model, ckpt = load_model(out_dir, device)
    path = os.path.join(out_dir, "ckpt.pt")
    if model.config.attention != "adaptive-sparse":
        raise configurator.ConfigError(f"checkpoint {path} is a {model.config.attention!r} model; "
                                       f"kept_blocks.py reads adaptive-sparse selections")
    return model.to(device).eval(), ckpt


@torch.no_grad()
def collect(model, idx, batch):
    """kept counts (layers, N, H, n_blocks) for windows idx (N, T)."""
    layers = [b.attn for b in model.transformer.h]
    out = []
    for i in range(0, len(idx), batch):
        model(idx[i:i + batch])
        out.append(torch.stack([a.last_kept for a in layers]))
    return torch.cat(out, dim=1)


def summarize(kept, k_max, block, T, force_first=0):
    """Per (layer, head) statistics over the query blocks that have candidates (blocks 2.., or 3..
    with a forced first block). read_fraction: the share of the causal (query, key) pairs the
    selected-block branch reads exactly (kept, forced first and previous blocks in full, the own
    block causally), as AdaptiveSparseAttention.work_stats counts it; a window branch is not counted."""
    L, N, H, nb = kept.shape
    i = torch.arange(nb)
    n_cand = (i - 1 - force_first).clamp(min=0)
    has = n_cand > 0
    k, c = kept[..., has].double(), n_cand[has].double()
    at_cap = (k == k_max) & (c > k_max) if k_max is not None else torch.zeros_like(k, dtype=torch.bool)
    rows = (T - i * block).clamp(max=block).double()  # query rows of block i (the last may be partial)
    full = kept.double() + (i > 0).double() + (i >= 2).double() * force_first
    pairs = (full * block * rows + rows * (rows + 1) / 2).sum(-1)  # (L, N, H)
    frac = pairs / (T * (T + 1) / 2)
    out = []
    for layer in range(L):
        for h in range(H):
            kk = k[layer, :, h]
            out.append(dict(layer=layer, head=h, kept_mean=kk.mean().item(), kept_min=kk.min().item(),
                            kept_max=kk.max().item(), at_cap=at_cap[layer, :, h].double().mean().item(),
                            window_mean_std=kk.mean(-1).std().item() if N > 1 else 0.0,
                            read_fraction=frac[layer, :, h].mean().item()))
    return out


def plot(kept, k_max, path, force_first=0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L, _, H, nb = kept.shape
    has = (torch.arange(nb) - 1 - force_first) > 0  # query blocks with candidates
    fig, axes = plt.subplots(1, L, figsize=(4.5 * L, 3.5), squeeze=False)
    bins = np.arange(0, (k_max if k_max is not None else nb) + 2) - 0.5
    for layer, ax in enumerate(axes[0]):
        for h in range(H):
            x = kept[layer, :, h][..., has].flatten().numpy()
            ax.hist(x, bins=bins, histtype="step", label=f"head {h}", density=True)
        ax.set(title=f"layer {layer}", xlabel="kept blocks per query block", ylabel="share")
        ax.legend(fontsize=7)
    fig.tight_layout()
    configurator.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv):
    try:
        o, _ = configurator.load(argv, DEFAULTS)
        configurator.check_ranges(o, dict(windows=">=1", batch=">=1"))
        if not o["out_dir"]:
            raise configurator.ConfigError("--out_dir=DIR (a run directory holding ckpt.pt) is required")
        model, ckpt = load(o["out_dir"], o["device"])
        cfg = ckpt["config"]
        T = model.config.block_size
        data = val_tokens(o["data_dir"], cfg)
        starts = ngram.fixed_windows(len(data), T, o["windows"] * T)
    except (configurator.ConfigError, ValueError) as e:
        configurator.fail(str(e))
    idx = torch.from_numpy(np.stack([data[s:s + T] for s in starts]).astype(np.int64)).to(o["device"])
    kept = collect(model, idx, o["batch"]).cpu()
    a = model.transformer.h[0].attn
    rows = summarize(kept, a.k_max, a.block, T, a.force_first)
    report = o["report_dir"] or o["out_dir"]
    os.makedirs(report, exist_ok=True)
    head = (f"Kept blocks per query block of `{o['out_dir']}` (T={T}, blocks of {a.block}, k_max {a.k_max}, "
            f"threshold {model.config.as_threshold}, forced first block {bool(a.force_first)}, window {a.window}), over {len(idx)} validation windows; "
            f"command: `python kept_blocks.py {' '.join(argv)}`")
    cols = ["layer", "head", "kept_mean", "kept_min", "kept_max", "at_cap", "window_mean_std", "read_fraction"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
              for r in rows]
    text = "\n".join(lines) + ("\n\nat_cap: share of query blocks whose count the cap set (more candidates were left); "
                               "window_mean_std: std over windows of the mean kept count; read_fraction: mean share of "
                               "a query block's causal keys read exactly (kept + previous + own block).\n")
    configurator.write_atomic(os.path.join(report, "kept_blocks.md"), text)
    configurator.write_atomic(os.path.join(report, "kept_blocks.json"), json.dumps(rows, indent=1))
    plot(kept, a.k_max, os.path.join(report, "kept_blocks.png"), a.force_first)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
