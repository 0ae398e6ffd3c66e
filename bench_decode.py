"""
Decoding cost against context length: milliseconds per generated token, through each block's
decode state, after a prompt of C tokens (the GPT of bench.py --what=model: 4 layers, 256 embd).

    python bench_decode.py --attention=dense,vq --contexts=512,2048,8192 --tokens=64
    python bench_decode.py --config=long --contexts=2048,8192,16384   # the long-context knobs and shape

A model with absolute positions gets block_size = C + tokens so nothing is cropped. Prints a
markdown table (median ms/token and the ratio to the smallest context), writes <out>/bench_decode.md.
"""

import os
import statistics
import sys
import time

import torch

import bench
import configurator
from model import ATTENTION, GPT

DEFAULTS = dict(attention="all", contexts="512,2048,8192", tokens=64, out="bench_results", threads=0,
                config="shakespeare")  # knobs (and, for long, the shape) from config/<config>_<block>.py, as bench.py


@torch.no_grad()
def ms_per_token(name, context, tokens):
    torch.manual_seed(bench.seed)
    cfg = bench.bench_config(name, "model", context + tokens, bench.config_knobs(name))
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, context + tokens))
    _, state = model.decode(idx[:, :context], None, 0)  # prefill the cache with the prompt
    times = []
    for t in range(context, context + tokens):
        t0 = time.perf_counter()
        _, state = model.decode(idx[:, t:t + 1], state, t)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv):
    try:
        o, _ = configurator.load(argv, DEFAULTS)
        names = list(ATTENTION) if o["attention"] == "all" else o["attention"].split(",")
        bad = [n for n in names if n not in ATTENTION]
        if bad:
            raise configurator.ConfigError(f"unknown attention {bad[0]!r}; valid: {', '.join(ATTENTION)}")
        contexts = [int(c) for c in str(o["contexts"]).split(",")]
    except (configurator.ConfigError, ValueError) as e:
        configurator.fail(str(e))
    if o["threads"]:
        torch.set_num_threads(o["threads"])
    bench.config = o["config"]
    rows = []
    for name in names:
        ms = [ms_per_token(name, c, o["tokens"]) for c in contexts]
        rows.append(f"| {name} | " + " | ".join(f"{m:.2f}" for m in ms) + f" | {ms[-1] / ms[0]:.2f}x |")
        print(rows[-1], flush=True)
    facts = bench.machine_facts("cpu")
    head = ["| attention | " + " | ".join(f"C={c}" for c in contexts) + f" | C={contexts[-1]} / C={contexts[0]} |",
            "|" + " --- |" * (len(contexts) + 2)]
    md = "\n".join([f"Median ms per generated token after a C-token prompt; `python bench_decode.py {' '.join(argv)}`",
                    "; ".join(f"{k}: {v}" for k, v in facts.items()), ""] + head + rows) + "\n"
    os.makedirs(o["out"], exist_ok=True)
    configurator.write_atomic(os.path.join(o["out"], "bench_decode.md"), md)
    print(md)


if __name__ == "__main__":
    main(sys.argv[1:])
