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
