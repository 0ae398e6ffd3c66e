"""Rotary positions (GPTConfig.rope) for the blocks with dense-like heads: scores depend on the offset only,
the wpe table is gone, and each block stays causal, decodes as it computes in full, and keeps its gradients."""
import pytest
import torch

from conftest import assert_causal
from model import GPT, GPTConfig, rotate

BLOCKS = {"dense": {}, "kernel-hashing": dict(kh_min_seq_len=8, kh_bucket_block=4, kh_samples=4, kh_hash_bits=4),
          "adaptive-sparse": dict(as_block=8, as_k_max=2)}


def gpt(attention, T=48, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=T, vocab_size=40, n_layer=2, n_head=2, n_embd=32, attention=attention, rope=True,
                         **{**BLOCKS[attention], **kw}))


def test_rotated_scores_depend_on_the_offset_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 10, 16, generator=g, dtype=torch.float64), torch.randn(1, 2, 10, 16, generator=g,
                                                                                    dtype=torch.float64)
    s0 = rotate(q) @ rotate(k).transpose(-1, -2)
    s7 = rotate(q, 7) @ rotate(k, 7).transpose(-1, -2)  # the same sequence 7 positions later
    assert torch.allclose(s0, s7, atol=1e-10)
    assert not torch.allclose(s0, q @ k.transpose(-1, -2), atol=1e-3)  # and it does rotate
    assert torch.allclose(rotate(q).norm(dim=-1), q.norm(dim=-1), atol=1e-12)  # a rotation: norms kept
    assert torch.equal(rotate(q[..., :1, :]), q[..., :1, :])  # position 0: identity


@pytest.mark.parametrize("attention", list(BLOCKS))
def test_rope_blocks_are_causal_decode_as_they_compute_and_drop_wpe(attention):
    m = gpt(attention).eval()
    assert not hasattr(m.transformer, "wpe") and not m.absolute_positions
    idx = torch.randint(0, 40, (2, 48), generator=torch.Generator().manual_seed(1))
    assert_causal(m, idx, (5, 20, 40), vocab_size=40, atol=1e-5)
    full, _ = m(idx, idx)
    logits, states = m.decode(idx[:, :17], None, 0)
    assert torch.allclose(logits[:, 0], full[:, 16], atol=1e-5)
    for t in range(17, 48):
        logits, states = m.decode(idx[:, t:t + 1], states, t)
        assert torch.allclose(logits[:, 0], full[:, t], atol=1e-5), t
    m.train()
    _, loss = m(idx, idx)
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "c_attn" in n)


def test_rope_is_rejected_where_there_are_no_dense_like_heads():
    for attention in ("vq", "generative-function"):
        with pytest.raises(ValueError, match="rope applies to"):
            GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=32, attention=attention, rope=True))


@pytest.mark.parametrize("attention", list(BLOCKS))
def test_rope_generation_runs_past_block_size_uncropped_and_the_cache_agrees(attention):
    m = gpt(attention, T=32).eval()
    start = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(2))
    a = m.generate(start, 40, temperature=0, use_cache=True)  # 45 tokens against block_size 32: no table to crop
    b = m.generate(start, 40, temperature=0, use_cache=False)
    assert a.shape == (1, 45) and torch.equal(a, b)
