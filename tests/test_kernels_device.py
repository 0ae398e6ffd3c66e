"""Every Triton kernel against its PyTorch reference, in float32 and bfloat16, on conftest.DEVICE:
natively on CUDA when torch sees a GPU, in the interpreter (with TF32 dots emulated, see
tests/tf32_emulation.py) otherwise. References run in float64 on the very inputs the kernel got
(bfloat16 inputs upcast), so the tolerance measures the kernel: 1e-3 relative (RMS ratio) for
float32 and 1e-2 for bfloat16. torch.empty is NaN-filled (conftest), so an output element a
kernel never writes fails the finiteness checks."""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels.adaptive_sparse as AS
import kernels.kernel_hashing as KH
import kernels.vq as VQ
from conftest import DEVICE, INTERPRETED, rel_err

pytest.importorskip("triton")

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def randn(*shape, g, dtype, scale=1.0):
    """Random values drawn on the CPU (same numbers on every device), rounded to dtype, on DEVICE."""
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def errors(got, want, names):
    """{name: rel_err}; every kernel output must be finite (unwritten elements stay NaN)."""
    out = {}
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), f"{name} has non-finite (unwritten?) elements"
        out[name] = rel_err(a, b)
    return out


def assert_within(errs, tol, **looser):
    bad = {k: v for k, v in errs.items() if not v <= looser.get(k, tol)}
    assert not bad, f"above {tol}: {bad} (all: {errs})"


def _grads(fn, leaves, do):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, do)]


# ------------------------------------------------------------------------------------------ VQ
def vq_inputs(B, H, T, L, S, dk, dv, dtype, seed, positions_per_chunk):
    """Codebook, codes, quantized keys, q, v, bias and an output gradient, T padded to whole chunks."""
    g = torch.Generator().manual_seed(seed)
    T += -T % positions_per_chunk
    codebook = randn(H, S, dk, g=g, dtype=dtype)
    z = torch.randint(0, S, (B, H, T), generator=g).to(DEVICE)
    k_hat = codebook[torch.arange(H, device=DEVICE)[None, :, None], z]
    q, v = randn(B, H, T, dk, g=g, dtype=dtype), randn(B, H, T, dv, g=g, dtype=dtype)
    bias = randn(B, H, T, L + 1, g=g, dtype=dtype)
    return codebook, z, k_hat, q, v, bias, randn(B, H, T, dv, g=g, dtype=dtype)


def vq_errors(B, H, T, L, S, dk, dv, dtype, seed=0):
    """kernels/vq.py (output and the gradients of q, k, v, bias, value sums) against
    model.vq_block_attention_torch in float64."""
    from kernels.vq import vq_block_attention
    codebook, z, k_hat, q, v, bias, do = vq_inputs(B, H, T, L, S, dk, dv, dtype, seed, L)
    counts, sums = VQ.vq_compressive_cache(z, v.double(), S, L)
    sums = sums.to(dtype)
    leaves = (q, k_hat, v, bias, sums)
    got = _grads(lambda q, k, v, b, u: vq_block_attention(q, k, v, b, codebook, counts, u, L), leaves, do)
    want = _grads(lambda q, k, v, b, u: VQ.vq_block_attention_torch(q, k, v, b, codebook.double(), counts.double(),
                                                                   u, L),
                  [t.double() for t in leaves], do.double())
    return errors(got, want, ("o", "dq", "dk", "dv", "dbias", "dsums"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,L,S,dk,dv", [(2, 2, 50, 16, 24, 40, 40),
                                            # codebook of 200: three full chunks of 64 codes and one of 8
                                            (1, 2, 61, 12, 200, 40, 100)])
def test_vq(B, H, T, L, S, dk, dv, dtype):
    assert_within(vq_errors(B, H, T, L, S, dk, dv, dtype), TOL[dtype])


def vq_chunk_errors(B, H, T, L, S, G, dk, dv, dtype, seed=0):
    """kernels/vq.py with a cache per chunk of G blocks (outputs; gradients of q, k, v through the
    cache sums, bias) against the block-wise model.vq_block_attention_torch in float64."""
    from kernels.vq import vq_block_attention
    codebook, z, k_hat, q, v, bias, do = vq_inputs(B, H, T, L, S, dk, dv, dtype, seed, G * L)

    def chunked(q, k, v, b):
        counts, sums = VQ.vq_compressive_cache(z, v.float(), S, L, G)
        return vq_block_attention(q, k, v, b, codebook, counts, sums.to(dtype), L, G)

    def block_wise(q, k, v, b):
        counts, sums = VQ.vq_compressive_cache(z, v, S, L)
        return VQ.vq_block_attention_torch(q, k, v, b, codebook.double(), counts, sums, L)

    leaves = (q, k_hat, v, bias)
    got = _grads(chunked, leaves, do)
    want = _grads(block_wise, [t.double() for t in leaves], do.double())
    return errors(got, want, ("o", "dq", "dk", "dv", "dbias"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,L,S,G,dk,dv", [(1, 2, 70, 8, 24, 3, 40, 24),  # 3 chunks of 3 blocks, T padded
                                              (2, 1, 50, 12, 70, 2, 24, 40),  # codebook of 70: two code chunks
                                              (1, 1, 33, 5, 20, 7, 16, 16)])  # one chunk: no cache at all
def test_vq_chunked_cache(B, H, T, L, S, G, dk, dv, dtype):
    """The Triton path's cache per chunk of G blocks computes the block-wise attention."""
    assert_within(vq_chunk_errors(B, H, T, L, S, G, dk, dv, dtype), TOL[dtype])


# ------------------------------------------------------------------------------ adaptive-sparse
def random_lists(B, H, nq, n_sel, g):
    """Per query block: up to n_sel random earlier blocks, the previous and its own block, empty
    slots (-1), in shuffled slot order."""
    idx = torch.full((B, H, nq, n_sel + 2), -1, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                n = int(torch.randint(0, n_sel + 1, (1,), generator=g))
                lst = torch.randperm(max(i - 1, 0), generator=g)[:n].tolist() + ([i - 1] if i else []) + [i]
                lst += [-1] * (n_sel + 2 - len(lst))
                idx[b, h, i] = torch.tensor(lst)[torch.randperm(n_sel + 2, generator=g)]
    return idx.to(DEVICE)


def as_errors(B, H, T, D, block, dtype, seed=0):
    from kernels.adaptive_sparse import block_sparse_attention
    g = torch.Generator().manual_seed(seed)
    nq = math.ceil(T / block)
    idx = random_lists(B, H, nq, 2, g)
    q, k, v, do = (randn(B, H, T, D, g=g, dtype=dtype) for _ in range(4))
    bias = randn(B, H, nq, 4, g=g, dtype=torch.float32)
    pad = lambda t: F.pad(t, (0, 0, 0, nq * block - T))  # noqa: E731
    got = _grads(lambda q, k, v, b: block_sparse_attention(q, k, v, idx, b, block), (q, k, v, bias), do)
    want = _grads(lambda q, k, v, b: AS.as_block_sparse_attention_torch(pad(q), pad(k), pad(v), idx, b, block)[:, :, :T],
                  [t.double() for t in (q, k, v, bias)], do.double())
    return errors(got, want, ("o", "dq", "dk", "dv", "dbias"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,D,block", [(1, 2, 50, 24, 16), (1, 1, 70, 64, 32)])
def test_adaptive_sparse(B, H, T, D, block, dtype):
    # dbias sums dS over a tile, and dS sums to zero over a row: in bfloat16 the cancellation
    # magnifies delta = dO . O taken from the rounded bfloat16 O (as FlashAttention does) to ~2e-2
    looser = {"dbias": 3e-2} if dtype == torch.bfloat16 else {}
    assert_within(as_errors(B, H, T, D, block, dtype), TOL[dtype], **looser)


# ------------------------------------------------------------------------------- kernel-hashing
def kh_rect_errors(dtype, G=3, s=23, d=16, block=5, m=7, seed=4):
    """One hashed level (block keys plus samples) through the kernel: o and lse, and the gradients
    of q, k, v from upstream gradients on both, against the level written densely."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (randn(G, s, d, g=g, dtype=dtype) for _ in range(4))
    dlse = randn(G, s, g=g, dtype=torch.float32)
    rq, rk = KH._kh_level_ranks(q[None].double(), k[None].double(), 0, 13, 4)
    plan = KH._kh_plan(rq[:, :, None], rk[:, :, None], 0, torch.tensor([0], device=DEVICE),
                      torch.arange(s, device=DEVICE), 13, block, m)
    assert plan["s_idx"] is not None

    def run(q, k, v, dense):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        if dense:
            x = leaves[0] @ leaves[1].transpose(1, 2) / math.sqrt(d) + KH._kh_plan_log_weights(plan, q.dtype)
            o, lse = torch.softmax(x, -1) @ leaves[2], torch.logsumexp(x, -1)
        else:
            o, lse = KH._kh_rect_triton(*leaves, plan, d ** -0.5)
        grads = torch.autograd.grad((o.double() * do.double()).sum() + (lse.double() * dlse.double()).sum(), leaves)
        return [o, lse, *grads]

    return errors(run(q, k, v, False), run(q.double(), k.double(), v.double(), True), ("o", "lse", "dq", "dk", "dv"))


def kh_diag_errors(dtype, B=1, H=2, c=32, n=3, d=24, seed=5):
    """Exact causal attention inside chunks of c tokens (the diagonal mode) against SDPA."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (randn(B, H, c * n, d, g=g, dtype=dtype) for _ in range(4))

    def dense(q, k, v):
        ch = lambda t: t.reshape(B, H, n, c, d)  # noqa: E731
        return F.scaled_dot_product_attention(ch(q), ch(k), ch(v), is_causal=True).reshape(B, H, n * c, d)

    got = _grads(lambda q, k, v: KH._kh_diag_triton(q, k, v, c, d ** -0.5)[0], (q, k, v), do)
    want = _grads(dense, [t.double() for t in (q, k, v)], do.double())
    return errors(got, want, ("o", "dq", "dk", "dv"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_hashing_level(dtype):
    assert_within(kh_rect_errors(dtype), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_hashing_diagonal(dtype):
    assert_within(kh_diag_errors(dtype), TOL[dtype])


def test_kernel_hashing_whole_block_fp32():
    """Chunks and every level through the Triton backend against the PyTorch backend, float32
    (bfloat16 inputs could hash differently in the two backends' arithmetic)."""
    g = torch.Generator().manual_seed(45)
    q, k, v, go = (randn(1, 2, 45, 24, g=g, dtype=torch.float32) for _ in range(4))
    outs = [_grads(lambda q, k, v: KH.kernel_hashing_attention(q, k, v, 8, 5, 6, 4, 21, backend=b), (q, k, v), go)
            for b in ("triton", "torch")]
    assert_within(errors(outs[0], outs[1], ("o", "dq", "dk", "dv")), TOL[torch.float32])


# --------------------------------------------------------------------------- generative-function
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn,avg", [("min", False), ("max", True), ("mean", True)])
def test_generative(fn, avg, dtype):
    from kernels.generative import generative_function
    from model import CausalGenerativeFunction, GPTConfig
    g = torch.Generator().manual_seed(5)
    x, dy = randn(2, 45, 40, g=g, dtype=dtype), randn(2, 45, 40, g=g, dtype=dtype)
    mix = CausalGenerativeFunction(GPTConfig(gf_fn=fn, gf_avg_context=avg))
    mix.use_triton = False
    got = _grads(lambda x: generative_function(x, fn, avg, block_t=16)[0], [x], dy)
    want = _grads(mix, [x.double()], dy.double())
    assert_within(errors(got, want, ("y", "dx")), TOL[dtype])


# ---------------------------------------------------------------------------------- the harness
def test_device_and_nan_poisoned_outputs():
    """The kernels run where conftest says, and fresh buffers there are NaN (so unwritten output
    elements cannot pass as zeros)."""
    assert INTERPRETED == (DEVICE == "cpu")
    assert torch.isnan(torch.empty(4, 8, device=DEVICE)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3, device=DEVICE, dtype=torch.bfloat16))).all()
