"""The long-context setting: its configs load, share one shape, and train 2 iterations at a reduced size;
bench.py reads their knobs and shape; recall.py's task is what it says and runs end to end."""
import csv
import json
import os
import random

import numpy as np
import pytest
import torch

import bench
import compare
import configurator
import recall
import train
from conftest import ROOT, run

LONG = sorted(f for f in os.listdir(os.path.join(ROOT, "config")) if f.startswith("long_"))
BLOCKS = [f for f in LONG if f != "long_nsa.py"]  # one per block; long_nsa.py is adaptive-sparse with options


def load(name, *flags):
    cfg, _ = configurator.load([os.path.join(ROOT, "config", name), "--scale=cpu", *flags], train.DEFAULTS)
    return cfg


def test_long_configs_share_shape_and_schedule():
    assert len(BLOCKS) == 5 and "long_nsa.py" in LONG
    shared = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "learning_rate", "eval_tokens",
              "dataset", "warmup_iters", "lr_decay_iters", "dropout")
    base = load("long_dense.py")
    assert base["block_size"] == 4096
    for f in LONG:
        cfg = load(f)
        assert {k: cfg[k] for k in shared} == {k: base[k] for k in shared}, f
    assert len({load(f)["attention"] for f in BLOCKS}) == 5
    nsa = load("long_nsa.py")
    assert nsa["attention"] == "adaptive-sparse" and nsa["as_window"] > 0 and nsa["as_force_first"]
    assert 0 < nsa["as_compress_stride"] < nsa["as_compress"]  # NSA's overlapping compressed blocks
    vq = load("long_vq.py")
    assert vq["block_size"] // vq["vq_block_len"] >= 8  # the cache acts: at least 8 blocks
    assert load("long_adaptive_sparse.py")["as_k_max"] * 4 >= 4096 // load("long_adaptive_sparse.py")["as_block"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    rnd = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    (d / "tiny.txt").write_text("\n".join(" ".join(rnd.choice(words) for _ in range(12)) for _ in range(2000)))
    r = run(["-m", "prepare_data", f"--input={d / 'tiny.txt'}", "--name=tiny"], cwd=d)
    assert r.returncode == 0, r.stderr
    return d


@pytest.mark.parametrize("f", LONG)
def test_long_config_trains_two_iterations_reduced(f, tiny_data):
    out = tiny_data / f"o-{f}"
    r = run(["-m", "train", os.path.join(ROOT, "config", f), "--dataset=tiny", "--block_size=512", "--n_layer=1",
             "--max_iters=2", "--eval_interval=2", "--eval_tokens=1024", "--eval_batch_size=2", f"--out_dir={out}"],
            cwd=tiny_data, timeout=300)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert rows[-1]["iter"] == 2 and np.isfinite(rows[-1]["val/loss"])


def test_compare_long_preset_arms():
    arms = compare.runs_for({"preset": "long", "scale": "cpu", "attentions": "all"})
    files = {c for _, c, _ in arms}
    assert files == {f"config/{f}" for f in BLOCKS}
    names = [n for n, _, _ in arms]
    assert "dense-gau" in names and "adaptive-sparse+budget" in names and len(names) == 7
    flags = dict((n, f) for n, _, f in arms)
    assert flags["adaptive-sparse+budget"]["as_budget"] > 0 and "as_budget" not in flags["adaptive-sparse"]


def test_bench_reads_long_knobs_and_shape(monkeypatch):
    monkeypatch.setattr(bench, "config", "long")
    cfg = load("long_kernel_hashing.py")
    knobs = bench.config_knobs("kernel-hashing")
    assert knobs["kh_min_seq_len"] == cfg["kh_min_seq_len"] and knobs["kh_samples"] == cfg["kh_samples"]
    assert bench.bench_shape("kernel-hashing") == (cfg["n_embd"], cfg["n_head"], cfg["n_layer"])
    c = bench.bench_config("kernel-hashing", "model", 1024, knobs)
    assert (c.n_embd, c.n_layer, c.kh_bucket_block) == (cfg["n_embd"], cfg["n_layer"], cfg["kh_bucket_block"])
    monkeypatch.setattr(bench, "config", "shakespeare")
    assert bench.bench_shape("kernel-hashing") == (bench.N_EMBD, bench.N_HEAD, bench.N_LAYER)


def test_config_file_can_build_on_its_neighbour(tmp_path):
    (tmp_path / "base.py").write_text("n_layer = 2\nlearning_rate = 3e-3\n")
    (tmp_path / "child.py").write_text(
        "import os; exec(open(os.path.join(os.path.dirname(__file__), 'base.py')).read())\nn_layer = 5\n")
    cfg, _ = configurator.load([str(tmp_path / "child.py")], dict(n_layer=1, learning_rate=1e-3, T="1,2"))
    assert cfg["n_layer"] == 5 and cfg["learning_rate"] == 3e-3
    cfg, _ = configurator.load(["--T=256"], dict(T="1,2"))  # a one-element list arrives as a number
    assert cfg["T"] == "256"


@pytest.mark.parametrize("T,n", [(32, 8), (256, 64), (1024, 8), (37, 3)])
def test_mqar_queries_ask_for_the_stored_value(T, n):
    rng = np.random.default_rng(T + n)
    x, y = recall.mqar_batch(rng, 16, T, n, n_keys=128, n_values=100)
    assert x.shape == y.shape == (16, T)
    for xs, ys in zip(x, y):
        keys, values = xs[0:2 * n:2], xs[1:2 * n:2]
        assert len(set(keys)) == n and keys.min() >= 1 and keys.max() <= 128
        assert values.min() >= 129 and values.max() <= 228
        stored = dict(zip(keys, values))
        q = np.flatnonzero(ys >= 0)
        assert len(q) == n and q.min() >= 2 * n  # every key asked once, after the pairs
        assert sorted(xs[q]) == sorted(keys)
        assert all(ys[p] == stored[xs[p]] == xs[p + 1] for p in q)  # the target is the stored value
        rest = np.setdiff1d(np.arange(2 * n, T), np.concatenate([q, q + 1]))
        assert (xs[rest] == recall.FILLER).all()
    with pytest.raises(ValueError, match="need T >="):
        recall.mqar_batch(rng, 1, 31, 8, 128, 128)


@pytest.mark.parametrize("n,n_values", [(8, 128), (4, 5), (16, 3)])
def test_context_guess_is_one_over_the_distinct_stored_values(n, n_values):
    """The guessing floor: mean over sequences of 1 / (distinct values among its pairs), counted here
    with a set per sequence; near 1/n when values rarely repeat, above it when they do."""
    x, _ = recall.mqar_batch(np.random.default_rng(n), 64, 4 * n + 8, n, n_keys=32, n_values=n_values)
    want = np.mean([1 / len(set(row[1:2 * n:2])) for row in x])
    assert recall.context_guess(x, n) == pytest.approx(want, rel=1e-12)
    assert recall.context_guess(x, n) >= 1 / n


def test_recall_runs_end_to_end_and_rejects_bad_input(tmp_path):
    r = run(["recall.py", "--attention=dense,generative-function", "--T=32", "--pairs=2,8", "--train_pairs=2,4",
             "--iters=3", "--test_examples=8", "--tokens_per_iter=128", "--n_layer=1", f"--out={tmp_path}"], timeout=300)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    rows = open(tmp_path / "recall.csv").read().splitlines()
    assert len(rows) == 1 + 2 * 2 + 2 and (tmp_path / "recall.png").exists() and (tmp_path / "recall.md").exists()
    assert sum(r.startswith("guess among the stored values,32,") for r in rows) == 2  # one per pair count
    for bad, msg in ((["--pairs=40", "--T=32"], "pair count 40"), (["--attention=nope"], "unknown attention"),
                     (["--iters=0"], "iters"), (["--knobs=nope"], "unknown knobs"), (["--short_conv=-1"], "short_conv")):
        r = run(["recall.py", *bad, f"--out={tmp_path}"], timeout=120)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_long_vq_and_dense_gau_at_parameter_parity_with_dense():
    from model import GPT, GPTConfig

    def params(f, *flags):
        c = load(f, *flags)
        return GPT(GPTConfig(**{k: c[k] for k in train.MODEL_KEYS if k != "vocab_size"}, vocab_size=65)).get_num_params()
    dense = params("long_dense.py")  # without dense's absolute position table (vq has none): named in the README
    for flags in ((), ("--vq_quantize=False",)):
        assert abs(params("long_vq.py", *flags) / dense - 1) < 0.02, flags


def test_kept_blocks_report_on_a_trained_checkpoint(tiny_data):
    out = tiny_data / "o-as-kept"
    r = run(["-m", "train", os.path.join(ROOT, "config", "long_adaptive_sparse.py"), "--dataset=tiny", "--block_size=256",
             "--n_layer=2", "--as_block=16", "--as_k_max=4", "--max_iters=4", "--eval_interval=4", "--eval_tokens=1024",
             "--always_save_checkpoint=True", f"--out_dir={out}"], cwd=tiny_data, timeout=300)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    r = run(["kept_blocks.py", f"--out_dir={out}", f"--data_dir={tiny_data / 'data'}", "--windows=3", "--batch=2"])
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    rows = json.load(open(out / "kept_blocks.json"))
    import torch
    shape = torch.load(out / "ckpt.pt", weights_only=True)["model_args"]  # 4 heads at the cpu scale, 6 at the gpu's
    assert len(rows) == 2 * shape["n_head"] and shape["n_layer"] == 2 and (out / "kept_blocks.png").exists()
    for row in rows:
        assert 1 <= row["kept_min"] <= row["kept_mean"] <= row["kept_max"] <= 4 and 0 <= row["at_cap"] <= 1
        assert 0 < row["read_fraction"] <= 1
    dense = tiny_data / "o-dense-kept"
    r = run(["-m", "train", os.path.join(ROOT, "config", "long_dense.py"), "--dataset=tiny", "--block_size=64",
             "--n_layer=1", "--max_iters=2", "--eval_interval=2", "--eval_tokens=256", "--always_save_checkpoint=True",
             f"--out_dir={dense}"], cwd=tiny_data, timeout=300)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    r = run(["kept_blocks.py", f"--out_dir={dense}", f"--data_dir={tiny_data / 'data'}"])
    assert r.returncode == 2 and "reads adaptive-sparse" in r.stderr and "Traceback" not in r.stderr
    # bench_trained.py times both checkpoints side by side; the adaptive-sparse row carries its work
    report = tiny_data / "bench-trained"
    r = run(["bench_trained.py", f"--runs={dense},{out}", f"--data_dir={tiny_data / 'data'}", "--repeats=2",
             "--warmup=1", f"--out={report}"])
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    rows = list(csv.DictReader(open(report / "bench_trained.csv")))
    assert [r_["attention"] for r_ in rows] == ["dense", "adaptive-sparse"] and rows[0]["vs_first"] == "1.0"
    assert rows[0]["kept_per_block"] == "" and 1 <= float(rows[1]["kept_per_block"]) <= 4
    assert 0 < float(rows[1]["frac_pairs"]) <= 1 and float(rows[1]["ms_fwd_bwd"]) > 0
    assert (report / "bench_trained.md").exists()
    for bad, msg in ((f"--runs={tiny_data / 'nope'}", "no checkpoint"), ("--runs=", "--runs=DIR")):
        r = run(["bench_trained.py", bad, f"--data_dir={tiny_data / 'data'}", f"--out={report}"])
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("force_first", [False, True])
def test_kept_blocks_read_fraction_is_the_blocks_own_count(force_first):
    import torch
    import kept_blocks
    from model import ATTENTION, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(n_embd=32, n_head=2, block_size=200, attention="adaptive-sparse", as_block=16, as_k_max=3,
                    as_force_first=force_first)
    attn = ATTENTION["adaptive-sparse"](cfg).eval()
    with torch.no_grad():
        attn(torch.randn(3, 200, 32))
    rows = kept_blocks.summarize(attn.last_kept[None].cpu(), attn.k_max, attn.block, 200, attn.force_first)
    own = attn.work_stats()["frac_pairs"]
    assert abs(np.mean([r["read_fraction"] for r in rows]) - own) < 1e-9
    assert all(1 <= r["kept_min"] <= r["kept_max"] <= 3 for r in rows)  # k_min 1: every block with candidates keeps one


def test_recall_trains_the_vq_codebook(monkeypatch):
    import torch
    o = {**recall.DEFAULTS, "iters": 2, "tokens_per_iter": 64, "n_layer": 1, "warmup_iters": 1, "train_pairs": "2"}
    x, y = recall.mqar_batch(np.random.default_rng(0), 4, 32, 2, o["n_keys"], o["n_values"])
    seen = []
    real = recall.GPT

    def spy(cfg):
        seen.append(real(cfg))
        return seen[-1]
    monkeypatch.setattr(recall, "GPT", spy)
    before = None
    torch.manual_seed(o["seed"])
    before = real(recall.model_config("vq", 32, o)).transformer.h[0].attn.units[0].codebook().clone()
    recall.train_one("vq", 32, o, {2: (x, y)})
    after = seen[0].transformer.h[0].attn.units[0].codebook()
    assert not torch.allclose(before, after)


def test_recall_probe_knobs_make_the_approximate_blocks_approximate_at_probe_lengths():
    """With knobs=probe each budgeted block reads less than the whole of T=256 exactly (kernel-hashing's
    exact chunk, adaptive-sparse's most blocks read, vq's exact blocks); with knobs=config the long
    configs' knobs, which read all of it."""
    o = {**recall.DEFAULTS, "knobs": "probe"}
    kh, asp, vq = (recall.model_config(n, 256, o) for n in ("kernel-hashing", "adaptive-sparse", "vq"))
    assert kh.kh_min_seq_len < 256 and (asp.as_k_max + 2) * asp.as_block < 256 and 2 * vq.vq_block_len < 256
    assert kh.rope and asp.rope  # positions and the other knobs still come from the long configs
    o["knobs"] = "config"
    assert recall.model_config("kernel-hashing", 256, o).kh_min_seq_len == load("long_kernel_hashing.py")["kh_min_seq_len"]


def test_recall_accuracy_counts_argmax_hits_at_the_queries():
    """recall.accuracy (scored on the query positions only) equals the argmax hit rate read off the full logits."""
    o = {**recall.DEFAULTS, "n_layer": 1}
    torch.manual_seed(0)
    model = recall.GPT(recall.model_config("dense", 64, o))
    x, y = recall.mqar_batch(np.random.default_rng(0), 10, 64, 8, o["n_keys"], o["n_values"])
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(x), torch.from_numpy(y))
    pred = logits.argmax(-1).numpy()
    # make about half of the queries hits: plant the model's own prediction as the answer
    plant = (y >= 0) & (np.random.default_rng(1).random(y.shape) < 0.5)
    y[plant] = pred[plant]
    want = float(np.mean(pred[y >= 0] == y[y >= 0]))
    assert 0.3 < want < 0.8
    assert recall.accuracy(model, x, y, batch=3) == pytest.approx(want, rel=1e-12)
