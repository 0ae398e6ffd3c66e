"""
Side by side with the public HyperAttention code: the relative error of its causal estimate and of this
repository's kernel-hashing block against exact causal attention, on diagnose.py's synthetic inputs, at the
same budgets (exact chunks c = min_seq_len, hashed blocks b = block_size, samples m = sample_size, hash bits
r = lsh_num_projs), and a causality probe of both.

    python diagnose_peer.py --hyper_attn=/path/to/hyper-attn --out=results/diagnose-peer

Setup, outside this repository (neither is a dependency of it):
    git clone https://github.com/insuhan/hyper-attn /path/to/hyper-attn   # measured at commit 68b91e9
    pip install einops                                                    # the one package it adds to torch
Without the checkout or einops the script says so in one line and exits 0.

Their code runs unmodified, float32 on CPU (cuda=False), softmax scale 1/sqrt(d), causal=True, its hash
planes and samples seeded with torch.manual_seed before the module is built. One substitution, reported
as its own column: their float32 exact-attention helper drops the additive bias their fp16/bf16 (Triton)
helper applies, and that bias is what stops a sampled key inside the query's own block from being counted
twice; 'hyperattention' replaces the helper by plain PyTorch with the bias applied (what their GPU path
computes), 'hyperattention-fp32-as-is' leaves it. Error: ||o_hat - o|| / ||o|| over positions >= --start,
per head, averaged over heads (diagnose.unit_error), then mean and std over --seeds draws.
Causality probe: change only the last token's q, k, v; count the earlier (head, position) outputs that move.
Writes peer.md and peer.csv into --out. Bad input: one line, exit code 2.
"""

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import configurator
import diagnose
from kernels.kernel_hashing import kernel_hashing_attention


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.strip("\n"), formatter_class=diagnose._HelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--hyper_attn", type=str, default="", help="checkout of github.com/insuhan/hyper-attn")
    p.add_argument("--out", type=str, default="results/diagnose-peer", help="where to write peer.md and peer.csv")
    p.add_argument("--inputs", type=str, default="heavy,clustered,random-layer,sink", help="synthetic inputs")
    p.add_argument("--T", type=str, default="2048,4096", help="sequence lengths")
    p.add_argument("--budgets", type=str, default="64-32-32-8,256-64-64-10,256-32-128-10,256-32-160-10",
                   help="comma-separated c-b-m-r budgets")
    p.add_argument("--seeds", type=int, default=3, help="draws per error")
    p.add_argument("--start", type=int, default=64, help="first position scored")
    p.add_argument("--data_dir", type=str, default="data", help="datasets root (random-layer reads validation text)")
    return p.parse_args(argv)


def load_theirs(path):
    """Their hyper_attn module, or None and the reason."""
    if not path or not os.path.isfile(os.path.join(path, "models", "attention", "hyper_attn.py")):
        return None, f"no hyper-attn checkout at {path!r} (--hyper_attn; see --help for the setup)"
    sys.path.insert(0, os.path.abspath(path))
    try:
        from models.attention import hyper_attn
    except ImportError as e:  # einops, most likely
        return None, f"cannot import the hyper-attn code ({e}); it needs einops: pip install einops"
    return hyper_attn, ""


def exact_attention_with_bias(query, key, value, softmax_scale, causal=False, bias=None):
    """Their exact-attention helper's contract, (out, lse of shape [..., n, 1]), with the additive bias applied."""
    s = query @ key.transpose(-1, -2) * softmax_scale
    if bias is not None:
        s = s + bias
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ value, torch.logsumexp(s, -1, keepdim=True)


def run_theirs(ha, q, k, v, budget, seed, with_bias):
    c, b, m, r = budget
    original = ha.exact_attention
    if with_bias:
        ha.exact_attention = exact_attention_with_bias
    try:
        torch.manual_seed(seed)  # their planes are drawn when the module is built, their samples in forward
        attn = ha.HyperAttention(input_dim=q.shape[-1], lsh_num_projs=r, block_size=b, sample_size=m, min_seq_len=c,
                                 cuda=False)
        return attn(q, k, v, scale=q.shape[-1] ** -0.5, causal=True)
    finally:
        ha.exact_attention = original


def run_ours(q, k, v, budget, seed, sampling):
    c, b, m, r = budget
    return kernel_hashing_attention(q, k, v, c, b, m, r, 1000 + seed, backend="torch", sampling=sampling)


def codes(ha):
    return {"hyperattention": lambda *a: run_theirs(ha, *a, True),
            "hyperattention-fp32-as-is": lambda *a: run_theirs(ha, *a, False),
            "ours (importance)": lambda *a: run_ours(*a, "importance"),
            "ours (sorted-strata)": lambda *a: run_ours(*a, "sorted-strata"),
            "ours (uniform)": lambda *a: run_ours(*a, "uniform")}


def causality(fns, q, k, v, budget):
    """Earlier (head, position) outputs that move, and by how much, when only the last token changes."""
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = torch.Generator().manual_seed(1)
    for t in (q2, k2, v2):
        t[:, :, -1] = 3 * torch.randn(t[:, :, -1].shape, generator=g)
    out = {}
    for name, fn in fns.items():
        d = (fn(q, k, v, budget, 0) - fn(q2, k2, v2, budget, 0))[:, :, :-1].abs().amax(-1)
        out[name] = (int((d > 1e-5).sum()), float(d.max()))
    return out


def parse_budgets(text):
    try:
        out = [tuple(int(x) for x in b.split("-")) for b in text.split(",") if b.strip()]
    except ValueError:
        out = []
    if not out or any(len(b) != 4 or min(b) < 1 for b in out):
        raise diagnose.DiagnoseError(f"--budgets: expected comma-separated c-b-m-r with positive integers, got {text!r}")
    return out


def main(argv):
    with torch.no_grad():  # measurements only; the caller's grad mode is left as it was
        run(parse_args(argv), argv)


def run(args, argv):
    budgets, Ts = parse_budgets(args.budgets), diagnose.int_list(args.T, "T")
    names = [n.strip() for n in args.inputs.split(",") if n.strip()]
    bad = [n for n in names if n not in diagnose.SYNTHETIC]
    if bad or not names:
        raise diagnose.DiagnoseError(f"--inputs: {', '.join(bad) or 'empty'}; choose from {', '.join(diagnose.SYNTHETIC)}")
    if args.seeds < 1 or min(Ts) <= args.start:
        raise diagnose.DiagnoseError("--seeds must be at least 1 and every --T above --start")
    ha, why = load_theirs(args.hyper_attn)
    if ha is None:
        print(f"diagnose_peer: skipped: {why}")
        return
    fns = codes(ha)
    rows = []
    for name in names:
        for T in Ts:
            q, k, v = diagnose.synthetic(name, T, data_dir=args.data_dir)
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, args.start:]
            for budget in budgets:
                for code, fn in fns.items():
                    errs = [diagnose.unit_error(fn(q, k, v, budget, s)[:, :, args.start:], ref) for s in range(args.seeds)]
                    rows.append([name, T, "-".join(map(str, budget)), code, float(np.mean(errs)), float(np.std(errs))])
                    print(f"{name} T={T} {rows[-1][2]} {code}: {rows[-1][4]:.4f} ± {rows[-1][5]:.4f}", flush=True)
    q, k, v = diagnose.synthetic("heavy", min(Ts), data_dir=args.data_dir)
    leaks = causality(fns, q, k, v, budgets[0])

    os.makedirs(args.out, exist_ok=True)
    diagnose.write_csv(os.path.join(args.out, "peer.csv"), ["input", "T", "budget", "code", "rel_err", "rel_err_std"],
              [r[:4] + [f"{r[4]:.5f}", f"{r[5]:.5f}"] for r in rows])
    cols = list(fns)
    lines = ["# kernel-hashing against the public HyperAttention code", "",
             f"`python diagnose_peer.py {' '.join(argv)}`", "",
             f"Relative output error against exact causal attention over positions >= {args.start}, per head, mean "
             f"over heads; mean ± std over {args.seeds} draws. Budget c-b-m-r: exact chunks, hashed block, samples, "
             f"hash bits.", "", "| input | T | budget | " + " | ".join(cols) + " |", "| --- | --- | --- |" + " --- |" * len(cols)]
    for name in names:
        for T in Ts:
            for budget in budgets:
                key = (name, T, "-".join(map(str, budget)))
                cell = {r[3]: r for r in rows if tuple(r[:3]) == key}
                lines.append(f"| {name} | {T} | {key[2]} | " + " | ".join(f"{cell[c][4]:.3f} ± {cell[c][5]:.3f}"
                                                                          for c in cols) + " |")
    lines += ["", f"Causality probe (heavy, T={min(Ts)}, budget {'-'.join(map(str, budgets[0]))}: only the last token's "
                  f"q, k, v changed): earlier (head, position) outputs that moved by more than 1e-5, and the largest move:",
              ""] + [f"- {c}: {n} moved, largest {mx:.3g}" for c, (n, mx) in leaks.items()] + [""]
    configurator.write_atomic(os.path.join(args.out, "peer.md"), "\n".join(lines))
    print(f"wrote {args.out}/peer.md and peer.csv")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except diagnose.DiagnoseError as e:
        print(f"diagnose_peer: error: {e}", file=sys.stderr)
        sys.exit(2)
