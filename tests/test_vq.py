"""Transformer-VQ block (`--attention=vq`): identity with dense attention over the quantized
keys, straight-through estimator, codebook EMA, compressive cache, causality, decoding, and the
Triton kernels against the PyTorch path (TRITON_INTERPRET=1, see conftest.py)."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, assert_causal, rel_err
from kernels.vq import (_scan_rows_, chunk_blocks_by_cost, nograd_chunk_group, gau_dense_attention, rms_norm, vq_attention, vq_block_attention_torch,
                        vq_cache_fold, vq_chunk_attention_torch, vq_compressive_cache)
from model import GPT, GPTConfig, VQGatedUnit



def small_config(**kw):
    base = dict(attention="vq", n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=50,
                vq_block_len=8, vq_codebook_size=16, vq_d_k=32)
    base.update(kw)
    return GPTConfig(**base)


def quantized_inputs(B, H, T, S, dk, dv, dtype=torch.float64, seed=0):
    """Random queries, a random codebook, codes and the quantized keys c_z, values."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(H, S, dk, generator=g, dtype=dtype)
    z = torch.randint(0, S, (B, H, T), generator=g)
    k_hat = codebook[torch.arange(H)[None, :, None], z]
    q = torch.randn(B, H, T, dk, generator=g, dtype=dtype)
    v = torch.randn(B, H, T, dv, generator=g, dtype=dtype)
    return q, k_hat, z, v, codebook


def dense_reference(q, k_hat, v, L, bias=None):
    """Dense causal softmax attention over k_hat, optionally with bias[i, i-j] added for
    0 <= i-j <= L. Keys older than the previous block enter through their codewords, which are
    constants: their logits use a detached k_hat, as the block-wise computation does."""
    T = q.shape[2]
    i = torch.arange(T)
    blk = i // L
    far = blk[None, :] <= blk[:, None] - 2  # (query, key) pairs served by the cache
    logits = torch.where(far, q @ k_hat.detach().transpose(-1, -2), q @ k_hat.transpose(-1, -2))
    dist = i[:, None] - i[None, :]
    if bias is not None:
        near = (dist >= 0) & (dist <= L)
        logits = logits + torch.gather(bias, -1, dist.clamp(0, L).expand(*bias.shape[:2], T, T)) * near
    logits = logits.masked_fill(dist < 0, float("-inf"))
    return torch.softmax(logits, -1) @ v


# ---------------------------------------------------------------- the main identity


@pytest.mark.parametrize("G", [1, 2, 3, None])  # blocks per chunk of the CPU path (None: its default)
@pytest.mark.parametrize("T,L,S", [(50, 16, 24), (64, 16, 64), (37, 8, 5), (12, 32, 16), (97, 12, 40)])
def test_equals_dense_attention_over_quantized_keys(T, L, S, G):
    q, k_hat, z, v, codebook = quantized_inputs(2, 2, T, S, 12, 10)
    q, k_hat, v = (t.requires_grad_(True) for t in (q, k_hat, v))
    out = vq_attention(q, k_hat, z, v, codebook, L, chunk_blocks=G)
    ref = dense_reference(q, k_hat, v, L)
    assert rel_err(out, ref) < 1e-10
    # with no cache in play, the reference is plain SDPA over k_hat (scale 1: q, k are pre-scaled)
    sdpa = F.scaled_dot_product_attention(q, k_hat, v, is_causal=True, scale=1.0)
    assert rel_err(out, sdpa) < 1e-10
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k_hat, v), do)
    grads_ref = torch.autograd.grad(ref, (q, k_hat, v), do)
    for g, gr in zip(grads, grads_ref):
        assert rel_err(g, gr) < 1e-10


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("T,L,S", [(50, 16, 24), (41, 8, 7)])
def test_equals_dense_attention_with_relative_bias(T, L, S, G):
    """With the window bias, the block equals dense attention with bias[i, i-j] for i-j <= L:
    keys further away (rest of the previous block, and the cache) get no position term."""
    q, k_hat, z, v, codebook = quantized_inputs(1, 2, T, S, 12, 10, seed=1)
    bias = torch.randn(1, 2, T, L + 1, dtype=torch.float64)
    q, k_hat, v, bias = (t.requires_grad_(True) for t in (q, k_hat, v, bias))
    out = vq_attention(q, k_hat, z, v, codebook, L, bias, chunk_blocks=G)
    ref = dense_reference(q, k_hat, v, L, bias)
    assert rel_err(out, ref) < 1e-10
    do = torch.randn_like(out)
    for g, gr in zip(torch.autograd.grad(out, (q, k_hat, v, bias), do),
                     torch.autograd.grad(ref, (q, k_hat, v, bias), do)):
        assert rel_err(g, gr) < 1e-10


def test_block_module_equals_dense_over_its_quantized_keys():
    """The whole unit, with its position terms zeroed: o equals dense attention over k^."""
    torch.manual_seed(0)
    unit = VQGatedUnit(small_config()).double().eval()
    with torch.no_grad():
        unit.c_r.weight.zero_()
        unit.xl_u.zero_()
        unit.xl_w.zero_()
    x = torch.randn(2, 29, 64, dtype=torch.float64)
    q, k, v, g = unit._project(x)
    q, k, v = q.double(), k.double(), v.double()
    z, k_hat, _ = unit.quantize(k)
    ref = F.scaled_dot_product_attention(q, k_hat, v, is_causal=True, scale=1.0)
    assert rel_err(unit(x), unit._out(ref, g)) < 1e-10


def _random_position_terms(unit, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (unit.xl_u, unit.xl_w, unit.c_r.weight):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def unit_position_logits(unit, q, T):
    """Independent form of the unit's Transformer-XL terms, as the official code scales them:
    u and w are multiplied by d_k^-1/4 (like q, k and R) where they are added to q. Returns the
    query for content logits q + u d_k^-1/4 and the (B, H, T, L+1) position logits for d = 0..L."""
    H, dk, L, C = unit.H, unit.dk, unit.L, unit.C
    d = torch.arange(L + 1, dtype=torch.float32)[:, None]  # sinusoids in float32, as the model makes them
    inv = 10000.0 ** (-torch.arange(0, C, 2, dtype=torch.float32) / C)
    sin = torch.cat([(d * inv).sin(), (d * inv).cos()], -1).to(q.dtype)  # (L+1, C)
    R = (sin @ unit.c_r.weight.t().to(q.dtype)).view(L + 1, H, dk).transpose(0, 1) * dk ** -0.25
    u = unit.xl_u.to(q.dtype).view(1, H, 1, dk) * dk ** -0.25
    w = unit.xl_w.to(q.dtype).view(1, H, 1, dk) * dk ** -0.25
    return q + u, (q + w) @ R.transpose(-1, -2)


def test_block_module_with_position_terms_equals_dense_reference():
    """The whole unit with u, w and W_r random: dense attention over k^ with the content bias
    u d_k^-1/4 on every key and the position term (q + w d_k^-1/4) . R_{i-j} for i-j <= L."""
    torch.manual_seed(0)
    unit = VQGatedUnit(small_config(vq_n_head=2)).double().eval()
    _random_position_terms(unit)
    x = torch.randn(2, 29, 64, dtype=torch.float64)
    q, k, v, g = unit._project(x)
    _, k_hat, _ = unit.quantize(k)
    qu, bias = unit_position_logits(unit, q, 29)
    ref = dense_reference(qu, k_hat, v, unit.L, bias)
    assert rel_err(unit(x), unit._out(ref, g)) < 1e-10


# ---------------------------------------------------------------- dense-GAU ablation (vq_quantize=False)


def band_reference(q, k, v, L, pos):
    """Causal softmax attention of t queries at the last t of n positions, logits q . k_j plus
    pos[i, d] at distance d = i - j <= L, by an explicit index (independent of the skew)."""
    t, n = q.shape[2], k.shape[2]
    d = (n - t + torch.arange(t))[:, None] - torch.arange(n)[None, :]
    near = (d >= 0) & (d <= L)
    s = q @ k.transpose(-1, -2) + torch.gather(pos, -1, d.clamp(0, L).expand(*pos.shape[:2], t, n)) * near
    return torch.softmax(s.masked_fill(d < 0, float("-inf")), -1) @ v


@pytest.mark.parametrize("t,n,L", [(29, 29, 8), (1, 40, 8), (5, 5, 8), (3, 7, 4), (1, 3, 6), (12, 50, 16)])
def test_gau_dense_attention_equals_band_reference(t, n, L):
    g = torch.Generator().manual_seed(t * 100 + n)
    q = torch.randn(2, 2, t, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, n, 6, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(2, 2, t, L + 1, generator=g, dtype=torch.float64, requires_grad=True)
    out, ref = gau_dense_attention(q, k, v, L, pos), band_reference(q, k, v, L, pos)
    assert rel_err(out, ref) < 1e-12
    do = torch.randn_like(out)
    for name, a, b in zip("qkvp", torch.autograd.grad(out, (q, k, v, pos), do),
                          torch.autograd.grad(ref, (q, k, v, pos), do)):
        assert rel_err(a, b) < 1e-12, name


def _dense_gau_unit(**kw):
    torch.manual_seed(0)
    return VQGatedUnit(small_config(vq_quantize=False, **kw)).double().train()


@pytest.mark.parametrize("H", [1, 2])
def test_dense_gau_equals_dense_causal_attention_over_unquantized_keys(H):
    """Position terms off (u, w and W_r zeroed): the unit is dense causal softmax attention over
    its unquantized keys (SDPA), in outputs and in the gradients of every parameter and of x."""
    unit = _dense_gau_unit(vq_n_head=H)
    with torch.no_grad():
        unit.c_r.weight.zero_()
        unit.xl_u.zero_()
        unit.xl_w.zero_()
    x = torch.randn(2, 37, 64, dtype=torch.float64, requires_grad=True)

    def reference(x):
        q, k, v, g = unit._project(x)
        return unit._out(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0), g)

    out, ref = unit(x), reference(x)
    assert rel_err(out, ref) < 1e-10
    assert unit.aux_loss is None and not hasattr(unit, "c_sum")  # no quantizer, no codebook
    leaves = (x, *[p for n, p in unit.named_parameters() if n not in ("c_r.weight", "xl_u", "xl_w")])
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do)):
        assert rel_err(a, b) < 1e-10


def test_dense_gau_with_position_terms_equals_reference():
    """u, w and W_r random: exact attention over unquantized k with content bias u d_k^-1/4 and the
    position term (q + w d_k^-1/4) . R_{i-j} for i-j <= L; outputs and every gradient."""
    unit = _dense_gau_unit(vq_n_head=2)
    _random_position_terms(unit, seed=1)
    x = torch.randn(2, 37, 64, dtype=torch.float64, requires_grad=True)

    def reference(x):
        q, k, v, g = unit._project(x)
        qu, pos = unit_position_logits(unit, q, 37)
        return unit._out(band_reference(qu, k, v, unit.L, pos), g)

    out, ref = unit(x), reference(x)
    assert rel_err(out, ref) < 1e-10
    leaves = (x, *unit.parameters())
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do)):
        assert rel_err(a, b) < 1e-10


def test_dense_gau_model_is_causal_and_has_no_codebook():
    torch.manual_seed(0)
    model = GPT(small_config(vq_quantize=False, vq_n_head=2)).eval()
    for b in model.transformer.h:  # make the position terms matter
        _random_position_terms(b.attn.units[0])
    assert_causal(model, torch.randint(0, 50, (2, 40)), (3, 8, 17, 31), vocab_size=50, atol=1e-5, rtol=1e-5)
    model.train()
    idx = torch.randint(0, 50, (2, 24))
    logits, loss = model(idx, idx)
    assert model.last_aux_loss is None and torch.allclose(loss, F.cross_entropy(logits.view(-1, 50), idx.view(-1)))
    assert not any("c_sum" in k or "c_count" in k for k in model.state_dict())
    model.commit_codebook_updates()  # nothing to commit
    assert model.extra_metrics() == {}


# ---------------------------------------------------------------- quantizer and codebook


def test_straight_through_forward_value_and_gradient():
    torch.manual_seed(0)
    unit = VQGatedUnit(small_config(vq_n_head=2))
    k = torch.randn(3, 2, 20, 32, requires_grad=True)
    z, k_hat, err = unit.quantize(k)
    c = unit.codebook()
    brute = ((k.detach()[..., None, :] - c[None, :, None]) ** 2).sum(-1).argmin(-1)
    assert torch.equal(z, brute)
    assert torch.equal(k_hat, c[torch.arange(2)[None, :, None], z])  # exactly the codewords
    upstream = torch.randn_like(k_hat)
    (gk,) = torch.autograd.grad(k_hat, k, upstream)
    assert torch.equal(gk, upstream)  # passed straight to k
    assert torch.allclose(err, (k - k_hat).pow(2).sum(-1))
    assert not any(n.startswith("c_sum") or n.startswith("c_count") for n, _ in unit.named_parameters())


def test_codebook_ema_update_arithmetic():
    torch.manual_seed(0)
    cfg = small_config(vq_n_head=2, vq_ema_decay=0.9)
    unit = VQGatedUnit(cfg).train()
    x = torch.randn(2, 21, 64)
    old_sum, old_count = unit.c_sum.clone(), unit.c_count.clone()
    with torch.no_grad():
        _, k, _, _ = unit._project(x)
        z, _, _ = unit.quantize(k)
    y = unit(x)
    assert torch.equal(unit.c_sum, old_sum) and torch.equal(unit.c_count, old_count)  # not before the step ends
    unit.commit_codebook_update()
    n = torch.zeros(2, 16)
    s = torch.zeros(2, 16, 32)
    for b in range(2):
        for h in range(2):
            for t in range(21):
                n[h, z[b, h, t]] += 1
                s[h, z[b, h, t]] += k[b, h, t]
    assert torch.allclose(unit.c_count, 0.9 * old_count + 0.1 * n, atol=1e-6)
    assert torch.allclose(unit.c_sum, 0.9 * old_sum + 0.1 * s, atol=1e-6)
    assert torch.allclose(unit.codebook(), unit.c_sum / unit.c_count.clamp(min=0.01)[..., None])
    # the buffers get no gradient and evaluation leaves them alone
    y.sum().backward()
    assert unit.c_sum.grad is None and unit.c_count.grad is None
    unit.eval()
    before = unit.c_sum.clone()
    unit(x)
    unit.commit_codebook_update()
    assert torch.equal(unit.c_sum, before)


def _accum_model():
    torch.manual_seed(0)
    return GPT(small_config(n_layer=2, vq_n_head=2, vq_ema_decay=0.9)).train()


def test_codebook_updates_once_per_optimizer_step_under_accumulation():
    """Gradient accumulation 4: the codebook after the step equals one EMA update over the four
    micro-batches together (one forward over their concatenation), not four sequential updates."""
    idx = torch.randint(0, 50, (4, 2, 24))  # 4 micro-batches of 2 sequences
    accum = _accum_model()
    c0 = [u.c_sum.clone() for u in accum.modules() if isinstance(u, VQGatedUnit)]
    for micro in idx:
        accum(micro, micro)[1].backward()
        # every micro-batch of the step sees the step's initial codebook
        assert all(torch.equal(u.c_sum, c) for u, c in zip(
            (u for u in accum.modules() if isinstance(u, VQGatedUnit)), c0))
    accum.commit_codebook_updates()
    whole = _accum_model()
    whole(idx.flatten(0, 1), idx.flatten(0, 1))
    whole.commit_codebook_updates()
    seq = _accum_model()
    for micro in idx:
        seq(micro, micro)
        seq.commit_codebook_updates()
    units = [[u for u in m.modules() if isinstance(u, VQGatedUnit)] for m in (accum, whole, seq)]
    for a, w, s_ in zip(*units):
        assert torch.allclose(a.c_count, w.c_count, atol=1e-5) and torch.allclose(a.c_sum, w.c_sum, atol=1e-5)
        assert not torch.allclose(a.c_count, s_.c_count, atol=1e-2)
        assert a.step_counts.sum() == 0 and not a.step_pending  # cleared for the next step
    # a second commit without new statistics changes nothing
    before = [u.c_sum.clone() for u in units[0]]
    accum.commit_codebook_updates()
    assert all(torch.equal(u.c_sum, b) for u, b in zip(units[0], before))


def test_commitment_loss_in_training_only():
    torch.manual_seed(0)
    cfg = small_config(vq_beta=0.5)
    model = GPT(cfg)
    idx = torch.randint(0, 50, (2, 24))
    model.eval()
    _, loss_eval = model(idx, idx)
    assert model.last_aux_loss is None
    ce = F.cross_entropy(model(idx, idx)[0].view(-1, 50), idx.view(-1))
    assert torch.allclose(loss_eval, ce)
    model.train()
    _, loss = model(idx, idx)
    aux = model.last_aux_loss
    assert aux is not None and aux.item() > 0
    parts = [b.attn.units[0].aux_loss for b in model.transformer.h]
    assert torch.allclose(aux, sum(parts))
    logits, loss = model(idx, idx)
    ce = F.cross_entropy(logits.view(-1, 50), idx.view(-1))
    assert torch.allclose(loss, ce + model.last_aux_loss)


def test_commitment_loss_value():
    torch.manual_seed(0)
    unit = VQGatedUnit(small_config(vq_beta=0.25, vq_n_head=2)).train()
    x = torch.randn(2, 19, 64)
    with torch.no_grad():
        _, k, _, _ = unit._project(x)
        _, _, err = unit.quantize(k)
    unit(x)
    assert torch.allclose(unit.aux_loss, 0.25 * err.sum(1).mean())
    k.requires_grad_(True)
    (gk,) = torch.autograd.grad(unit.quantize(k)[2].sum(), k)
    assert gk.abs().sum() > 0  # the commitment term pulls k towards its codeword


def test_compressive_cache_counts_sums_and_gradient():
    torch.manual_seed(0)
    B, H, L, S, R, dv = 1, 2, 3, 4, 5, 2
    z = torch.randint(0, S, (B, H, R * L))
    v = torch.randn(B, H, R * L, dv, dtype=torch.float64, requires_grad=True)
    N, U = vq_compressive_cache(z, v, S, L)
    onehot = F.one_hot(z, S).double()
    for r in range(R):
        older = (torch.arange(R * L) // L <= r - 2).double()[None, None, :, None]
        assert torch.equal(N[:, :, r].double(), (onehot * older).sum(2))
        assert torch.allclose(U[:, :, r], (onehot * older).transpose(-1, -2) @ v)
    assert torch.autograd.gradcheck(lambda v: vq_compressive_cache(z, v, S, L)[1], (v,))


@pytest.mark.parametrize("R", [1, 2, 3, 8, 17, 50, 300])
def test_row_scan_in_place(R):
    x = torch.randn(3, R + 1, 5, dtype=torch.float64)
    for reverse, want in ((False, x[:, :R].cumsum(1)), (True, x[:, :R].flip(1).cumsum(1).flip(1))):
        y = x.clone()
        out = _scan_rows_(y[:, :R], reverse)  # a view: the sums land in y itself
        assert torch.allclose(out, want) and torch.allclose(y[:, :R], want) and torch.equal(y[:, R], x[:, R])


def test_extra_metrics():
    torch.manual_seed(0)
    model = GPT(small_config())
    idx = torch.randint(0, 50, (2, 30))
    unit = model.transformer.h[0].attn.units[0]
    with torch.no_grad():  # the codes layer 0 is about to assign
        _, k, _, _ = unit._project(model.transformer.wte(idx))
        z, _, _ = unit.quantize(k)
    model(idx, idx)
    m = model.extra_metrics()
    assert m["vq/layer0/code_usage"] == pytest.approx(len(z.unique()) / 16)
    counts = torch.bincount(z.flatten(), minlength=16).float()
    p = counts[counts > 0] / counts.sum()
    assert m["vq/layer0/code_entropy"] == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)
    assert m["vq/layer0/dead_codes"] == float((unit.c_count < 1).sum())
    assert m["vq/layer1/commit_loss"] > 0


# ---------------------------------------------------------------- streaming forward (no grad)


def _stream_unit(**kw):
    torch.manual_seed(0)
    unit = VQGatedUnit(small_config(**kw)).double().eval()
    _random_position_terms(unit)
    with torch.no_grad():
        unit.c_count.uniform_(0.5, 2.0)
    return unit


@pytest.mark.parametrize("H, L, S, T, pieces", [(1, 4, 12, 1, 1), (1, 4, 12, 11, 1), (1, 4, 12, 12, 1),
                                                (2, 4, 12, 37, 1), (1, 4, 12, 60, 1), (2, 8, 16, 45, 1),
                                                (1, 8, 4, 29, 1), (2, 4, 12, 37, 2), (1, 4, 12, 60, 3),
                                                (1, 8, 4, 29, 2), (2, 4, 8, 61, 4)])
def test_streaming_forward_equals_training_forward(H, L, S, T, pieces):
    """Under no_grad in eval the unit streams pieces of `pieces` chunks of the CPU path (T with a
    partial last piece, chunk and block); float64, the same output as the autograd forward, and the
    same diagnostics."""
    unit = _stream_unit(vq_n_head=H, vq_block_len=L, vq_codebook_size=S)
    C = chunk_blocks_by_cost(L, S, unit.dk, unit.dv // H) * L
    unit.stream_len = pieces * C
    x = torch.randn(2, T, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = unit(x.requires_grad_(True)).detach()  # autograd on: the training (chunked) path
    counts, commit = unit.last_counts.clone(), unit.last_commit.clone()
    seen = []
    project = unit._project
    unit._project = lambda x_: seen.append(x_.shape[1]) or project(x_)
    with torch.no_grad():
        got = unit(x.detach())
    P = pieces * C
    assert seen == [min(P, T - s0) for s0 in range(0, T, P)]  # it streamed, one piece at a time
    assert rel_err(got, want) < 1e-12
    assert torch.equal(unit.last_counts, counts)
    assert torch.allclose(unit.last_commit, commit, rtol=1e-12, atol=0)


def test_streaming_forward_is_causal_and_taken_only_without_grad():
    unit = _stream_unit()
    x = torch.randn(1, 40, 64, dtype=torch.float64)
    calls = []
    stream = unit._stream
    unit._stream = lambda x_: calls.append(1) or stream(x_)
    unit(x)  # autograd on: not streamed
    unit.train()
    with torch.no_grad():
        unit(x)  # training mode (codebook statistics): not streamed
    assert calls == []
    unit.eval()
    with torch.no_grad():
        y = unit(x)
        x2 = x.clone()
        x2[:, 21:] = torch.randn(1, 19, 64, dtype=torch.float64)
        y2 = unit(x2)
    assert calls == [1, 1]
    assert torch.equal(y[:, :21], y2[:, :21]) and not torch.allclose(y[:, 21:], y2[:, 21:])


# ---------------------------------------------------------------- whole model


def test_causality_through_the_whole_model():
    torch.manual_seed(0)
    model = GPT(small_config(vq_n_head=2)).eval()
    assert_causal(model, torch.randint(0, 50, (2, 40)), (3, 8, 17, 31), vocab_size=50, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = GPT(small_config())
    idx = torch.randint(0, 50, (2, 30))
    # make the position biases matter (they start at zero, as in the paper)
    for b in model.transformer.h:
        torch.nn.init.normal_(b.attn.units[0].xl_w, std=0.1)
    _, loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradcheck_attention():
    """Exact derivatives of the block-wise attention in all its differentiable inputs."""
    q, k_hat, z, v, codebook = quantized_inputs(1, 1, 14, 4, 3, 2, seed=3)
    bias = torch.randn(1, 1, 14, 4, dtype=torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (q, k_hat, v, bias))
    assert torch.autograd.gradcheck(lambda q, k, v, b: vq_attention(q, k, z, v, codebook, 3, b, 1), inputs)
    # chunks of two blocks: the same derivatives in q, v and the bias. (In k the chunked path
    # reads the older keys of a chunk from k^ itself, equal to their codewords only on the
    # quantized values, so its k-gradient is checked against the block-wise path instead.)
    assert torch.autograd.gradcheck(lambda q, v, b: vq_attention(q, k_hat.detach(), z, v, codebook, 3, b, 2),
                                    (inputs[0], inputs[2], inputs[3]))


@pytest.mark.parametrize("B,H,T,L,S,G", [(2, 2, 48, 8, 6, 2), (1, 3, 90, 6, 20, 5), (1, 1, 64, 16, 64, 4)])
def test_chunked_path_equals_block_wise_path(B, H, T, L, S, G):
    """The CPU path (chunks of G blocks, a cache per chunk) against the block-wise computation
    the Triton kernels implement (a cache per block), on outputs and every gradient."""
    q, k_hat, z, v, codebook = quantized_inputs(B, H, T, S, 12, 10, seed=T)
    bias = torch.randn(B, H, T, L + 1, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (q, k_hat, v, bias)]
    out = vq_chunk_attention_torch(q, k_hat, z, v, bias, codebook, L, G)
    counts, sums = vq_compressive_cache(z, v, S, L)
    ref = vq_block_attention_torch(q, k_hat, v, bias, codebook, counts, sums, L)
    assert rel_err(out, ref) < 1e-10
    do = torch.randn_like(out)
    for name, g, gr in zip("qkvb", torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do)):
        assert rel_err(g, gr) < 1e-10, name


@pytest.mark.parametrize("T", [None, 64, 100, 8192])
@pytest.mark.parametrize("L,S,dk,dv", [(256, 512, 128, 512), (16, 512, 128, 512), (64, 128, 64, 106),
                                        (4, 12, 8, 16), (2, 256, 16, 64), (8, 1024, 32, 256), (16, 64, 128, 128)])
def test_chunk_length_minimises_the_stated_cost(L, S, dk, dv, T):
    """chunk_blocks_by_cost returns the G minimising its cost model (with T's padding to whole
    chunks) over every G up to S, or up to T's block count."""
    from kernels.vq import CACHE_BUILD_COST as k
    top = S if T is None else -(-T // L)
    pad = [1.0 if T is None else -(-T // (G * L)) * G * L / T for G in range(1, top + 1)]
    cost = [((L + G * L + S) * (dk + dv) + k * S * dv / (G * L)) * p for G, p in zip(range(1, top + 1), pad)]
    G = chunk_blocks_by_cost(L, S, dk, dv, T)
    assert 1 <= G <= top and cost[G - 1] == pytest.approx(min(cost), rel=1e-12)


def _peak_bytes(fn):
    """fn() and the peak of the bytes it held allocated at once (the profiler's memory events), CPU."""
    import json
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    live = peak = 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        live += e["args"]["Bytes"]
        peak = max(peak, live)
    if peak == 0:
        pytest.skip("this torch's profiler records no CPU memory events")
    return out, peak


@pytest.mark.parametrize("B,H", [(2, 2), (8, 4)])  # products over (batch, head) per chunk, or over chunks
@pytest.mark.parametrize("G", [1, 2])
def test_no_grad_path_holds_only_its_logits_cache_and_output(G, B, H):
    """The no-grad chunked path's working set: the logits (n C W), the caches of one group of g
    chunks and the running one ((g + 1) S d_v), the group's entering values (g C d_v, a copy when
    B H > 1), the counts per chunk ((n + 1) S) and the output (T d_v) per (batch, head), within 5%
    (index tensors; not all of them live at once): no copy of all values, no cache for every chunk,
    no second logits-sized buffer. The lower bound only checks that the profiler saw the buffers."""
    T, L, S, dk, dv = 768, 16, 64, 32, 48
    q, k_hat, z, v, codebook = quantized_inputs(B, H, T, S, dk, dv, dtype=torch.float32)
    bias = torch.randn(B, H, T, L + 1)
    with torch.no_grad():
        out, peak = _peak_bytes(lambda: vq_attention(q, k_hat, z, v, codebook, L, bias, chunk_blocks=G))
    C = G * L
    n, W = T // C, S + L + C
    g = nograd_chunk_group(n, C)
    assert 1 < g < n  # several chunks per group, several groups
    need = 4 * B * H * (T * W + (g + 1) * S * dv + g * C * dv + (n + 1) * S + T * dv)
    assert out.shape == (B, H, T, dv) and 0.8 * need <= peak <= 1.05 * need


def test_streaming_forward_memory_beyond_its_output_is_independent_of_T():
    """The streaming forward's peak allocation minus its output y is the same at 4 and 64 pieces (a
    guard against anything kept per piece; the working set itself is bounded by the test above)."""
    unit = _stream_unit(vq_n_head=2, vq_block_len=8, vq_codebook_size=16)
    unit.stream_len = 64
    extra = []
    for T in (256, 4096):
        x = torch.randn(2, T, 64, dtype=torch.float64)
        with torch.no_grad():
            y, peak = _peak_bytes(lambda: unit(x))
        extra.append(peak - y.numel() * y.element_size())
    assert 0 < extra[1] <= 1.01 * extra[0]


@pytest.mark.parametrize("G", [1, 2, 3])
@pytest.mark.parametrize("T,L,S,P", [(50, 8, 24, 16), (97, 12, 40, 36), (37, 4, 5, 8), (41, 8, 7, 8)])
def test_no_grad_path_whole_and_in_pieces_with_carry_equals_dense_reference(T, L, S, G, P):
    """Without autograd the chunked path takes its one-product form; run on the whole sequence and
    in pieces of P positions (whole blocks, not whole chunks: each piece is padded), each carrying
    the counts and value sums of the keys before the previous block and that block, as the
    streaming forward does. Both equal the dense reference (float64, odd sizes, partial last piece)."""
    B, H = 2, 2
    q, k_hat, z, v, codebook = quantized_inputs(B, H, T, S, 12, 10, seed=T + P)
    bias = torch.randn(B, H, T, L + 1, dtype=torch.float64)
    ref = dense_reference(q, k_hat, v, L, bias)
    with torch.no_grad():
        whole = vq_attention(q, k_hat, z, v, codebook, L, bias, chunk_blocks=G)
        plain = vq_attention(q, k_hat, z, v, codebook, L, chunk_blocks=G)  # no position bias
        counts, sums = torch.zeros(B, H, S, dtype=v.dtype), torch.zeros(B, H, S, 10, dtype=v.dtype)
        prev, pieces = None, []
        for s0 in range(0, T, P):
            cut = slice(s0, s0 + P)
            carry = None if prev is None else (counts, sums, *prev)
            pieces.append(vq_attention(q[:, :, cut], k_hat[:, :, cut], z[:, :, cut], v[:, :, cut], codebook, L,
                                       bias[:, :, cut], G, carry))
            if s0 + P < T:
                if prev is not None:
                    vq_cache_fold(counts, sums, prev[2], prev[1])
                vq_cache_fold(counts, sums, z[:, :, s0:s0 + P - L], v[:, :, s0:s0 + P - L])
                prev = tuple(t[:, :, s0 + P - L:s0 + P] for t in (k_hat, v, z))
    assert rel_err(whole, ref) < 1e-10
    assert rel_err(plain, dense_reference(q, k_hat, v, L)) < 1e-10
    assert rel_err(torch.cat(pieces, 2), ref) < 1e-10
    assert prev is not None or T <= P  # the carry was used


def test_chunked_path_refuses_a_codebook_that_wants_a_gradient():
    """The unit's codebook moves by EMA; the chunked path gives it no gradient and says so."""
    q, k_hat, z, v, codebook = quantized_inputs(1, 1, 16, 4, 6, 5)
    with pytest.raises(ValueError, match="codebook takes no gradient"):
        vq_chunk_attention_torch(q.requires_grad_(True), k_hat, z, v, None, codebook.requires_grad_(True), 4, 2)


def test_pytorch_path_under_bf16_autocast():
    """bfloat16 autocast (a CUDA machine without Triton, or CPU): the PyTorch path computes in float32,
    as the kernels do, so forward and backward run and equal float32 on the same bf16-rounded inputs."""
    B, H, T, L, S = 2, 2, 45, 8, 12
    q, k_hat, z, v, codebook = quantized_inputs(B, H, T, S, 16, 12, dtype=torch.float32, seed=3)
    bias = torch.randn(B, H, T, L + 1)
    bf = [t.bfloat16().requires_grad_(True) for t in (q, k_hat, v, bias)]
    ref = [t.detach().float().requires_grad_(True) for t in bf]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq_attention(bf[0], bf[1], z, bf[2], codebook.bfloat16(), L, bf[3])
    want = vq_attention(ref[0], ref[1], z, ref[2], codebook.bfloat16().float(), L, ref[3])
    assert rel_err(out.float(), want) < 1e-6
    do = torch.randn_like(want)
    for name, g, gr in zip("qkvb", torch.autograd.grad(out, bf, do.to(out.dtype)), torch.autograd.grad(want, ref, do)):
        assert g.dtype == torch.bfloat16 and rel_err(g.float(), gr) < 1e-2, name


@pytest.mark.parametrize("weight,scale", [(True, 1.0), (True, 0.5), (False, 0.3)])
def test_rms_norm_equals_torch(weight, scale):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3 * 24, dtype=torch.float64)[..., 5:29].requires_grad_(True)  # strided rows
    w = torch.randn(24, dtype=torch.float64, requires_grad=True) if weight else None
    out = rms_norm(x, w, scale)
    ref = F.rms_norm(x, (24,), w, eps=1e-6) * scale
    assert rel_err(out, ref) < 1e-12
    leaves = (x, w) if weight else (x,)
    do = torch.randn_like(out)
    for g, gr in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do)):
        assert rel_err(g, gr) < 1e-12


def _decode_config(**kw):
    return small_config(n_layer=2, block_size=24, vq_block_len=4, vq_codebook_size=8, **kw)


@pytest.mark.parametrize("kw", [dict(), dict(vq_n_head=2), dict(vq_gau_layout=True, mlp_ratio=0.0),
                                dict(vq_quantize=False, vq_n_head=2)])
def test_decode_state_equals_full_forward(kw):
    torch.manual_seed(0)
    model = GPT(_decode_config(**kw)).eval()
    for b in model.transformer.h:  # make the position terms matter
        for u in b.attn.units:
            _random_position_terms(u)
    idx = torch.randint(0, 50, (2, 27))  # past block_size: no absolute positions, no cropping
    full, _ = model(idx, idx)
    logits, states = model.decode(idx[:, :7], None, 0)
    assert torch.allclose(logits[:, -1], full[:, 6], atol=1e-5)
    for t in range(7, 27):
        logits, states = model.decode(idx[:, t:t + 1], states, t)
        assert torch.allclose(logits[:, -1], full[:, t], atol=1e-5), t
        unit_state = states[0][0][0]
        if kw.get("vq_quantize", True):
            assert unit_state["k"].shape[2] <= 2 * 4 and unit_state["U"].shape[2] == 8  # O(1) state
        else:  # the dense-GAU ablation keeps every key
            assert unit_state["k"].shape[2] == t + 1


@pytest.mark.parametrize("stream_len", [8, 16])
@pytest.mark.parametrize("P", [1, 3, 4, 8, 9, 13, 16, 21])
def test_streamed_prefill_then_decode_equals_full_forward(P, stream_len):
    """The prefill streams pieces of one or two chunks of 8 positions (L = 4, S = 8); prompts of
    1..21 tokens (whole and partial pieces, chunks and blocks), then token-by-token decoding to 26;
    float64, against the autograd forward."""
    unit = _stream_unit(vq_n_head=2, vq_block_len=4, vq_codebook_size=8)
    unit.stream_len = stream_len
    x = torch.randn(2, 26, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(P))
    full = unit(x.requires_grad_(True)).detach()
    x = x.detach()
    calls = []
    stream = unit._stream
    unit._stream = lambda x_, keep_state=False: calls.append(x_.shape[1]) or stream(x_, keep_state)
    y, state = unit.decode(x[:, :P], None)
    assert calls == [P] and rel_err(y, full[:, :P]) < 1e-12
    assert state["w0"] == max(0, (P // 4 - 1) * 4) and state["k"].shape[2] == P - state["w0"] <= 8
    assert state["N"].sum().item() == 2 * 2 * state["w0"]  # batch x heads x cached positions
    for t in range(P, 26):
        y, state = unit.decode(x[:, t:t + 1], state)
        assert rel_err(y[:, 0], full[:, t]) < 1e-12, t


def test_greedy_generation_with_cache_equals_without():
    torch.manual_seed(0)
    model = GPT(_decode_config()).eval()
    prompt = torch.randint(0, 50, (2, 5))
    a = model.generate(prompt, 30, temperature=0, use_cache=True)
    b = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert a.shape == (2, 35) and torch.equal(a, b)


# ---------------------------------------------------------------- Triton kernels


@pytest.mark.parametrize("B,H,T,L,S,dk,dv", [(2, 2, 50, 16, 24, 40, 40), (1, 1, 29, 12, 150, 72, 72)])
def test_triton_kernels_match_pytorch(B, H, T, L, S, dk, dv):
    pytest.importorskip("triton")
    from kernels.vq import vq_block_attention
    torch.manual_seed(B * 1000 + T)
    pad = -T % L
    q, k_hat, z, v, codebook = (t.to(DEVICE) for t in quantized_inputs(B, H, T + pad, S, dk, dv,
                                                                          dtype=torch.float32, seed=T))
    counts, sums = vq_compressive_cache(z, v, S, L)
    bias = torch.randn(B, H, T + pad, L + 1).to(DEVICE)
    leaves = [t.clone().requires_grad_(True) for t in (q, k_hat, v, bias, sums)]
    out = vq_block_attention(leaves[0], leaves[1], leaves[2], leaves[3], codebook, counts, leaves[4], L)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k_hat, v, bias, sums)]
    ref = vq_block_attention_torch(ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[3], codebook,
                                   counts, ref_leaves[4], L)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-3
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, do)
    grads_ref = torch.autograd.grad(ref, ref_leaves, do)
    for name, g, gr in zip(("q", "k", "v", "bias", "sums"), grads, grads_ref):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, gr) <= 1e-3, name


@pytest.mark.parametrize("G", [None, 1, 3])  # None: chunk_blocks_cuda (S // L = 3 here)
def test_triton_path_equals_dense_attention(G):
    """vq_attention's Triton path (the kernels on CUDA; the interpreter here), padding to whole chunks
    and its cache per chunk included, against the dense reference: outputs and gradients."""
    pytest.importorskip("triton")
    q, k_hat, z, v, codebook = (t.to(DEVICE) for t in quantized_inputs(1, 2, 45, 24, 16, 8, dtype=torch.float32,
                                                                         seed=3))
    bias = torch.randn(1, 2, 45, 9).to(DEVICE)
    leaves = [t.clone().requires_grad_(True) for t in (q, k_hat, v, bias)]
    out = vq_attention(*leaves[:2], z, leaves[2], codebook, 8, leaves[3], chunk_blocks=G, backend="triton")
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    ref = dense_reference(*ref_leaves[:3], 8, ref_leaves[3])
    assert torch.isfinite(out).all() and rel_err(out.double().cpu(), ref) <= 1e-3
    do = torch.randn_like(ref)
    for name, g, gr in zip("qkvb", torch.autograd.grad(out, leaves, do.to(out)), torch.autograd.grad(ref, ref_leaves, do)):
        assert torch.isfinite(g).all() and rel_err(g.double().cpu(), gr) <= 1e-3, name


def test_triton_path_saves_a_cache_per_chunk(monkeypatch):
    """What autograd keeps for the Triton path: the value sums per chunk of chunk_blocks_cuda blocks,
    (T / (G L)) S d_v floats, not per block (G times more). Kernel launches are stood in for (only
    the saved tensors' sizes are read), so this runs at T = 8192 on a CPU."""
    pytest.importorskip("triton")
    import kernels.vq as kv

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kw: None
    for name in ("_vq_lse_kernel", "_vq_fwd_kernel"):
        monkeypatch.setattr(kv, name, NoLaunch())
    B, H, T, L, S, dk, dv = 1, 2, 8192, 64, 256, 32, 64  # the long config's unit, S doubled (G = 4)
    q, k_hat, z, v, codebook = quantized_inputs(B, H, T, S, dk, dv, dtype=torch.float32)

    def run(G):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
            return t
        leaves = [t.clone().requires_grad_(True) for t in (q, k_hat, v)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            vq_attention(*leaves[:2], z, leaves[2], codebook, L, chunk_blocks=G, backend="triton")
        return sum(seen.values())
    G = kv.chunk_blocks_cuda(L, S)
    assert G == 4
    saved = {g: run(g) for g in (1, G)}
    cache = {g: B * H * (T // (g * L)) * S * (dv + 1) * 4 for g in (1, G)}  # value sums and counts
    # the difference is the per-block cache less the per-chunk one, and the per-chunk sums are T d_v floats
    assert saved[1] - saved[G] == cache[1] - cache[G]
    assert cache[G] == v.numel() * 4 * (dv + 1) // dv


def test_triton_path_chunk_length_and_refusals():
    """chunk_blocks_cuda: S // L blocks, never more than T has; the Triton path refuses a streaming carry,
    and the kernels refuse a cache whose chunks do not tile the blocks."""
    pytest.importorskip("triton")
    import kernels.vq as kv
    assert kv.chunk_blocks_cuda(32, 512) == 16 and kv.chunk_blocks_cuda(64, 32) == 1
    assert kv.chunk_blocks_cuda(32, 512, T=100) == 4 and kv.chunk_blocks_cuda(32, 512, T=1) == 1
    q, k_hat, z, v, codebook = quantized_inputs(1, 1, 16, 6, 4, 4, dtype=torch.float32)
    carry = (torch.zeros(1, 1, 6), torch.zeros(1, 1, 6, 4), k_hat[:, :, :4], v[:, :, :4], z[:, :, :4])
    with pytest.raises(ValueError, match="carry"):
        vq_attention(q, k_hat, z, v, codebook, 4, carry=carry, backend="triton")
    counts, sums = vq_compressive_cache(z, v, 6, 4, 2)  # 4 blocks in 2 chunks, launched as chunks of 3
    with pytest.raises(ValueError, match="chunks"):
        kv.vq_block_attention(q, k_hat, v, torch.zeros(1, 1, 16, 5), codebook, counts, sums, 4, 3)


def test_kernels_declare_compile_cases():
    pytest.importorskip("triton")
    import kernels.vq as kv
    declared = {case[1] for case in kv.COMPILE_CASES}
    assert declared == {kv._vq_lse_kernel, kv._vq_fwd_kernel, kv._vq_bwd_q_kernel, kv._vq_bwd_cache_kernel,
                        kv._vq_bwd_sums_kernel, kv._vq_bwd_kv_kernel}


# ---------------------------------------------------------------- distributed codebook statistics


def _ddp_worker(rank, world, path, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial codebook on both ranks
    unit = VQGatedUnit(small_config(vq_ema_decay=0.5)).train()
    x = torch.randn(world, 2, 15, 64)[rank]  # a different batch per rank
    unit(x)
    unit.commit_codebook_update()
    torch.save({"count": unit.c_count, "sum": unit.c_sum}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_ranks_share_codebook_statistics(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path / "st")), nprocs=2, join=True)
    s0, s1 = (torch.load(f"{tmp_path / 'st'}.{r}") for r in range(2))
    assert torch.equal(s0["count"], s1["count"]) and torch.equal(s0["sum"], s1["sum"])
    # and they hold the statistics of both ranks' batches together
    torch.manual_seed(0)
    unit = VQGatedUnit(small_config(vq_ema_decay=0.5)).train()
    x = torch.randn(2, 2, 15, 64).reshape(4, 15, 64)
    unit(x)
    unit.commit_codebook_update()
    assert torch.allclose(s0["count"], unit.c_count) and torch.allclose(s0["sum"], unit.c_sum, atol=1e-5)
