"""scripts/gpu_check.py in its CPU smoke mode: every block and every config runs, and the
results file records each item (the full check needs a GPU; see the script's docstring)."""
import json
import random

from conftest import ROOT, run


def test_gpu_check_smoke(tmp_path):
    words = "thou art king the of my lord and to be not sweet love".split()
    rnd = random.Random(0)
    (tmp_path / "tiny.txt").write_text("\n".join(" ".join(rnd.choice(words) for _ in range(12)) for _ in range(3000)))
    r = run(["-m", "prepare_data", f"--input={tmp_path / 'tiny.txt'}", "--name=shakespeare_char"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out"
    r = run([f"{ROOT}/scripts/gpu_check.py", str(out), "--smoke", f"--workdir={tmp_path}", "--budget=600",
             "--train_timeout=300"], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert rows[0]["part"] == "machine" and rows[0]["smoke"] is True
    blocks = [x for x in rows if x["part"] == "blocks"]
    train = [x for x in rows if x["part"] == "train"]
    names = {"dense", "vq", "kernel-hashing", "adaptive-sparse", "generative-function"}
    assert {x["attention"] for x in blocks} == names and all(x["status"] == "ok" and x["ms"] > 0 for x in blocks)
    assert {x["attention"] for x in train} == names
    for x in train:
        assert x["status"] == "ok", x
        assert x["final_iter"] == 10 and x["ms_per_iter"] > 0 and x["val/loss"] > 0
    assert not any(x["part"] == "kernels" for x in rows)  # no kernel tests in the smoke mode
    assert "done in" in (out / "gpu_check.log").read_text()


def test_gpu_check_help():
    r = run([f"{ROOT}/scripts/gpu_check.py", "--help"])
    assert r.returncode == 0 and "--smoke" in r.stdout


def test_junit_counts_sum_the_suites(tmp_path):
    import sys
    sys.path.insert(0, f"{ROOT}/scripts")
    import gpu_check
    (tmp_path / "r.xml").write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/>'
                                    '<testsuite tests="3" failures="0" errors="1" skipped="0"/></testsuites>')
    assert gpu_check.junit_counts(tmp_path / "r.xml") == {"tests": 8, "failures": 1, "errors": 1, "skipped": 2}
    assert gpu_check.junit_counts(tmp_path / "missing.xml") == {}


def test_profile_block_writes_its_table_and_rejects_bad_input(tmp_path):
    r = run([f"{ROOT}/scripts/profile_block.py", "--attention=vq,adaptive-sparse", "--T=128", "--steps=1",
             "--warmup=1", "--rows=5", f"--out={tmp_path}"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("vq", "adaptive-sparse"):
        text = (tmp_path / f"profile_{name}_T128.txt").read_text()
        assert text.startswith(f"{name} T=128 B=1 n_head=6") and "Self CPU time total" in text
    r = run([f"{ROOT}/scripts/profile_block.py", "--attention=nope"])
    assert r.returncode == 2 and "unknown attention 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = run([f"{ROOT}/scripts/profile_block.py", "--help"])
    assert r.returncode == 0 and "torch.profiler" in r.stdout
