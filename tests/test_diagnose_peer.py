"""diagnose_peer.py: skips cleanly without the hyper-attn checkout; with a stand-in checkout whose
HyperAttention is exact causal attention, the harness scores it 0 and finds it causal; bad input exits 2."""
import csv

import pytest
import torch

import diagnose_peer
from conftest import run

STAND_IN = '''
import torch
def exact_attention(query, key, value, softmax_scale, causal=False, bias=None):
    raise AssertionError("the stand-in never calls it")
class HyperAttention(torch.nn.Module):
    def __init__(self, input_dim, lsh_num_projs, block_size, sample_size, min_seq_len, cuda=False):
        super().__init__()
    def forward(self, q, k, v, scale=None, causal=False):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
'''


def test_skips_in_one_line_without_the_checkout(tmp_path):
    r = run(["diagnose_peer.py", f"--hyper_attn={tmp_path / 'none'}", f"--out={tmp_path / 'out'}"], timeout=120)
    assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "skipped" in r.stdout
    assert not (tmp_path / "out").exists()


def test_harness_scores_an_exact_stand_in_zero_and_causal(tmp_path, monkeypatch):
    pkg = tmp_path / "hyper" / "models" / "attention"
    pkg.mkdir(parents=True)
    (pkg / "hyper_attn.py").write_text(STAND_IN)
    for d in (tmp_path / "hyper" / "models", pkg):
        (d / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "hyper"))
    out = tmp_path / "out"
    diagnose_peer.main([f"--hyper_attn={tmp_path / 'hyper'}", f"--out={out}", "--inputs=heavy", "--T=128",
                        "--budgets=16-4-4-4", "--seeds=2", "--start=16"])
    assert torch.is_grad_enabled()
    rows = list(csv.DictReader(open(out / "peer.csv")))
    err = {r["code"]: float(r["rel_err"]) for r in rows}
    assert err["hyperattention"] < 1e-5 and err["hyperattention-fp32-as-is"] < 1e-5
    assert err["ours (sorted-strata)"] > 1e-3  # a real estimate at this budget
    md = (out / "peer.md").read_text()
    assert "- hyperattention: 0 moved" in md and "- ours (sorted-strata): 0 moved" in md


@pytest.mark.parametrize("flag", ["--budgets=1-2-3", "--inputs=nosuch", "--T=32,x"])
def test_bad_input_is_one_line_and_exit_2(flag):
    r = run(["diagnose_peer.py", flag], timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
