"""Bad input and faults: value ranges, resume conflicts, corrupt checkpoints, kill -9 and resume."""
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import configurator
import prepare_data
import sample
import train
from conftest import ROOT, run

TINY = ["--dataset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--eval_tokens=1024", "--log_interval=10", "--warmup_iters=5", "--learning_rate=3e-3", "--min_lr=3e-4",
        "--device=cpu"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliability")
    rnd = random.Random(1)
    words = "the cat sat on a mat and saw one small dog run far away".split()
    (d / "tiny.txt").write_text("\n".join(" ".join(rnd.choice(words) for _ in range(12)) for _ in range(1500)))
    r = run(["-m", "prepare_data", f"--input={d / 'tiny.txt'}", "--name=tiny"], cwd=d)
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def trained(workdir):
    """A generative-function checkpoint at iteration 20 (not the default attention, so a resume that
    reported the defaults would show)."""
    r = run(["-m", "train", *TINY, "--out_dir=o_gf", "--attention=generative-function", "--max_iters=20",
             "--eval_interval=10", "--lr_decay_iters=20", "--always_save_checkpoint=True"], cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return workdir / "o_gf"


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-1500:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


# ----------------------------------------------------------------------------- value ranges
# one meaningless value per numeric key of each script (a new numeric key must get a range and a line here)
TRAIN_BAD = dict(
    eval_interval=0, log_interval=0, eval_tokens=-1, eval_batch_size=0, gradient_accumulation_steps=0, batch_size=-1,
    learning_rate=-1e-3, max_iters=-3, max_seconds=-1.0, weight_decay=-0.1, beta1=1.0, beta2=-0.5, grad_clip=-1.0,
    warmup_iters=-1, lr_decay_iters=-1, min_lr=-1e-4, seed=-1, peak_flops=0.0, vocab_size=-1, block_size=0,
    n_layer=0, n_head=0, n_embd=-5, dropout=1.0, mlp_ratio=-1.0, vq_codebook_size=0, vq_block_len=0, vq_d_k=0,
    vq_d_v_mult=0.0, vq_n_head=0, vq_beta=-1.0, vq_ema_decay=1.0, kh_hash_bits=17, kh_bucket_block=0, kh_samples=-1,
    kh_min_seq_len=0, as_block=0, as_threshold=0.0, as_k_min=-1, as_k_max=-1, as_score_dim=0, as_window=-1,
    as_compress=-1, as_compress_stride=0, short_conv=-1, as_budget=-0.1, as_gate_bias=50.0)
SAMPLE_BAD = dict(num_samples=0, max_new_tokens=-5, temperature=-0.5, top_k=-1, seed=-1)
PREPARE_BAD = dict(num_proc=0, val_fraction=1.0, max_chars=-1)
CASES = [(m, k, v) for m, bad in ((train, TRAIN_BAD), (sample, SAMPLE_BAD), (prepare_data, PREPARE_BAD))
         for k, v in bad.items()]


@pytest.mark.parametrize("module,bad", [(train, TRAIN_BAD), (sample, SAMPLE_BAD), (prepare_data, PREPARE_BAD)])
def test_every_numeric_key_has_a_range_and_a_case(module, bad):
    numeric = {k for k, v in module.DEFAULTS.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(module.RANGES) == set(bad)
    configurator.check_ranges(module.DEFAULTS, module.RANGES)  # the defaults are valid


@pytest.mark.parametrize("module,key,value", CASES, ids=[f"{m.__name__}-{k}" for m, k, _ in CASES])
def test_meaningless_value_is_rejected(module, key, value):
    with pytest.raises(configurator.ConfigError, match=f"^{key} must be .*got {value!r}$"):
        configurator.check_ranges({**module.DEFAULTS, key: value}, module.RANGES)


def test_range_bounds_are_inclusive_or_exclusive_as_written():
    rules = {"a": ">=0", "b": ">0", "c": "[0,1)", "d": "(0,1]"}
    configurator.check_ranges({"a": 0, "b": 1e-9, "c": 0.0, "d": 1.0}, rules)
    for key, value in (("a", -1), ("b", 0), ("c", 1.0), ("d", 0.0), ("a", float("nan"))):
        with pytest.raises(configurator.ConfigError, match=key):
            configurator.check_ranges({key: value}, rules)


@pytest.mark.parametrize("script,flag", [
    ("train", "--batch_size=-1"), ("train", "--block_size=-5"), ("train", "--block_size=0"),
    ("train", "--max_iters=-3"), ("train", "--eval_batch_size=0"), ("train", "--dropout=1.5"),
    ("sample", "--max_new_tokens=-5"), ("sample", "--temperature=-1"), ("prepare_data", "--val_fraction=0"),
])
def test_meaningless_values_on_the_command_line_are_one_line_errors(workdir, script, flag):
    key = flag[2:].split("=")[0]
    one_line_error(run(["-m", script, *([] if script != "train" else TINY), flag], cwd=workdir), f"{key} must be")


def test_model_that_cannot_be_built_is_a_one_line_error(workdir):
    r = run(["-m", "train", *TINY, "--out_dir=o_bad", "--n_embd=30", "--n_head=4"], cwd=workdir)
    one_line_error(r, "invalid model configuration", "n_embd must be divisible by n_head")


def test_prepare_data_refuses_input_too_small_for_a_split(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("a")
    r = run(["prepare_data.py", f"--input={f}", f"--data_dir={tmp_path / 'data'}"])
    one_line_error(r, f"at least {prepare_data.SMALLEST_BLOCK + 2}")
    assert not (tmp_path / "data" / "one").exists()
    f.write_text("x" * 660)  # 594 train and 66 val characters: just enough
    assert run(["prepare_data.py", f"--input={f}", f"--data_dir={tmp_path / 'data'}"]).returncode == 0


def test_smallest_block_is_the_smallest_config_block_size():
    sizes = []
    for name in os.listdir(os.path.join(ROOT, "config")):
        cfg, _ = configurator.load([os.path.join(ROOT, "config", name)], train.DEFAULTS)
        ns = configurator.exec_config(os.path.join(ROOT, "config", name))
        sizes += [cfg["block_size"]] + [s["block_size"] for s in ns.get("scales", {}).values() if "block_size" in s]
    assert min(sizes) == prepare_data.SMALLEST_BLOCK


# ----------------------------------------------------------------------------- checkpoints
def corrupt(kind, good, path):
    raw = open(good, "rb").read()
    if kind == "truncated":
        open(path, "wb").write(raw[: len(raw) // 2])
    elif kind == "random":
        open(path, "wb").write(random.Random(0).randbytes(4096))
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "foreign":  # a plain state_dict of some other program
        torch.save({"w": torch.ones(2)}, path)
    elif kind == "pickle":  # a pickle that would run code when loaded without weights_only
        open(path, "wb").write(pickle.dumps(configurator.ConfigError("x")))


@pytest.mark.parametrize("script", ["train", "sample"])
@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "foreign", "pickle"])
def test_bad_checkpoint_is_a_one_line_error(trained, workdir, kind, script):
    out = workdir / f"o_corrupt_{kind}_{script}"
    out.mkdir(exist_ok=True)
    corrupt(kind, trained / "ckpt.pt", out / "ckpt.pt")
    args = [*TINY, "--init_from=resume", "--max_iters=40"] if script == "train" else ["--max_new_tokens=5"]
    r = run(["-m", script, f"--out_dir={out.name}", *args], cwd=workdir)
    one_line_error(r, str(out.name) + "/ckpt.pt")
    assert "weights_only" not in r.stderr


# ----------------------------------------------------------------------------- resume
def test_resume_conflicting_model_flags_name_each_conflict(trained, workdir, tmp_path):
    r = run(["-m", "train", *TINY, "--out_dir=o_gf", "--init_from=resume", "--max_iters=40", "--attention=dense",
             "--n_layer=3"], cwd=workdir)
    one_line_error(r, "attention='dense' (command line)", "'generative-function'", "n_layer=3 (command line)")
    cfg = tmp_path / "c.py"
    cfg.write_text("n_embd = 64\nattention = 'generative-function'\n")  # same attention: no conflict there
    r = run(["-m", "train", str(cfg), *[a for a in TINY if not a.startswith("--n_embd")], "--out_dir=o_gf",
             "--init_from=resume", "--max_iters=40"], cwd=workdir)
    one_line_error(r, "n_embd=64 (config file)")
    assert "attention" not in r.stderr


def test_resume_reports_the_checkpoints_model_and_records_changed_keys(trained, workdir):
    out = workdir / "o_gf_more"
    shutil.copytree(trained, out)
    r = run(["-m", "train", *TINY, f"--out_dir={out.name}", "--init_from=resume", "--max_iters=30",
             "--eval_interval=10", "--learning_rate=1e-3"], cwd=workdir)  # no --attention: the default is dense
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "model: generative-function" in r.stdout and "learning_rate 0.003 -> 0.001" in r.stdout
    cfg = json.load(open(out / "config.json"))
    assert cfg["attention"] == cfg["model_args"]["attention"] == "generative-function"
    assert cfg["resumed"]["iter"] == 20 and cfg["resumed"]["changed"]["learning_rate"] == [3e-3, 1e-3]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [x["iter"] for x in rows] == [0, 10, 20, 30] and {x["attention"] for x in rows} == {"generative-function"}


def test_resume_at_or_past_max_iters_is_an_error(trained, workdir):
    for n in (20, 5):
        r = run(["-m", "train", *TINY, "--out_dir=o_gf", "--init_from=resume", f"--max_iters={n}"], cwd=workdir)
        one_line_error(r, "at iteration 20", f"max_iters={n}")


def test_kill_9_then_resume_logs_each_iteration_once(workdir):
    """Train until metrics.jsonl is past the checkpoint, kill -9, resume: every iteration once, and the
    re-logged row at the resumed iteration equal to the first one (exact resume)."""
    out = workdir / "o_kill"
    # the lr reaches 0 at iteration 20, so val stops improving and no later checkpoint is saved
    args = ["-m", "train", *TINY, f"--out_dir={out.name}", "--eval_interval=10", "--lr_decay_iters=20",
            "--min_lr=0.0"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.Popen([sys.executable, *args, "--max_iters=100000"], cwd=workdir, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            lines = open(out / "metrics.jsonl").read().splitlines() if (out / "metrics.jsonl").exists() else []
            if len(lines) >= 6 and (out / "ckpt.pt").exists():  # rows 0..50
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run wrote no checkpoint and six rows in time")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    ckpt_iter = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    before = [json.loads(line) for line in open(out / "metrics.jsonl") if line.endswith("\n")]
    assert max(x["iter"] for x in before) > ckpt_iter  # rows after the checkpoint exist: the test means something
    r = run([*args, "--init_from=resume", "--max_iters=70"], cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    after = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [x["iter"] for x in after] == list(range(0, 80, 10))
    again = next(x for x in after if x["iter"] == ckpt_iter)
    first = next(x for x in before if x["iter"] == ckpt_iter)
    assert again["val/loss"] == first["val/loss"] and again["time"] > first["time"]
