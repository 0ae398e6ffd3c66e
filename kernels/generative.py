"""The causal generative function (GenerativeFunction and ACTIVATION["generative"] in model.py):
how it is computed.

    reference (PyTorch)  gf_compare (the elementwise f, tie rule included) and generative_function_torch
    CPU-fast path        the reference: one shift, one cumulative sum and a few elementwise ops
    entry point          causal_generative_function: the fused kernels on CUDA, PyTorch elsewhere
    Triton kernels       generative_function (GenerativeFunctionTriton): forward and backward, below

Triton kernels for the generative-function block (Hilsenbek, "Breaking the Attention
Bottleneck", 2024): the shift, the comparison and the running mean fused into one pass.

    p_t = x_{t-1} (p_0 = x_0)          m_t = (x_0 + ... + x_t) / (t + 1)
    y_t = f(x_t, p_t)                  or, with the average context, f(x_t, p_t, m_t)
    f in {min, max, mean}, elementwise over the channels

Forward writes y and, for min/max, which argument won (int8: 0 x_t, 1 x_{t-1}, 2 m_t);
the backward needs only that and dy, not x.

Gradient at ties of min/max: the whole gradient goes to ONE argument, the first in the
order (x_t, x_{t-1}, m_t); a later argument wins only if it is strictly smaller (larger).
torch.minimum would split a tie in halves; the PyTorch path above uses the same
strict comparisons and torch.where, so both paths agree exactly. So

    dx_t = dy_t [won_t = 0] + dy_{t+1} [won_{t+1} = 1] + sum_{s >= t} dy_s [won_s = 2] / (s + 1)

(p_0 = x_0 ties with x_0, so won_0 is never 1). For f = mean every argument gets 1/2 of
dy (1/3 with the context), and x_0 gets its share as p_0 too.

Layout: x is (B, T, C) contiguous, T * C < 2^31. A program owns BLOCK_C channels of one sequence and
a span of T, walked in BLOCK_T chunks. Without the context the span is one chunk (every
tile independent); with it the span is the whole sequence and a running sum carries
between chunks (forward left to right, backward right to left), tl.cumsum inside a chunk.
"""
import torch

from kernels._triton import HAS_TRITON, tl, triton

# ------------------------------------------------------------------------------- reference (PyTorch)

def gf_compare(x, prev, mean, fn):
    """y = f(x, prev[, mean]) elementwise, f in {min, max, mean}. Returns (y, took_prev,
    took_mean): boolean maps of where prev / mean won (None for f = mean or no mean).

    Ties of min/max: the gradient goes whole to ONE argument, the first in the order
    (x, prev, mean) -- a later argument must be strictly smaller (larger) to win, and
    torch.where routes the gradient to the winner only (torch.minimum would split a tie
    in halves). The Triton kernels apply the same rule."""
    if fn == "mean":
        y = (x + prev) / 2.0 if mean is None else (x + prev + mean) / 3.0
        return y, None, None
    beats = torch.lt if fn == "min" else torch.gt
    took_prev = beats(prev, x)
    y = torch.where(took_prev, prev, x)
    took_mean = None
    if mean is not None:
        took_mean = beats(mean, y)
        y = torch.where(took_mean, mean, y)
    return y, took_prev, took_mean


def generative_function_torch(x, fn, avg_context):
    """y_t = f(x_t, x_{t-1}[, m_t]) on (B, T, C) in PyTorch; returns gf_compare's (y, took_prev, took_mean)."""
    prev = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # x_{t-1}; the first token meets itself
    mean = None
    if avg_context:  # causal running mean: position t sees x_0..x_t only
        n = torch.arange(1, x.size(1) + 1, device=x.device, dtype=x.dtype)
        mean = x.cumsum(dim=1) / n[:, None]
    return gf_compare(x, prev, mean, fn)


# ------------------------------------------------------------------------------- CPU-fast path
# generative_function_torch above: elementwise, nothing to chunk or fuse on a CPU

# ------------------------------------------------------------------------------- entry point

def causal_generative_function(x, fn, avg_context, use_triton=None):
    """y_t = f(x_t, x_{t-1}[, m_t]) on (B, T, C). Returns (y, took_prev, took_mean): boolean maps of
    where x_{t-1} / m_t won (None for f = mean). use_triton None: the fused kernels on CUDA when
    triton is installed; True/False forces a path."""
    if use_triton is None:
        use_triton = x.is_cuda and HAS_TRITON
    if not use_triton:
        return generative_function_torch(x, fn, avg_context)
    y, won = generative_function(x, fn, avg_context)
    return (y, None, None) if won is None else (y, won == 1, won == 2)


# ------------------------------------------------------------------------------- Triton kernels

FN_CODE = {"min": 0, "max": 1, "mean": 2}
BLOCK_T, BLOCK_C = 32, 32  # tile: tokens x channels (8 elements a thread at 4 warps)


@triton.jit
def _gf_tile(T, C, stride_b, span, BLOCK_C: tl.constexpr):
    """This program's tile: its sequence's base offset (64-bit, so offsets inside it can be
    32-bit), its channels c with their mask, and its span [t_start, t_end) of T."""
    n_cblocks = tl.cdiv(C, BLOCK_C)
    base = (tl.program_id(0) // n_cblocks).to(tl.int64) * stride_b
    c = (tl.program_id(0) % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_start = tl.program_id(1) * span
    t_end = tl.minimum(t_start + span, T)
    return base, c, c < C, t_start, t_end


@triton.jit
def _gf_fwd_kernel(X, Y, WON, T, C, stride_b, stride_t, span,
                   FN: tl.constexpr, AVG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    base, c, c_ok, t_start, t_end = _gf_tile(T, C, stride_b, span, BLOCK_C)
    X += base
    Y += base
    WON += base
    run = tl.zeros([BLOCK_C], dtype=tl.float32)  # sum of x over the chunks already done
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < t_end)[:, None] & c_ok[None, :]
        offs = t[:, None] * stride_t + c[None, :]
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        t_prev = tl.maximum(t - 1, 0)  # the first token is compared with itself
        p = tl.load(X + t_prev[:, None] * stride_t + c[None, :], mask=ok, other=0.0).to(tl.float32)
        if AVG:
            csum = tl.cumsum(x, axis=0) + run[None, :]
            m = csum / (t + 1).to(tl.float32)[:, None]
            run += tl.sum(x, axis=0)
        if FN == 2:  # mean
            if AVG:
                y = (x + p + m) / 3.0
            else:
                y = (x + p) / 2.0
        else:
            if FN == 0:
                take_p = p < x
            else:
                take_p = p > x
            y = tl.where(take_p, p, x)
            won = tl.where(take_p, 1, 0)
            if AVG:
                if FN == 0:
                    take_m = m < y
                else:
                    take_m = m > y
                y = tl.where(take_m, m, y)
                won = tl.where(take_m, 2, won)
            tl.store(WON + offs, won.to(tl.int8), mask=ok)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _gf_bwd_kernel(DY, WON, DX, T, C, stride_b, stride_t, span,
                   FN: tl.constexpr, AVG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    base, c, c_ok, t_start, t_end = _gf_tile(T, C, stride_b, span, BLOCK_C)
    n_chunks = tl.cdiv(t_end - t_start, BLOCK_T)
    DY += base
    WON += base
    DX += base
    run = tl.zeros([BLOCK_C], dtype=tl.float32)  # sum over later chunks of dy_s [m_s won] / (s + 1)
    for i in range(n_chunks):  # right to left: the running mean sends gradient backwards in time
        t = t_start + (n_chunks - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = (t < t_end)[:, None] & c_ok[None, :]
        offs = t[:, None] * stride_t + c[None, :]
        ok_next = (t + 1 < T)[:, None] & c_ok[None, :]  # x_t is the previous token of y_{t+1}
        g = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        g_next = tl.load(DY + offs + stride_t, mask=ok_next, other=0.0).to(tl.float32)
        if FN == 2:  # mean: every argument gets 1/k of the gradient
            if AVG:
                k = 3.0
            else:
                k = 2.0
            dx = (g + g_next) / k + tl.where((t == 0)[:, None], g / k, 0.0)  # p_0 is x_0
            if AVG:
                w = g / k
        else:
            won = tl.load(WON + offs, mask=ok, other=0)
            won_next = tl.load(WON + offs + stride_t, mask=ok_next, other=0)
            dx = tl.where(won == 0, g, 0.0) + tl.where(won_next == 1, g_next, 0.0)
            if AVG:
                w = tl.where(won == 2, g, 0.0)
        if AVG:
            w = w / (t + 1).to(tl.float32)[:, None]
            dx += tl.cumsum(w, axis=0, reverse=True) + run[None, :]
            run += tl.sum(w, axis=0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)


def _launch_shape(x, avg, block_t, block_c):
    B, T, C = x.shape
    span = T if avg else block_t  # the running mean needs one program to walk the whole sequence
    return (B * triton.cdiv(C, block_c), triton.cdiv(T, span)), max(span, 1)


class GenerativeFunctionTriton(torch.autograd.Function):
    """y = f(x_t, x_{t-1}[, m_t]) on (B, T, C) with the fused kernels; returns (y, won),
    won an int8 map of the winning argument (None for f = mean)."""

    @staticmethod
    def forward(ctx, x, fn, avg, block_t=BLOCK_T, block_c=BLOCK_C):
        x = x.contiguous()
        B, T, C = x.shape
        y = torch.empty_like(x)
        track = fn != "mean"
        won = torch.empty((B, T, C) if track else (1,), dtype=torch.int8, device=x.device)
        grid, span = _launch_shape(x, avg, block_t, block_c)
        _gf_fwd_kernel[grid](x, y, won, T, C, x.stride(0), x.stride(1), span,
                             FN=FN_CODE[fn], AVG=bool(avg), BLOCK_T=block_t, BLOCK_C=block_c)
        ctx.save_for_backward(won)
        ctx.cfg = (fn, bool(avg), block_t, block_c)
        ctx.mark_non_differentiable(won)
        return y, (won if track else None)

    @staticmethod
    def backward(ctx, dy, _dwon):
        fn, avg, block_t, block_c = ctx.cfg
        (won,) = ctx.saved_tensors
        dy = dy.contiguous()
        B, T, C = dy.shape
        dx = torch.empty_like(dy)
        grid, span = _launch_shape(dy, avg, block_t, block_c)
        _gf_bwd_kernel[grid](dy, won, dx, T, C, dy.stride(0), dy.stride(1), span,
                             FN=FN_CODE[fn], AVG=avg, BLOCK_T=block_t, BLOCK_C=block_c)
        return dx, None, None, None, None


def generative_function(x, fn="min", avg_context=False, block_t=BLOCK_T, block_c=BLOCK_C):
    """Fused causal generative function; see the module docstring. Returns (y, won)."""
    assert fn in FN_CODE, f"unknown generative function {fn!r}"
    return GenerativeFunctionTriton.apply(x, fn, avg_context, block_t, block_c)


def _cases():
    """Each f and both context settings in float32 (max differs from min only in the sign of
    a comparison, so only with the context), and min with the context in bfloat16 (the MLP
    activation's input dtype under autocast)."""
    sig = {"T": "i32", "C": "i32", "stride_b": "i32", "stride_t": "i32", "span": "i32",
           "FN": "constexpr", "AVG": "constexpr", "BLOCK_T": "constexpr", "BLOCK_C": "constexpr"}
    variants = [("min", False, "fp32"), ("min", True, "fp32"), ("max", True, "fp32"),
                ("mean", False, "fp32"), ("mean", True, "fp32"), ("min", True, "bf16")]
    cases = []
    for fn, avg, dtype in variants:
        tag = f"{fn}{'_avg' if avg else ''}_{dtype}"
        consts = dict(FN=FN_CODE[fn], AVG=avg, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
        cases.append((f"fwd_{tag}", _gf_fwd_kernel, {"X": f"*{dtype}", "Y": f"*{dtype}", "WON": "*i8", **sig}, consts))
        cases.append((f"bwd_{tag}", _gf_bwd_kernel, {"DY": f"*{dtype}", "WON": "*i8", "DX": f"*{dtype}", **sig}, consts))
    return cases


# both kernels in the variants above, for sm_80 and sm_90: python -m kernels.gpu_compile
COMPILE_CASES = _cases()
