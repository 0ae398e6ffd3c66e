"""compare.py: runs trainings (or reuses them), then writes a table and a plot that match metrics.jsonl."""
import csv
import json
import os
import re
import statistics

import pytest

import compare
from conftest import run

TINY = ("--dataset=tiny --n_layer=1 --n_head=2 --n_embd=16 --block_size=16 --batch_size=4 --eval_tokens=512 "
        "--eval_interval=10 --warmup_iters=2 --device=cpu")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    (d / "tiny.txt").write_text("to be or not to be, that is the question.\n" * 400)
    r = run(["-m", "prepare_data", f"--input={d / 'tiny.txt'}", "--name=tiny"], cwd=d)
    assert r.returncode == 0, r.stderr
    return d


def test_compare_trains_seeds_tabulates_and_reuses(workdir):
    args = ["-m", "compare", "--attentions=dense", "--max_iters=20", "--seeds=2", "--out=cmp", f"--extra={TINY}"]
    r = run(args, cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[run 1/2] dense-s0\n" in r.stdout and re.search(r"^\[run 2/2\] dense-s1, eta [0-9.]+ min$", r.stdout, re.M)
    logs = [[json.loads(line) for line in open(workdir / "cmp" / f"dense-s{i}" / "metrics.jsonl")] for i in (0, 1)]
    assert logs[0][-1]["val/loss"] != logs[1][-1]["val/loss"]  # the seeds differ
    row = next(csv.DictReader(open(workdir / "cmp" / "results.csv")))
    finals = [log[-1]["val/loss"] for log in logs]
    assert row["run"] == "dense" and int(row["seeds"]) == 2
    assert float(row["final_val"]) == pytest.approx(statistics.fmean(finals), abs=1e-12)
    assert float(row["final_val_std"]) == pytest.approx(statistics.stdev(finals), abs=1e-12)
    assert float(row["tokens"]) == 20 * 4 * 16 and int(row["params"]) > 0
    md = open(workdir / "cmp" / "results.md").read()
    assert "| dense |" in md and "| n-gram floor |" in md and " ± " in md
    floor = json.load(open(workdir / "cmp" / "ngram_floor.json"))
    assert floor["windows"] == logs[0][-1]["eval_windows"]  # the floor is scored on the models' windows
    assert os.path.getsize(workdir / "cmp" / "losses.png") > 1000
    r = run(args, cwd=workdir)  # finished runs are reused, not retrained
    assert r.returncode == 0 and r.stdout.count("reusing") == 2


def test_token_budget_gives_equal_tokens_with_scaled_schedules():
    o = {**compare.DEFAULTS, "budget": "tokens", "budget_value": 1_638_400.0, "extra": "--dataset=x"}
    arms = [("a", "config/shakespeare_dense.py", {"scale": "cpu", "batch_size": 64}),
            ("b", "config/shakespeare_dense.py", {"scale": "cpu", "batch_size": 16})]
    (_, _, fa, ca), (_, _, fb, cb) = compare.apply_budget(arms, o)
    ta, tb = (c["max_iters"] * c["batch_size"] * c["block_size"] for c in (ca, cb))
    assert ta == tb == 1_638_400
    assert fb["max_iters"] == 4 * fa["max_iters"] and fb["lr_decay_iters"] == 4 * fa["lr_decay_iters"]
    assert fb["warmup_iters"] / fb["max_iters"] == fa["warmup_iters"] / fa["max_iters"] > 0


def test_summary_gaps_and_aggregate():
    log = [{"iter": 0, "train/loss": 4.0, "val/loss": 4.0, "ms_per_iter": None, "peak_mem_cpu_rss_mib": 10.0},
           {"iter": 10, "train/loss": 1.0, "val/loss": 1.5, "ms_per_iter": 20.0, "peak_mem_cpu_rss_mib": 12.0},
           {"iter": 20, "train/loss": 0.5, "val/loss": 1.75, "ms_per_iter": 30.0, "peak_mem_cpu_rss_mib": 11.0}]
    s = compare.summarize("x", log)
    assert s["best_val"] == 1.5 and s["best_iter"] == 10 and s["final_val"] == 1.75
    assert s["gap_final_minus_best"] == 0.25 and s["gap_val_minus_train"] == 1.25
    assert s["peak_mem_cpu_rss_mib"] == 12.0 and s["ms_per_iter"] == 25.0  # median of the evaluations' medians
    assert compare.val_at_train_loss(log, 0.75) == pytest.approx(1.625)  # halfway between 1.0 and 0.5
    a = compare.aggregate("x", [s, {**s, "best_val": 1.7}])
    assert a["best_val"] == pytest.approx(1.6) and a["best_val_std"] == pytest.approx(statistics.stdev([1.5, 1.7]))


def test_bad_preset_attention_and_budget_are_one_line_errors(workdir):
    for flag, msg in (("--preset=nope", "unknown preset"), ("--attentions=nope", "unknown attention 'nope'"),
                      ("--budget=nope", "unknown budget"), ("--budget=seconds", "needs --budget_value")):
        r = run(["-m", "compare", flag], cwd=workdir)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_verdicts_count_a_difference_only_beyond_the_seed_spread():
    base = dict(seeds=3, gap_val_minus_train=0.2, gap_val_minus_train_std=0.01, best_val=1.8, best_val_std=0.02,
                gap_final_minus_best=0.0, gap_final_minus_best_std=0.0, val_at_matched_train=None)
    arms = [{**base, "run": "m-b64"}, {**base, "run": "m-b16", "best_val": 1.81},  # 0.01 < spread 0.02
            {**base, "run": "m-b16x4", "gap_val_minus_train": 0.1}]  # -0.1, beyond the spread 0.01
    lines = compare.overfit_verdicts(arms).splitlines()
    assert lines[2].startswith("| m | b16 |") and "+0.0100 (no difference" in lines[2]
    assert lines[3].startswith("| m | b16x4 |") and "-0.1000 (lower)" in lines[3]
    one = [{**a, "seeds": 1} for a in arms]
    assert "one seed" in compare.overfit_verdicts(one)
