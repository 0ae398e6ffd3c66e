"""No host sync in any block's training step: a forward and backward of the GPT reads no tensor value
on the host (a GPU would stall on it), counted with a TorchDispatchMode over the ops that do
(`aten::_local_scalar_dense`, `nonzero`, `unique`, ...) and with Tensor.item/tolist/bool/int refused.
Each block runs the code a GPU runs: its PyTorch path where that is the GPU path too; adaptive-sparse's
selected attention through its kernel entry point, with the Triton launch replaced by a differentiable
stand-in (its CPU fallback groups query blocks by their kept count, data-dependent shapes that need the
counts on the host, so it is the one path that syncs by design); vq's chunked path and the compressive
cache its CUDA path builds in PyTorch. kernel-hashing's Triton wrapper: tests/test_kernel_hashing.py."""
import pytest
import torch

import kernels.adaptive_sparse as AS
from conftest import SyncingOps, host_syncs
from kernels.vq import vq_compressive_cache
from model import GPT, GPTConfig


@pytest.mark.parametrize("name,extra", [("dense", {}), ("vq", {}), ("vq", {"vq_quantize": False}),
                                        ("kernel-hashing", dict(kh_min_seq_len=16, kh_bucket_block=8, kh_samples=8)),
                                        ("adaptive-sparse", dict(as_block=16)), ("generative-function", {})])
def test_training_step_reads_nothing_on_the_host(monkeypatch, name, extra):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=96, vocab_size=50, attention=name, dropout=0.0, **extra)
    model = GPT(cfg).train()
    if name == "adaptive-sparse":
        used = []
        stand_in = lambda q, k, v, idx, bias, block: used.append(1) or q + k + v + 0 * bias.sum()  # noqa: E731
        monkeypatch.setattr(AS, "_kernel_for", lambda t: stand_in)
    x, y = torch.randint(0, 50, (2, 96)), torch.randint(0, 50, (2, 96))

    def step():
        _, loss = model(x, y)
        loss.backward()
    assert host_syncs(monkeypatch, step) == []
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if name == "adaptive-sparse":
        assert used  # the kernel entry point was taken


def test_vq_compressive_cache_reads_nothing_on_the_host(monkeypatch):
    """The per-block cache of vq's CUDA path (counts and value sums, built in PyTorch), forward and backward."""
    z = torch.randint(0, 7, (2, 3, 45))
    v = torch.randn(2, 3, 45, 5, requires_grad=True)

    def build():
        counts, sums = vq_compressive_cache(z, v, 7, 8)
        (sums.square().sum() + counts.sum()).backward()
    assert host_syncs(monkeypatch, build) == []
    assert v.grad is not None


def test_the_probe_sees_a_sync(monkeypatch):
    """The counter can fail: a value read on the host is caught."""
    t = torch.tensor([1.0, 2.0])
    with SyncingOps() as probe:
        torch.nonzero(t)
    assert probe.calls
    with pytest.raises(AssertionError, match="host sync"):
        host_syncs(monkeypatch, lambda: t.sum().item())
