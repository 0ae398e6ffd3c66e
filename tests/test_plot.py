"""plot.py: loss against iterations, tokens and training time for any run directories."""
import json
import os

import pytest

import plot
from conftest import run


def write_run(d, attention, n=4, tpi=256, scale=1.0):
    d.mkdir(parents=True)
    rows = [{"iter": 10 * i, "tokens": 10 * i * tpi, "train_seconds": 0.5 * i * scale, "attention": attention,
             "val/loss": 3.0 - 0.2 * i * scale, "train/loss": 2.9 - 0.25 * i * scale} for i in range(n)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_figure_plots_each_run_against_iterations_tokens_and_seconds(tmp_path):
    a = write_run(tmp_path / "runs" / "a", "vq")
    b = write_run(tmp_path / "runs" / "b", "dense", n=3, tpi=512, scale=0.5)
    runs = [plot.load_run(str(tmp_path / "runs" / "a")), plot.load_run(str(tmp_path / "runs" / "b"))]
    assert [name for name, _ in runs] == ["vq a", "dense b"]
    fig = plot.figure(runs)
    for ax, (key, _) in zip(fig.axes, plot.AXES):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert set(lines) == {"vq a val", "vq a train", "dense b val", "dense b train"}
        for label, rows in (("vq a", a), ("dense b", b)):
            assert list(lines[f"{label} val"].get_xdata()) == [r[key] for r in rows]
            assert list(lines[f"{label} val"].get_ydata()) == [r["val/loss"] for r in rows]
            assert list(lines[f"{label} train"].get_ydata()) == [r["train/loss"] for r in rows]
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == set(lines)


def test_cli_writes_one_png_where_asked_or_beside_the_runs(tmp_path):
    write_run(tmp_path / "runs" / "a", "vq")
    write_run(tmp_path / "runs" / "b", "dense")
    r = run(["plot.py", str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")])
    assert r.returncode == 0, r.stderr
    out = tmp_path / "runs" / "loss.png"  # several runs: their common parent
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and str(out) in r.stdout
    r = run(["plot.py", str(tmp_path / "runs" / "a")])
    assert r.returncode == 0 and (tmp_path / "runs" / "a" / "loss.png").exists()
    r = run(["plot.py", str(tmp_path / "runs" / "a"), f"--out={tmp_path / 'x.png'}"])
    assert r.returncode == 0 and (tmp_path / "x.png").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # written atomically


def test_help_and_errors(tmp_path):
    r = run(["plot.py", "--help"])
    assert r.returncode == 0 and "python plot.py OUT_DIR" in r.stdout
    (tmp_path / "empty").mkdir()
    for args, msg in (([str(tmp_path / "nope")], "run directory not found"),
                      ([str(tmp_path / "empty")], "has no metrics.jsonl"),
                      ([str(tmp_path / "empty"), "--bogus=1"], "unknown option '--bogus=1'")):
        r = run(["plot.py", *args])
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
