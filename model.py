"""
attnlab model: one GPT, five interchangeable token-mixing blocks.

Every token-mixing block maps (B, T, C) -> (B, T, C), is causal, and is
registered by name in the ATTENTION table; `--attention=NAME` picks one.
A block's contract (see DenseAttention for the smallest example):

    __init__(config)              build from GPTConfig
    forward(x) -> y               full causal pass over (B, T, C)
    decode(x, state) -> (y, st)   incremental pass over new tokens x (B, t, C);
                                  state is None at the start of a sequence
    aux_loss                      optional tensor set in forward (added to the loss)
    extra_metrics() -> dict       optional floats logged at every evaluation
    attn_flops_per_token(T)       forward+backward FLOPs of the mixing itself
    uses_absolute_positions       class flag: False drops the wpe table and lets
                                  generation run past block_size without cropping
    has_input_norm                class flag: True if the block normalises its own
                                  input, so the Block skips its pre-LayerNorm

The section for each block below cites its paper and states its equations and cost.
"""

import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # bias in Linears and LayerNorms (nanoGPT default: off)
    mlp_ratio: float = 4.0  # MLP inner width = mlp_ratio * n_embd; 0 removes the MLP
    mlp_activation: str = "gelu"  # a name in ACTIVATION
    attention: str = "dense"  # a name in ATTENTION
    # block-specific knobs, prefixed by the block they belong to; each section owns its lines
    # vq (Transformer-VQ)
    vq_codebook_size: int = 128
    vq_block_len: int = 32
    vq_d_k: int = 128
    vq_d_v_mult: float = 2.0
    vq_n_head: int = 1
    vq_beta: float = 1e-4
    vq_ema_decay: float = 0.99
    vq_gau_layout: bool = False
    # kernel-hashing (LSH + sampling)
    kh_hash_bits: int = 8  # hyperplanes per hash; buckets are read in Gray-code order
    kh_bucket_block: int = 32  # keys per hashed block: the heavy entries a query scores exactly
    kh_samples: int = 32  # uniformly sampled keys per past rectangle, weighted n/m
    kh_min_seq_len: int = 64  # exact causal attention inside chunks of this many tokens
    # adaptive-sparse (learned block scoring)
    as_block: int = 16
    as_threshold: float = 0.9
    as_k_min: int = 1
    as_k_max: int = 8
    as_score_dim: int = 32
    as_dense_equivalent: bool = False
    # generative-function (Hilsenbek 2024)
    gf_fn: str = "min"  # f in y_t = f(x_t, x_{t-1}): min (the paper's), max or mean
    gf_avg_context: bool = False  # also compare with the causal running mean of x_0..x_t


ATTENTION = {}  # name -> token-mixing block class; filled at the end of each section
ACTIVATION = {"gelu": lambda config: nn.GELU()}  # name -> factory(config) for the MLP


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


# --------------------------------------------------------------------------------------
# dense: causal softmax attention
# --------------------------------------------------------------------------------------


class DenseAttention(nn.Module):
    """Causal multi-head softmax attention (Vaswani et al., "Attention Is All You Need", 2017).

        q, k, v = x W_q, x W_k, x W_v            split into n_head heads of size d
        o_t = sum_{s<=t} softmax_s(q_t . k_s / sqrt(d)) v_s
        y = o W_o

    Computed by torch's scaled_dot_product_attention (flash / memory-efficient
    kernels where available). Cost per layer: O(T^2 d) time; O(T d) memory with a
    fused kernel, O(T^2) with the math fallback. Decode state: a KV cache, O(T d).
    """

    uses_absolute_positions = True
    has_input_norm = False

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]

    def _out(self, y):
        B, H, T, D = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, H * D)))

    def forward(self, x):
        q, k, v = self._heads(x)
        p = self.dropout if self.training else 0.0
        return self._out(F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True))

    def decode(self, x, state):
        q, k, v = self._heads(x)
        if state is not None:  # append the new keys/values to the cache
            k, v = torch.cat([state[0], k], dim=2), torch.cat([state[1], v], dim=2)
        t, S = q.shape[2], k.shape[2]
        if t == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new query sees the whole cache
        else:  # queries sit at the last t positions: bottom-right aligned causal mask
            mask = torch.ones(t, S, dtype=torch.bool, device=x.device).tril(S - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._out(y), (k, v)

    def attn_flops_per_token(self, T):
        # QK^T and AV, forward + backward (x3), 2 flops per MAC; as nanoGPT counts it
        return 12 * self.c_proj.in_features * T


ATTENTION["dense"] = DenseAttention

# --------------------------------------------------------------------------------------
# vq: Transformer-VQ (vector-quantized keys, block-wise attention, compressive cache)
# --------------------------------------------------------------------------------------
#
# Lucas D. Lingle, "Transformer-VQ: Linear-Time Transformers via Vector Quantization",
# ICLR 2024 (arXiv:2309.16354). One gated attention unit (GAU) per layer by default:
#
#     x~ = RMSNorm(x)                                      (gain, no mean-centering)
#     q = RMSNorm(x~ W_q) d_k^-1/4,  k = RMSNorm(x~ W_k) d_k^-1/4    (norms without gain)
#     v = SiLU(x~ W_v),  g = SiLU(x~ W_g),  y = (o * g) W_o           (no biases)
#
# Keys are vector-quantized against a codebook C of S codes, with the straight-through
# estimator (forward value exactly c_z, gradient passed to k):
#
#     z_t = argmin_s |k_t - c_s|^2,   k^_t = sg(c_z) + k_t - sg(k_t)
#     commitment loss  beta * mean_t |k_t - sg(c_z_t)|^2  (summed over heads), in aux_loss
#     C = sums / max(counts, 0.01); in training forwards, from the batch (all-reduced under DDP):
#         counts_s <- g counts_s + (1-g) #{t: z_t = s},  sums_s <- g sums_s + (1-g) sum_{z_t=s} k_t
#     (buffers, never touched by the optimizer; g = vq_ema_decay)
#
# Block-wise attention with block length L. A query i in block r attends exactly to the keys
# j <= i of its own block and to all of block r-1; every older key (blocks <= r-2) is in a
# compressive cache: per code s, its count N_s(r) and the mean of its values vbar_s(r):
#
#     logit_ij = (q_i + u) . k^_j + (q_i + w) . R_{i-j} [i-j <= L]    window (Transformer-XL bias)
#     logit_is = (q_i + u) . c_s + log N_s(r)      (-inf when N_s(r) = 0)   cache
#     o_i = sum_j a_ij v_j + sum_s a_is vbar_s(r),  a = one softmax over window and cache
#
# Because q . k^_j = q . c_{z_j}, the cache part equals exactly the sum over the cached keys,
# so without the position terms (u = w = 0, no R) o is dense causal softmax attention over
# the quantized keys k^. The cache (N, vbar per block) is built by cumulative sums over
# blocks. Gradients: exact for q, v and every window key; a key older than the previous
# block is represented by its codeword c_z, a constant, so the cache passes no gradient to k
# (as in the paper's official code); k also gets the commitment-loss gradient.
#
# Relative position bias (Transformer-XL, Dai et al. 2019, as in the official code):
# R_d = W_r sin(d) d_k^-1/4 for distances d = 0..L (sinusoids of width n_embd), learned u and
# w vectors (zero-initialised); the cache gets the content bias u but no position term, and
# window keys further than L get none. The GPT therefore has no absolute position table.
#
# Cost per layer, T tokens, d = d_k + d_v, no T x T tensor in forward or backward. Two paths
# compute the same function:
# - Triton kernels (kernels/vq.py, forward and backward) on CUDA, block by block: a query
#   scores 2L window keys and S codes; the cache (counts N, value sums U) is kept per block,
#   built by cumulative sums over blocks. Time O(T (L + S) d), memory O(T d + (T/L) S d_v).
# - PyTorch on CPU (and wherever Triton is missing), chunk by chunk: a chunk of G blocks
#   (C = G L positions, G about S / L) scores key by key the block before it and itself, since
#   q . k^_j = q . c_z_j gives an old key the logit its code has in the cache, and only the
#   blocks older than that go through a cache kept per chunk. Time O(T (S + L + C) d) =
#   O(T (L + S) d); memory O(T d + (T/C) S d_v) = O(T d). Fewer, larger matrix products and a
#   cache G times smaller than block by block, which is what makes it fast on a CPU.
# Decode: O(1) state per layer (the current and previous block, N and the value sums per
# code) and O(L + S) time per token, independent of the context length.
#
# vq_n_head > 1 splits d_k per head into separate heads with their own codebooks (d_v split
# across heads, one shared gate); vq_gau_layout=True stacks two GAUs in the module (the
# paper's layout; pair it with mlp_ratio=0 for two GAUs and no MLP per layer).

try:
    from kernels.vq import vq_block_attention as _vq_block_attention_triton
except ImportError:  # no triton: the PyTorch path is used everywhere
    _vq_block_attention_triton = None


def _f32(t):
    """Attention arithmetic runs in float32 at least (bfloat16/float16 inputs are upcast)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _RMSNorm(torch.autograd.Function):
    """y = x / rms(x) * w * scale over the last dimension (w may be None), with eps inside the
    root. The same function as F.rms_norm, in fewer passes over memory and fewer temporaries
    than its composite CPU form (it saves x and the per-row 1/rms, not the normalised x)."""

    @staticmethod
    def forward(ctx, x, w, scale, eps):
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, r, w)
        ctx.scale = scale
        return x * (r * scale) if w is None else (x * r).mul_(w * scale)

    @staticmethod
    def backward(ctx, dy):
        x, r, w = ctx.saved_tensors
        h = dy * (r * ctx.scale)  # gradient wrt x/rms, times 1/rms
        dw = None
        if w is not None:
            if ctx.needs_input_grad[1]:
                dw = (h * x).flatten(0, -2).sum(0)
            h = h.mul_(w)
        # dx = (g - xhat mean(g xhat)) / rms with g the gradient wrt xhat = x / rms
        c = torch.linalg.vecdot(h, x).unsqueeze(-1).mul_(r * r / -x.shape[-1])
        return torch.addcmul(h, x, c), dw, None, None


def rms_norm(x, weight=None, scale=1.0, eps=1e-6):
    """RMSNorm over the last dimension, times an optional gain and a constant scale."""
    if x.is_cuda:  # fused there
        return F.rms_norm(x, (x.shape[-1],), weight, eps=eps) * scale
    return _RMSNorm.apply(x, weight, scale, eps)


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly the codewords. Backward: the gradient goes to the keys unchanged."""

    @staticmethod
    def forward(ctx, k, codewords):
        return codewords.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _scan(x, reverse=False, G=4):
    """Inclusive cumulative sum of x (N, R, M) over R (from the end if reverse), as a few
    matmuls: a lower-triangular (G, G) matrix sums inside chunks of G rows, and the chunk
    totals are scanned recursively. torch.cumsum over a middle dimension is far slower on CPU."""
    N, R, M = x.shape
    if x.is_cuda:  # fast there, and exact (the matmul below could run in TF32)
        return x.flip(1).cumsum(1).flip(1) if reverse else x.cumsum(1)
    if R == 1:
        return x
    G = min(G, R)
    C = -(-R // G)
    xc = (F.pad(x, (0, 0, 0, C * G - R)) if C * G > R else x).reshape(N, C, G, M)
    tri = torch.ones(G, G, device=x.device, dtype=x.dtype)
    tri = tri.triu() if reverse else tri.tril()
    y = tri @ xc  # scan inside each chunk, (N, C, G, M)
    if C > 1:
        tot = y[:, :, 0] if reverse else y[:, :, -1]  # chunk totals, (N, C, M)
        y += (_scan(tot, reverse, G) - tot).unsqueeze(2)  # plus the exclusive scan of the totals
    return y.view(N, C * G, M)[:, :R]


class _CacheSums(torch.autograd.Function):
    """Value sums U (N, R, S, d_v) per cache row r and code s, from values v (N, T, d_v) with
    codes z (N, T): position t counts in rows r >= first[t] (first (T,) non-decreasing). Forward:
    an index_add at row first[t], then a cumulative sum over rows. Backward: the reverse
    cumulative sum, read back at each position's row (zero where first[t] >= R)."""

    @staticmethod
    def forward(ctx, v, z, first, R, S):
        N, T, dv = v.shape
        n_rows = max(R, int(first.max()) + 1)  # rows past R take the positions no row uses
        rows = (first * S + z + torch.arange(N, device=z.device)[:, None] * (n_rows * S)).view(-1)
        U = v.new_zeros(N * n_rows * S, dv).index_add_(0, rows, v.reshape(-1, dv))
        ctx.save_for_backward(z, first)
        ctx.shape = (R, S)
        return _scan(U.view(N, -1, S * dv)[:, :R]).view(N, R, S, dv)

    @staticmethod
    def backward(ctx, g):
        z, first = ctx.saved_tensors
        R, S = ctx.shape
        N, dv, T = g.shape[0], g.shape[-1], z.shape[1]
        g = _scan(g.reshape(N, R, S * dv), reverse=True).reshape(N * R * S, dv)
        rows = first.clamp(max=R - 1) * S + z + torch.arange(N, device=z.device)[:, None] * (R * S)
        dv_ = g.index_select(0, rows.view(-1)).view(N, T, dv)
        dv_[:, int((first < R).sum()):] = 0  # positions that enter no row of the cache
        return dv_, None, None, None, None


def _cache(z, v, first, R, S):
    """Counts N (B, H, R, S) and value sums U (B, H, R, S, d_v) of the positions t with
    first[t] <= r, for z (B, H, T) codes and v (B, H, T, d_v) values (U differentiable in v)."""
    B, H, T = z.shape
    dv = v.shape[-1]
    slot = first * S + z  # (B, H, T)
    counts = torch.zeros(B, H, (int(first.max()) + 1) * S, device=z.device, dtype=v.dtype).scatter_add_(
        2, slot, torch.ones_like(slot, dtype=v.dtype))
    counts = counts.view(B, H, -1, S)[:, :, :R].cumsum(2)
    sums = _CacheSums.apply(v.reshape(B * H, T, dv), z.reshape(B * H, T), first, R, S)
    return counts, sums.view(B, H, R, S, dv)


def vq_compressive_cache(z, v, S, L):
    """Per-block cache of the keys in blocks <= r-2, by cumulative sums over blocks: counts
    N (B, H, R, S) per code and value sums U (B, H, R, S, d_v) (differentiable in v).
    z (B, H, R*L) codes, v (B, H, R*L, d_v) values."""
    Tp = z.shape[2]
    # key t enters at block t//L + 2, so that the inclusive sum at block r covers blocks 0..r-2
    return _cache(z, v, torch.arange(Tp, device=z.device) // L + 2, Tp // L, S)


def vq_block_attention_torch(q, k, v, bias, codebook, counts, sums, L):
    """Block-wise attention, PyTorch. Same arguments as kernels/vq.py's VQBlockAttention:
    q, k (B, H, R*L, d_k), v (B, H, R*L, d_v), bias (B, H, R*L, L+1) or None (no position bias),
    codebook (H, S, d_k), counts N (B, H, R, S), value sums U (B, H, R, S, d_v). Returns (B, H, R*L, d_v)."""
    B, H, Tp, dk = q.shape
    R, dv = Tp // L, v.shape[-1]
    qb, kb, vb = q.view(B, H, R, L, dk), k.view(B, H, R, L, dk), v.view(B, H, R, L, dv)
    i = torch.arange(L, device=q.device)
    dist = i[:, None] - i[None, :]  # query-to-key distance inside a block; L more to the previous one
    # logits against the block itself and against the previous one (none for block 0)
    s_cur = qb @ kb.transpose(-1, -2)  # (B, H, R, L, L)
    s_prev = F.pad(qb[:, :, 1:] @ kb[:, :, :-1].transpose(-1, -2), (0, 0, 0, 0, 1, 0), value=float("-inf"))
    if bias is not None:
        bias = bias.view(B, H, R, L, L + 1)
        s_cur = s_cur + torch.gather(bias, -1, dist.clamp(min=0).expand(B, H, R, L, L))
        s_prev = s_prev + torch.gather(bias, -1, (dist + L).clamp(max=L).expand(B, H, R, L, L)) * (dist <= 0)
    s_cur = s_cur.masked_fill(dist < 0, float("-inf"))
    logn = torch.where(counts > 0, counts.clamp(min=1).log(), torch.full_like(counts, float("-inf")))
    s_cache = (q @ codebook.transpose(-1, -2)).view(B, H, R, L, -1) + logn.unsqueeze(3)
    a = torch.softmax(torch.cat([s_prev, s_cur, s_cache], dim=-1), dim=-1)
    a_prev, a_cur, a_cache = a.split([L, L, a.shape[-1] - 2 * L], dim=-1)
    # cache values are the means U / N: divide the (small) weights instead of the sums
    w_cache = a_cache / counts.clamp(min=1).unsqueeze(3)
    S = w_cache.shape[-1]
    o = (a_cur @ vb).view(-1, L, dv).baddbmm_(w_cache.reshape(-1, L, S), sums.reshape(-1, S, dv))
    o = o.view(B, H, R, L, dv)
    o[:, :, 1:] += a_prev[:, :, 1:] @ vb[:, :, :-1]
    return o.view(B, H, Tp, dv)


def _chunk_scores(x, y, L, before_first):
    """s = x [y_before | y_chunk]^T per chunk: x, y (B, H, n, C, d) -> (B, H, n, C, L+C), where
    y_before is the last block of the previous chunk; before_first fills the first chunk's."""
    B, H, n, C, _ = x.shape
    s = x.new_empty(B, H, n, C, L + C)
    s[..., L:] = x @ y.transpose(-1, -2)
    s[:, :, 0, :, :L] = before_first
    s[:, :, 1:, :, :L] = x[:, :, 1:] @ y[:, :, :-1, C - L:].transpose(-1, -2)
    return s


def _chunk_mix(a, y, L):
    """The product back: a [y_before | y_chunk], a (B, H, n, C, L+C) -> (B, H, n, C, d)."""
    C = y.shape[3]
    o = a[..., L:] @ y
    o[:, :, 1:] += a[:, :, 1:, :, :L] @ y[:, :, :-1, C - L:]
    return o


def _chunk_mix_t(a, x, L):
    """The transposed product: a^T x, each chunk's first L columns of a landing on the last
    block of the previous chunk (nothing for the first chunk's)."""
    C = x.shape[3]
    o = a[..., L:].transpose(-1, -2) @ x
    o[:, :, :-1, C - L:] += a[:, :, 1:, :, :L].transpose(-1, -2) @ x[:, :, 1:]
    return o


class _ChunkLogits(torch.autograd.Function):
    """Content logits of each chunk's queries (B, H, n, C, .) against the block before the
    chunk and the chunk itself: s (B, H, n, C, L+C), -inf before the first chunk. Backward:
    q gets every pair's gradient; a key only the pairs inside its queries' window (own or
    next block), since an older pair stands for a cache entry, whose key is a codeword."""

    @staticmethod
    def forward(ctx, q, k, L):
        ctx.save_for_backward(q, k)
        ctx.L = L
        return _chunk_scores(q, k, L, float("-inf"))

    @staticmethod
    def backward(ctx, ds):
        q, k = ctx.saved_tensors
        L, C = ctx.L, q.shape[3]
        p = torch.arange(C, device=q.device)
        e = torch.arange(L + C, device=q.device)
        window = e[None, :] // L >= p[:, None] // L  # key block >= query block - 1 (column e is position e - L)
        return _chunk_mix(ds, k, L), _chunk_mix_t(ds * window, q, L), None


class _ChunkMix(torch.autograd.Function):
    """The values side of _ChunkLogits: o = a [v_before | v_chunk], a (B, H, n, C, L+C),
    v (B, H, n, C, d_v), without copying the values into windows."""

    @staticmethod
    def forward(ctx, a, v, L):
        ctx.save_for_backward(a, v)
        ctx.L = L
        return _chunk_mix(a, v, L)

    @staticmethod
    def backward(ctx, do):
        a, v = ctx.saved_tensors
        return _chunk_scores(do, v, ctx.L, 0.0), _chunk_mix_t(a, do, ctx.L), None


def vq_chunk_attention_torch(q, k, z, v, bias, codebook, L, G):
    """Block-wise VQ attention computed chunk by chunk, the CPU path: the same result as
    vq_block_attention_torch over vq_compressive_cache(z, v, S, L), with no per-block cache.
    A chunk is G blocks, C = G L positions. Its queries attend key by key, with logits
    q . k^_j, to the block before the chunk and to the chunk itself: window pairs (own and
    previous block) with the position bias, older pairs as the cache would count them
    (q . k^_j = q . c_z_j, no gradient to k). Blocks older than that are in a per-chunk cache
    (counts and value sums by cumulative sums over chunks): (T/C) S d_v floats instead of
    (T/L) S d_v, for (L + C) keys per query instead of 2L. G = 1 is the block-wise form.
    k must hold the quantized keys (values equal to the codewords of z), as VQGatedUnit's do.
    q, k, v (B, H, n*C, .), z (B, H, n*C), bias (B, H, n*C, L+1) or None. Returns (B, H, n*C, d_v)."""
    B, H, Tp, dk = q.shape
    C, S, dv = G * L, codebook.shape[1], v.shape[-1]
    n = Tp // C
    # the chunk cache of chunk c holds the positions t < c C - L: t enters at chunk (t + L) // C + 1
    counts, sums = _cache(z, v, (torch.arange(Tp, device=z.device) + L) // C + 1, n, S)
    logn = torch.where(counts > 0, counts.clamp(min=1).log(), torch.full_like(counts, float("-inf")))
    s_cache = (q @ codebook.transpose(-1, -2)).view(B, H, n, C, S) + logn.unsqueeze(3)
    vc = v.view(B, H, n, C, dv)
    s_keys = _ChunkLogits.apply(q.view(B, H, n, C, dk), k.view(B, H, n, C, dk), L)  # (B, H, n, C, L+C)
    dist = torch.arange(C, device=q.device)[:, None] + L - torch.arange(L + C, device=q.device)
    if bias is not None:  # bias[p, d] belongs at column L + p - d: a skewed copy of the flipped bias
        skew = F.pad(bias.view(B, H, n, C, L + 1).flip(-1), (0, C)).view(B, H, n, C * (L + C + 1))
        s_keys = s_keys + skew[..., :C * (L + C)].view(B, H, n, C, L + C)
    s_keys = s_keys.masked_fill(dist < 0, float("-inf"))
    a = torch.softmax(torch.cat([s_cache, s_keys], dim=-1), dim=-1)
    a_cache, a_keys = a.split([S, L + C], dim=-1)
    o = _ChunkMix.apply(a_keys, vc, L) + (a_cache / counts.clamp(min=1).unsqueeze(3)) @ sums
    return o.view(B, H, Tp, dv)


def vq_attention(q, k_hat, z, v, codebook, L, bias=None, chunk_blocks=None):
    """Transformer-VQ attention of (B, H, T, .) queries, quantized keys k_hat with codes z,
    and values; codebook (H, S, d_k); optional window bias (B, H, T, L+1) for distances 0..L.
    Runs the Triton kernels on CUDA (block-wise), the chunked PyTorch path otherwise, with
    chunks of chunk_blocks blocks (default: about S / L, so a chunk's keys cost about what
    its cache costs). T is padded to a whole number of chunks; padding sits after every real
    query, so it is never attended to."""
    T = q.shape[2]
    cuda = q.is_cuda and _vq_block_attention_triton is not None
    G = 1 if cuda else chunk_blocks or max(1, min(codebook.shape[1] // L, -(-T // L)))
    pad = -T % (G * L)
    if pad:
        q, k_hat, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k_hat, v))
        z = F.pad(z, (0, pad))
        bias = None if bias is None else F.pad(bias, (0, 0, 0, pad))
    if cuda:
        counts, sums = vq_compressive_cache(z, v, codebook.shape[1], L)
        if bias is None:
            bias = q.new_zeros(*q.shape[:3], L + 1)
        o = _vq_block_attention_triton(q, k_hat, v, bias, codebook, counts, sums, L)
    else:
        o = vq_chunk_attention_torch(q, k_hat, z, v, bias, codebook, L, G)
    return o[:, :, :T]


def relative_sinusoids(n, width, device, lam=10000.0):
    """Sinusoidal embeddings of the distances 0..n-1, (n, width) = [sin | cos]."""
    inv = lam ** (-torch.arange(0, width, 2, device=device, dtype=torch.float32) / width)
    ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class VQGatedUnit(nn.Module):
    """One gated attention unit with VQ keys (equations at the top of this section)."""

    def __init__(self, config):
        super().__init__()
        C, H, dk = config.n_embd, config.vq_n_head, config.vq_d_k
        dv = int(round(config.vq_d_v_mult * C))
        assert dv % H == 0, "vq: d_v = vq_d_v_mult * n_embd must be divisible by vq_n_head"
        assert C % 2 == 0, "vq: n_embd must be even (sinusoidal position features)"
        self.H, self.dk, self.dv, self.C = H, dk, dv, C
        self.L, self.S = config.vq_block_len, config.vq_codebook_size
        self.beta, self.decay = config.vq_beta, config.vq_ema_decay
        self.tau = dk ** -0.25  # q and k scale: q . k is divided by sqrt(d_k)
        self.ln_w = nn.Parameter(torch.ones(C))  # input RMSNorm gain
        self.c_attn = nn.Linear(C, 2 * H * dk + 2 * dv, bias=False)  # W_q, W_k, W_v, W_g in one
        self.c_r = nn.Linear(C, H * dk, bias=False)  # relative-position projection W_r
        self.xl_u = nn.Parameter(torch.zeros(H * dk))  # content bias (1-D: no weight decay, like biases)
        self.xl_w = nn.Parameter(torch.zeros(H * dk))  # position bias
        self.c_proj = nn.Linear(dv, C, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        # codebook as EMA statistics: c = c_sum / max(c_count, 0.01)
        self.register_buffer("c_sum", torch.randn(H, self.S, dk) * self.tau)
        self.register_buffer("c_count", torch.ones(H, self.S))
        self.register_buffer("last_counts", torch.zeros(H, self.S), persistent=False)  # diagnostics
        self.aux_loss = None
        self.last_commit = torch.zeros(())

    def codebook(self):
        return self.c_sum / self.c_count.clamp(min=0.01).unsqueeze(-1)

    def _project(self, x):
        """x (B, T, C) -> q, k (B, H, T, d_k), v (B, H, T, d_v/H), g (B, T, d_v)."""
        B, T, _ = x.shape
        x = rms_norm(x, self.ln_w)
        q, k, v, g = self.c_attn(x).split([self.H * self.dk, self.H * self.dk, self.dv, self.dv], dim=-1)
        q = rms_norm(q.view(B, T, self.H, self.dk), scale=self.tau)
        k = rms_norm(k.view(B, T, self.H, self.dk), scale=self.tau)
        v = F.silu(v).view(B, T, self.H, -1)
        g = F.silu(g)
        return _f32(q.transpose(1, 2)), _f32(k.transpose(1, 2)), _f32(v.transpose(1, 2)), g

    def _rel(self, device):
        """Position keys R_d for d = 0..L, (H, L+1, d_k)."""
        r = self.c_r(relative_sinusoids(self.L + 1, self.C, device).to(self.c_r.weight.dtype))
        return _f32(r.view(self.L + 1, self.H, self.dk).transpose(0, 1)) * self.tau

    def quantize(self, k):
        """Codes z (B, H, T), straight-through quantized keys and the per-token squared errors."""
        c = self.codebook()
        with torch.no_grad():
            d2 = (k * k).sum(-1, keepdim=True) - 2 * k @ c.transpose(-1, -2) + (c * c).sum(-1)[:, None, :]
            z = d2.argmin(-1)
        cz = c[torch.arange(self.H, device=k.device)[None, :, None], z]  # (B, H, T, d_k)
        err = (k - cz).pow(2).sum(-1)
        return z, _StraightThrough.apply(k, cz), err

    @torch.no_grad()
    def ema_update(self, k, z):
        """Move the codebook statistics towards this batch's (summed over DDP ranks)."""
        kz = k.detach().to(self.c_sum.dtype).transpose(0, 1).reshape(self.H, -1, self.dk)  # (H, B*T, d_k)
        zz = z.transpose(0, 1).reshape(self.H, -1)
        counts = torch.zeros_like(self.c_count).scatter_add_(1, zz, torch.ones_like(zz, dtype=self.c_count.dtype))
        sums = torch.zeros_like(self.c_sum).scatter_add_(
            1, zz.unsqueeze(-1).expand(-1, -1, self.dk), kz)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = torch.cat([counts.unsqueeze(-1), sums], dim=-1)
            torch.distributed.all_reduce(stats)
            counts, sums = stats[..., 0], stats[..., 1:]
        self.c_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.c_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)

    def _content_q(self, q):
        """q + u: the query for content logits (window keys and codewords)."""
        return q + self.xl_u.to(q.dtype).view(1, self.H, 1, self.dk)

    def _window_bias(self, q, rel):
        """(q + w) . R_d for d = 0..L: (B, H, T, L+1)."""
        return (q + self.xl_w.to(q.dtype).view(1, self.H, 1, self.dk)) @ rel.transpose(-1, -2)

    def _out(self, o, g):
        B, H, T, dvh = o.shape
        o = o.transpose(1, 2).reshape(B, T, H * dvh).to(g.dtype)
        return self.resid_dropout(self.c_proj(o * g))

    def forward(self, x):
        q, k, v, g = self._project(x)
        z, k_hat, err = self.quantize(k)
        commit = err.sum(1).mean()
        self.last_commit = (self.beta * commit).detach()  # read by extra_metrics (no sync here)
        self.aux_loss = self.beta * commit if self.training else None
        with torch.no_grad():
            zz = z.transpose(0, 1).reshape(self.H, -1)
            self.last_counts.zero_().scatter_add_(1, zz, torch.ones_like(zz, dtype=self.last_counts.dtype))
        bias = self._window_bias(q, self._rel(x.device))
        o = vq_attention(self._content_q(q), k_hat, z, v, self.codebook(), self.L, bias)
        if self.training:  # after the codebook was used: this forward saw the old one
            self.ema_update(k, z)
        return self._out(o, g)

    # ---- decoding: the window (previous + current block) and per-code counts / value sums
    @torch.no_grad()
    def decode(self, x, state):
        """Incremental pass; state None starts a sequence at position 0. The state holds the
        window's quantized keys, values and codes (at most 2L), and N, U per code."""
        if state is None:  # prefill: one full forward, then keep what later tokens need
            q, k, v, g = self._project(x)
            z, k_hat, _ = self.quantize(k)
            bias = self._window_bias(q, self._rel(x.device))
            o = vq_attention(self._content_q(q), k_hat, z, v, self.codebook(), self.L, bias)
            T = x.shape[1]
            w0 = max(0, (T // self.L - 1) * self.L)  # first position of the window
            B = x.shape[0]
            N = torch.zeros(B, self.H, self.S, device=x.device, dtype=v.dtype)
            U = torch.zeros(B, self.H, self.S, v.shape[-1], device=x.device, dtype=v.dtype)
            state = dict(pos=T, w0=w0, k=k_hat[:, :, w0:], v=v[:, :, w0:], z=z[:, :, w0:], N=N, U=U)
            self._fold(state, z[:, :, :w0], v[:, :, :w0])
            return self._out(o, g), state
        outs = []
        for t in range(x.shape[1]):  # usually one token
            y, state = self._decode_one(x[:, t:t + 1], state)
            outs.append(y)
        return torch.cat(outs, dim=1), state

    def _fold(self, state, z, v):
        """Add keys (codes z) and values v, (B, H, n, .), to the cache counts and sums."""
        onehot = F.one_hot(z, self.S).to(v.dtype)  # (B, H, n, S)
        state["N"] = state["N"] + onehot.sum(2)
        state["U"] = state["U"] + onehot.transpose(-1, -2) @ v

    def _decode_one(self, x, state):
        p, L = state["pos"], self.L
        state = dict(state)
        if (p // L - 1) * L > state["w0"]:  # a new block starts: the oldest one leaves the window
            self._fold(state, state["z"][:, :, :L], state["v"][:, :, :L])
            state.update(k=state["k"][:, :, L:], v=state["v"][:, :, L:], z=state["z"][:, :, L:], w0=state["w0"] + L)
        q, k, v, g = self._project(x)
        z, k_hat, _ = self.quantize(k)
        kw, vw = torch.cat([state["k"], k_hat], 2), torch.cat([state["v"], v], 2)
        n = kw.shape[2]
        dist = p - (state["w0"] + torch.arange(n, device=x.device))  # 0 for the new token
        rel = self._rel(x.device)  # (H, L+1, d_k)
        pos = self._window_bias(q, rel)[..., dist.clamp(max=L)] * (dist <= L)  # (B, H, 1, n)
        qu = self._content_q(q)
        c = self.codebook()
        s_win = qu @ kw.transpose(-1, -2) + pos
        N = state["N"]
        logn = torch.where(N > 0, N.clamp(min=1).log(), torch.full_like(N, float("-inf")))
        s_cache = qu @ c.transpose(-1, -2) + logn.unsqueeze(2)
        a = torch.softmax(torch.cat([s_win, s_cache], -1), -1)
        o = a[..., :n] @ vw + a[..., n:] @ (state["U"] / N.clamp(min=1).unsqueeze(-1))
        state.update(k=kw, v=vw, z=torch.cat([state["z"], z], 2), pos=p + 1)
        return self._out(o, g), state

    def extra_metrics(self):
        cnt = self.last_counts
        frac = cnt / cnt.sum(-1, keepdim=True).clamp(min=1)
        entropy = -(frac * frac.clamp(min=1e-12).log()).sum(-1)
        return {
            "code_usage": (cnt > 0).float().mean().item(),  # fraction of codes used by the last batch
            "code_entropy": entropy.mean().item(),  # nats, of the last batch's code assignments
            "dead_codes": float((self.c_count < 1.0).sum().item()),  # EMA count below one per batch
            "commit_loss": float(self.last_commit),  # beta * commitment term of the last forward
        }


class VQAttention(nn.Module):
    """Transformer-VQ token mixing: one gated attention unit, or two in sequence when
    vq_gau_layout (the paper's layout, with mlp_ratio=0). Returns the residual increment."""

    uses_absolute_positions = False
    has_input_norm = True

    def __init__(self, config):
        super().__init__()
        n = 2 if config.vq_gau_layout else 1
        self.units = nn.ModuleList([VQGatedUnit(config) for _ in range(n)])

    @property
    def aux_loss(self):
        losses = [u.aux_loss for u in self.units if u.aux_loss is not None]
        return sum(losses) if losses else None

    def forward(self, x):
        y = 0
        for unit in self.units:
            y = y + unit(x + y)
        return y

    def decode(self, x, state):
        state = state or [None] * len(self.units)
        y, new = 0, []
        for unit, s in zip(self.units, state):
            d, s = unit.decode(x + y, s)
            y = y + d
            new.append(s)
        return y, new

    def extra_metrics(self):
        if len(self.units) == 1:
            return self.units[0].extra_metrics()
        return {f"{k}_gau{n}": v for n, u in enumerate(self.units) for k, v in u.extra_metrics().items()}

    def attn_flops_per_token(self, T):
        u = self.units[0]
        keys = min(2 * u.L, T) + u.S  # window and cache entries per query
        # logits and weighted values, forward + backward (x3), 2 flops per MAC; quantizer distances
        return len(self.units) * (6 * u.H * keys * (u.dk + u.dv // u.H) + 2 * u.H * u.S * u.dk)


ATTENTION["vq"] = VQAttention

# --------------------------------------------------------------------------------------
# kernel-hashing: LSH finds the heavy entries, uniform samples estimate the light rest
# --------------------------------------------------------------------------------------

_KH_M32 = 0xFFFFFFFF
_KH_GOLDEN = 0x9E3779B9
_kh_triton_module = None


def _kh_kernels():
    """The Triton kernels, imported on first use (CUDA, or tests under TRITON_INTERPRET=1)."""
    global _kh_triton_module
    if _kh_triton_module is None:
        from kernels import kernel_hashing
        _kh_triton_module = kernel_hashing
    return _kh_triton_module


def _kh_mix(x):
    """xorshift-multiply mixer of 32-bit words held in int64 tensors. Every multiplier is
    below 2**31, so no product leaves int64 and CPU and CUDA agree bit for bit."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _KH_M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _KH_M32
    return x ^ (x >> 16)


def _kh_hash(first, *fields):
    """Counter-based random 32-bit words: a hash of integer fields (ints or int64 tensors,
    broadcast together). The same fields give the same word on any device and in any batch."""
    h = _kh_mix((torch.as_tensor(first, dtype=torch.long) & _KH_M32) ^ _KH_GOLDEN)
    for f in fields:
        h = _kh_mix(((h ^ (f & _KH_M32)) + _KH_GOLDEN) & _KH_M32)
    return h


def _kh_planes(seed, level, B, H, d, r, device):
    """Gaussian hyperplanes (B, H, d, r) for angular LSH at one level (Box-Muller on hashed words)."""
    bi = torch.arange(B, device=device).view(B, 1, 1)
    hi = torch.arange(H, device=device).view(1, H, 1)
    e = torch.arange(d * r, device=device).view(1, 1, d * r)
    u1 = (_kh_hash(seed, 1, level, bi, hi, 2 * e).float() + 0.5) / 2**32  # in (0, 1]
    u2 = _kh_hash(seed, 1, level, bi, hi, 2 * e + 1).float() / 2**32
    return (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).view(B, H, d, r)


def _kh_gray_rank(proj):
    """Bucket of each vector from its r hyperplane projections (..., r): the signs read as a Gray
    code, returned as its rank, so buckets adjacent in rank differ in one hyperplane."""
    binary = (proj > 0).long().cumsum(-1) & 1  # Gray -> binary, most significant bit first
    weights = 2 ** torch.arange(proj.shape[-1] - 1, -1, -1, device=proj.device)
    return (binary * weights).sum(-1)


def _kh_level_ranks(q, k, level, seed, r):
    """Gray ranks of q (B, H, Nq, d) and k (B, H, Nk, d) under the hyperplanes of one level."""
    B, H, _, d = q.shape
    planes = _kh_planes(seed, level, B, H, d, r, q.device)
    return _kh_gray_rank(torch.matmul(q.float(), planes)), _kh_gray_rank(torch.matmul(k.float(), planes))


def _kh_plan(rq, rk, level, pairs, qpos, seed, block, samples):
    """Key blocks and samples for P past rectangles at one level.

    rq (B, H, P, SQ): Gray ranks of the rectangles' queries, at local positions qpos (SQ,) within
    the second half; rk (B, H, P, SK): ranks of their keys (the first halves); pairs (P,): the
    rectangles' indices at this level. Keys are sorted by rank (ties by position) and cut into
    blocks of `block`. A query goes to the key block at its own place in that order: after the
    keys of lower rank, and among keys of its own rank at the fraction of the half it sits at.
    That place depends on the query itself and past keys only, which keeps the block causal.
    Samples: `samples` keys per rectangle drawn uniformly without replacement, weight SK/m. All is
    a function of (seed, level, pair, batch row, head, position), so a prefix of a sequence gets
    the plan of the whole sequence (which cached decoding relies on). Integer tensors over
    G = B*H*P groups: q_kb (G, SQ), k_order, k_kb (G, SK), s_idx, s_kb (G, m) or None.
    """
    B, H, P, SQ = rq.shape
    SK = rk.shape[3]
    G, dev = B * H * P, rq.device
    rq, rk = rq.reshape(G, SQ).contiguous(), rk.reshape(G, SK).contiguous()
    ar = torch.arange(SK, device=dev)
    sorted_key, k_order = (rk * SK + ar).sort(dim=1)
    rk_sorted = sorted_key // SK
    lo = torch.searchsorted(rk_sorted, rq)
    hi = torch.searchsorted(rk_sorted, rq, right=True)
    place = lo + (hi - lo) * (2 * qpos + 1) // (2 * SK)
    q_kb = place.clamp(max=SK - 1) // block
    k_kb = torch.empty_like(k_order).scatter_(1, k_order, ar.expand(G, SK)) // block
    m = 0 if SK <= block else min(samples, SK)  # one block holds every key: nothing left to sample
    plan = dict(q_kb=q_kb, k_order=k_order, k_kb=k_kb, s_idx=None, s_kb=None, block=block, log_w=0.0)
    if m > 0:
        assert SK < 2**24
        words = _kh_hash(seed, 2, level, torch.arange(B, device=dev).view(B, 1, 1, 1),
                         torch.arange(H, device=dev).view(1, H, 1, 1), pairs.view(1, 1, P, 1), ar)
        s_idx = ((words << 24) | ar).topk(m, dim=-1).indices.reshape(G, m)  # distinct keys: no ties
        plan.update(s_idx=s_idx, s_kb=k_kb.gather(1, s_idx), log_w=math.log(SK / m))
    return plan


def _kh_tiles(q_kb, rows, nb):
    """Sort queries by key block and cut the sorted order into chunks of `rows`; a tile is a
    (chunk, key block) pair that at least one query of the chunk needs, so each query is active
    in exactly one tile. Returns q_order, kb_sorted (G, SQ), tile_g, tile_chunk, tile_kb (NT,)."""
    G, SQ = q_kb.shape
    kb_sorted, q_order = q_kb.sort(dim=1, stable=True)
    nch = -(-SQ // rows)
    chunk = torch.arange(G, device=q_kb.device)[:, None] * nch + torch.arange(SQ, device=q_kb.device) // rows
    uniq = torch.unique_consecutive((chunk * nb + kb_sorted).flatten())
    tile_chunk, tile_kb = uniq // nb, uniq % nb
    return q_order, kb_sorted, tile_chunk // nch, tile_chunk, tile_kb


def _kh_pieces(plan, q_rows, k_rows):
    """A level's plan as gathered pieces for _kh_attend: q_rows (G, SQ) and k_rows (G, SK) map each
    rectangle's local queries and keys to rows of the flattened q and k.
    A piece: rows_q (NT, R), rows_k (NT, K) (None: the first NT*R rows in order), mask
    (broadcastable to (NT, R, K), True = scored) and bias (added to every score)."""
    G, SQ = q_rows.shape
    SK, b = k_rows.shape[1], plan["block"]
    nb, nch = -(-SK // b), -(-SQ // b)
    q_order, kb_sorted, tile_g, tile_chunk, tile_kb = _kh_tiles(plan["q_kb"], b, nb)
    qo = F.pad(q_order, (0, nch * b - SQ))  # padding rows point at query 0 and stay inactive
    kbs = F.pad(kb_sorted, (0, nch * b - SQ), value=-1)
    ko = F.pad(plan["k_order"], (0, nb * b - SK))
    real_key = (torch.arange(nb * b, device=q_rows.device) < SK).view(nb, b)[tile_kb]
    active = kbs.view(G * nch, b)[tile_chunk] == tile_kb[:, None]
    pieces = [dict(rows_q=q_rows.gather(1, qo).view(G * nch, b)[tile_chunk],
                   rows_k=k_rows.gather(1, ko).view(G * nb, b)[tile_g * nb + tile_kb],
                   mask=active[:, :, None] & real_key[:, None, :], bias=0.0)]
    if plan["s_idx"] is not None:  # sampled keys, minus those in the query's own block
        pieces.append(dict(rows_q=q_rows, rows_k=k_rows.gather(1, plan["s_idx"]),
                           mask=plan["s_kb"][:, None, :] != plan["q_kb"][:, :, None], bias=plan["log_w"]))
    return pieces


def _kh_take(x, rows, nt, r):
    return x.view(nt, r, x.shape[-1]) if rows is None else x.index_select(0, rows.flatten()).view(nt, r, -1)


def _kh_put(acc, rows, val):
    if rows is None:
        acc[:val.shape[0] * val.shape[1]] += val.flatten(0, 1)
    else:
        acc.index_put_((rows.flatten(),), val.flatten(0, 1), accumulate=True)


def _kh_scores(qf, kf, piece, scale):
    nt, r = piece["rows_q"].shape if piece["rows_q"] is not None else piece["shape"]
    kk = piece["rows_k"].shape[1] if piece["rows_k"] is not None else r
    qt, kt = _kh_take(qf, piece["rows_q"], nt, r), _kh_take(kf, piece["rows_k"], nt, kk)
    s = torch.baddbmm(torch.full((), piece["bias"], dtype=qt.dtype, device=qt.device), qt, kt.transpose(1, 2),
                      alpha=scale)
    if piece["mask"] is not None:
        s = s.masked_fill(~piece["mask"], float("-inf"))
    return s, qt, kt


def _kh_row_lse(n, pieces, row_lse):
    """Combine per-piece row log-sum-exps into one per row (rows may appear in several pieces)."""
    top = torch.full((n,), float("-inf"), dtype=row_lse[0].dtype, device=row_lse[0].device)
    for pc, l in zip(pieces, row_lse):
        rows = pc["rows_q"]
        if rows is None:
            top[:l.numel()] = torch.maximum(top[:l.numel()], l.flatten())
        else:
            top.scatter_reduce_(0, rows.flatten(), l.flatten(), "amax")
    top = top.clamp_min(-1e30)
    total = torch.zeros(n, dtype=top.dtype, device=top.device)
    for pc, l in zip(pieces, row_lse):
        rows = pc["rows_q"]
        if rows is None:
            total[:l.numel()] += torch.exp(l.flatten() - top[:l.numel()])
        else:
            total.index_add_(0, rows.flatten(), torch.exp(l.flatten() - top[rows.flatten()]))
    return top + torch.log(total)


def _kh_attend(qf, kf, vf, pieces, scale):
    """Softmax attention of each query row over the union of its pieces' keys (disjoint per row):
    qf (Nq, d), kf, vf (Nk, d) -> o (Nq, d), lse (Nq,), and the first piece's row lse."""
    scores = [_kh_scores(qf, kf, pc, scale)[0] for pc in pieces]
    row_lse = [torch.logsumexp(s, -1) for s in scores]
    lse = _kh_row_lse(qf.shape[0], pieces, row_lse)
    o = torch.zeros(qf.shape[0], vf.shape[1], dtype=vf.dtype, device=vf.device)
    for pc, s in zip(pieces, scores):
        nt, r, kk = s.shape
        p = torch.exp(s - _kh_take(lse[:, None], pc["rows_q"], nt, r))
        _kh_put(o, pc["rows_q"], torch.bmm(p, _kh_take(vf, pc["rows_k"], nt, kk)))
    return o, lse, row_lse[0]


class _KHAttend(torch.autograd.Function):
    """_kh_attend with a backward that recomputes the scores piece by piece (flash-style), so the
    saved state is q, k, v, o and the row lse: O(T d) memory however many pieces there are."""

    @staticmethod
    def forward(ctx, qf, kf, vf, pieces, scale):
        o, lse, lse0 = _kh_attend(qf, kf, vf, pieces, scale)
        ctx.save_for_backward(qf, kf, vf, o, lse)
        ctx.pieces, ctx.scale = pieces, scale
        ctx.mark_non_differentiable(lse, lse0)
        return o, lse, lse0

    @staticmethod
    def backward(ctx, do, _dlse, _dlse0):
        qf, kf, vf, o, lse = ctx.saved_tensors
        do = do.contiguous()
        delta = (do * o).sum(-1, keepdim=True)
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        for pc in ctx.pieces:
            s, qt, kt = _kh_scores(qf, kf, pc, ctx.scale)
            nt, r, kk = s.shape
            p = torch.exp(s - _kh_take(lse[:, None], pc["rows_q"], nt, r))
            dot, vt = _kh_take(do, pc["rows_q"], nt, r), _kh_take(vf, pc["rows_k"], nt, kk)
            _kh_put(dv, pc["rows_k"], torch.bmm(p.transpose(1, 2), dot))
            ds = p * (torch.bmm(dot, vt.transpose(1, 2)) - _kh_take(delta, pc["rows_q"], nt, r))
            _kh_put(dq, pc["rows_q"], torch.bmm(ds, kt))
            _kh_put(dk, pc["rows_k"], torch.bmm(ds.transpose(1, 2), qt))
        return dq * ctx.scale, dk * ctx.scale, dv, None, None


def _kh_rect_triton(q, k, v, plan, scale):
    """Triton path of one level: q (G, SQ, d), k, v (G, SK, d) -> o (G, SQ, d), lse (G, SQ)."""
    kern = _kh_kernels()
    G, SQ, _ = q.shape
    b = plan["block"]
    rows = kern.rows_per_tile(b)
    q_order, kb_sorted, tile_g, tile_chunk, tile_kb = _kh_tiles(plan["q_kb"], rows, -(-k.shape[1] // b))
    tile_q0 = tile_chunk % -(-SQ // rows) * rows
    return kern.gathered_block_attention(q, k, v, q_order, kb_sorted, plan["k_order"], plan["s_idx"], plan["s_kb"],
                                         tile_g, tile_q0, tile_kb, b, plan["log_w"], scale, False, rows)


def _kh_diag_triton(q, k, v, c, scale):
    """Exact causal attention inside consecutive chunks of c tokens, Triton: (o, lse) over (B, H, Tp)."""
    kern = _kh_kernels()
    B, H, Tp, d = q.shape
    G, rows = B * H * (Tp // c), kern.rows_per_tile(c)
    sub = -(-c // rows)
    tile_g = torch.arange(G, device=q.device).repeat_interleave(sub)
    tile_q0 = (torch.arange(sub, device=q.device) * rows).repeat(G)
    o, lse = kern.gathered_block_attention(q.reshape(G, c, d), k.reshape(G, c, d), v.reshape(G, c, d), None, None,
                                           None, None, None, tile_g, tile_q0, torch.zeros_like(tile_g), c, 0.0,
                                           scale, True, rows)
    return o.view(B, H, Tp, d), lse.view(B, H, Tp)


def _kh_merge(o1, lse1, o2, lse2):
    """Combine two partial softmaxes over disjoint key sets through their log-sum-exps."""
    lse = torch.logaddexp(lse1, lse2)
    return o1 * torch.exp(lse1 - lse)[..., None] + o2 * torch.exp(lse2 - lse)[..., None], lse


def _kh_levels(T, c):
    """Dyadic layout from position 0: chunks of c, then rectangles of side s = c*2^l at level l.
    Yields (level, s, number of rectangles whose query half holds a real position)."""
    level, s = 0, c
    while s < T:
        yield level, s, -(-(T - s) // (2 * s))
        level, s = level + 1, 2 * s


def kernel_hashing_attention(q, k, v, min_seq_len, bucket_block, samples, hash_bits, seed,
                             backend="auto", stats=None):
    """The kernel-hashing estimate of causal softmax attention. q, k, v (B, H, T, d) -> (B, H, T, d).
    seed: an int or int64 tensor that fixes every hash plane and sample. backend: 'auto' (Triton
    on CUDA when available), 'torch' or 'triton'. stats: a dict to receive 'approx_mass', the
    mean softmax weight that queries past the first chunk give to the approximated rectangles."""
    B, H, T, d = q.shape
    c, scale = min_seq_len, d ** -0.5
    if T <= c and stats is None:  # short sequence: exact attention
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda and _kh_triton_available())
    Tp = c << max(0, (-(-T // c) - 1).bit_length())  # c times a power of two >= T
    q, k, v = (F.pad(t, (0, 0, 0, Tp - T)).contiguous() for t in (q, k, v))
    levels = list(_kh_levels(T, c))
    plans = []
    with torch.no_grad():  # hashing and sampling: no gradient
        r, dev = hash_bits, q.device
        planes = torch.cat([_kh_planes(seed, lv, B, H, d, r, dev) for lv, _, _ in levels], -1) if levels else None
        pq = torch.matmul(q.float(), planes) if levels else None  # every level's projections at once
        pk = torch.matmul(k.float(), planes) if levels else None
        for level, s, P in levels:
            n = Tp // (2 * s)
            rq = _kh_gray_rank(pq[..., level * r:(level + 1) * r]).view(B, H, n, 2, s)[:, :, :P, 1]
            rk = _kh_gray_rank(pk[..., level * r:(level + 1) * r]).view(B, H, n, 2, s)[:, :, :P, 0]
            plans.append(_kh_plan(rq, rk, level, torch.arange(P, device=dev), torch.arange(s, device=dev),
                                  seed, bucket_block, samples))
    if use_triton:
        o, lse = _kh_diag_triton(q, k, v, c, scale)
        lse_diag = lse
        for (level, s, P), plan in zip(levels, plans):
            n = Tp // (2 * s)
            q6, k6, v6 = (t.view(B, H, n, 2, s, d) for t in (q, k, v))
            o_r, lse_r = _kh_rect_triton(q6[:, :, :P, 1].reshape(-1, s, d), k6[:, :, :P, 0].reshape(-1, s, d),
                                         v6[:, :, :P, 0].reshape(-1, s, d), plan, scale)
            o6, l5 = o.view(B, H, n, 2, s, d), lse.view(B, H, n, 2, s)
            o_m, l_m = _kh_merge(o6[:, :, :P, 1], l5[:, :, :P, 1], o_r.view(B, H, P, s, d), lse_r.view(B, H, P, s))
            o = torch.stack([o6[:, :, :, 0], torch.cat([o_m, o6[:, :, P:, 1]], 2)], 3).view(B, H, Tp, d)
            lse = torch.stack([l5[:, :, :, 0], torch.cat([l_m, l5[:, :, P:, 1]], 2)], 3).view(B, H, Tp)
    else:
        pieces = [dict(rows_q=None, rows_k=None, shape=(B * H * Tp // c, c), bias=0.0,
                       mask=torch.ones(c, c, dtype=torch.bool, device=q.device).tril()[None])]
        with torch.no_grad():
            base = torch.arange(B * H, device=q.device).view(B * H, 1, 1) * Tp
            for (level, s, P), plan in zip(levels, plans):
                rows = base + torch.arange(P, device=q.device).view(1, P, 1) * 2 * s + torch.arange(s, device=q.device)
                pieces += _kh_pieces(plan, (rows + s).view(-1, s), rows.view(-1, s))
        o, lse, lse_diag = _KHAttend.apply(q.view(-1, d), k.view(-1, d), v.view(-1, d), pieces, scale)
        o, lse, lse_diag = o.view(B, H, Tp, d), lse.view(B, H, Tp), lse_diag.view(B, H, Tp)
    if stats is not None:
        with torch.no_grad():
            w = 1 - torch.exp(lse_diag[:, :, c:T] - lse[:, :, c:T])
            stats["approx_mass"] = w.mean().item() if w.numel() else 0.0
    return o[:, :, :T]


def kernel_hashing_query(q, k, v, min_seq_len, bucket_block, samples, hash_bits, seed):
    """The same estimate for one query at the last position: q (B, H, 1, d), k, v (B, H, S, d).
    Hashes and samples only the past rectangles this query sees; used by decoding."""
    B, H, S, d = k.shape
    c, i, dev = min_seq_len, S - 1, q.device
    ci = i // c
    bh = torch.arange(B * H, device=dev)[:, None]
    pieces = [dict(rows_q=bh, rows_k=bh * S + torch.arange(ci * c, S, device=dev), mask=None, bias=0.0)]
    for level in range(ci.bit_length()):
        if not (ci >> level) & 1:
            continue  # this query sits in the first half at this level
        s = c << level
        pair = i // (2 * s)
        kr = k[:, :, pair * 2 * s:pair * 2 * s + s]
        rq, rk = _kh_level_ranks(q, kr, level, seed, hash_bits)
        plan = _kh_plan(rq[:, :, None], rk[:, :, None], level, torch.tensor([pair], device=dev),
                        torch.tensor([i - pair * 2 * s - s], device=dev), seed, bucket_block, samples)
        pieces += _kh_pieces(plan, bh, bh * S + pair * 2 * s + torch.arange(s, device=dev))
    o, _, _ = _kh_attend(q.reshape(B * H, d), k.reshape(B * H * S, d), v.reshape(B * H * S, d), pieces, d ** -0.5)
    return o.view(B, H, 1, d)


def kernel_hashing_log_weights(q, k, min_seq_len, bucket_block, samples, hash_bits, seed):
    """The estimator written densely: (B, H, T, T) additive log-weights W such that the block's
    output is softmax(q k^T / sqrt(d) + W) v. W is 0 on entries computed exactly (the query's
    chunk, causally, and its key block in each past rectangle), log(n/m) on sampled entries
    outside that block, -inf elsewhere. O(T^2): for tests and diagnostics only."""
    B, H, T, d = q.shape
    c, dev = min_seq_len, q.device
    W = torch.full((B, H, T, T), float("-inf"), dtype=q.dtype, device=dev)
    for start in range(0, T, c):
        n = min(c, T - start)
        W[:, :, start:start + n, start:start + n] = torch.zeros(n, n, dtype=q.dtype, device=dev).masked_fill(
            ~torch.ones(n, n, dtype=torch.bool, device=dev).tril(), float("-inf"))
    for level, s, P in _kh_levels(T, c):
        for pair in range(P):
            k0, q0 = pair * 2 * s, pair * 2 * s + s
            nq = min(s, T - q0)
            rq, rk = _kh_level_ranks(q[:, :, q0:q0 + nq], k[:, :, k0:k0 + s], level, seed, hash_bits)
            plan = _kh_plan(rq[:, :, None], rk[:, :, None], level, torch.tensor([pair], device=dev),
                            torch.arange(nq, device=dev), seed, bucket_block, samples)
            W[:, :, q0:q0 + nq, k0:k0 + s] = _kh_plan_log_weights(plan, q.dtype).view(B, H, nq, s)
    return W


def _kh_plan_log_weights(plan, dtype=torch.float32):
    """One level's plan written densely: (G, SQ, SK) log-weights, 0 on the query's key block,
    log(n/m) on sampled keys outside it, -inf elsewhere."""
    same = plan["k_kb"][:, None, :] == plan["q_kb"][:, :, None]
    w = torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(~same, float("-inf"))
    if plan["s_idx"] is not None:
        sampled = torch.zeros(plan["k_kb"].shape, dtype=torch.bool, device=same.device)
        sampled.scatter_(1, plan["s_idx"], True)
        w = w.masked_fill(sampled[:, None, :] & ~same, plan["log_w"])
    return w


def _kh_triton_available():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


class KernelHashingAttention(DenseAttention):
    """Causal attention by kernel hashing: locality-sensitive hashing finds the heavy entries of
    the attention (kernel) matrix and uniform sampling estimates the light rest.

    Papers: Indyk, Kapralov, Sheth, Wagner, "Improved Algorithms for Kernel Matrix-Vector
    Multiplication Under Sparsity Assumptions" (ICLR 2025): if the entries of the kernel matrix
    K_ij = exp(q_i . k_j / sqrt(d)) sum to O(n), LSH plus sampling computes K v in sub-quadratic
    time. Han, Jayaram, Karbasi, Mirrokni, Woodruff, Zandieh, "HyperAttention: Long-context
    Attention in Near-Linear Time" (ICLR 2024): the causal recursion and sorted-block LSH.

    Heads and projections as dense. With c = kh_min_seq_len, b = kh_bucket_block, m = kh_samples,
    r = kh_hash_bits, positions are split dyadically from 0: chunks of c, and at level l pairs of
    halves of side s = c 2^l. A query i gets these disjoint pieces, each a partial softmax with
    (o_p, lse_p), merged exactly:
        chunk:     exact causal attention inside its chunk of c tokens (T <= c: exact attention)
        level l:   if i is in a second half, the first half (all past, so nothing is masked) is
                   approximated: angular LSH h(x) = Gray-rank(sign(x R_l)), R_l ~ N(0,1)^{d x r};
                   keys sorted by h and cut into blocks of b; i takes the key block B_i at its own
                   place in that order; m keys S drawn uniformly without replacement:
                   N = sum_{j in B_i} e_ij v_j + (s/m) sum_{j in S \\ B_i} e_ij v_j,  e_ij = exp(q_i.k_j/sqrt d)
                   Z = the same sums of e_ij;  o_p = N / Z, lse_p = log Z
        merge:     lse = logsumexp_p lse_p,  o_i = sum_p exp(lse_p - lse) o_p,   y = o W_o
    Every N and Z is unbiased for the exact sum over the rectangle. Gradients flow through the
    lse_p too (the merge weights depend on q and k). HyperAttention aligns blocks of *sorted
    queries* with blocks of sorted keys, which lets later queries move earlier ones between
    blocks (a leak from the future); here a query's block depends on itself and past keys only.
    With m >= s (every key sampled, weight 1) or s <= b the block equals exact attention.

    Randomness: planes and samples are hashes of (seed, level, rectangle, batch row, head, key),
    the seed being (per-layer seed buffer, step buffer) in training -- the step counter lives in
    the state_dict, so resuming is exact -- and a fixed per-layer seed in eval mode. Decoding
    reproduces the eval-mode estimate at each new position (the plan of a prefix is the plan of
    the whole sequence), so cached and uncached generation agree; it costs O(S (d r + log S)) per
    token rather than exact attention's O(S d). No attention dropout (residual dropout only).

    Cost per layer: time O(T d (c + (b + m + r) log(T/c)) + T log^2 T), the sorts giving the last
    term: O(T (b + m) log T) for fixed d, c, r. Memory: the PyTorch path saves q, k, v, o and the row
    LSEs, O(T d), plus O(T log(T/c)) integers of hashes and samples; its forward holds the scores,
    O(T (c + b + m) log(T/c)), and its backward recomputes them piece by piece. No T x T tensor.
    The Triton path (CUDA) runs the chunks and each level in one gathered-block kernel that
    returns the LSE, with a backward that takes d(lse) as well as d(o).
    """

    def __init__(self, config):
        super().__init__(config)
        assert config.kh_min_seq_len >= 1 and config.kh_bucket_block >= 1 and config.kh_samples >= 0
        assert 1 <= config.kh_hash_bits <= 16, "kh_hash_bits must be in 1..16"
        self.min_seq_len, self.bucket_block = config.kh_min_seq_len, config.kh_bucket_block
        self.samples, self.hash_bits = config.kh_samples, config.kh_hash_bits
        self.backend = "auto"
        self.register_buffer("seed", torch.randint(0, 2**31 - 1, ()))  # per layer; saved in the state_dict
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training forwards so far
        self._metrics = {}

    def _knobs(self):
        return self.min_seq_len, self.bucket_block, self.samples, self.hash_bits

    def forward(self, x):
        q, k, v = self._heads(x)
        if self.training:
            seed = _kh_hash(self.seed, 1, self.step)
            self.step += 1
        else:
            seed = _kh_hash(self.seed, 0)
        stats = {} if not self.training and q.shape[2] > self.min_seq_len else None  # diagnostics in eval
        y = kernel_hashing_attention(q, k, v, *self._knobs(), seed, backend=self.backend, stats=stats)
        if stats is not None:
            self._metrics = {"approx_mass": stats["approx_mass"], "scored_frac": self.scored_fraction(q.shape[2])}
        return self._out(y)

    def decode(self, x, state):
        q, k, v = self._heads(x)
        seed = _kh_hash(self.seed, 0)  # the eval-mode estimate
        if state is None:  # a prefix: the full pass gives every position its estimate
            return self._out(kernel_hashing_attention(q, k, v, *self._knobs(), seed, backend=self.backend)), (k, v)
        k, v = torch.cat([state[0], k], dim=2), torch.cat([state[1], v], dim=2)
        t, S = q.shape[2], k.shape[2]
        ys = [kernel_hashing_query(q[:, :, j:j + 1], k[:, :, :S - t + j + 1], v[:, :, :S - t + j + 1],
                                   *self._knobs(), seed) for j in range(t)]  # t is 1 when sampling
        return self._out(torch.cat(ys, dim=2)), (k, v)

    def scored_fraction(self, T):
        """Share of the T(T+1)/2 causal (query, key) pairs whose score is computed (an upper
        bound: samples that fall in the query's own block are counted too)."""
        c, b, m = self.min_seq_len, self.bucket_block, self.samples
        n = sum(min(c, T - s0) * (min(c, T - s0) + 1) // 2 for s0 in range(0, T, c))
        for _, s, P in _kh_levels(T, c):
            for pair in range(P):
                nq = min(s, T - pair * 2 * s - s)
                n += nq * (s if s <= b else min(b + m, s))
        return n / (T * (T + 1) / 2)

    def extra_metrics(self):
        return dict(self._metrics)

    def attn_flops_per_token(self, T):
        # dense's convention (12 C per key and token, counting every key of the causal row as
        # dense counts all T): the chunk's c keys, plus b + m keys at every level
        c, b, m = self.min_seq_len, self.bucket_block, self.samples
        if T <= c:
            return super().attn_flops_per_token(T)
        keys = c + sum(s if s <= b else min(b + m, s) for _, s, _ in _kh_levels(T, c))
        return 12 * self.c_proj.in_features * keys


ATTENTION["kernel-hashing"] = KernelHashingAttention

# --------------------------------------------------------------------------------------
# adaptive-sparse: learned block scoring, adaptive (top-p) block selection, compressed correction
# --------------------------------------------------------------------------------------
#
# Anchors: NSA, Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable
# Sparse Attention", 2025 (arXiv:2502.11089): compression + block selection branches combined
# by sigmoid gates; MoBA, Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs",
# 2025 (arXiv:2502.13189): block scores from mean-pooled keys, the query's own block always
# kept; Dynamic Context Pruning, Anagnostidis et al., NeurIPS 2023 (arXiv:2305.15805): a learned
# keep-score with a threshold; the cumulative-mass (top-p) budget follows Twilight, Lin et al.,
# 2025 (arXiv:2502.02770).
#
# Multi-head, heads of size d, tokens split into blocks of B = as_block (the last one may be
# partial). Per head, with qbar_i, kbar_i, vbar_i the means of q, k, v over block i:
#
#   scoring      s_ij = e^tau (qbar_{i-1} W_q) . (kbar_j W_k) / sqrt(d)    W_q, W_k: d x as_score_dim,
#                tau a learned per-head log-temperature (a vector: no weight decay)
#                pi_ij = softmax_j s_ij over the candidates j <= i-2
#   selection    rank the candidates by pi; keep the shortest prefix whose mass reaches
#                p = as_threshold, at least as_k_min and at most as_k_max (k_max wins). Blocks i-1
#                and i (own, causal inside) are always kept: K_i = kept + {i-1, i}
#   attention    o_sel_t = sum_{s in K_i, s <= t} softmax_s(q_t . k_s / sqrt(d) + b_ij) v_s
#   correction   c_i = sum_{j in D_i} e^{s_ij} vbar_j / (1 + sum_{j in D_i} e^{s_ij}),
#                D_i = candidates not kept; the 1 is a null slot (logit 0, value 0), so a block
#                with nothing dropped gets c_i = 0. One correction per query block, from the
#                scorer's own logits (NSA derives its selection scores from its compression
#                branch's attention; here the compression branch reuses the selection scores)
#   output       y_t = W_o [g_sel_t * o_sel_t + g_cmp_t * c_{block(t)}],
#                (g_sel, g_cmp) = sigmoid(x_t W_g + b_g) per token and head, as NSA's gates
#
# Strictly causal: the scorer's query side is the mean query of the previous (complete) block,
# so a block's selection and correction depend only on tokens before it, and only complete
# blocks j <= i-2 are ever scored or pooled. The scorer starts as MoBA's rule: W_q = W_k = one
# random orthonormal projection, so s_ij ~ qbar . kbar / sqrt(d) within as_score_dim directions.
#
# Gradient to the scorer (selection is discrete), two paths: (1) the correction branch, whose
# weights are softmaxes of s; (2) straight-through: the kept blocks get the logit bias
# b_ij = log pi_ij - sg(log pi_ij), exactly 0 in value (the forward pass is exact attention over
# K_i), while dL/d log pi_ij = the sum over the (block i, block j) tile of dL/dlogit: whether more
# attention to block j would lower the loss; through the softmax normaliser the dropped
# candidates get the opposite push. The gates learn by ordinary backprop.
#
# Dense-equivalent setting (as_dense_equivalent=True): keep every block (p = 1, no k_max) and
# no correction or gates (g_sel = 1, g_cmp = 0): exactly dense causal attention. No attention-
# probability dropout in either branch (the Triton kernel has none); the residual dropout is kept.
#
# Cost per layer and head, T tokens, n = T/B blocks, k = as_k_max, r = as_score_dim: scoring,
# selection and correction O(n^2 (r + d)) time and O(n^2) memory (one (n, n) score matrix, its
# softmax, a boolean mask; the correction runs in torch's fused SDPA; computed in up to 4
# chunks of query blocks, each against the key blocks it can see, ~5/8 of the full square); selected attention
# O(T (k+2) B d) time and O(T (k+2) B) memory. No T x T tensor: O(T^2/B^2 + T k B) in all.
# Decode: a KV cache (plus the queries, for the scorer's previous-block mean); each new query's
# block is selected by the same rule from the same cached tensors, so greedy cached generation
# equals full recompute; O(S d + n (d + r) + (k+2) B d) per token at context S.
#
# Two paths for the selected-block attention: batched gather + softmax in PyTorch (CPU, and
# whenever the kernel cannot run), and the Triton block-sparse flash attention of
# kernels/adaptive_sparse.py (forward and backward; per-query-block index lists, causal mask in
# the diagonal block) on CUDA for B >= 16, a power of two. Scoring and correction are PyTorch.


def _as_kernel(t):
    """The Triton block-sparse attention for a CUDA tensor, None otherwise (imported lazily)."""
    if not t.is_cuda:
        return None
    try:
        from kernels.adaptive_sparse import block_sparse_attention
    except ImportError:
        return None
    return block_sparse_attention


def as_block_sparse_attention_torch(q, k, v, idx, bias, block, q_block0=0):
    """Selected-block attention by gathering the listed key blocks. q: (B, H, nq*block, D) for the
    query blocks q_block0.., k, v: (B, H, nk*block, D); idx, bias: (B, H, nq, n_slots) key-block
    ids (-1 = empty) and per-slot logit bias. Every query block must list its own block."""
    B, H, Tq, D = q.shape
    nq, n_slots = idx.shape[2], idx.shape[3]
    nk = k.shape[2] // block
    # row of each listed block in the flattened (B*H*nk, block*D) key table; index_select's
    # backward is one index_add_, much faster than advanced indexing's
    head = torch.arange(B * H, device=q.device).view(B, H, 1, 1) * nk
    rows = (head + idx.clamp(min=0)).reshape(-1)
    kg = k.reshape(B * H * nk, block * D).index_select(0, rows).view(B, H, nq, n_slots * block, D)
    vg = v.reshape(B * H * nk, block * D).index_select(0, rows).view(B, H, nq, n_slots * block, D)
    att = (q.view(B, H, nq, block, D) @ kg.transpose(-1, -2)) * (1.0 / math.sqrt(D))
    att = att + bias.to(att.dtype).repeat_interleave(block, dim=-1).unsqueeze(-2)
    offs = torch.arange(block, device=q.device)
    qpos = (q_block0 + torch.arange(nq, device=q.device)).view(nq, 1) * block + offs  # (nq, block)
    kpos = (idx.unsqueeze(-1) * block + offs).view(B, H, nq, 1, n_slots * block)
    listed = (idx >= 0).repeat_interleave(block, dim=-1).view(B, H, nq, 1, n_slots * block)
    att = att.masked_fill(~(listed & (kpos <= qpos.view(nq, block, 1))), float("-inf"))
    return (att.softmax(-1) @ vg).view(B, H, Tq, D)


class AdaptiveSparseAttention(nn.Module):
    """Learned block scoring, top-p block selection, exact attention over the kept blocks plus a
    gated correction over the pooled dropped blocks; see the section comment above."""

    uses_absolute_positions = True
    has_input_norm = False

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        assert config.as_block >= 1 and config.as_k_max >= 0 and config.as_threshold > 0
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.block = config.as_block
        self.dense_equivalent = config.as_dense_equivalent
        self.threshold = 1.0 if self.dense_equivalent else config.as_threshold
        self.k_max = None if self.dense_equivalent else config.as_k_max  # None: no cap
        self.k_min = config.as_k_min
        self.score_dim = config.as_score_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # scorer: per-head projections of the pooled queries and keys, initialised to one shared
        # random orthonormal projection so s starts as MoBA's qbar . kbar (within as_score_dim dims)
        d, r = self.head_dim, self.score_dim
        proj = torch.linalg.qr(torch.randn(self.n_head, max(d, r), min(d, r)))[0]
        proj = proj if r <= d else proj.transpose(1, 2)  # (H, d, r)
        self.score_q = nn.Parameter(proj.clone())
        self.score_k = nn.Parameter(proj.clone())
        self.score_log_temp = nn.Parameter(torch.zeros(self.n_head))  # per-head sharpness, not decayed
        # NSA-style gates (g_sel, g_cmp) per token and head; absent in the dense-equivalent setting
        self.gate = None if self.dense_equivalent else nn.Linear(config.n_embd, 2 * config.n_head, bias=True)
        self._stats = None
        self.last_kept = None

    _heads = DenseAttention._heads  # the same c_attn / c_proj head layout as dense
    _out = DenseAttention._out

    def _n_slots(self, n_blocks):
        """Selected slots per query block: every candidate can be kept unless k_max caps it."""
        n = max(n_blocks - 2, 0)
        return n if self.k_max is None else min(self.k_max, n)

    def score_and_select(self, q_prev, kbar, vbar, q_block0, correction=True):
        """Scoring, top-p selection and the correction for query blocks q_block0.. (q_prev: their
        previous block's mean query, (B, H, nq, D); kbar, vbar: (B, H, nk, D) block means).
        Returns sel (B, H, nq, k): kept candidate ids, best first, -1 = none; st (B, H, nq, k):
        the straight-through bias of those slots; c (B, H, nq, D) the correction, or None."""
        B, H, nq, D = q_prev.shape
        nk = kbar.shape[2]
        k = min(nk, self._n_slots(q_block0 + nq))  # the most candidates any of these blocks has
        dev = q_prev.device
        dt = torch.promote_types(q_prev.dtype, torch.float32)
        if k == 0:  # at most two blocks: nothing to score, nothing dropped
            empty = torch.zeros(B, H, nq, 0, device=dev)
            return empty.long(), empty.to(dt), q_prev.new_zeros(B, H, nq, D, dtype=dt) if correction else None
        with torch.autocast(dev.type, enabled=False):
            temp = self.score_log_temp.to(dt).exp().view(H, 1, 1) / math.sqrt(D)
            sq = torch.einsum("bhnd,hdr->bhnr", q_prev.to(dt), self.score_q.to(dt)) * temp
            sk = torch.einsum("bhnd,hdr->bhnr", kbar.to(dt), self.score_k.to(dt))
            i = torch.arange(q_block0, q_block0 + nq, device=dev).view(nq, 1)
            cand = torch.arange(nk, device=dev) <= i - 2  # fully past and not forced: (nq, nk)
            with torch.no_grad():  # the ranking is discrete: no graph through the (nq, nk) scores
                s = (sq @ sk.transpose(-1, -2)).masked_fill_(~cand, -1e9)  # finite: rows without candidates stay NaN-free
                top = s.topk(k, dim=-1).indices  # best first; ranked by s, not pi, which can underflow to 0
                pi = s.softmax(-1)
                del s
                top_p = pi.gather(-1, top)
                rank = torch.arange(k, device=dev)
                valid = (rank < (i - 1).clamp(min=0)) & (top <= i - 2)  # a real candidate at rank r
                if self.threshold >= 1.0:
                    keep = valid.expand(B, H, nq, k)
                else:
                    mass_before = top_p.cumsum(-1) - top_p  # mass of the better-ranked blocks
                    keep = valid & ((rank < self.k_min) | (mass_before < self.threshold))
            sel = torch.where(keep, top, torch.full_like(top, -1))
            # straight-through bias: value 0, gradient of log pi at the kept blocks. log pi_ij =
            # s_ij - logsumexp_j s_ij, and the logsumexp's gradient is pi, so sq_i . (pi_i @ sk)
            # (pi held constant) has the same first-order gradient at a cost of O(nq nk r).
            rows = (torch.arange(B * H, device=dev).view(B, H, 1, 1) * nk + top).reshape(-1)
            sk_top = sk.reshape(B * H * nk, -1).index_select(0, rows).view(B, H, nq, k, -1)
            log_pi = (sq.unsqueeze(-2) * sk_top).sum(-1) - (sq * (pi @ sk)).sum(-1, keepdim=True)
            st = torch.where(keep, log_pi - log_pi.detach(), torch.zeros_like(log_pi))
            if not correction:
                return sel, st, None
            # correction: each query block attends (scorer logits s_ij) over the pooled values of its
            # dropped candidates plus a null slot of logit 0 and value 0
            mask = torch.zeros(B, H, nq, nk + 2, dtype=torch.bool, device=dev)
            mask[..., 0] = True  # null slot
            mask[..., 1:nk + 1] = cand
            mask.scatter_(-1, torch.where(keep, top + 1, nk + 1), False)  # remove the kept ones
            width = max(D, sq.shape[-1])  # equal q/k/v widths keep SDPA on its fused kernel
            pad = lambda t, n: F.pad(t, (0, width - t.shape[-1], n, 0))
            c = F.scaled_dot_product_attention(pad(sq, 0), pad(sk, 1), pad(vbar.to(dt), 1),
                                               attn_mask=mask[..., :nk + 1], scale=1.0)[..., :D]
        return sel, st, c

    select_chunks, select_min_blocks = 4, 64  # query-block chunking of the (nq, nk) scores

    def _select_in_chunks(self, q_prev, kbar, vbar, q_block0, correction):
        """score_and_select over up to select_chunks ranges of query blocks, each against only the
        key blocks it can see (the score matrix is block-lower-triangular): about half the work."""
        nq = q_prev.shape[2]
        k = self._n_slots(q_block0 + nq)
        per = max(self.select_min_blocks, -(-nq // self.select_chunks))
        sels, sts, cs = [], [], []
        for a in range(0, nq, per):
            e = min(nq, a + per)
            width = max(q_block0 + e - 2, 0)  # candidates of the chunk's last block: j <= q_block0+e-3
            sel, st, c = self.score_and_select(q_prev[:, :, a:e], kbar[:, :, :width], vbar[:, :, :width],
                                               q_block0 + a, correction)
            sels.append(F.pad(sel, (0, k - sel.shape[-1]), value=-1))  # same number of slots everywhere
            sts.append(F.pad(st, (0, k - st.shape[-1])))
            cs.append(c)
        if len(sels) == 1:
            return sels[0], sts[0], cs[0]
        return torch.cat(sels, 2), torch.cat(sts, 2), torch.cat(cs, 2) if correction else None

    def _gates(self, x):
        """(g_sel, g_cmp), each (B, H, T, 1); None in the dense-equivalent setting."""
        if self.gate is None:
            return None
        B, T, _ = x.shape
        g = torch.sigmoid(self.gate(x)).view(B, T, 2, self.n_head).permute(2, 0, 3, 1).unsqueeze(-1)
        return g[0], g[1]

    def _mix(self, q, k, v, gates, q0):
        """Outputs (B, H, S - q0, D) for the queries at positions q0..S-1 of q, k, v (B, H, S, D),
        plus the kept counts (B, H, nq) of the query blocks computed and their ids (nq,)."""
        B, H, S, D = k.shape
        Bk = self.block
        nb = -(-S // Bk)
        i0 = q0 // Bk  # first query block computed
        pad = nb * Bk - S
        qp, kp, vp = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, k, v))
        kbar = kp.view(B, H, nb, Bk, D).mean(3)  # only complete blocks (j <= i-2) are ever used
        vbar = vp.view(B, H, nb, Bk, D).mean(3)
        q_prev = qp.view(B, H, nb, Bk, D).mean(3)[:, :, max(i0 - 1, 0):nb - 1]  # previous block's mean query
        if i0 == 0:  # block 0 has no previous block (and no candidates): a zero placeholder
            q_prev = torch.cat([q_prev.new_zeros(B, H, 1, D), q_prev], 2)
        nq = nb - i0
        sel, st, c = self._select_in_chunks(q_prev, kbar, vbar, i0, correction=gates is not None)
        blocks = torch.arange(i0, nb, device=q.device)
        forced = torch.stack([torch.where(blocks > 0, blocks - 1, -1), blocks], -1).expand(B, H, nq, 2)
        idx = torch.cat([sel, forced], -1)  # slots: kept candidates, previous block, own block
        bias = torch.cat([st, st.new_zeros(B, H, nq, 2)], -1)
        kernel = _as_kernel(q) if Bk >= 16 and Bk & (Bk - 1) == 0 and i0 == 0 else None
        if kernel is not None:
            o = kernel(q, k, v, idx, bias, Bk)
        else:
            o = as_block_sparse_attention_torch(qp[:, :, i0 * Bk:] if i0 else qp, kp, vp, idx, bias, Bk, i0)
        kept = (sel >= 0).sum(-1)
        if q0 == 0 and pad == 0:  # the usual forward: rows are whole blocks, no slicing needed
            if gates is not None:  # every token of block i gets its block's correction, gated per token
                g_sel, g_cmp = (g.view(B, H, nq, Bk, 1) for g in gates)
                o = o.view(B, H, nq, Bk, D) * g_sel + g_cmp * c.to(o.dtype).unsqueeze(3)
            return o.view(B, H, S, D), kept, blocks
        rows = slice(q0 - i0 * Bk, S - i0 * Bk)
        o = o[:, :, rows]
        if gates is not None:
            o = gates[0] * o + gates[1] * c.to(o.dtype).repeat_interleave(Bk, dim=2)[:, :, rows]
        return o, kept, blocks

    def forward(self, x):
        q, k, v = self._heads(x)
        gates = self._gates(x)
        o, kept, blocks = self._mix(q, k, v, gates, 0)
        self.last_kept = kept.detach()  # (B, H, n_blocks): scored blocks kept per query block
        with torch.no_grad():  # diagnostics for extra_metrics (kept on device, read at evaluation)
            attended = kept + (blocks > 0).long() + 1  # kept candidates + previous + own block
            available = (blocks + 1).expand_as(attended)  # blocks 0..i
            scored = (blocks >= 2).expand_as(kept)  # query blocks that have candidates
            self._stats = dict(frac_blocks_attended=attended.sum() / available.sum(),
                               blocks_selected=(kept * scored).sum() / scored.sum().clamp(min=1))
            if gates is not None:
                self._stats.update(gate_sel=gates[0].mean(), gate_cmp=gates[1].mean())
        return self._out(o)

    def decode(self, x, state):
        q, k, v = self._heads(x)
        q0 = 0
        if state is not None:  # append to the cache of queries, keys and values
            q0 = state[0].shape[2]
            q, k, v = (torch.cat([s, t], 2) for s, t in zip(state, (q, k, v)))
        o, _, _ = self._mix(q, k, v, self._gates(x), q0)
        return self._out(o), (q, k, v)

    def extra_metrics(self):
        """Last forward: fraction of the causally available blocks attended (kept + previous +
        own over blocks 0..i, summed over query blocks and heads), mean number of scored blocks
        kept per query block that has candidates, and mean gates."""
        return {} if self._stats is None else {k: float(v) for k, v in self._stats.items()}

    def attn_flops_per_token(self, T):
        # forward + backward (x3), 2 flops per MAC, as DenseAttention counts it: the selected
        # attention per token, plus per query block (shared by its B tokens) the scores, the
        # straight-through pi @ sk, and the correction (logits and values at width max(d, r))
        nb = -(-T // self.block)
        keys = min(T, (self._n_slots(nb) + 2) * self.block)
        width = max(self.head_dim, self.score_dim)
        per_block = nb * 2 * self.score_dim + (0 if self.gate is None else nb * 2 * width)
        return 12 * self.c_proj.in_features * keys + 6 * self.n_head * per_block / self.block


ATTENTION["adaptive-sparse"] = AdaptiveSparseAttention

# --------------------------------------------------------------------------------------
# generative-function: a parameter-free causal comparison in place of attention
# --------------------------------------------------------------------------------------

try:  # fused Triton kernels, used on CUDA only
    from kernels import generative as gf_kernels
except ImportError:
    gf_kernels = None


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


class CausalGenerativeFunction(nn.Module):
    """The generative function of Hilsenbek (2024) on (B, T, D), no parameters:
    y_t = f(x_t, x_{t-1}[, m_t]), y_0 = x_0, m_t = mean(x_0..x_t). Used as the token
    mixer of GenerativeFunction and, registered as ACTIVATION["generative"], as the MLP
    activation (the paper's second use). Decode state: (x_{t-1}, running sum, count)."""

    use_triton = None  # None: the fused kernels on CUDA when triton imports; True/False forces

    def __init__(self, config):
        super().__init__()
        if config.gf_fn not in ("min", "max", "mean"):
            raise ValueError(f"gf_fn must be min, max or mean, got {config.gf_fn!r}")
        self.fn = config.gf_fn
        self.avg_context = config.gf_avg_context
        self.last_stats = {}  # share of channels where x_{t-1} / m_t won, from the last eval pass

    def forward(self, x):
        use_triton = self.use_triton if self.use_triton is not None else (x.is_cuda and gf_kernels is not None)
        if use_triton:
            y, won = gf_kernels.generative_function(x, self.fn, self.avg_context)
            took_prev, took_mean = (None, None) if won is None else (won == 1, won == 2)
        else:
            prev = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # x_{t-1}; the first token meets itself
            mean = None
            if self.avg_context:  # causal running mean: position t sees x_0..x_t only
                n = torch.arange(1, x.size(1) + 1, device=x.device, dtype=x.dtype)
                mean = x.cumsum(dim=1) / n[:, None]
            y, took_prev, took_mean = gf_compare(x, prev, mean, self.fn)
        if not self.training:
            self._record(took_prev, took_mean)
        return y

    def decode(self, x, state):
        """x (B, t, D) new tokens; state None or (x_{t-1}, float64 running sum, count)."""
        B, t, D = x.shape
        if state is None:
            prev0, sum0, count = x[:, 0], torch.zeros(B, D, dtype=torch.float64, device=x.device), 0
        else:
            prev0, sum0, count = state
        prev = torch.cat([prev0[:, None], x[:, :-1]], dim=1)
        csum = sum0[:, None] + x.double().cumsum(dim=1)  # float64: no drift over long decodes
        mean = None
        if self.avg_context:
            n = torch.arange(count + 1, count + t + 1, device=x.device, dtype=x.dtype)
            mean = csum.to(x.dtype) / n[:, None]
        y, _, _ = gf_compare(x, prev, mean, self.fn)
        return y, (x[:, -1], csum[:, -1], count + t)

    @torch.no_grad()
    def _record(self, took_prev, took_mean):
        self.last_stats = {}
        if took_prev is not None:
            self.last_stats["frac_prev"] = took_prev.float().mean().item()
        if took_mean is not None:
            self.last_stats["frac_mean"] = took_mean.float().mean().item()

    def flops_per_channel(self):
        """Forward+backward elementwise operations per channel and token: compare/select
        (or add) for x_{t-1}, plus add, divide and compare/select for the running mean."""
        return 2 * (1 + 3 * int(self.avg_context))


ACTIVATION["generative"] = CausalGenerativeFunction


class GenerativeFunction(nn.Module):
    """Causal generative function in place of attention (Kalle Hilsenbek, "Breaking the
    Attention Bottleneck", arXiv:2406.10906, 2024). No queries, keys or values: each
    token is compared, channel by channel, with the previous one.

        y_t = f(x_t, x_{t-1}),  y_0 = x_0,  f in {min (the paper's), max, mean}
        with gf_avg_context: y_t = f(x_t, x_{t-1}, m_t),  m_t = (x_0 + ... + x_t) / (t + 1)
        out = dropout(y W_o)

    The average context joins the comparison as a third argument, as in the paper; here it
    is the causal running mean m_t, since a mean over the whole sequence would leak the
    future. Ties of min/max send the whole gradient to one argument, the first in the
    order (x_t, x_{t-1}, m_t). Without the context one layer reaches one token back, so L
    layers reach L tokens back; the running mean is the only longer-range path. The
    extra_metrics are the shares of channels where x_{t-1} and m_t won (last eval batch).
    On CUDA the shift, compare and running mean are one fused Triton kernel
    (kernels/generative.py), forward and backward; on CPU the PyTorch path below runs.

    Cost per layer: O(T C) time for the mixing (plus O(T C^2) for W_o); memory O(T C),
    an int8 (B, T, C) map of winners (or bool masks) kept for the backward; no T x T
    anything. Decode state: the previous token, a running sum and a count, O(C) per
    sequence, O(1) in T.
    """

    uses_absolute_positions = True  # the paper modifies nanoGPT, which keeps its wpe table
    has_input_norm = False

    def __init__(self, config):
        super().__init__()
        self.mix = CausalGenerativeFunction(config)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.resid_dropout(self.c_proj(self.mix(x)))

    def decode(self, x, state):
        y, state = self.mix.decode(x, state)
        return self.resid_dropout(self.c_proj(y)), state

    def extra_metrics(self):
        return dict(self.mix.last_stats)

    def attn_flops_per_token(self, T):
        return self.mix.flops_per_channel() * self.c_proj.in_features  # elementwise, independent of T


ATTENTION["generative-function"] = GenerativeFunction

# --------------------------------------------------------------------------------------
# the GPT around the blocks
# --------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Position-wise perceptron: W_2 act(W_1 x), inner width mlp_ratio * n_embd."""

    def __init__(self, config):
        super().__init__()
        hidden = int(round(config.mlp_ratio * config.n_embd))
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = ACTIVATION[config.mlp_activation](config)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))

    def decode(self, x, state):
        if not hasattr(self.act, "decode"):  # a pointwise activation keeps no state
            return self(x), None
        h, state = self.act.decode(self.c_fc(x), state)
        return self.dropout(self.c_proj(h)), state


class Block(nn.Module):
    """Pre-norm residual block: x + mix(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, config):
        super().__init__()
        mixer = ATTENTION[config.attention]
        self.ln_1 = nn.Identity() if mixer.has_input_norm else LayerNorm(config.n_embd, config.bias)
        self.attn = mixer(config)
        self.has_mlp = config.mlp_ratio > 0
        if self.has_mlp:
            self.ln_2 = LayerNorm(config.n_embd, config.bias)
            self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        if self.has_mlp:
            x = x + self.mlp(self.ln_2(x))
        return x

    def decode(self, x, state):
        state = state or (None, None)
        a, s_attn = self.attn.decode(self.ln_1(x), state[0])
        x = x + a
        s_mlp = None
        if self.has_mlp:
            m, s_mlp = self.mlp.decode(self.ln_2(x), state[1])
            x = x + m
        return x, (s_attn, s_mlp)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.attention not in ATTENTION:
            raise ValueError(f"unknown attention {config.attention!r}; valid: {', '.join(ATTENTION)}")
        if config.mlp_activation not in ACTIVATION:
            raise ValueError(f"unknown mlp_activation {config.mlp_activation!r}; valid: {', '.join(ACTIVATION)}")
        self.config = config
        self.absolute_positions = ATTENTION[config.attention].uses_absolute_positions
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias),
        ))
        if self.absolute_positions:
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for m in self.modules():  # blocks may re-initialise their own parameters afterwards
            if m is not self and hasattr(m, "reset_parameters_after_gpt_init"):
                m.reset_parameters_after_gpt_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.absolute_positions:
            n -= self.transformer.wpe.weight.numel()
        return n

    def _embed(self, idx, pos0=0):
        T = idx.shape[1]
        x = self.transformer.wte(idx)
        if self.absolute_positions:
            if pos0 + T > self.config.block_size:
                raise ValueError(f"sequence of length {pos0 + T} exceeds block_size {self.config.block_size}")
            x = x + self.transformer.wpe(torch.arange(pos0, pos0 + T, device=idx.device))
        return self.transformer.drop(x)

    def forward(self, idx, targets=None):
        """Returns (logits, loss). With targets: logits at every position and the
        cross-entropy plus every block's auxiliary loss (the auxiliary part alone is
        left in self.last_aux_loss). Without targets: logits at the last position."""
        x = self._embed(idx)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        aux = [b.attn.aux_loss for b in self.transformer.h if getattr(b.attn, "aux_loss", None) is not None]
        self.last_aux_loss = torch.stack(aux).sum() if aux else None
        if aux:
            loss = loss + self.last_aux_loss
        return logits, loss

    def decode(self, idx, states, pos0):
        """Incremental pass over new tokens idx (B, t) at positions pos0..pos0+t-1.
        Returns (logits at the last position, new per-layer states)."""
        x = self._embed(idx, pos0)
        states = states or [None] * len(self.transformer.h)
        new_states = []
        for block, s in zip(self.transformer.h, states):
            x, s = block.decode(x, s)
            new_states.append(s)
        return self.lm_head(self.transformer.ln_f(x[:, [-1], :])), new_states

    def extra_metrics(self):
        """Per-layer block diagnostics (codebook health, fraction attended, ...)."""
        out = {}
        for i, block in enumerate(self.transformer.h):
            if hasattr(block.attn, "extra_metrics"):
                for k, v in block.attn.extra_metrics().items():
                    out[f"{self.config.attention}/layer{i}/{k}"] = float(v)
        return out

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]  # matrices and embeddings
        no_decay = [p for p in params if p.dim() < 2]  # biases, norm gains, scalars
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))

    def flops_per_token(self, T=None):
        """Forward+backward FLOPs per token: 6 N for the weights (PaLM appendix B)
        plus each block's own token-mixing term at sequence length T."""
        T = T or self.config.block_size
        mixing = sum(b.attn.attn_flops_per_token(T) for b in self.transformer.h)
        return 6 * self.get_num_params() + mixing

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s over peak_flops."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Sample max_new_tokens after idx (B, T). temperature <= 0 decodes greedily.
        With use_cache, each block carries its decode state and only the newest token
        is fed; otherwise the whole (cropped) sequence is recomputed every step. A model
        with absolute positions crops its context to block_size, as nanoGPT does; once
        the context slides, the cache is rebuilt from the cropped window."""
        states, pos = None, 0
        for _ in range(max_new_tokens):
            crop = self.absolute_positions and idx.size(1) > self.config.block_size
            if not use_cache:
                cond = idx[:, -self.config.block_size:] if self.absolute_positions else idx
                logits, _ = self(cond)
            elif states is None or crop:  # (re)fill the cache from the visible context
                cond = idx[:, -self.config.block_size:] if self.absolute_positions else idx
                logits, states = self.decode(cond, None, 0)
                pos = cond.size(1)
            else:
                logits, states = self.decode(idx[:, -1:], states, pos)
                pos += 1
            logits = logits[:, -1, :]
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


def model_config_keys():
    """Names of every GPTConfig field, for train.py's configuration checks."""
    return [f.name for f in fields(GPTConfig)]
