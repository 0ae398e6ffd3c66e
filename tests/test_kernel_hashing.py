"""The kernel-hashing block: exactness where it must be exact, the estimator against its dense
form (forward and gradients), unbiased sampling, causality, cached decoding, seeding, and the
Triton kernels against the PyTorch path (TRITON_INTERPRET=1, set by conftest)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.kernel_hashing as KH
from conftest import DEVICE, assert_causal, host_syncs, rel_err
from model import ATTENTION, GPT, GPTConfig

KNOBS = dict(kh_min_seq_len=8, kh_bucket_block=5, kh_samples=6, kh_hash_bits=4)  # awkward on purpose



def knobs(**kw):
    k = {**KNOBS, **kw}
    return k["kh_min_seq_len"], k["kh_bucket_block"], k["kh_samples"], k["kh_hash_bits"]


def qkv(B, H, T, d, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, H, T, d, generator=g, dtype=dtype) * s for s in (1.5, 1.5, 1.0)]
    return [t.requires_grad_(grad) for t in out]


def reference(q, k, v, kn, seed, sampling="sorted-strata"):
    """The same estimator written densely: softmax(q k^T / sqrt(d) + W) v, W from the same hashes and samples."""
    W = KH.kernel_hashing_log_weights(q.detach(), k.detach(), *kn, seed, sampling)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + W, -1) @ v


def tiny_gpt(T=64, **kw):
    cfg = dict(block_size=T, vocab_size=40, n_layer=2, n_head=2, n_embd=32, dropout=0.0, attention="kernel-hashing",
               kh_min_seq_len=8, kh_bucket_block=4, kh_samples=4, kh_hash_bits=4)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg))


def test_registered_with_dense_heads():
    assert ATTENTION["kernel-hashing"].uses_absolute_positions and not ATTENTION["kernel-hashing"].has_input_norm
    m = ATTENTION["kernel-hashing"](GPTConfig(n_embd=32, n_head=4))
    assert {"c_attn.weight", "c_proj.weight", "seed", "step"} <= set(m.state_dict())


def test_exact_at_or_below_min_seq_len():
    cfg = GPTConfig(n_embd=32, n_head=2, block_size=16, attention="kernel-hashing", kh_min_seq_len=16)
    torch.manual_seed(0)
    kh, dense = ATTENTION["kernel-hashing"](cfg).eval(), ATTENTION["dense"](cfg).eval()
    dense.load_state_dict({k: v for k, v in kh.state_dict().items() if k not in ("seed", "step")})
    for T in (1, 9, 16):
        x = torch.randn(2, T, 32)
        assert rel_err(kh(x), dense(x)) < 1e-6
    q, k, v = qkv(1, 2, 16, 8)  # the general path (asked for stats) at T = min_seq_len is exact too
    out = KH.kernel_hashing_attention(q, k, v, *knobs(kh_min_seq_len=16), 3, backend="torch", stats={})
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-12


@pytest.mark.parametrize("T,sampling", [(45, "sorted-strata"), (77, "sorted-strata"), (77, "importance")])
def test_full_budget_equals_exact_attention(T, sampling):
    """Samples covering every key (weight n/m = 1): exact attention, outputs and gradients."""
    q, k, v = qkv(2, 2, T, 8, grad=True)
    go = torch.randn(2, 2, T, 8, dtype=torch.float64)
    out = KH.kernel_hashing_attention(q, k, v, *knobs(kh_samples=T), 11, backend="torch", sampling=sampling)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(out, exact) < 1e-12
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(exact, (q, k, v), go)):
        assert rel_err(a, b) < 1e-12
    # with a small budget the same call is a real approximation
    small = KH.kernel_hashing_attention(q, k, v, *knobs(), 11, backend="torch", sampling=sampling)
    assert rel_err(small, exact) > 1e-2


@pytest.mark.parametrize("T,seed,m,sampling", [(45, 1, 6, "sorted-strata"), (77, 2, 6, "sorted-strata"),
                                                (64, 3, 6, "sorted-strata"), (77, 4, 4, "sorted-strata"),
                                                (77, 5, 6, "importance"), (64, 6, 4, "importance")])
def test_matches_dense_reference_of_same_estimator(T, seed, m, sampling):
    """Forward and every gradient against autograd through the dense form with the same hashes and samples
    (m 6 does not divide the rectangles' sides 8, 16, 32: uniform draws; m 4 does: sorted strata; importance:
    per-sample weights, keys drawn twice included)."""
    q, k, v = qkv(1, 3, T, 8, seed=seed, grad=True)
    go = torch.randn(1, 3, T, 8, dtype=torch.float64)
    out = KH.kernel_hashing_attention(q, k, v, *knobs(kh_samples=m), seed, backend="torch", sampling=sampling)
    ref = reference(q, k, v, knobs(kh_samples=m), seed, sampling)
    assert rel_err(out, ref) < 1e-10
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        assert rel_err(a, b) < 1e-10


def test_gradient_flows_through_the_merge_weights():
    """Detaching the normaliser (what public code does with the LSE) changes dq and dk: the test above would see it."""
    q, k, v = qkv(1, 2, 64, 8, seed=5, grad=True)
    go = torch.randn(1, 2, 64, 8, dtype=torch.float64)
    W = KH.kernel_hashing_log_weights(q.detach(), k.detach(), *knobs(), 5)
    e = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(8) + W)
    detached = (e @ v) / e.sum(-1, keepdim=True).detach()
    out = KH.kernel_hashing_attention(q, k, v, *knobs(), 5, backend="torch")
    dq, dk, _ = torch.autograd.grad(out, (q, k, v), go)
    dq_bad, dk_bad, _ = torch.autograd.grad(detached, (q, k, v), go)
    assert rel_err(dq_bad, dq) > 0.1 and rel_err(dk_bad, dk) > 0.1


@pytest.mark.parametrize("sampling", ["sorted-strata", "uniform", "importance"])
def test_sampled_part_is_unbiased(sampling):
    """Over draws, the estimated sums Z_i = sum_j e_ij and N_i = sum_j e_ij v_j of a past rectangle
    (exact block + sampled rest weighted n/m) average to the exact sums; weight 1 is visibly biased.
    Batch rows hash and sample independently, so R copies of one sequence are R independent draws."""
    s, R = 32, 400
    q, k, v = (t.expand(R, 1, 2 * s, 8) for t in qkv(1, 1, 2 * s, 8, seed=9))
    S = (q @ k.transpose(-1, -2) / math.sqrt(8))[..., s:, :s]  # queries s..2s-1 against keys 0..s-1
    exact_z, exact_n = S[0].exp().sum(-1), S[0].exp() @ v[0, :, :s]
    W = KH.kernel_hashing_log_weights(q, k, s, 8, 8, 3, 17, sampling)[..., s:, :s]
    n_exact = (W == 0).sum(-1)  # a block of 8 keys exactly (importance: and the keys drawn for sure, weight 1)
    assert (n_exact.eq(8) if sampling != "importance" else n_exact.ge(8)).all() and (W > 0).any()
    e = torch.exp(S + W)
    for est, exact in ((e.sum(-1), exact_z), (e @ v[..., :s, :], exact_n)):
        z = (est.mean(0) - exact) / (est.std(0) / math.sqrt(R)).clamp_min(1e-12)
        assert z.abs().max() < 5, z.abs().max()
    est = torch.exp(S + W.clamp(max=0)).sum(-1)  # the sampled part without its n/m weight
    z = (est.mean(0) - exact_z) / (est.std(0) / math.sqrt(R))
    assert z.abs().max() > 10


def test_sorted_strata_take_one_key_from_each_stratum_of_the_hashed_order():
    """sorted-strata: the m samples sit one in each run of s/m consecutive keys of the hash-sorted order (so
    every key is drawn with probability m/s, as uniform draws are); m not dividing s falls back to uniform."""
    s, m, G = 64, 8, 6
    q, k, _ = qkv(1, G, s, 8, seed=3)
    rq, rk = KH._kh_level_ranks(q, k, 0, 5, 4)
    place = lambda plan: torch.argsort(plan["k_order"], dim=1).gather(1, plan["s_idx"])  # place in sorted order
    args = (rq[:, :, None], rk[:, :, None], 0, torch.tensor([0]), torch.arange(s), 5, 8)
    strata = KH._kh_plan(*args, m)
    assert torch.equal(place(strata).sort(1).values // (s // m), torch.arange(m).expand(G, m))
    hits = torch.zeros(s)
    for seed in range(200):  # every place of the sorted order is drawn, about equally often
        p = KH._kh_plan(*args[:5], seed, 8, m)
        hits += torch.bincount(place(p).flatten(), minlength=s) / G
    assert hits.min() > 0 and (hits / 200 - m / s).abs().max() < 0.1
    uni = KH._kh_plan(*args, m, "uniform")
    assert not torch.equal(place(uni).sort(1).values // (s // m), torch.arange(m).expand(G, m))
    odd = KH._kh_plan(*args, 6)  # 6 does not divide 64: the uniform draw
    assert torch.equal(odd["s_idx"], KH._kh_plan(*args, 6, "uniform")["s_idx"])


def test_importance_draws_each_key_with_probability_pi_and_weight_one_over_pi():
    """importance: p = (1 - a) softmax(proxy) + a / s; inclusion probabilities pi = min(1, c p) sum to m;
    key j is drawn with probability pi_j (never twice) and weighs 1 / pi_j; a key whose m p_j > 1 is
    drawn in every plan with weight 1; the draws follow the hashed order."""
    s, m, G = 64, 8, 3
    q, k, _ = qkv(1, G, s, 8, seed=4)
    rq, rk = KH._kh_level_ranks(q, k, 0, 5, 4)
    proxy = torch.randn(1, G, 1, s, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    proxy[0, 0, 0, 7] = 12.0  # one key takes nearly all of the proxy's mass in group 0: m p > 1
    a = KH.KH_DEFENSIVE
    p = (1 - a) * torch.softmax(proxy.reshape(G, s), -1) + a / s
    pi = KH._kh_inclusion(p, m)
    assert torch.allclose(pi.sum(1), torch.full((G,), float(m), dtype=pi.dtype)) and pi.max() <= 1
    capped = pi == 1
    assert capped[0, 7] and (m * p[0, 7]) > 1
    for g in range(G):
        ratio = pi[g][~capped[g]] / p[g][~capped[g]]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and (ratio[0] * p[g][capped[g]] >= 1).all()
    args = (rq[:, :, None], rk[:, :, None], 0, torch.tensor([0]), torch.arange(s))
    counts, draws = torch.zeros(G, s, dtype=torch.float64), 400
    for seed in range(draws):
        plan = KH._kh_plan(*args, seed, 8, m, "importance", proxy)
        assert plan["s_idx"].shape == (G, m)
        assert all(len(set(row.tolist())) == m for row in plan["s_idx"])  # distinct keys
        assert torch.allclose(plan["log_w"].double(), -torch.log(pi.gather(1, plan["s_idx"])), atol=1e-6)
        place = torch.argsort(plan["k_order"], dim=1).gather(1, plan["s_idx"])
        assert (place.diff(dim=1) > 0).all()  # one draw per unit of [0, m), in the sorted order
        counts.scatter_add_(1, plan["s_idx"], torch.ones(G, m, dtype=torch.float64))
    assert counts[0, 7] == draws  # the capped key: every plan
    se = (pi * (1 - pi) / draws).sqrt().clamp_min(1e-9)
    assert ((counts / draws - pi).abs() / se).max() < 5  # every key, within sampling noise


@pytest.mark.parametrize("sampling", ["sorted-strata", "importance"])
def test_causal_through_the_whole_gpt(sampling):
    m = tiny_gpt(kh_sampling=sampling).eval()
    idx = torch.randint(0, 40, (2, 64), generator=torch.Generator().manual_seed(1))
    assert_causal(m, idx, (5, 20, 40), vocab_size=40, atol=1e-5)


@pytest.mark.parametrize("sampling", ["sorted-strata", "importance"])
def test_decode_reproduces_forward_and_cached_generation_equals_recompute(sampling):
    m = tiny_gpt(kh_sampling=sampling).eval()
    idx = torch.randint(0, 40, (2, 60), generator=torch.Generator().manual_seed(2))
    full, _ = m(idx, idx)
    logits, states = m.decode(idx[:, :21], None, 0)
    assert torch.allclose(logits[:, 0], full[:, 20], atol=1e-5)
    logits, states = m.decode(idx[:, 21:27], states, 21)  # several tokens on top of the cache
    assert torch.allclose(logits[:, 0], full[:, 26], atol=1e-5)
    for t in range(27, 60):
        logits, states = m.decode(idx[:, t:t + 1], states, t)
        assert torch.allclose(logits[:, 0], full[:, t], atol=1e-5)
    start = idx[:, :6]
    a = m.generate(start, 70, temperature=0, use_cache=True)  # runs past block_size=64: crop and refill
    b = m.generate(start, 70, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_seeding_per_step_resume_and_fixed_eval_seed():
    torch.manual_seed(0)
    cfg = GPTConfig(n_embd=32, n_head=2, block_size=64, attention="kernel-hashing", **KNOBS)
    a = ATTENTION["kernel-hashing"](cfg)
    x = torch.randn(2, 64, 32)
    a.train()
    a(x), a(x)
    assert a.step.item() == 2
    b = ATTENTION["kernel-hashing"](cfg)
    b.load_state_dict(a.state_dict())  # a resumed run continues with the same randomness
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb) and a.step.item() == 3
    assert not torch.allclose(a(x), ya)  # the next step draws new hashes and samples
    a.eval()
    e1, e2 = a(x), a(x)
    assert torch.equal(e1, e2) and a.step.item() == 4  # eval: a fixed seed and no step
    assert 0 < a.extra_metrics()["approx_mass"] < 1 and 0 < a.extra_metrics()["scored_frac"] < 1


def test_ranks_draw_differently_and_each_rank_reproducibly(monkeypatch):
    """Under DDP equal batch rows on different ranks get different hashes and samples; a rank repeats its own
    draws exactly, and rank 0 draws what a single process draws."""
    import model
    torch.manual_seed(0)
    cfg = GPTConfig(n_embd=32, n_head=2, block_size=64, attention="kernel-hashing", **KNOBS)
    a = ATTENTION["kernel-hashing"](cfg).train()
    x, state = torch.randn(2, 64, 32), {k: v.clone() for k, v in a.state_dict().items()}
    seeds = []
    real = model.kernel_hashing_attention
    monkeypatch.setattr(model, "kernel_hashing_attention",
                        lambda *args, **kw: seeds.append(args[7]) or real(*args, **kw))  # args[7]: the seed

    def step(rank):
        if rank is not None:
            monkeypatch.setattr(model, "_process_rank", lambda: rank)
        a.load_state_dict(state)
        return a(x)

    single, r0, r1, r1_again, r2 = step(None), step(0), step(1), step(1), step(2)
    assert torch.equal(single, r0) and torch.equal(r1, r1_again)
    assert len({int(s) for s in seeds}) == 3  # ranks 0, 1, 2: three seeds, rank 1 twice the same
    assert rel_err(r1, r0) > 1e-2 and rel_err(r2, r1) > 1e-2  # so different planes and samples
    a.eval()  # eval: one fixed seed whatever the rank
    monkeypatch.setattr(model, "_process_rank", lambda: 1)
    e1 = a(x)
    monkeypatch.setattr(model, "_process_rank", lambda: 0)
    assert torch.equal(e1, a(x))


def test_flops_count():
    cfg = GPTConfig(n_embd=64, n_head=4, attention="kernel-hashing", kh_min_seq_len=64, kh_bucket_block=32,
                    kh_samples=32)
    kh, dense = ATTENTION["kernel-hashing"](cfg), ATTENTION["dense"](cfg)
    assert kh.attn_flops_per_token(64) == dense.attn_flops_per_token(64)
    assert kh.attn_flops_per_token(32768) < dense.attn_flops_per_token(32768) / 30


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_T_by_T_tensor():
    T = 2048
    cfg = GPTConfig(n_embd=32, n_head=2, block_size=T, attention="kernel-hashing", kh_min_seq_len=16,
                    kh_bucket_block=8, kh_samples=8)
    m = ATTENTION["kernel-hashing"](cfg)
    x = torch.randn(1, T, 32, requires_grad=True)
    with _LargestTensor() as probe:
        m(x).sum().backward()
    assert probe.largest < T * T // 16, probe.largest


@pytest.mark.parametrize("r", [1, 2, 5, 10])
def test_gray_rank_is_a_gray_code(r):
    """Every sign pattern of r hyperplanes gets its own rank in [0, 2^r), and patterns of adjacent rank
    differ in one hyperplane (so buckets adjacent in the sorted order are near in angle)."""
    patterns = (torch.arange(2**r)[:, None] >> torch.arange(r)) & 1  # all 2^r sign patterns, (2^r, r)
    rank = KH._kh_gray_rank(patterns.float() * 2 - 1)
    assert torch.equal(rank.sort().values, torch.arange(2**r))
    by_rank = patterns[rank.argsort()]
    assert ((by_rank[1:] != by_rank[:-1]).sum(-1) == 1).all()
    assert rank[0] == 0  # all negative: rank 0; the same ranks as before (buckets of earlier runs) below
    proj = torch.randn(3, 4, 7, r)
    binary = (proj > 0).long().cumsum(-1) & 1  # the definition: binary bit i = XOR of the Gray bits up to i
    assert torch.equal(KH._kh_gray_rank(proj), (binary * 2 ** torch.arange(r - 1, -1, -1)).sum(-1))


def test_fixed_size_tiles_are_the_needed_tiles_plus_inactive_padding():
    g = torch.Generator().manual_seed(3)
    for G, SQ, rows, nb in ((3, 37, 8, 5), (2, 16, 16, 1), (4, 20, 4, 9)):
        q_kb = torch.randint(0, nb, (G, SQ), generator=g)
        q_order, kb_sorted, tile_g, tile_chunk, tile_kb = KH._kh_tiles(q_kb, rows, nb)
        nch = -(-SQ // rows)
        assert tile_g.numel() == G * (nch + nb - 1)
        chunk = torch.arange(G)[:, None] * nch + torch.arange(SQ) // rows
        needed = set(zip(chunk.flatten().tolist(), kb_sorted.flatten().tolist()))
        real = tile_kb < nb
        got = list(zip(tile_chunk[real].tolist(), tile_kb[real].tolist()))
        assert len(got) == len(set(got)) and set(got) == needed
        assert torch.equal(tile_g, tile_chunk // nch) and (tile_chunk < G * nch).all()


class _NoLaunch:
    """Stands in for a Triton kernel: launching it does nothing (the outputs keep conftest's NaN fill)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("train,backend,sampling", [(True, "torch", "sorted-strata"), (False, "torch", "sorted-strata"),
                                                     (True, "triton", "sorted-strata"), (True, "torch", "importance"),
                                                     (True, "triton", "importance")])
def test_no_host_sync_in_forward_and_backward(monkeypatch, train, backend, sampling):
    """A real budget (T 256, chunks 32, blocks 16, 16 samples): one forward and backward of the block reads no
    tensor value on the host, so a GPU never stalls on it. Eval also gathers the approx_mass statistic; the
    Triton path's wrapper (plans, tiles, merges) is checked with the kernel launches stubbed out."""
    cfg = GPTConfig(n_embd=64, n_head=2, block_size=256, attention="kernel-hashing", kh_min_seq_len=32,
                    kh_bucket_block=16, kh_samples=16, kh_hash_bits=4, kh_sampling=sampling)
    torch.manual_seed(0)
    m = ATTENTION["kernel-hashing"](cfg).train(train)
    m.backend = backend
    if backend == "triton":
        monkeypatch.setattr(KH, "_kh_fwd_kernel", _NoLaunch())
        monkeypatch.setattr(KH, "_kh_bwd_kernel", _NoLaunch())
    x = torch.randn(2, 256, 64, requires_grad=True)

    calls = host_syncs(monkeypatch, lambda: m(x).square().sum().backward())
    assert calls == [], calls
    assert x.grad is not None and (backend == "triton" or x.grad.abs().sum() > 0)
    if not train:
        assert 0 < m.extra_metrics()["approx_mass"] < 1


# ------------------------------------------------------------------ Triton (interpreter) vs PyTorch
triton = pytest.importorskip("triton")


@pytest.mark.parametrize("T,d,kn,sampling", [(45, 24, knobs(), "sorted-strata"),
                                              (40, 16, knobs(kh_min_seq_len=10, kh_bucket_block=7, kh_samples=20),
                                               "sorted-strata"),
                                              (45, 24, knobs(), "importance")])
def test_triton_block_matches_torch(T, d, kn, sampling):
    """Whole block: chunks (causal mode) and every level (hashed mode), outputs and gradients, float32."""
    q, k, v = (t.to(DEVICE).requires_grad_() for t in qkv(1, 2, T, d, dtype=torch.float32, seed=T))
    go = torch.randn(1, 2, T, d).to(DEVICE)
    outs = {}
    for backend in ("torch", "triton"):
        o = KH.kernel_hashing_attention(q, k, v, *kn, 21, backend=backend, sampling=sampling)
        outs[backend] = (o, *torch.autograd.grad(o, (q, k, v), go))
    for a, b in zip(outs["triton"], outs["torch"]):
        assert not a.isnan().any()
        assert rel_err(a, b) <= 1e-3


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_saved_for_backward_is_a_few_outputs_whatever_the_levels(backend):
    """Autograd keeps q, k, v, the merged output and the row LSEs (floating tensors; the plans are integers),
    not an output per level: T 256 over chunks of 8 has 5 levels."""
    q, k, v = (t.to(DEVICE) for t in qkv(1, 2, 256, 16, dtype=torch.float32, seed=8, grad=True))
    seen = {}

    def pack(t):
        if t.is_floating_point():
            seen[(t.data_ptr(), tuple(t.shape))] = t.numel()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = KH.kernel_hashing_attention(q, k, v, 8, 4, 4, 3, 7, backend=backend)
    assert sum(seen.values()) <= 4 * q.numel() + q.numel() // 16, sum(seen.values()) / q.numel()
    assert o.shape == q.shape


def test_triton_block_bf16_matches_float32():
    """bfloat16 inputs through the whole Triton block (chunks, levels merged in float32) against float32 inputs
    holding the same rounded values (so the hashes agree): outputs and gradients to bfloat16 tolerance."""
    q, k, v = (t.bfloat16().to(DEVICE) for t in qkv(1, 2, 64, 16, dtype=torch.float32, seed=6))
    go = torch.randn(1, 2, 64, 16).to(DEVICE)
    res = []
    for dt in (torch.bfloat16, torch.float32):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        o = KH.kernel_hashing_attention(*leaves, 8, 4, 4, 3, 7, backend="triton")
        res.append((o, *torch.autograd.grad(o, leaves, go.to(o.dtype))))
    for a, b in zip(*res):
        assert not a.isnan().any() and rel_err(a, b) <= 1e-2


def test_triton_kernel_takes_the_lse_gradient():
    """One level through the kernel: o and lse against the dense form, with upstream gradients on both."""
    G, s, d, block, m = 3, 23, 16, 5, 7
    q, k, v = (t[0].to(DEVICE) for t in qkv(1, G, s, d, dtype=torch.float32, seed=4, grad=False))
    rq, rk = KH._kh_level_ranks(q[None], k[None], 0, 13, 4)
    plan = KH._kh_plan(rq[:, :, None], rk[:, :, None], 0, torch.tensor([0], device=DEVICE),
                      torch.arange(s, device=DEVICE), 13, block, m)
    assert plan["s_idx"] is not None
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    x = q @ k.transpose(1, 2) / math.sqrt(d) + KH._kh_plan_log_weights(plan)
    ref = (torch.softmax(x, -1) @ v, torch.logsumexp(x, -1))
    got = KH._kh_rect_triton(q, k, v, plan, d ** -0.5)
    go, gl = torch.randn(G, s, d).to(DEVICE), torch.randn(G, s).to(DEVICE)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-3
    g_got = torch.autograd.grad(got[0], (q, k, v), go, retain_graph=True)
    g_lse = torch.autograd.grad(got[1], (q, k, v), gl)
    g_ref = torch.autograd.grad((ref[0] * go).sum() + (ref[1] * gl).sum(), (q, k, v))
    for a, b, c in zip(g_got, g_lse, g_ref):
        assert rel_err(a + b, c) <= 1e-3


def test_compile_cases_cover_both_kernels():
    from kernels import kernel_hashing as K
    fns = {case[1] for case in K.COMPILE_CASES}
    assert fns == {K._kh_fwd_kernel, K._kh_bwd_kernel}
    assert {case[3]["CAUSAL"] for case in K.COMPILE_CASES} == {True, False}
