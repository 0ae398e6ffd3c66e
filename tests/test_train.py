"""train.py end to end on a tiny local dataset: learning, metrics, resume, checkpoints, DDP, wandb, sampling."""
import glob
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run

TINY = ["--dataset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--eval_tokens=2048", "--log_interval=10", "--warmup_iters=5", "--learning_rate=3e-3", "--min_lr=3e-4",
        "--device=cpu"]
KEYS = {"iter", "train/loss", "val/loss", "lr", "ms_per_iter", "tokens_per_sec", "peak_mem_cpu_rss_mib", "mfu",
        "data_source"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    rnd = random.Random(0)
    words = "the cat sat on a mat and saw one small dog run far away".split()
    text = "\n".join(" ".join(rnd.choice(words) for _ in range(12)) + "." for _ in range(3000))
    (d / "tiny.txt").write_text(text)
    r = run(["-m", "prepare_data", f"--input={d / 'tiny.txt'}", "--name=tiny"], cwd=d)
    assert r.returncode == 0, r.stderr
    return d


def train(workdir, out, *extra, env=None, check=True):
    r = run(["-m", "train", *TINY, f"--out_dir={out}", *extra], cwd=workdir, env=env)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def rows(workdir, out):
    return [json.loads(line) for line in open(workdir / out / "metrics.jsonl")]


def test_short_run_learns_logs_every_key_and_samples(workdir):
    r = train(workdir, "o_learn", "--max_iters=80", "--eval_interval=40", "--lr_decay_iters=80")
    assert re.search(r"^iter 10/80: loss [0-9.]+, .*, eta (\d+m)?\d+s$", r.stdout, re.M), r.stdout[-1000:]
    assert re.search(r"^iter 40/80: train loss", r.stdout, re.M)
    log = rows(workdir, "o_learn")
    assert [r["iter"] for r in log] == [0, 40, 80]
    assert all(KEYS <= set(r) for r in log)
    assert log[-1]["val/loss"] < log[0]["val/loss"] - 0.8
    assert log[-1]["ms_per_iter"] > 0 and log[-1]["tokens_per_sec"] > 0 and log[-1]["peak_mem_cpu_rss_mib"] > 10
    ckpt = torch.load(workdir / "o_learn" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 80
    json.load(open(workdir / "o_learn" / "config.json"))
    r = run(["-m", "sample", "--out_dir=o_learn", "--num_samples=2", "--max_new_tokens=60", "--start=the"],
            cwd=workdir)
    assert r.returncode == 0, r.stderr
    samples = r.stdout.split("---------------")
    assert len(samples) == 3 and all(len(s.strip()) >= 60 for s in samples[:2])


def test_resume_is_exact(workdir):
    common = ["--eval_interval=20", "--lr_decay_iters=40", "--always_save_checkpoint=True", "--dropout=0.1"]
    train(workdir, "o_full", "--max_iters=40", *common)
    train(workdir, "o_half", "--max_iters=20", *common)
    train(workdir, "o_half", "--max_iters=40", "--init_from=resume", *common)
    full, half = rows(workdir, "o_full")[-1], rows(workdir, "o_half")[-1]
    assert full["iter"] == half["iter"] == 40
    assert full["train/loss"] == half["train/loss"] and full["val/loss"] == half["val/loss"]
    a = torch.load(workdir / "o_full" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(workdir / "o_half" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vq_codebook_moves_once_per_optimizer_step(workdir):
    """Gradient accumulation 2, one step: the EMA counts hold one update over both micro-batches
    (g S + (1-g) tokens per head), not two updates, nor none."""
    train(workdir, "o_vqacc", "--attention=vq", "--vq_codebook_size=16", "--vq_block_len=8", "--vq_d_k=16",
          "--vq_ema_decay=0.5", "--gradient_accumulation_steps=2", "--max_iters=1", "--eval_interval=1",
          "--lr_decay_iters=1", "--always_save_checkpoint=True")
    model = torch.load(workdir / "o_vqacc" / "ckpt.pt", weights_only=True)["model"]
    counts = [v for k, v in model.items() if k.endswith("c_count")]
    assert len(counts) == 2
    for c in counts:
        assert torch.allclose(c.sum(-1), torch.tensor(0.5 * 16 + 0.5 * 2 * 8 * 32)), c.sum(-1)


def test_evaluation_windows_are_the_same_for_every_batch_size_and_seed(workdir):
    train(workdir, "o_eval", "--max_iters=10", "--eval_interval=10", "--lr_decay_iters=10")
    got = []
    for b, seed in ((8, 1337), (3, 7), (5, 99)):
        train(workdir, "o_eval", "--max_iters=10", "--init_from=resume", "--eval_only=True", f"--batch_size={b}",
              f"--seed={seed}")
        got.append(rows(workdir, "o_eval")[-1])
    assert len({(g["val/loss"], g["train/loss"], g["eval_windows"]) for g in got}) == 1
    assert got[0]["eval_windows"] == 2048 // 32 and 0 < got[0]["val/loss_se"] < 0.1


def test_time_budget_stops_where_it_says(workdir):
    train(workdir, "o_time", "--max_iters=100000", "--max_seconds=3", "--eval_interval=100000", "--lr_decay_iters=100000",
          "--warmup_iters=0")  # no warmup: on a loaded machine 3 s may end inside it
    log = rows(workdir, "o_time")
    last = log[-1]
    # it stops at the first step boundary past the budget, whatever the machine's load: before the last step
    # the clock was still under 3 s
    assert last["train_seconds"] - last["last_step_ms"] / 1000 < 3 <= last["train_seconds"] and last["iter"] < 100000
    assert last["tokens"] == last["iter"] * 8 * 32
    assert last["lr"] == pytest.approx(3e-4, rel=0.05)  # the cosine ran out with the time (by iterations it would barely have begun)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import train as train_mod
    path = str(tmp_path / "ckpt.pt")
    train_mod.save_atomic({"w": torch.ones(3), "iter_num": 1}, path)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_mod.save_atomic({"w": torch.zeros(3), "iter_num": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ck = torch.load(path, weights_only=True)
    assert ck["iter_num"] == 1 and torch.equal(ck["w"], torch.ones(3))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(workdir):
    r = train(workdir, "o_nan", "--max_iters=300", "--eval_interval=2", "--always_save_checkpoint=True",
              "--learning_rate=1e3", "--warmup_iters=300", "--lr_decay_iters=300", "--grad_clip=0.0", check=False)
    assert r.returncode == 1, r.stdout[-1000:] + r.stderr[-1000:]
    assert "non-finite" in r.stderr and "iteration" in r.stderr and "Traceback" not in r.stderr
    ck = torch.load(workdir / "o_nan" / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert ck["iter_num"] >= 2


def torchrun(*args):
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", *args]


def test_ddp_two_cpu_processes_keep_the_global_batch(workdir):
    common = [*TINY, "--max_iters=30", "--eval_interval=30", "--lr_decay_iters=30", "--gradient_accumulation_steps=1"]
    r = run(torchrun(*common, "--out_dir=o_ddp"), cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = rows(workdir, "o_ddp")
    assert [x["iter"] for x in log] == [0, 30] and log[1]["val/loss"] < log[0]["val/loss"]
    assert "1 accum x 2 ranks x 4 batch x 32 block" in r.stdout and "split over the ranks" in r.stdout
    train(workdir, "o_ddp1", *common[len(TINY):])
    assert log[-1]["tokens"] == rows(workdir, "o_ddp1")[-1]["tokens"] == 30 * 8 * 32  # the same experiment


def test_global_batch_split_over_ranks():
    import train as train_mod
    assert train_mod.split_batch(12, 4, 2) == (12, 2)  # the micro-steps first: the same memory per rank
    assert train_mod.split_batch(12, 1, 2) == (6, 1) and train_mod.split_batch(12, 3, 4) == (3, 3)
    assert train_mod.split_batch(12, 1, 1) == (12, 1) and train_mod.split_batch(3, 1, 2) is None


def test_ddp_global_batch_that_cannot_be_split_is_an_error(workdir):
    r = run(torchrun(*TINY, "--out_dir=o_ddp_bad", "--batch_size=3", "--max_iters=2"), cwd=workdir)
    assert r.returncode != 0 and 'train.py", line' not in r.stderr  # torchrun's own traceback follows; none of ours
    assert r.stderr.count("error: cannot split the global batch (batch_size 3 x gradient_accumulation_steps 1) "
                          "over 2 processes") == 1, r.stderr[-2000:]


def test_wandb_offline_without_credentials_writes_summary(workdir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true")
    args = [*TINY, "--max_iters=20", "--eval_interval=10", "--lr_decay_iters=20"]
    r = subprocess.run([sys.executable, "-m", "train", *args, "--out_dir=o_wandb", "--wandb_log=True"], cwd=workdir,
                       env={**env, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "offline" in r.stdout
    runs = glob.glob(str(workdir / "o_wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, os.listdir(workdir / "o_wandb")
    kinds, summary, config = wandb_offline_records(runs[0])
    log = rows(workdir, "o_wandb")
    assert kinds.get("history") == 3 and kinds.get("exit") == 1  # three evaluations, and a clean finish
    assert summary["val/loss"] == log[-1]["val/loss"] and summary["iter"] == 20
    assert summary["best_val_loss"] == min(x["val/loss"] for x in log)
    assert summary["final_ms_per_iter"] == log[-1]["ms_per_iter"]
    assert summary["peak_mem_cpu_rss_mib"] == log[-1]["peak_mem_cpu_rss_mib"]
    assert config["attention"] == "dense" and config["n_embd"] == 32 and config["max_iters"] == 20
    # the memory peak is taken before wandb starts, so it is the same figure without wandb (identical runs
    # differ by a few pages of resident memory; wandb's import alone adds ~90 MiB)
    r = subprocess.run([sys.executable, "-m", "train", *args, "--out_dir=o_nowandb"], cwd=workdir,
                       env={**env, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    without = rows(workdir, "o_nowandb")
    assert abs(log[-1]["peak_mem_cpu_rss_mib"] - without[-1]["peak_mem_cpu_rss_mib"]) < 8, (log[-1], without[-1])
    assert log[0]["peak_mem_cpu_rss_mib"] <= log[-1]["peak_mem_cpu_rss_mib"] == log[1]["peak_mem_cpu_rss_mib"]


def wandb_offline_records(path):
    """Record kinds, the merged summary and the run config of an offline .wandb file (a leveldb-style log of
    protobuf records: 7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    raw, pos, buf, block = open(path, "rb").read(), 7, b"", 32768
    assert raw[1:4] == b"W&B"
    kinds, summary, config = {}, {}, {}
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        buf += raw[pos:pos + n]
        pos += n
        if kind in (1, 4):  # FULL or LAST fragment completes a record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            k = rec.WhichOneof("record_type")
            kinds[k] = kinds.get(k, 0) + 1
            if k == "run":
                config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            if k == "summary":
                summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in rec.summary.update})
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    return kinds, summary, config


def test_adaptive_sparse_selection_is_logged(workdir):
    train(workdir, "o_as", "--attention=adaptive-sparse", "--as_block=4", "--as_k_max=3", "--max_iters=10",
          "--eval_interval=10")
    row = rows(workdir, "o_as")[-1]
    for layer in (0, 1):
        lo, mean, hi = (row[f"as/kept_{k}/l{layer}"] for k in ("min", "mean", "max"))
        assert 1 <= lo <= mean <= hi <= 3 and 0 <= row[f"as/at_cap/l{layer}"] <= 1
