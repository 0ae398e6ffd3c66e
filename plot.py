"""
Plot any runs: val (solid) and train (dashed) loss against iterations, tokens and training time.

    python plot.py OUT_DIR [OUT_DIR ...] [--out=FILE]

Reads each OUT_DIR/metrics.jsonl (train.py's log); the legend names each run by its attention
and its directory. Writes one PNG (atomically): --out, else loss.png in OUT_DIR for one run, or in
the runs' common parent directory for several.
"""

import io
import json
import os
import sys

import configurator

AXES = (("iter", "iterations"), ("tokens", "tokens seen"), ("train_seconds", "training time (s, evaluation excluded)"))


def load_run(out_dir):
    """(legend label, metrics rows) of one run directory; ConfigError if it has no metrics."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isdir(out_dir):
        raise configurator.ConfigError(f"run directory not found: {out_dir}")
    if not os.path.isfile(path):
        raise configurator.ConfigError(f"{out_dir} has no metrics.jsonl (not a train.py out_dir?)")
    rows = []
    for n, line in enumerate(open(path), 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise configurator.ConfigError(f"{path} line {n} is not JSON") from None
    rows = [r for r in rows if "iter" in r and "val/loss" in r]
    if not rows:
        raise configurator.ConfigError(f"{path} has no evaluation rows")
    name = os.path.basename(os.path.normpath(os.path.abspath(out_dir)))
    return f"{rows[-1].get('attention', '?')} {name}", rows


def default_out(dirs):
    if len(dirs) == 1:
        return os.path.join(dirs[0], "loss.png")
    return os.path.join(os.path.commonpath([os.path.abspath(d) for d in dirs]), "loss.png")


def figure(runs):
    """One panel per x axis in AXES; a val and a train line per run, labelled '<attention> <dir> val|train'."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(AXES), figsize=(6 * len(AXES), 4.5))
    for ax, (key, label) in zip(axes, AXES):
        for i, (name, rows) in enumerate(runs):
            pts = [r for r in rows if r.get(key) is not None]
            for loss, style in (("val/loss", "-"), ("train/loss", "--")):
                ax.plot([r[key] for r in pts], [r[loss] for r in pts], style, color=f"C{i % 10}",
                        alpha=1.0 if style == "-" else 0.5, label=f"{name} {loss.split('/')[0]}")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(runs, out):
    import matplotlib.pyplot as plt
    fig = figure(runs)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    configurator.write_atomic(out, buf.getvalue())


def main(argv):
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        sys.exit(0 if argv else 2)
    dirs = [a for a in argv if not a.startswith("--")]
    out = None
    try:
        for a in argv:
            if a.startswith("--out="):
                out = a[len("--out="):]
            elif a.startswith("--"):
                raise configurator.ConfigError(f"unknown option {a!r}; usage: python plot.py OUT_DIR [...] [--out=FILE]")
        if not dirs:
            raise configurator.ConfigError("name at least one run directory")
        runs = [load_run(d) for d in dirs]
        out = out or default_out(dirs)
        if os.path.dirname(out) and not os.path.isdir(os.path.dirname(out)):
            raise configurator.ConfigError(f"output directory not found: {os.path.dirname(out)}")
    except configurator.ConfigError as e:
        configurator.fail(str(e))
    plot(runs, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
