"""
Check the sparsity assumption behind kernel-hashing attention on a trained checkpoint.

    python diagnose.py --out_dir out-shakespeare-kernel-hashing
    python diagnose.py --out_dir out-shakespeare-dense --report_dir reports/dense --n_seqs 16

Indyk et al. (ICLR 2025) approximate softmax attention well when the entries of the kernel
matrix K_ij = exp(q_i . k_j / sqrt(d)) sum to O(n): then a few heavy entries per row carry the
mass, LSH can find them and sampling can estimate the rest. The paper recommends checking this
on one's own model. For every layer and head with dense-like q, k, v heads (a c_attn projection,
as in dense and kernel-hashing; captured with a forward hook) this script runs validation windows
through the checkpoint and measures
  - growth: S(n) = sum_{i<n} sum_{j<=i} K_ij over causal prefixes of length n, and the exponent
    alpha of S(n) ~ n^alpha (least squares in log-log). About 1: the assumption holds (row sums
    stay bounded); about 2: it fails (every entry counts); above 2: the rows' scale grows with
    position. Softmax ignores a per-row scale, so the exponent is also fitted with every row
    divided by its largest entry (then S(n)/n is the mean effective number of keys per row);
  - top-n share: the part of the n x n causal kernel matrix's total carried by its n largest entries;
  - the kernel-hashing estimate's output error relative to exact attention on those q, k, v
    (||o_hat - o|| / ||o|| over the positions it approximates), over a grid of samples m and
    bucket sizes b, averaged over hash/sample seeds.
Writes diagnose.md, diagnose_heads.csv, diagnose_error.csv, kernel_sum_growth.png and
error_vs_budget.png into --report_dir (default: out_dir). Bad input: one line, exit code 2.
"""

import argparse
import csv
import io
import math
import os
import sys
from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F

import configurator


class DiagnoseError(Exception):
    pass


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.MetavarTypeHelpFormatter):
    """--help as the other scripts give it: the whole docstring, each option's type and default."""

    def _get_help_string(self, action):
        if action.default in (None, argparse.SUPPRESS):
            return action.help
        return f"{action.help or ''} [default: {action.default!r}]".lstrip()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.strip("\n"), formatter_class=_HelpFormatter, allow_abbrev=False)
    p.add_argument("--out_dir", type=str, required=True, help="directory holding ckpt.pt (saved by train.py)")
    p.add_argument("--report_dir", type=str, default="", help="where to write the report ('': out_dir)")
    p.add_argument("--data_dir", type=str, default="data", help="datasets root: <data_dir>/<dataset>/val.bin")
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    p.add_argument("--n_seqs", type=int, default=8, help="validation windows")
    p.add_argument("--seq_len", type=int, default=0, help="window length (0: the model's block_size)")
    p.add_argument("--min_seq_len", type=int, default=0,
                   help="exact-chunk size for the error grid (0: the checkpoint's, else seq_len/4)")
    p.add_argument("--samples", type=str, default="",
                   help="comma-separated samples m ('': powers of two to seq_len/2)")
    p.add_argument("--buckets", type=str, default="",
                   help="comma-separated bucket blocks b ('': powers of two up to min_seq_len)")
    p.add_argument("--hash_bits", type=int, default=0, help="0: the checkpoint's kh_hash_bits")
    p.add_argument("--seeds", type=int, default=3, help="hash/sample draws averaged per grid point")
    return p.parse_args(argv)


def load_checkpoint(out_dir, device):
    from model import GPT, GPTConfig
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise DiagnoseError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        known = {f.name for f in fields(GPTConfig)}
        config = GPTConfig(**{k: v for k, v in ckpt["model_args"].items() if k in known})
        model = GPT(config)
        model.load_state_dict(ckpt["model"])
    except DiagnoseError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is bad input
        raise DiagnoseError(f"cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return model.to(device).eval(), config, ckpt.get("config", {})


def val_windows(data_dir, dataset, T, n):
    path = os.path.join(data_dir, dataset, "val.bin")
    if not os.path.isfile(path):
        raise DiagnoseError(f"no validation data at {path}")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if len(data) < T:
        raise DiagnoseError(f"{path} has {len(data)} tokens, fewer than the window length {T}")
    starts = np.linspace(0, len(data) - T, n).astype(np.int64)  # evenly spread, deterministic
    return torch.from_numpy(np.stack([data[s:s + T] for s in starts]).astype(np.int64))


def capture_qkv(model, idx):
    """q, k, v (N, H, T, d) of every layer whose mixer has dense-like heads (a c_attn giving 3C)."""
    C = model.config.n_embd
    found, hooks = {}, []
    for i, block in enumerate(model.transformer.h):
        attn = block.attn
        lin = getattr(attn, "c_attn", None)
        if isinstance(lin, torch.nn.Linear) and lin.out_features == 3 * C and hasattr(attn, "n_head"):
            def hook(mod, inp, out, i=i, H=attn.n_head):
                N, T, _ = out.shape
                found[i] = [t.reshape(N, T, H, C // H).transpose(1, 2).detach() for t in out.split(C, dim=2)]
            hooks.append(lin.register_forward_hook(hook))
    if not hooks:
        raise DiagnoseError(f"attention {model.config.attention!r} has no dense-like q/k/v heads (c_attn) to measure")
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return found


def prefix_grid(T):
    return sorted(set(int(round(x)) for x in np.geomspace(min(8, T), T, 12)))


def kernel_sum_growth(q, k, ns, row_normalised=False):
    """log S(n) for n in ns, averaged over sequences: (H, len(ns)); q, k (N, H, T, d).
    row_normalised: each row's entries divided by the row's largest, exp(s_ij - max_j s_ij) --
    the per-row scale that softmax ignores, so S(n)/n is then the mean effective row size."""
    q, k = q.double(), k.double()
    T = q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    row = torch.logsumexp(s, -1)
    if row_normalised:
        row = row - s.amax(-1)
    log_s = torch.logcumsumexp(row, -1)  # (N, H, T): log S(n) at n = index + 1
    return log_s[..., [n - 1 for n in ns]].mean(0)


def fit_exponent(ns, log_s):
    """Slope of log S(n) against log n (least squares), one per row of log_s."""
    x = np.log(np.asarray(ns, dtype=np.float64))
    y = np.asarray(log_s, dtype=np.float64)
    x = x - x.mean()
    return ((y - y.mean(-1, keepdims=True)) * x).sum(-1) / (x * x).sum()


def top_n_share(q, k):
    """Share of the causal kernel matrix's total held by its T largest entries: (H,), mean over sequences."""
    q, k = q.double(), k.double()
    N, H, T, d = q.shape
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf")).view(N, H, -1)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e.topk(T, dim=-1).values.sum(-1) / e.sum(-1)).mean(0)


def estimate_error(q, k, v, c, b, m, r, seeds):
    """Relative error of the kernel-hashing estimate against exact causal attention, over positions >= c."""
    from kernels.kernel_hashing import kernel_hashing_attention
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, c:]
    errs = []
    for seed in range(seeds):
        est = kernel_hashing_attention(q, k, v, c, b, m, r, 1000 + seed, backend="torch")[:, :, c:]
        errs.append(((est - exact).norm() / exact.norm().clamp_min(1e-30)).item())
    return float(np.mean(errs)), float(np.std(errs))


def int_list(text, default):
    if not text:
        return default
    try:
        out = sorted(set(int(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise DiagnoseError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise DiagnoseError(f"expected positive integers, got {text!r}")
    return out


def pow2_range(lo, hi):
    out, x = [], lo
    while x <= hi:
        out.append(x)
        x *= 2
    return out or [hi]


def plots(report_dir, ns, growth, exps, errors, samples, buckets, title, c, r):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, g_all, e_all, name in ((axes[0], growth[0], exps[0], "S(n): sum of exp(q.k/sqrt d)"),
                                   (axes[1], growth[1], exps[1], "row-normalised S(n): exp(q.k/sqrt d - row max)")):
        layers = sorted(g_all)
        cmap = plt.get_cmap("viridis", max(len(layers), 2))
        for li, layer in enumerate(layers):
            for h, row in enumerate(g_all[layer]):
                ax.plot(ns, np.exp(row), color=cmap(li), alpha=0.7, lw=1,
                        label=f"layer {layer} (mean alpha {np.mean(e_all[layer]):.2f})" if h == 0 else None)
        x = np.asarray(ns, dtype=np.float64)
        y0 = np.exp(np.mean([g[:, 0].mean() for g in g_all.values()]))
        for p, style in ((1, ":"), (2, "--")):
            ax.plot(x, y0 * (x / x[0]) ** p, "k" + style, lw=1, label=f"slope {p}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("prefix length n")
        ax.set_ylabel(f"{name}, causal n x n prefix", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    configurator.write_atomic(os.path.join(report_dir, "kernel_sum_growth.png"),
                              lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for b in buckets:
        ys = [errors[("all", b, m)][0] for m in samples]
        ax.plot(samples, ys, marker="o", label=f"bucket block b={b}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples m per rectangle")
    ax.set_ylabel("relative output error vs exact attention")
    ax.set_title(f"{title}\nexact chunks of {c}, {r} hash bits, positions >= {c}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    configurator.write_atomic(os.path.join(report_dir, "error_vs_budget.png"),
                              lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main(argv):
    args = parse_args(argv)
    report_dir = args.report_dir or args.out_dir
    model, config, train_cfg = load_checkpoint(args.out_dir, args.device)
    T = args.seq_len or config.block_size
    if T > config.block_size and model.absolute_positions:
        raise DiagnoseError(f"--seq_len {T} exceeds the model's block_size {config.block_size}")
    dataset = train_cfg.get("dataset") or "shakespeare_char"
    if args.n_seqs < 1:
        raise DiagnoseError("--n_seqs must be at least 1")
    idx = val_windows(args.data_dir, dataset, T, args.n_seqs).to(args.device)
    qkv = capture_qkv(model, idx)

    c = args.min_seq_len or (config.kh_min_seq_len if config.attention == "kernel-hashing" else max(2, T // 4))
    if c >= T:
        c = max(2, T // 4)  # the estimate must run somewhere: chunks shorter than the window
    samples = int_list(args.samples, pow2_range(2, max(2, T // 2)))
    buckets = int_list(args.buckets, pow2_range(4, c) if c >= 4 else [c])
    r = args.hash_bits or config.kh_hash_bits

    ns = prefix_grid(T)
    heads, growth, exps, growth_row, exps_row = [], {}, {}, {}, {}
    for layer, (q, k, v) in sorted(qkv.items()):
        g = kernel_sum_growth(q, k, ns).cpu().numpy()
        a = fit_exponent(ns, g)
        g_row = kernel_sum_growth(q, k, ns, row_normalised=True).cpu().numpy()
        a_row = fit_exponent(ns, g_row)
        share = top_n_share(q, k).cpu().numpy()
        growth[layer], exps[layer] = g, a
        growth_row[layer], exps_row[layer] = g_row, a_row
        for h in range(q.shape[1]):
            heads.append(dict(layer=layer, head=h, exponent=float(a[h]), exponent_row_normalised=float(a_row[h]),
                              top_n_share=float(share[h])))

    errors = {}
    for b in buckets:
        for m in samples:
            per_layer = [estimate_error(q, k, v, c, b, m, r, args.seeds) for _, (q, k, v) in sorted(qkv.items())]
            for layer, e in zip(sorted(qkv), per_layer):
                errors[(layer, b, m)] = e
            errors[("all", b, m)] = tuple(float(np.mean([e[i] for e in per_layer])) for i in (0, 1))
    own = None
    if config.attention == "kernel-hashing" and not args.min_seq_len:
        per_layer = [estimate_error(q, k, v, c, config.kh_bucket_block, config.kh_samples, r, args.seeds)[0]
                     for _, (q, k, v) in sorted(qkv.items())]
        own = (config.kh_bucket_block, config.kh_samples, float(np.mean(per_layer)))

    os.makedirs(report_dir, exist_ok=True)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["layer", "head", "exponent", "exponent_row_normalised", "top_n_share"])
    w.writeheader()
    w.writerows(heads)
    configurator.write_atomic(os.path.join(report_dir, "diagnose_heads.csv"), buf.getvalue())
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["layer", "min_seq_len", "bucket_block", "samples", "hash_bits", "rel_err", "rel_err_std"])
    for (layer, b, m), (e, sd) in errors.items():
        w.writerow([layer, c, b, m, r, f"{e:.6g}", f"{sd:.3g}"])
    configurator.write_atomic(os.path.join(report_dir, "diagnose_error.csv"), buf.getvalue())

    all_exp = np.array([h["exponent"] for h in heads])
    row_exp = np.array([h["exponent_row_normalised"] for h in heads])

    def verdict(a):
        return ("holds (near-linear growth)" if a < 1.3 else "fails (near-quadratic growth)" if a < 2.2 else
                "fails: the sum grows faster than n^2, so the scale of the rows grows with position")
    title = f"{os.path.basename(os.path.normpath(args.out_dir))}: {config.attention}, T={T}, {args.n_seqs} val windows"
    lines = [f"# Sparsity diagnostic: {title}", "",
             f"Checkpoint `{os.path.join(args.out_dir, 'ckpt.pt')}`, dataset `{dataset}`, {len(qkv)} layers x "
             f"{config.n_head} heads with dense-like q/k/v.", "",
             f"Fitted exponent alpha of S(n) ~ n^alpha over n = {ns[0]}..{ns[-1]}: mean {all_exp.mean():.3f}, "
             f"min {all_exp.min():.3f}, max {all_exp.max():.3f}. About 1 means the assumption holds, about 2 that "
             f"it fails: here it {verdict(all_exp.mean())}.", "",
             f"Softmax ignores a per-row scale, which S(n) does not. With every row divided by its largest entry "
             f"(row-normalised S(n); S(n)/n is then the mean effective number of keys per row) the exponent is: "
             f"mean {row_exp.mean():.3f}, min {row_exp.min():.3f}, max {row_exp.max():.3f}. "
             f"Top-n share: the part of the causal n x n kernel matrix's total held by its n largest entries "
             f"(n = {T}).", "",
             "| layer | head | exponent | row-normalised exponent | top-n share |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {h['layer']} | {h['head']} | {h['exponent']:.3f} | {h['exponent_row_normalised']:.3f} | "
              f"{h['top_n_share']:.3f} |" for h in heads]
    lines += ["", f"Relative output error of the kernel-hashing estimate against exact attention (positions >= "
                  f"min_seq_len={c}, mean over layers and {args.seeds} seeds, {r} hash bits):", "",
              "| bucket block \\ samples | " + " | ".join(str(m) for m in samples) + " |",
              "| --- |" + " --- |" * len(samples)]
    lines += [f"| {b} | " + " | ".join(f"{errors[('all', b, m)][0]:.4f}" for m in samples) + " |" for b in buckets]
    if own is not None:
        lines += ["", f"At the checkpoint's own knobs (bucket block {own[0]}, samples {own[1]}): "
                      f"relative output error {own[2]:.4f}."]
    lines += ["", "Plots: `kernel_sum_growth.png`, `error_vs_budget.png`. Tables: `diagnose_heads.csv`, "
                  "`diagnose_error.csv`.", ""]
    configurator.write_atomic(os.path.join(report_dir, "diagnose.md"), "\n".join(lines))
    plots(report_dir, ns, (growth, growth_row), (exps, exps_row), errors, samples, buckets, title, c, r)
    print(f"exponent alpha: mean {all_exp.mean():.3f} (min {all_exp.min():.3f}, max {all_exp.max():.3f}): "
          f"the assumption {verdict(all_exp.mean())}; row-normalised: mean {row_exp.mean():.3f}")
    if own is not None:
        print(f"relative output error at the checkpoint's knobs (b={own[0]}, m={own[1]}): {own[2]:.4f}")
    print(f"report written to {os.path.join(report_dir, 'diagnose.md')}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DiagnoseError as e:
        print(f"diagnose: error: {e}", file=sys.stderr)
        sys.exit(2)
