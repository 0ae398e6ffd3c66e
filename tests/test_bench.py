"""bench.py: a tiny end-to-end run, the CPU memory probe, the exponent fit, the skip logic,
the README writer and the command-line errors."""
import csv
import math
import os
import random
import sys

import subprocess

import pytest

import bench
from conftest import ROOT
import torch

from model import ATTENTION, GPT

README = "# title\n\nintro\n\n<!-- BEGIN bench_block -->\nold block table\n<!-- END bench_block -->\n\nmiddle\n\n" \
         "<!-- BEGIN bench_model -->\nold model table\n<!-- END bench_model -->\n\nend\n"


def run_bench(args, timeout):
    """python bench.py args... from the repository root, without the test-only Triton interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)



def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_csv_md_png_and_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    out = tmp_path / "res"
    args = ["--T=64,128", "--repeats=1", "--what=block,model", "--mem=False", "--threads=1", f"--out={out}",
            "--readme=True", f"--readme_path={readme}"]
    r = run_bench(args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = readme.read_text()
    for what in ("block", "model"):
        rows = read_csv(out / f"bench_{what}.csv")
        assert sorted((x["attention"], int(x["T"])) for x in rows) == sorted(
            (n, t) for n in ATTENTION for t in (64, 128)), "one row per (attention, T)"
        for x in rows:
            assert x["status"] == "ok", x
            assert float(x["ms"]) > 0 and int(x["repeats"]) == 1 and x["what"] == what
            assert math.isclose(float(x["ratio_vs_dense"]) * float(next(
                d["ms"] for d in rows if d["attention"] == "dense" and d["T"] == x["T"])), float(x["ms"]))
        md = (out / f"bench_{what}.md").read_text()
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        device = "cuda" if bench.torch.cuda.is_available() else "cpu"  # device=auto
        for fact in (cpu, "torch: " + bench.torch.__version__, f"device: {device}", "python bench.py " + " ".join(args)):
            assert fact in md, fact
        for name in ATTENTION:
            assert f"| {name} |" in md
        assert (out / f"bench_{what}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the README section now holds this run's table; the text around it is untouched
        begin, end = f"<!-- BEGIN bench_{what} -->", f"<!-- END bench_{what} -->"
        section = text[text.index(begin) + len(begin):text.index(end)]
        assert f"old {what} table" not in section and "| dense |" in section and "Machine: " in section
    assert text.startswith("# title\n\nintro\n\n<!-- BEGIN bench_block -->")
    assert "<!-- END bench_block -->\n\nmiddle\n\n<!-- BEGIN bench_model -->" in text
    assert text.endswith("<!-- END bench_model -->\n\nend\n")


def test_cpu_memory_probe_measures_the_step_and_reports_oom():
    T, C = 2048, bench.N_EMBD
    r = bench.measure_memory_cpu("dense", "block", T)
    assert r["status"] == "ok" and r["mem_method"] == "child VmHWM", r
    # the qkv projection (3 T C floats) is alive during attention, next to the input and the output
    assert 3 * T * C * 4 / 2**20 < r["peak_mem_mib"] < 200, r
    # a case that does not fit the child's address-space budget reports OOM instead of dying
    tight = bench.measure_memory_cpu("dense", "block", T, limit_mib=1)
    assert tight["status"] == "oom" and tight["peak_mem_mib"] is None, tight


def test_exponent_fit_on_synthetic_data():
    Ts = [1024, 4096, 8192, 16384, 32768, 65536]
    for k, c in ((2.0, 3e-6), (1.0, 0.25), (1.5, 7.0), (1.0 + random.random(), random.random())):
        assert bench.fit_exponent(Ts, [c * t ** k for t in Ts]) == pytest.approx(k, abs=1e-9)
    # only 4k..32k counts; None (skipped) values are left out; fewer than 2 points gives None
    outside = [1.0 if not 4096 <= t <= 32768 else 5e-6 * t ** 2 for t in Ts]
    assert bench.fit_exponent(Ts, outside) == pytest.approx(2.0, abs=1e-9)
    assert bench.fit_exponent([4096, 8192, 16384], [1.0, 2.0, None]) == pytest.approx(1.0, abs=1e-9)
    assert bench.fit_exponent([4096, 8192], [1.0, None]) is None
    assert bench.fit_exponent([256, 1024], [1.0, 16.0]) is None
    assert bench.fit_exponent([256, 1024], [1.0, 16.0], lo=256, hi=1024) == pytest.approx(2.0)


def test_skips_after_oom_and_when_the_estimate_does_not_fit(monkeypatch):
    def fake_probe(name, what, T, dtype_name="auto", **kw):  # peak memory of T MiB, OOM from 512 on
        if T >= 512:
            return {"status": "oom", "peak_mem_mib": None, "mem_method": None, "note": "RuntimeError: fake"}
        return {"status": "ok", "peak_mem_mib": float(T), "mem_method": "fake", "note": ""}

    monkeypatch.setattr(bench, "measure_memory_cpu", fake_probe)
    monkeypatch.setattr(bench, "mem_available_mib", lambda: 1e9)
    rows = bench.run(["dense"], "block", [64, 128, 512, 1024], repeats=1, log=lambda msg: None)
    assert [r["status"] for r in rows] == ["ok", "ok", "oom", "skipped"]
    assert rows[3]["note"] == "OOM at T=512" and rows[3]["ms"] is None
    # 300 MiB free, 80% usable: T=256 is estimated at 256 MiB (linear from 64 and 128 MiB) and skipped
    monkeypatch.setattr(bench, "mem_available_mib", lambda: 300.0)
    rows = bench.run(["dense"], "block", [64, 128, 256], repeats=1, log=lambda msg: None)
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped"]
    assert rows[2]["note"] == "est. 256 MiB > 80% of 300 MiB free"
    md = bench.markdown_tables(rows)
    assert "| dense | " in md and "skipped" in md and "dense at T=256: skipped: est." in md


def test_attentions_are_interleaved_and_repeats_capped_by_time(monkeypatch):
    calls, ms = [], {"slow": 15000.0, "fast": 2.0, "dense": 4.0}  # fake fwd+bwd times

    def fake_make_case(name, what, T, device="cpu", dtype_name="auto"):
        return (lambda: calls.append((name, T))), {"n_params": 1, "dtype": "float32", "knobs": {}}

    monkeypatch.setattr(bench, "make_case", fake_make_case)
    monkeypatch.setattr(bench, "timed", lambda step, device_type: (step(), ms[calls[-1][0]])[1])
    rows = bench.run(["slow", "fast", "dense"], "block", [256, 64], repeats=3, warmup=1, max_seconds=20,
                     measure_mem=False, log=lambda msg: None)
    warm = [("slow", 64), ("fast", 64), ("dense", 64)]
    assert calls[:3 + 8] == warm + [("slow", 64), ("fast", 64), ("dense", 64)] * 2 + [("fast", 64), ("dense", 64)]
    assert calls[11:] == [(n, 256) for n, _ in calls[:11]], "sizes in increasing order, each the same way"
    by = {(r["attention"], r["T"]): r for r in rows}
    assert by["slow", 64]["repeats"] == 2 and by["fast", 64]["repeats"] == 3  # 30 s > 20 s: no third run
    assert by["fast", 256]["ratio_vs_dense"] == pytest.approx(0.5) and by["slow", 64]["ms"] == 15000.0


def test_time_case_caps_repeats_by_time():
    r = bench.time_case("dense", "block", 64, "cpu", repeats=5, max_seconds=1e-9, memory=False)
    assert r["status"] == "ok" and r["repeats"] == 1 and r["ms"] > 0 and r["peak_mem_mib"] is None
    r = bench.time_case("dense", "model", 64, "cpu", repeats=3, max_seconds=60, memory=False)
    assert r["status"] == "ok" and r["repeats"] == 3 and r["ms_min"] <= r["ms"]


def test_config_knobs_come_from_the_cpu_scale(tmp_path, monkeypatch):
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "shakespeare_generative.py").write_text(
        "attention = 'generative-function'\nbatch_size = 3\ngf_fn = 'max'\nn_embd = 64\n"
        "scales = {'cpu': dict(n_layer=2, n_head=2, block_size=64, dropout=0.1, gf_avg_context=True),\n"
        "          'gpu': dict(gf_fn='min')}\n")
    monkeypatch.setattr(bench, "HERE", str(tmp_path))
    assert bench.config_knobs("generative-function") == {"gf_fn": "max", "gf_avg_context": True}
    assert bench.config_knobs("dense") == {}


def test_readme_section_replaced_in_place(tmp_path):
    p = tmp_path / "R.md"
    p.write_text(README)
    bench.replace_readme_section(str(p), "model", "new table\n")
    bench.replace_readme_section(str(p), "model", "new table\n")  # idempotent
    assert p.read_text() == README.replace("old model table\n", "new table\n")
    with pytest.raises(bench.BenchError):
        bench.replace_readme_section(str(p), "nothing", "x")


@pytest.mark.parametrize("argv, says", [
    (["--nope=1"], "unknown flag --nope"),
    (["--attention=dense,nope"], "valid: " + ", ".join(ATTENTION)),
    (["--T=64,abc"], "--T must be"),
    (["--T=0"], "--T must be"),
    (["--repeats=0"], "--repeats >= 1"),
    (["--threads=-1"], "--threads >= 0"),
    (["--repeats=two"], "--repeats must be int"),
    (["--device=tpu"], "--device must be"),
    (["--what=both"], "--what must be"),
    (["--mem=maybe"], "--mem must be True or False"),
    (["--out"], "needs a value"),
    (["config/x.py"], "unexpected argument"),
    (["--readme=True", "--readme_path=" + os.path.join(ROOT, "MISSING_README.md")], "not found"),
    (["--readme=True", "--readme_path=" + os.path.join(ROOT, "bench.py")], "markers"),
])
def test_bad_flags_exit_2_with_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err


def test_bad_flag_from_the_shell_has_no_traceback():
    r = run_bench(["--attention=nope"], timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "valid: dense" in r.stderr


def causal_pairs_attended(m, T):
    """Fraction of the causal (query, key) pairs the selected-block branch attended, counted on a
    T x T mask built from the module's last selection, the forced first block included (tiny T only)."""
    sel, Bk = m.last_selected, m.block
    B, H, nb, _ = sel.shape
    blk = torch.arange(T) // Bk
    total = 0
    for b in range(B):
        for h in range(H):
            allowed = torch.zeros(nb, nb, dtype=torch.bool)
            for i in range(nb):
                for j in [s for s in sel[b, h, i].tolist() if s >= 0] + [i - 1, i] + ([0] if m.force_first else []):
                    if j >= 0:
                        allowed[i, j] = True
            mask = allowed[blk][:, blk] & torch.ones(T, T, dtype=torch.bool).tril()
            total += mask.sum().item()
    return total / (B * H) / (T * (T + 1) / 2), sel.ge(0).sum(-1).double().mean().item()


@pytest.mark.parametrize("what", ["block", "model"])
def test_adaptive_sparse_rows_report_kept_blocks_and_pairs(what, tmp_path):
    """The adaptive-sparse row carries the timed forward's kept blocks per query block and the
    fraction of causal pairs attended (equal to a count on the T x T mask); other rows carry none."""
    T = 75  # not a multiple of the block: a partial last block
    rows = bench.run(["dense", "adaptive-sparse"], what, [T], repeats=1, warmup=0, measure_mem=False,
                     log=lambda msg: None)
    by = {r["attention"]: r for r in rows}
    assert by["dense"]["kept_per_block"] is None and by["dense"]["frac_pairs"] is None
    r = by["adaptive-sparse"]
    # rebuild the timed case and run its forward once more: the same seed, so the same selection
    torch.manual_seed(bench.seed)
    cfg = bench.bench_config("adaptive-sparse", what, T, bench.config_knobs("adaptive-sparse"))
    if what == "block":
        m = ATTENTION["adaptive-sparse"](cfg).train()
        m(torch.randn(1, T, cfg.n_embd))
        mods = [m]
    else:
        g = GPT(cfg).train()
        idx = torch.randint(0, cfg.vocab_size, (1, T))
        g(idx, torch.randint(0, cfg.vocab_size, (1, T)))
        mods = [b.attn for b in g.transformer.h]
    want = [causal_pairs_attended(m, T) for m in mods]
    assert math.isclose(r["frac_pairs"], sum(w[0] for w in want) / len(want), rel_tol=1e-9)
    assert math.isclose(r["kept_per_block"], sum(w[1] for w in want) / len(want), rel_tol=1e-9)
    assert 0 < r["frac_pairs"] < 1 and r["kept_per_block"] > 0
    md = bench.markdown_tables(rows)
    assert f"kept {r['kept_per_block']:.1f}/qblk, {100 * r['frac_pairs']:.1f}% pairs" in md
    assert "| dense | " + bench._num(by["dense"]["ms"]) + " (1.00x) |" in md
