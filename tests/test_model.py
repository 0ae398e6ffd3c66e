"""The GPT around the blocks, with dense attention: shapes, causality, cached decoding, optimizer groups."""
import pytest
import torch

from conftest import assert_causal
from model import ATTENTION, GPT, GPTConfig


def tiny(**kw):
    cfg = dict(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.0, attention="dense")
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg))


def test_shapes_and_loss():
    m = tiny()
    idx = torch.randint(0, 50, (3, 20))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 20, 50) and loss.ndim == 0
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5  # near uniform at init
    logits, loss = m(idx)
    assert logits.shape == (3, 1, 50) and loss is None
    full, _ = m(idx, idx)
    assert torch.allclose(logits[:, 0], full[:, -1], atol=1e-5)  # the last position only


def test_unknown_attention_is_an_error():
    with pytest.raises(ValueError, match="unknown attention 'nope'"):
        tiny(attention="nope")
    assert "dense" in ATTENTION


def test_dense_causality():
    assert_causal(tiny().eval(), torch.randint(0, 50, (2, 32)), [13], vocab_size=50)


def test_cached_generation_equals_recompute_including_crop():
    m = tiny().eval()
    idx = torch.randint(0, 50, (2, 5))
    # 40 new tokens run past block_size=32, where the context is cropped and the cache rebuilt
    a = m.generate(idx, 40, temperature=0, use_cache=True)
    b = m.generate(idx, 40, temperature=0, use_cache=False)
    assert a.shape == (2, 45) and torch.equal(a, b)


def test_decode_matches_forward_logits():
    m = tiny().eval()
    idx = torch.randint(0, 50, (2, 20))
    full, _ = m(idx, idx)
    logits, states = m.decode(idx[:, :12], None, 0)
    assert torch.allclose(logits[:, 0], full[:, 11], atol=1e-5)
    logits, states = m.decode(idx[:, 12:17], states, 12)  # a multi-token chunk on top of the cache
    assert torch.allclose(logits[:, 0], full[:, 16], atol=1e-5)
    for t in range(17, 20):
        logits, states = m.decode(idx[:, t:t + 1], states, t)
        assert torch.allclose(logits[:, 0], full[:, t], atol=1e-5)


def test_sampling_respects_top_k():
    m = tiny().eval()
    torch.manual_seed(1)
    out = m.generate(torch.zeros(4, 1, dtype=torch.long), 10, temperature=1.0, top_k=1)
    greedy = m.generate(torch.zeros(4, 1, dtype=torch.long), 10, temperature=0)
    assert torch.equal(out, greedy)


def test_optimizer_groups_and_flops():
    m = tiny()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters())
    cfg = m.config
    assert m.flops_per_token() == 6 * m.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def test_gradients_reach_every_parameter():
    m = tiny()
    idx = torch.randint(0, 50, (2, 16))
    _, loss = m(idx, idx)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


NO_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as on a CPU-only install
import torch
import kernels._triton
from model import ATTENTION, GPT, GPTConfig
assert not kernels._triton.HAS_TRITON
for name in ATTENTION:
    torch.manual_seed(0)
    g = GPT(GPTConfig(attention=name, n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=20,
                      vq_block_len=8, vq_codebook_size=8, vq_d_k=16, kh_min_seq_len=8, as_block=4))
    idx = torch.randint(0, 20, (1, 32))
    g(idx, idx)[1].backward()
    g.eval().generate(idx[:, :4], 3)
print("ran", len(ATTENTION), "blocks")
"""


def test_every_block_runs_without_triton():
    """kernels/<block>.py import without triton (the one guard is kernels/_triton.py) and each
    block's entry point takes its PyTorch path."""
    from conftest import run
    r = run(["-c", NO_TRITON], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ran 5 blocks" in r.stdout


# ----------------------------------------------------------------------------- short convolution before the mixer
SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=20, dropout=0.0, vq_block_len=8,
             vq_codebook_size=8, vq_d_k=16, kh_min_seq_len=8, as_block=4)


def test_short_conv_is_a_causal_depthwise_filter():
    """The mixer's input is sum_j c_j h_{t-j} per channel, zero before position 0 (loop reference)."""
    torch.manual_seed(0)
    g = GPT(GPTConfig(**{**SMALL, "short_conv": 3, "bias": True}))
    blk = g.transformer.h[0]
    x = torch.randn(2, 11, 32)
    got, tail = blk.mixer_input(x)
    h = blk.ln_1(x)
    w, b = blk.conv.weight[:, 0], blk.conv.bias  # (C, 3): tap 2 multiplies h_t, tap 0 h_{t-2}
    want = torch.stack([b + sum(w[:, 2 - j] * h[:, t - j] for j in range(3) if t - j >= 0)
                        for t in range(11)], 1)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(tail, h[:, -2:])
    plain, _ = GPT(GPTConfig(**SMALL)).transformer.h[0].mixer_input(x)
    assert not torch.allclose(got, plain)  # the option changes the mixer's input


@pytest.mark.parametrize("name", list(ATTENTION))
def test_short_conv_keeps_every_block_causal_and_decodable(name):
    torch.manual_seed(0)
    g = GPT(GPTConfig(**{**SMALL, "attention": name, "short_conv": 4})).eval()
    idx = torch.randint(0, 20, (2, 32))
    tol = dict(atol=1e-5, rtol=1e-5) if name == "kernel-hashing" else {}
    assert_causal(g, idx, [5, 17], vocab_size=20, **tol)
    full, _ = g(idx, idx)
    logits, states = g.decode(idx[:, :9], None, 0)
    assert torch.allclose(logits[:, 0], full[:, 8], atol=1e-4)
    for t in range(9, 14):  # token by token: the conv's state carries the last 3 inputs of each layer
        logits, states = g.decode(idx[:, t:t + 1], states, t)
        assert torch.allclose(logits[:, 0], full[:, t], atol=1e-4), t
    logits, states = g.decode(idx[:, 14:20], states, 14)  # a chunk on top of the cache
    assert torch.allclose(logits[:, 0], full[:, 19], atol=1e-4)


# ----------------------------------------------------------------------------- loss at the labelled positions only
@pytest.mark.parametrize("name,mlp_activation", [(n, "gelu") for n in ATTENTION] + [("dense", "generative")])
def test_labelled_only_gives_the_same_loss_and_gradients(name, mlp_activation):
    """forward(labelled_only=True) skips the last block's MLP, the final norm and the head at positions
    whose target is -1: loss, every gradient and the kept logits equal the full forward's (float64,
    training mode, so auxiliary losses count); a sequence-mixing MLP activation takes the full path."""
    torch.manual_seed(0)
    g = GPT(GPTConfig(**{**SMALL, "attention": name, "mlp_activation": mlp_activation, "short_conv": 3})).double()
    idx = torch.randint(0, 20, (3, 29))
    targets = torch.randint(0, 20, (3, 29))
    targets[torch.rand(3, 29) < 0.8] = -1  # most positions carry no loss, as in recall.py
    rows = []  # positions the last MLP computes
    g.transformer.h[-1].mlp.c_fc.register_forward_hook(lambda m, i, o: rows.append(i[0].numel() // i[0].size(-1)))
    runs = []
    for labelled_only in (False, True):
        g.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # kernel-hashing draws its hashes and samples in training
        logits, loss = g(idx, targets, labelled_only=labelled_only)
        loss.backward()
        runs.append((logits, loss, {n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None}))
    (full, loss_full, grads_full), (kept, loss_kept, grads_kept) = runs
    keep = targets >= 0
    assert kept.shape == (int(keep.sum()), 20)
    assert rows == [idx.numel(), idx.numel() if mlp_activation == "generative" else int(keep.sum())]
    assert torch.allclose(kept, full[keep], rtol=1e-10, atol=1e-12)
    assert torch.allclose(loss_kept, loss_full, rtol=1e-12)
    assert grads_full.keys() == grads_kept.keys() and grads_full
    for n in grads_full:
        assert torch.allclose(grads_kept[n], grads_full[n], rtol=1e-9, atol=1e-12), n
