"""bench_peer.py: the skip path (no JAX/Flax, or no official checkout), its input errors, and, where
JAX, Flax and the official code are installed, the agreement of the two units (skipped elsewhere)."""
import os

import pytest

import bench_peer
from conftest import run

OFFICIAL = os.environ.get("ATTNLAB_OFFICIAL_VQ", bench_peer.official)
TINY = dict(bench_peer.DEFAULTS, d_model=64, d_k=32, d_v=128, L=16, S=32, official=OFFICIAL)


def test_skips_without_the_official_checkout(tmp_path):
    out = tmp_path / "out"
    r = run(["bench_peer.py", f"--official={tmp_path / 'none'}", f"--out={out}"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_peer: skipped"), r.stdout
    assert "official checkout" in lines[0] and "pip install jax" in lines[0] and "git clone" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("flag,values,T,table,columns", [("chunks", ["1", "2"], 128, "chunks.md", 4),
                                                          ("stream_lens", ["16", "48"], 96, "stream-len.md", 3)])
def test_sweep_modes_run_without_the_official_code(tmp_path, flag, values, T, table, columns):
    """--chunks (blocks per chunk: fwd and fwd+bwd) and --stream_lens (piece length: fwd) time our unit
    alone at each value (no JAX, no checkout) and write their table, one row per value."""
    out = tmp_path / "out"
    r = run(["bench_peer.py", f"--official={tmp_path / 'none'}", f"--{flag}={','.join(values)}", f"--T={T}",
             "--repeats=1", "--warmup=0", "--d_model=32", "--d_k=16", "--d_v=32", "--L=16", "--S=32", f"--out={out}"],
            timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in (out / table).read_text().splitlines() if line.startswith(f"| {T} |")]
    assert [row.split("|")[2].strip() for row in rows] == values
    assert all(len(row.split("|")) == columns + 2 for row in rows)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_balanced_order_puts_each_case_after_each_other_equally_often(n):
    names = [f"case{i}" for i in range(n)]
    rounds = [bench_peer.round_order(names, r, "balanced") for r in range(n if n % 2 == 0 else 2 * n)]
    assert all(sorted(row) == names for row in rounds)
    pairs = [(x, y) for row in rounds for x, y in zip(row, row[1:])]  # within rounds
    counts = {(x, y): pairs.count((x, y)) for x in names for y in names if x != y}
    assert len(set(counts.values())) == 1 and min(counts.values()) >= 1, counts
    assert all(bench_peer.round_order(names, r, "fixed") == names for r in range(5))


def test_skips_without_jax(tmp_path):
    """A jax that fails to import (even where the real one is installed) and a checkout that is there."""
    fake = tmp_path / "official" / "src" / "transformer_vq" / "nn"
    fake.mkdir(parents=True)
    (fake / "attn.py").write_text("")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "jax.py").write_text("raise ImportError('no jax here')\n")
    r = run(["bench_peer.py", f"--official={tmp_path / 'official'}", f"--out={tmp_path / 'out'}"], timeout=120,
            env={"PYTHONPATH": f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.strip()
    assert line.startswith("bench_peer: skipped, missing jax") and "official checkout" not in line, line


@pytest.mark.parametrize("args, phrase", [(["--T=100"], "multiple of L=256"), (["--check_T=0"], "multiple of L"),
                                         (["--d_model=63"], "even"), (["--S=0"], "S must be > 0"),
                                         (["--bogus=1"], "unknown config key")])
def test_bad_input_is_one_line(args, phrase, tmp_path):
    r = run(["bench_peer.py", *args, f"--official={tmp_path}"], timeout=120)
    assert r.returncode == 2 and phrase in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _peer_or_skip():
    for mod in ("jax", "flax", "chex"):
        pytest.importorskip(mod)
    if bench_peer.missing_peer(OFFICIAL):
        pytest.skip(f"no official Transformer-VQ checkout at {OFFICIAL} (ATTNLAB_OFFICIAL_VQ)")


def test_agrees_with_the_official_unit():
    """Outputs, the loss and every gradient within float32 rounding; cache in use (4 blocks)."""
    _peer_or_skip()
    err = bench_peer.check(TINY, 64)
    assert set(err) >= {"y", "dx", "dW_q", "dW_kvg", "dln_w", "dc_r.weight", "dc_proj.weight", "dxl_u", "dxl_w"}
    assert max(err.values()) < bench_peer.AGREE, err


def test_agreement_check_can_fail():
    """Their sinusoid base 10^5 (ours is 10^4): the positions differ and the check says so."""
    _peer_or_skip()
    err = bench_peer.check(dict(TINY, pe_lam=1e5), 64)
    assert err["y"] > 1e-3 and err["dxl_w"] > 1e-3, err


def test_official_memory_plan_is_reported():
    """XLA's plan of the official unit: scratch plus outputs, the training step's larger than the forward's
    and at least its outputs (the output y, T x d_model floats)."""
    _peer_or_skip()
    plan = bench_peer.official_plan(TINY, 64)
    if plan is None:
        pytest.skip("this jax reports no memory_analysis")
    out_mib = TINY["batch"] * 64 * TINY["d_model"] * 4 / 2**20
    assert plan["fwd"] >= out_mib and plan["fwdbwd"] > plan["fwd"], plan
