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
    attention_stats() -> dict     optional floats about the last forward (GPT.attention_stats)
    attn_flops_per_token(T)       forward+backward FLOPs of the mixing itself
    uses_absolute_positions       class flag: False drops the wpe table and lets
                                  generation run past block_size without cropping
    has_input_norm                class flag: True if the block normalises its own
                                  input, so the Block skips its pre-LayerNorm

The section for each block below cites its paper and states its equations and cost; the
block calls one functional op from kernels/<block>.py, which holds how it is computed (PyTorch
reference, CPU-fast path, Triton kernels) and picks the path.
"""

import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.adaptive_sparse import (Scorer, adaptive_sparse_attention, block_means, compressed_blocks, n_compressed,
                                     n_slots)
from kernels.generative import causal_generative_function, gf_compare
from kernels.kernel_hashing import KH_SAMPLING, kernel_hashing_attention, kernel_hashing_query, kh_hash, kh_levels
from kernels._triton import HAS_TRITON
from kernels.vq import (chunk_blocks_by_cost, gau_dense_attention, rms_norm, straight_through, vq_attention,
                        vq_cache_fold)


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
    rope: bool = False  # rotary positions on q, k instead of the wpe table (blocks with dense-like heads)
    short_conv: int = 0  # width of a causal depthwise convolution before every mixer (Zoology, H3); 0: off
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
    vq_quantize: bool = True  # False: the dense-GAU ablation (no quantizer, exact attention over k)
    # kernel-hashing (LSH + sampling)
    kh_hash_bits: int = 8  # hyperplanes per hash; buckets are read in Gray-code order
    kh_bucket_block: int = 32  # keys per hashed block: the heavy entries a query scores exactly
    kh_samples: int = 32  # sampled keys per past rectangle, weighted n/m
    kh_min_seq_len: int = 64  # exact causal attention inside chunks of this many tokens
    kh_sampling: str = "sorted-strata"  # one sample per stratum of the hash-sorted keys; "importance"; "uniform"
    # adaptive-sparse (learned block scoring)
    as_block: int = 16
    as_threshold: float = 0.9
    as_k_min: int = 1  # forced blocks beyond the top-p choice get no straight-through term (see the section)
    as_k_max: int = 8
    as_score_dim: int = 32
    as_dense_equivalent: bool = False
    as_window: int = 0  # NSA's sliding-window branch of this many tokens, gated per token (0: off)
    as_force_first: bool = False  # NSA's forced initial block: block 0 always attended, never scored
    as_compress: int = 0  # NSA's per-token compressed branch over windows of this many tokens, replacing the correction (0: off)
    as_compress_stride: int = 16  # ... taken every this many tokens (NSA: length 32, stride 16)
    as_budget: float = 0.0  # weight of the budget regulariser: expected kept count / k_max, added to the loss (0: off)
    as_gate_bias: float = 0.0  # initial bias of the selection gate g_sel (0: sigmoid 0.5, as the other gates; 2: 0.88)
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


def rotate(t, pos0=0, base=10000.0):
    """Rotary position embedding (Su et al., "RoFormer", 2021) of q or k (B, H, T, d) at positions
    pos0 .. pos0+T-1: the pair (t_i, t_{i+d/2}) is turned by the angle p * base^(-2i/d), so
    rotate(q)_s . rotate(k)_t depends on q, k and s - t only (a relative position scheme, used by
    dense, kernel-hashing and adaptive-sparse when GPTConfig.rope is set; the wpe table is then
    dropped). Computed in float32 at least (float64 for float64 input), returned in t's dtype."""
    half, dt = t.shape[-1] // 2, torch.promote_types(t.dtype, torch.float32)
    inv = base ** (-2 * torch.arange(half, device=t.device, dtype=dt) / t.shape[-1])
    ang = torch.arange(pos0, pos0 + t.shape[-2], device=t.device, dtype=dt)[:, None] * inv
    cos, sin = ang.cos(), ang.sin()
    a, b = t[..., :half].to(dt), t[..., half:2 * half].to(dt)
    return torch.cat([a * cos - b * sin, a * sin + b * cos, t[..., 2 * half:].to(dt)], -1).to(t.dtype)


# --------------------------------------------------------------------------------------
# dense: causal softmax attention
# --------------------------------------------------------------------------------------


class DenseAttention(nn.Module):
    """Causal multi-head softmax attention (Vaswani et al., "Attention Is All You Need", 2017).

        q, k, v = x W_q, x W_k, x W_v            split into n_head heads of size d
        o_t = sum_{s<=t} softmax_s(q_t . k_s / sqrt(d)) v_s
        y = o W_o

    Positions: nanoGPT's learned table (wpe), or with config.rope rotary q and k (rotate above;
    the table is then dropped). Computed by torch's scaled_dot_product_attention (flash /
    memory-efficient kernels where available). Cost per layer: O(T^2 d) time; O(T d) memory with a
    fused kernel, O(T^2) with the math fallback. Decode state: a KV cache, O(T d).
    """

    uses_absolute_positions = True  # unless config.rope: rotary q, k instead (see rotate)
    supports_rope = True
    has_input_norm = False

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.rope = config.rope
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x, pos0=0):
        """q, k, v (B, H, T, d) of x at positions pos0.., q and k rotated when rope is on."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if self.rope:
            q, k = rotate(q, pos0), rotate(k, pos0)
        return q, k, v

    def _out(self, y):
        B, H, T, D = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, H * D)))

    def forward(self, x):
        q, k, v = self._heads(x)
        p = self.dropout if self.training else 0.0
        return self._out(F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True))

    def decode(self, x, state):
        q, k, v = self._heads(x, 0 if state is None else state[0].shape[2])
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
#     C = sums / max(counts, 0.01); once per optimizer step, over all its micro-batches (and DDP ranks):
#         counts_s <- g counts_s + (1-g) #{t: z_t = s},  sums_s <- g sums_s + (1-g) sum_{z_t=s} k_t
#     (buffers, never touched by the optimizer; g = vq_ema_decay). Training forwards only gather the
#     counts and sums; GPT.commit_codebook_updates(), called by train.py after each optimizer step,
#     applies them, so every micro-batch of a step sees the same codebook (as the official code,
#     whose codebook is a parameter updated by SGD at rate 1 on a surrogate loss in the same step).
#
# Block-wise attention with block length L. A query i in block r attends exactly to the keys
# j <= i of its own block and to all of block r-1; every older key (blocks <= r-2) is in a
# compressive cache: per code s, its count N_s(r) and the mean of its values vbar_s(r):
#
#     logit_ij = (q_i + u') . k^_j + (q_i + w') . R_{i-j} [i-j <= L]   window (Transformer-XL bias)
#     logit_is = (q_i + u') . c_s + log N_s(r)     (-inf when N_s(r) = 0)   cache
#     (u' = u d_k^-1/4, w' = w d_k^-1/4: see the relative position bias below)
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
# w vectors (zero-initialised), used as u d_k^-1/4 and w d_k^-1/4: like q, k and R, the official
# code multiplies its xl_u and xl_v parameters by tau^-1/2 = d_k^-1/4 (tau = sqrt(d_k)) where it
# adds them to q, so (q + u) . k is (q~ + u) . k~ / sqrt(d_k) for the normalised q~, k~. The
# cache gets the content bias u but no position term, and window keys further than L get none.
# The GPT therefore has no absolute position table.
#
# Cost per layer, T tokens, d = d_k + d_v: time O(T (L + S) d), memory O(T d), no T x T tensor
# in forward or backward. kernels/vq.py computes it chunk by chunk, chunks of G blocks with a cache
# per chunk (a query scores the block before its chunk and its chunk key by key, and S codes):
# in Triton on CUDA with G = S / L (memory O(T d + (T/(G L)) S d_v) = O(T d)), in PyTorch
# elsewhere with G chosen by a cost model (1 at the paper's knobs and the long config's).
# Without autograd in eval mode (evaluation, and decode's prefill) the CPU path streams: one piece
# (whole chunks, about 2^20 logits, or stream_len positions) at a time is projected, quantized and
# attended, carrying the block before it and the cache (N and value sums per code), so its memory
# beyond x and y is O(P (L + C + S + d) + g S d_v) for pieces of P positions, independent of T (g: chunks
# whose caches are built at once, kernels.vq.nograd_chunk_group, 1 at the paper's unit).
# Decode: O(1) state per layer (the current and previous block, N and the value sums per
# code) and O(L + S) time per token, independent of the context length.
#
# Dense-GAU ablation (vq_quantize=False): the same unit (norms, gate, u, w and R) with the
# quantizer off: logit_ij = (q_i + u') . k_j + (q_i + w') . R_{i-j} [i-j <= L] over every key
# j <= i (unquantized), one exact causal softmax; no codebook, no cache, no commitment loss.
# It isolates what quantization and the cache cost. O(T^2) time and memory (a plain masked
# softmax); decode keeps every key and value.
#
# vq_n_head > 1 splits d_k per head into separate heads with their own codebooks (d_v split
# across heads, one shared gate); vq_gau_layout=True stacks two GAUs in the module (the
# paper's layout; pair it with mlp_ratio=0 for two GAUs and no MLP per layer).
#
# Deliberate deviations from the official code (transformer-vq/transformer_vq: nn/, scripts/), checked
# against its source, one per line; the unit's arithmetic is otherwise the same:
# - sinusoid base 10^4 (official pe_lam default 10^5); no dropout on the sinusoids (its p_dropsin).
# - codebook init c_sum ~ N(0, d_k^-1/2), the keys' scale (official: fan-in scaling, N(0, 1/(H S))).
# - input RMSNorm with a gain and no bias (official: gain and bias, its LayerNorm's defaults).
# - GPT's final LayerNorm kept (official: none on enwik8, RMSNorm with gain and bias on PG-19).
# - one GAU + the GPT's MLP per layer by default (official: two GAUs, d_ff=0: vq_gau_layout=True).
# - vq_n_head splits d_v across heads (official: d_v per head, the width grows with n_head).
# - window of one previous block (official: mem_len M, set per run, may differ from L).
# - gradients always reach the previous block and the cache's values (official grad_thru_cache=1).
# - each training window starts with an empty cache (official: update segments carry it over).
# - GPT-2 init, one dropout rate, tied head, no output bias (official: fan-in init, several rates, bias).


def _f32(t):
    """Attention arithmetic runs in float32 at least (bfloat16/float16 inputs are upcast)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def relative_sinusoids(n, width, device, lam=10000.0):
    """Sinusoidal embeddings of the distances 0..n-1, (n, width) = [sin | cos]."""
    inv = lam ** (-torch.arange(0, width, 2, device=device, dtype=torch.float32) / width)
    ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


# Logits per piece of the streaming forward (over batch and heads; W = S + L + C per query): the paper's unit
# (W 1024) streams 1024 positions at a time, the long config's (W 256) 4096. A memory choice: longer pieces are
# faster (the paper's unit at 4096 positions: 0.89x / 0.87x the time of 1024 at 8k / 32k) but hold more (about
# 14 MiB per 1024 positions there), and 1024 keeps that unit's forward within 2x of the official scan's memory
# (results/peer-vq/session-c/stream-len*, README's VQ section).
STREAM_LOGITS = 1 << 20


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
        self.quantized = config.vq_quantize
        self.stream_len = None  # positions per piece of the streaming forward (whole chunks); None: STREAM_LOGITS
        self.chunk_blocks = None  # blocks per chunk; None: kernels.vq.chunk_blocks_by_cost (CPU), chunk_blocks_cuda (CUDA)
        self.aux_loss = None
        self.step_pending = False
        if not self.quantized:  # the dense-GAU ablation keeps no codebook
            return
        # codebook as EMA statistics: c = c_sum / max(c_count, 0.01)
        self.register_buffer("c_sum", torch.randn(H, self.S, dk) * self.tau)
        self.register_buffer("c_count", torch.ones(H, self.S))
        self.register_buffer("last_counts", torch.zeros(H, self.S), persistent=False)  # diagnostics
        # this optimizer step's statistics (all micro-batches so far), applied by commit_codebook_update
        self.register_buffer("step_counts", torch.zeros(H, self.S), persistent=False)
        self.register_buffer("step_sums", torch.zeros(H, self.S, dk), persistent=False)
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
        with torch.no_grad():  # argmin of |c|^2 - 2 k . c (|k|^2 is the same for every code): one product
            ext = torch.cat([-2 * c, (c * c).sum(-1, keepdim=True)], -1).to(k.dtype)
            z = (torch.cat([k, k.new_ones(*k.shape[:-1], 1)], -1) @ ext.transpose(-1, -2)).argmin(-1)
        cz = c[torch.arange(self.H, device=k.device)[None, :, None], z]  # (B, H, T, d_k)
        err = (k - cz).pow(2).sum(-1)
        return z, straight_through(k, cz), err

    @torch.no_grad()
    def accumulate_codebook_stats(self, k, z):
        """Add this micro-batch's per-code counts and key sums to the step's statistics."""
        kz = k.detach().to(self.c_sum.dtype).transpose(0, 1).reshape(self.H, -1, self.dk)  # (H, B*T, d_k)
        zz = z.transpose(0, 1).reshape(self.H, -1)
        self.step_counts.scatter_add_(1, zz, torch.ones_like(zz, dtype=self.step_counts.dtype))
        self.step_sums.scatter_add_(1, zz.unsqueeze(-1).expand(-1, -1, self.dk), kz)
        self.step_pending = True

    @torch.no_grad()
    def commit_codebook_update(self):
        """One EMA step towards the statistics gathered since the last call (summed over DDP
        ranks), then clear them; train.py calls it once per optimizer step. No statistics, no update."""
        if not self.step_pending:
            return
        counts, sums = self.step_counts, self.step_sums
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = torch.cat([counts.unsqueeze(-1), sums], dim=-1)
            torch.distributed.all_reduce(stats)
            counts, sums = stats[..., 0], stats[..., 1:]
        self.c_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.c_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.step_counts.zero_()
        self.step_sums.zero_()
        self.step_pending = False

    def _content_q(self, q):
        """q + u d_k^-1/4: the query for content logits (window keys and codewords)."""
        return q + (self.xl_u * self.tau).to(q.dtype).view(1, self.H, 1, self.dk)

    def _window_bias(self, q, rel):
        """(q + w d_k^-1/4) . R_d for d = 0..L: (B, H, T, L+1)."""
        return (q + (self.xl_w * self.tau).to(q.dtype).view(1, self.H, 1, self.dk)) @ rel.transpose(-1, -2)

    def _out(self, o, g):
        B, H, T, dvh = o.shape
        o = o.transpose(1, 2).reshape(B, T, H * dvh).to(g.dtype)
        return self.resid_dropout(self.c_proj(o * g))

    def forward(self, x):
        if self.quantized and not self.training and not torch.is_grad_enabled() and not (x.is_cuda and HAS_TRITON):
            return self._stream(x)  # evaluation, prefill: memory independent of T
        q, k, v, g = self._project(x)
        if not self.quantized:  # dense-GAU ablation: the same unit, exact attention over k
            bias = self._window_bias(q, self._rel(x.device))
            return self._out(gau_dense_attention(self._content_q(q), k, v, self.L, bias), g)
        z, k_hat, err = self.quantize(k)
        commit = err.sum(1).mean()
        self.last_commit = (self.beta * commit).detach()  # read by extra_metrics (no sync here)
        self.aux_loss = self.beta * commit if self.training else None
        with torch.no_grad():
            zz = z.transpose(0, 1).reshape(self.H, -1)
            self.last_counts.zero_().scatter_add_(1, zz, torch.ones_like(zz, dtype=self.last_counts.dtype))
        bias = self._window_bias(q, self._rel(x.device))
        o = vq_attention(self._content_q(q), k_hat, z, v, self.codebook(), self.L, bias, self.chunk_blocks)
        if self.training:  # the codebook moves only in commit_codebook_update, once per optimizer step
            self.accumulate_codebook_stats(k, z)
        return self._out(o, g)

    @torch.no_grad()
    def _stream(self, x, keep_state=False):
        """The forward without autograd, piece by piece (whole chunks of the CPU path's
        chunk_blocks_by_cost blocks, stream_len positions or, when None, about STREAM_LOGITS logits
        per piece over batch and heads): project, quantize and attend one piece at a time, carrying
        the block before it and the cache counts and value sums. Extra memory O(P (L + C + S + d) +
        g S d_v) for pieces of P positions (g: kernels.vq.nograd_chunk_group), independent of T.
        Same result, last_counts and last_commit as the training forward. keep_state: also return
        decode's state after x (the prefill)."""
        B, T, _ = x.shape
        H, L, S = self.H, self.L, self.S
        G = self.chunk_blocks or chunk_blocks_by_cost(L, S, self.dk, self.dv // H, min(T, self.stream_len or T))
        C = G * L
        P = max(1, (self.stream_len or STREAM_LOGITS // (B * H * (S + L + C))) // C) * C
        rel, cb = self._rel(x.device), self.codebook()
        prev = counts = sums = y = None
        commit = 0.0
        self.last_counts.zero_()
        for s0 in range(0, T, P):
            carry = None if prev is None else (counts, sums, *prev)
            out, piece, err = self._stream_piece(x[:, s0:s0 + P], rel, cb, G, carry)
            if y is None:  # the cache in the values' dtype (float32 at least), as the training path's
                y, v = out.new_empty(B, T, out.shape[-1]), piece[1]
                counts, sums = v.new_zeros(B, H, S), v.new_zeros(B, H, S, v.shape[-1])
            y[:, s0:s0 + P] = out
            commit = commit + err
            if s0 + P < T:  # the keys before the next piece's previous block enter the cache
                k_hat, v, z = piece
                if prev is not None:
                    vq_cache_fold(counts, sums, prev[2], prev[1])
                vq_cache_fold(counts, sums, z[:, :, :P - L], v[:, :, :P - L])
                prev = tuple(t[:, :, P - L:].clone() for t in piece)
                out = piece = carry = k_hat = v = z = None  # freed before the next piece is projected
        self.last_commit = self.beta * commit / (B * T)
        self.aux_loss = None
        if not keep_state:
            return y
        # decode's window starts at w0; the kept keys (block before the last piece, the last piece) start at p0
        k_hat, v, z = piece
        pk, pv, pz = prev if prev is not None else (k_hat[:, :, :0], v[:, :, :0], z[:, :, :0])
        p0, w0 = s0 - pk.shape[2], max(0, (T // L - 1) * L)
        wk, wv, wz = torch.cat([pk, k_hat], 2), torch.cat([pv, v], 2), torch.cat([pz, z], 2)
        cut = w0 - p0  # the kept positions before the window enter the cache
        vq_cache_fold(counts, sums, wz[:, :, :cut], wv[:, :, :cut])
        return y, dict(pos=T, w0=w0, k=wk[:, :, cut:], v=wv[:, :, cut:], z=wz[:, :, cut:], N=counts, U=sums)

    def _stream_piece(self, x, rel, cb, G, carry):
        """One piece of _stream: its output, (quantized keys, values, codes) and summed squared
        quantization error; counts its codes into last_counts."""
        q, k, v, g = self._project(x)
        v = v.contiguous()  # head-major (B, H, T, d_v), so the attention reads it in place (a copy only when B, H > 1)
        z, k_hat, err = self.quantize(k)
        H = self.H
        self.last_counts.scatter_add_(1, z.transpose(0, 1).reshape(H, -1),
                                      torch.ones(H, z.numel() // H, device=x.device, dtype=self.last_counts.dtype))
        o = vq_attention(self._content_q(q), k_hat, z, v, cb, self.L, self._window_bias(q, rel), G, carry)
        return self._out(o, g), (k_hat, v, z), err.sum()

    # ---- decoding: the window (previous + current block) and per-code counts / value sums
    @torch.no_grad()
    def decode(self, x, state):
        """Incremental pass; state None starts a sequence at position 0. The state holds the
        window's quantized keys, values and codes (at most 2L), and N, U per code.
        The dense-GAU ablation keeps every key and value instead (O(T) state and time per token)."""
        if not self.quantized:
            q, k, v, g = self._project(x)
            if state is not None:
                k, v = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)
            bias = self._window_bias(q, self._rel(x.device))
            o = gau_dense_attention(self._content_q(q), k, v, self.L, bias)
            return self._out(o, g), dict(k=k, v=v)
        if state is None and not (x.is_cuda and HAS_TRITON):  # prefill, streamed: memory independent of T
            return self._stream(x, keep_state=True)
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
        if not self.quantized:
            return {}
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
        if not u.quantized:  # dense-GAU ablation: every key, no quantizer
            return len(self.units) * 6 * u.H * T * (u.dk + u.dv // u.H)
        keys = min(2 * u.L, T) + u.S  # window and cache entries per query
        # logits and weighted values, forward + backward (x3), 2 flops per MAC; quantizer distances
        return len(self.units) * (6 * u.H * keys * (u.dk + u.dv // u.H) + 2 * u.H * u.S * u.dk)


ATTENTION["vq"] = VQAttention

# --------------------------------------------------------------------------------------
# kernel-hashing: LSH finds the heavy entries, samples estimate the light rest
# --------------------------------------------------------------------------------------

def _process_rank():
    """This process's torch.distributed rank, 0 when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class KernelHashingAttention(DenseAttention):
    """Causal attention by kernel hashing: a HyperAttention-style estimator (locality-sensitive
    hashing finds heavy entries, sampling estimates the rest) with a causality fix and samples
    stratified along the hash order.

    Papers: Indyk, Kapralov, Sheth, Wagner, "Improved Algorithms for Kernel Matrix-Vector
    Multiplication Under Sparsity Assumptions" (ICLR 2025): for the Gaussian kernel matrix
    K_ij = exp(-||x_i - y_j||^2 / (2 sigma^2)) (entries in (0, 1]) whose entries sum to O(n), a
    vector y with ||K x - y|| <= eps ||x|| is computed in sub-quadratic time, LSH finding the heavy
    entries and sampling the light rest. Softmax attention's matrix exp(q.k / sqrt d) becomes that
    kernel with sigma^2 = sqrt(d) after the norm-equalising lift (q, 0, sqrt(M^2 - |q|^2)),
    (k, sqrt(M^2 - |k|^2), 0), up to the constant exp(-M^2 / sqrt d); diagnose.py tests the
    assumption on trained and synthetic q, k. Han, Jayaram, Karbasi, Mirrokni, Woodruff, Zandieh,
    "HyperAttention: Long-context Attention in Near-Linear Time" (ICLR 2024): the causal recursion
    and sorted-block LSH. This block takes the paper's structure (heavy entries exactly, the rest by
    unbiased sampling) but not its guarantee: it has no ||x||-relative bound, and it normalises by the
    estimated row sum, so its output is a ratio of two unbiased estimates.

    Heads and projections as dense. With c = kh_min_seq_len, b = kh_bucket_block, m = kh_samples,
    r = kh_hash_bits, positions are split dyadically from 0: chunks of c, and at level l pairs of
    halves of side s = c 2^l. A query i gets these disjoint pieces, each a partial softmax with
    (o_p, lse_p), merged exactly:
        chunk:     exact causal attention inside its chunk of c tokens (T <= c: exact attention)
        level l:   if i is in a second half, the first half (all past, so nothing is masked) is
                   approximated: angular LSH h(x) = Gray-rank(sign(x R_l)), R_l ~ N(0,1)^{d x r};
                   keys sorted by h and cut into blocks of b; i takes the key block B_i at its own
                   place in that order; m draws S with weights w_j:
                     kh_sampling="importance": p_j = (1 - a) softmax_j(u_j) + a / s, a = 1/2, with
                       u_j = log E[exp(q.k_j / sqrt d)] for q ~ N(mu, Sigma), the mean and covariance of
                       the rectangle's first-half queries (all past: causal), = mu.k_j/sqrt d +
                       k_j^T Sigma k_j / 2d; inclusion probabilities pi_j = min(1, c p_j) summing to m;
                       the sorted order laid out on [0, m), key j taking pi_j, and the points u, u+1, ...,
                       u+m-1 (one uniform offset u) pick the keys: key j is drawn with probability pi_j,
                       never twice, w_j = 1/pi_j;
                     "sorted-strata": one key in each of m equal strata of the sorted order, w = s/m;
                     "uniform": m uniform draws without replacement, w = s/m;
                   N = sum_{j in B_i} e_ij v_j + sum_{draws j in S \\ B_i} w_j e_ij v_j,  e_ij = exp(q_i.k_j/sqrt d)
                   Z = the same sums of e_ij;  o_p = N / Z, lse_p = log Z
        merge:     lse = logsumexp_p lse_p,  o_i = sum_p exp(lse_p - lse) o_p,   y = o W_o
    Every N and Z is unbiased for the exact sum over the rectangle. Gradients flow through the
    lse_p too (the merge weights depend on q and k). HyperAttention aligns blocks of *sorted
    queries* with blocks of sorted keys, which lets later queries move earlier ones between
    blocks (a leak from the future); here a query's block depends on itself and past keys only.
    With m >= s (every key sampled, weight 1) or s <= b the block equals exact attention.

    Decisions, by measurement (python diagnose.py; results/diagnose-long-abspos and diagnose-long;
    errors at T=4096 on the long checkpoints' q, k, v, b 32): the error there is set by the samples
    (it falls about as 1/sqrt(m)). Strata of the hash order spread the samples over the buckets
    (0.314 -> 0.294 at m 128 against uniform draws). Importance draws (the long config's choice)
    send them where the past queries score high and take the keys that would be drawn twice for
    sure: at m 160, 0.232 / 0.217 (kernel-hashing checkpoint trained with strata / dense checkpoint)
    against 0.277 / 0.274 with uniform draws (m 160 does not divide the rectangles' sides, so strata
    fall back to those), 0.217 on the kernel-hashing checkpoint retrained at these knobs, and
    at m 128 0.276 / 0.253 against strata's 0.313 / 0.305 (positions >= 256); one block's fwd+bwd
    at 32k is 0.30x dense's (results/bench-long-kh-importance). In a scratch comparison (T=4096,
    m 160) the moment proxy beat the exact mean of exp over the past queries and its own mean
    term, a = 1/2 beat 0.2 and 0.8, and capped systematic draws beat uncapped per-unit draws
    (0.232 / 0.217 against 0.237 / 0.247); the a/s floor bounds every weight by 2s/m. The draws
    depend on q and k but, like the hashes, carry no gradient: the gradient is that of the
    estimate for the drawn plan. GPTConfig keeps "sorted-strata" (the T=64 runs were measured with
    it). None of this finds a missed heavy key (planted-key input: 0.566 against 0.568 with
    uniform draws), which needs a better hash (several rounds).

    Randomness: planes and samples are hashes of (seed, level, rectangle, batch row, head, key),
    the seed being (per-layer seed buffer, step buffer, DDP rank) in training -- the step counter
    lives in the state_dict, so resuming is exact; ranks draw independently, rank 0 as a single
    process does -- and a fixed per-layer seed in eval mode (the same on every rank). Decoding
    reproduces the eval-mode estimate at each new position (the plan of a prefix is the plan of
    the whole sequence), so cached and uncached generation agree; it costs O(S (d r + log S)) per
    token rather than exact attention's O(S d). No attention dropout (residual dropout only).

    Cost per layer: time O(T d (c + (b + m + r) log(T/c)) + T log^2 T), the sorts giving the last
    term: O(T (b + m) log T) for fixed d, c, r. Memory: the PyTorch path saves q, k, v, o and the row
    LSEs, O(T d), plus O(T log(T/c)) integers of hashes and samples; its forward holds the scores,
    O(T (c + b + m) log(T/c)), and its backward recomputes them piece by piece. No T x T tensor.
    The Triton path (CUDA; kernels/kernel_hashing.py) runs the chunks and each level in one
    gathered-block kernel that returns the LSE, merging each level into a running (o, lse) inside
    one autograd Function: it saves the same O(T d) (q, k, v, o, LSEs), and its backward runs each
    piece's kernel against the final LSE. Plans have sizes fixed by the shapes: no host sync.
    """

    def __init__(self, config):
        super().__init__(config)
        assert config.kh_min_seq_len >= 1 and config.kh_bucket_block >= 1 and config.kh_samples >= 0
        assert 1 <= config.kh_hash_bits <= 16, "kh_hash_bits must be in 1..16"
        self.min_seq_len, self.bucket_block = config.kh_min_seq_len, config.kh_bucket_block
        self.samples, self.hash_bits = config.kh_samples, config.kh_hash_bits
        assert config.kh_sampling in KH_SAMPLING, f"kh_sampling must be one of {KH_SAMPLING}, got {config.kh_sampling!r}"
        self.sampling = config.kh_sampling
        self.backend = "auto"
        self.register_buffer("seed", torch.randint(0, 2**31 - 1, ()))  # per layer; saved in the state_dict
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training forwards so far
        self._metrics = {}

    def _knobs(self):
        return self.min_seq_len, self.bucket_block, self.samples, self.hash_bits

    def forward(self, x):
        q, k, v = self._heads(x)
        if self.training:
            seed = kh_hash(self.seed, 1, self.step)
            rank = _process_rank()
            if rank:  # DDP: every rank its own draws; rank 0 (and a single process) keeps the plain seed
                seed = kh_hash(seed, 3, rank)
            self.step += 1
        else:
            seed = kh_hash(self.seed, 0)
        stats = {} if not self.training and q.shape[2] > self.min_seq_len else None  # diagnostics in eval
        y = kernel_hashing_attention(q, k, v, *self._knobs(), seed, backend=self.backend, stats=stats,
                                     sampling=self.sampling)
        if stats is not None:
            self._metrics = {"approx_mass": stats["approx_mass"], "scored_frac": self.scored_fraction(q.shape[2])}
        return self._out(y)

    def decode(self, x, state):
        q, k, v = self._heads(x, 0 if state is None else state[0].shape[2])
        seed = kh_hash(self.seed, 0)  # the eval-mode estimate
        # the state keeps the queries too: importance sampling reads each rectangle's past queries
        if state is None:  # a prefix: the full pass gives every position its estimate
            return self._out(kernel_hashing_attention(q, k, v, *self._knobs(), seed, backend=self.backend,
                                                      sampling=self.sampling)), (k, v, q)
        k, v, qs = (torch.cat([past, new], dim=2) for past, new in zip(state, (k, v, q)))
        t, S = q.shape[2], k.shape[2]
        ys = [kernel_hashing_query(q[:, :, j:j + 1], k[:, :, :S - t + j + 1], v[:, :, :S - t + j + 1],
                                   *self._knobs(), seed, self.sampling, qs[:, :, :S - t + j + 1])
              for j in range(t)]  # t is 1 when sampling
        return self._out(torch.cat(ys, dim=2)), (k, v, qs)

    def scored_fraction(self, T):
        """Share of the T(T+1)/2 causal (query, key) pairs whose score is computed (an upper
        bound: samples that fall in the query's own block are counted too)."""
        c, b, m = self.min_seq_len, self.bucket_block, self.samples
        n = sum(min(c, T - s0) * (min(c, T - s0) + 1) // 2 for s0 in range(0, T, c))
        for _, s, P in kh_levels(T, c):
            for pair in range(P):
                nq = min(s, T - pair * 2 * s - s)
                n += nq * (s if s <= b else min(b + m, s))
        return n / (T * (T + 1) / 2)

    def extra_metrics(self):
        return {k: float(v) for k, v in self._metrics.items()}  # approx_mass reaches the host here, not in forward

    def attn_flops_per_token(self, T):
        # dense's convention (12 C per key and token, counting every key of the causal row as
        # dense counts all T): the chunk's c keys, plus b + m keys at every level
        c, b, m = self.min_seq_len, self.bucket_block, self.samples
        if T <= c:
            return super().attn_flops_per_token(T)
        keys = c + sum(s if s <= b else min(b + m, s) for _, s, _ in kh_levels(T, c))
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
#                p = as_threshold in (0, 1], at least as_k_min and at most as_k_max (k_max wins). Blocks
#                i-1 and i (own, causal inside) are always kept: K_i = kept + {i-1, i}. Edge values:
#                k_min = 0 is the plain top-p rule, which (p > 0) always keeps the best candidate, so
#                k_min = 0 and 1 select the same blocks; k_max = 0 keeps no candidate: attention
#                over {i-1, i} only, and the correction covers every candidate j <= i-2
#   attention    o_sel_t = sum_{s in K_i, s <= t} softmax_s(q_t . k_s / sqrt(d) + b_ij) v_s
#   correction   c_i = sum_{j in D_i} e^{s_ij} vbar_j / (1 + sum_{j in D_i} e^{s_ij}),
#                D_i = candidates not kept; the 1 is a null slot (logit 0, value 0), so a block
#                with nothing dropped gets c_i = 0. One correction per query block, from the
#                scorer's own logits (NSA derives its selection scores from its compression
#                branch's attention; here the compression branch reuses the selection scores)
#   output       y_t = W_o [g_sel_t * o_sel_t + g_cmp_t * c_{block(t)}],
#                (g_sel, g_cmp) = sigmoid(x_t W_g + b_g) per token and head, as NSA's gates; W_g
#                starts small (std 0.02) and b_g at 0, but g_sel's bias at as_gate_bias (2 in the
#                T=64 config: the selected attention starts nearly open, as in dense)
#
# NSA's other options, each off by default:
#   as_window = w > 0     a third branch, NSA's sliding window, with its own softmax and gate:
#                         o_win_t = sum_{t-w < s <= t} softmax_s(q_t . k_s / sqrt(d)) v_s,
#                         y_t = W_o [g_sel o_sel + g_cmp c + g_win o_win], g_win a third sigmoid
#                         gate per token and head (not with as_dense_equivalent: no gates there)
#   as_force_first        NSA's forced initial block, as an addition to the selected set: block 0
#                         is not a candidate (not scored, not counted in k_min/k_max, not in the
#                         correction) and is always attended: K_i = kept + {0, i-1, i} for i >= 2
#   as_compress = l > 0   NSA's compressed branch, per token, in place of the per-block correction
#   as_compress_stride = d  (under the same gate g_cmp): keys and values pooled by a mean over the
#                         windows [j d, j d + l) (NSA: l 32, d 16, overlapping), and each token attends
#                         to the windows complete by then, plus the null slot:
#                         o_cmp_t = sum_{j: j d + l - 1 <= t} softmax_j(q_t . kc_j / sqrt(d_head)) vc_j,
#                         y_t = W_o [g_sel o_sel + g_cmp o_cmp (+ g_win o_win)]. Deviations from NSA: the
#                         compressor is a mean, not a learned MLP with intra-block positions; selection
#                         stays the learned scorer's (NSA scores blocks from this branch's attention)
#
# Strictly causal: the scorer's query side is the mean query of the previous (complete) block,
# so a block's selection and correction depend only on tokens before it, and only complete
# blocks j <= i-2 are ever scored or pooled. The scorer starts as MoBA's rule: W_q = W_k = one
# random orthonormal projection, so s_ij ~ qbar . kbar / sqrt(d) within as_score_dim directions.
#
# Gradient to the scorer (selection is discrete), two paths: (1) the correction branch, whose
# weights are softmaxes of s; (2) straight-through: the blocks the top-p rule chose get the logit
# bias b_ij = log pi_ij - sg(log pi_ij), exactly 0 in value (the forward pass is exact attention over
# K_i), while dL/d log pi_ij = the sum over the (block i, block j) tile of dL/dlogit: whether more
# attention to block j would lower the loss; through the softmax normaliser the dropped
# candidates get the opposite push. Blocks kept only because of k_min get no bias: their score does
# not decide whether they are kept, and with the bias a forced block that hurt had its log pi pushed
# down without bound (d log pi / ds -> 1 as pi -> 0), so k_min >= 2 diverged
# (results/as-kmin-probe). The gates learn by ordinary backprop.
#
# Budget regulariser (as_budget = lambda > 0, training only; DCP's sparsity term, here on the
# top-p rule): the expected kept count of query block i,
#   E_i = sum_{r <= k} sigma((p - M_ir) / kappa),   M_ir = the mass pi of the candidates ranked before r
# (1 for the first k_min ranks; kappa = budget_softness = 0.1; E_i -> the kept count as kappa -> 0),
# enters the loss as lambda * mean_i E_i / k over the scored query blocks. Its gradient sharpens pi
# onto the best-ranked blocks, the direction in which the threshold, not k_max, sets the count; the
# language-model loss decides which blocks are ranked first. pi at the ranked slots carries the
# straight-through term's first-order gradient (the softmax normaliser's gradient is pi itself),
# so it costs O(n k r) and keeps nothing of size n^2 (tested against the full softmax).
#
# Dense-equivalent setting (as_dense_equivalent=True): keep every block (p = 1, no k_max), no
# correction or gates (g_sel = 1, g_cmp = 0) and no straight-through term (b_ij = 0 with no
# gradient): exactly dense causal attention, in value and gradient (the scorer gets none). No attention-
# probability dropout in either branch (the Triton kernel has none); the residual dropout is kept.
#
# Cost per layer and head, T tokens, n = T/B blocks, k = as_k_max, r = as_score_dim: scoring,
# selection and correction O(n^2 (r + d)) time, in ranges of query blocks of about 2^16 scores each
# (2^22 on a GPU, where up to that many per (batch, head) may be kept),
# each range against only the key blocks it can see (about half the square); with several ranges and
# more than 2^22 scores in all (over batch and heads; below that keeping them, <= ~40 MB, is cheaper
# than torch's checkpointing) each range is recomputed in the backward, so autograd keeps
# O(n (k + r + d)) of it and the peak holds one range's scores: memory linear in T (tested on the
# saved tensors). Selected attention O(T (kbar+2) B d)
# time and O(T (kbar+2) B) memory, kbar <= k the mean number of blocks kept (the work follows the kept
# blocks, not the cap). The compressed branch, when on, O(T^2 d / (2 stride)) time in ranges recomputed
# likewise. No T x T tensor, and memory O(T k B) in all.
# Decode: a KV cache (a buffer grown by doubling, written in place) plus the block means qbar,
# kbar, vbar of the complete blocks, each computed once when its block completes (and the queries
# of the current partial block); each new query's block is selected by the same rule from the
# same means, so decode equals the full forward and greedy cached generation equals full
# recompute. A block's selection depends only on the blocks before it, so it is computed at the
# block's first token and reused by the rest: O(n r (d + 1) / B + (k+2) B d) per token at context
# S, n = S/B blocks, amortised (and O(d) for the cache append): no mean is recomputed, the cache
# is not copied. With as_compress the
# compressed blocks are kept the same way (each pooled once, when its window completes).
#
# kernels/adaptive_sparse.py: scoring, selection and correction in PyTorch; the selected-block
# attention in PyTorch by gather + softmax with query blocks grouped by their number of kept blocks,
# or in Triton (block-sparse flash attention, forward and backward) on CUDA for B >= 16, a power of two.


class AdaptiveSparseAttention(nn.Module):
    """Learned block scoring, top-p block selection, exact attention over the kept blocks plus a
    gated correction over the pooled dropped blocks; see the section comment above."""

    uses_absolute_positions = True
    has_input_norm = False

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        for key, ok in (("as_block", config.as_block >= 1), ("as_k_min", config.as_k_min >= 0),
                        ("as_k_max", config.as_k_max >= 0), ("as_threshold", 0 < config.as_threshold <= 1),
                        ("as_score_dim", config.as_score_dim >= 1), ("as_window", config.as_window >= 0),
                        ("as_compress", config.as_compress >= 0), ("as_budget", config.as_budget >= 0),
                        ("as_compress_stride",
                         not config.as_compress or 1 <= config.as_compress_stride <= config.as_compress)):
            if not ok:
                raise ValueError(f"{key} out of range: got {getattr(config, key)!r} (see AdaptiveSparseAttention)")
        if config.as_window and config.as_dense_equivalent:
            raise ValueError("as_window needs the gates, which the dense-equivalent setting has not: set as_window=0")
        if config.as_compress and config.as_dense_equivalent:
            raise ValueError("as_compress needs the gates, which the dense-equivalent setting has not: set as_compress=0")
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.block = config.as_block
        self.dense_equivalent = config.as_dense_equivalent
        self.threshold = 1.0 if self.dense_equivalent else config.as_threshold
        self.k_max = None if self.dense_equivalent else config.as_k_max  # None: no cap
        self.k_min = config.as_k_min
        self.score_dim = config.as_score_dim
        self.window = config.as_window
        self.force_first = int(bool(config.as_force_first))  # 1: block 0 forced
        self.compress = (config.as_compress, config.as_compress_stride) if config.as_compress else None
        self.rope = config.rope
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
        self.budget = 0.0 if self.dense_equivalent else config.as_budget
        self.aux_loss = None  # budget * expected kept share of the last training forward (GPT adds it)
        # NSA-style gates (g_sel, g_cmp[, g_win]) per token and head; absent in the dense-equivalent setting
        n_gates = 3 if self.window else 2
        self.gate = None if self.dense_equivalent else nn.Linear(config.n_embd, n_gates * config.n_head, bias=True)
        self.gate_bias = config.as_gate_bias
        self._stats = None
        self._last_T = None
        self.last_selected = None  # last forward: (B, H, n_blocks, n_slots) kept candidate ids, -1 = none
        self.last_kept = None  # last forward: (B, H, n_blocks) number of kept candidates

    supports_rope = True
    _heads = DenseAttention._heads  # the same c_attn / c_proj head layout as dense (and rotary q, k)
    _out = DenseAttention._out

    @torch.no_grad()
    def reset_parameters_after_gpt_init(self):
        """GPT's init zeroes every Linear bias; the selection gate's (the first n_head outputs) starts at as_gate_bias."""
        if self.gate is not None:
            self.gate.bias[:self.n_head].fill_(self.gate_bias)

    # the (nq, nk) scores in ranges of about select_chunk_scores scores per (batch, head), at least
    # select_min_blocks query blocks each (recomputed in the backward when there are several and the
    # whole matrix exceeds select_recompute_scores entries). None: 2^16 on the CPU (memory), 2^22 on a
    # GPU, where each range's few dozen small launches cost more than its memory: at T = 128k (blocks
    # of 64) 2^16 gave 32 ranges and a block whose host time was 7.6x its device time; with one range
    # it ran 12.8x faster and its peak memory rose from 552 to 705 MiB (results/gpu-h200). Up to 2^22
    # scores (16 MB) per (batch, head) may then be kept: memory stays linear in T beyond that constant.
    select_chunk_scores, select_min_blocks, select_recompute_scores = None, 64, 1 << 22
    select_chunk_scores_by_device = {"cpu": 1 << 16, "cuda": 1 << 22}
    budget_softness = 0.1  # width of the sigmoid in the expected kept count (in scorer mass)

    def scorer(self):
        """The scorer's parameters and the selection rule, for adaptive_sparse_attention."""
        by_device = self.select_chunk_scores_by_device
        chunk = self.select_chunk_scores or by_device.get(self.score_q.device.type, by_device["cpu"])
        return Scorer(self.score_q, self.score_k, self.score_log_temp, self.threshold, self.k_min, self.k_max,
                      chunk, self.select_min_blocks, self.select_recompute_scores,
                      straight_through=not self.dense_equivalent,
                      first=self.force_first, softness=self.budget_softness if self.budget > 0 else 0.0)

    def _gates(self, x):
        """(g_sel, g_cmp[, g_win]), each (B, H, T, 1); None in the dense-equivalent setting."""
        if self.gate is None:
            return None
        B, T, _ = x.shape
        g = torch.sigmoid(self.gate(x)).view(B, T, -1, self.n_head).permute(2, 0, 3, 1).unsqueeze(-1)
        return tuple(g)

    def forward(self, x):
        q, k, v = self._heads(x)
        gates = self._gates(x)
        expected = [] if self.training and self.budget > 0 else None
        o, sel, blocks = adaptive_sparse_attention(q, k, v, gates, 0, self.block, self.scorer(), window=self.window,
                                                   compress=self.compress, expected_kept=expected)
        self.aux_loss = None
        if expected:  # the budget regulariser: expected kept count over the slots, mean over scored blocks
            scored = (blocks >= 2 + self.force_first).to(expected[0].dtype)
            self.aux_loss = self.budget * (expected[0] * scored).sum() / (
                scored.sum().clamp(min=1) * sel.shape[0] * sel.shape[1] * max(sel.shape[-1], 1))
        with torch.no_grad():  # diagnostics for extra_metrics (kept on device, read at evaluation)
            self._last_T = x.shape[1]
            self.last_selected = sel.detach()
            self.last_kept = kept = (sel >= 0).sum(-1)
            attended = kept + (blocks > 0).long() + 1  # kept candidates + previous + own block
            attended = attended + (blocks >= 2).long() * self.force_first  # + block 0 when forced
            available = (blocks + 1).expand_as(attended)  # blocks 0..i
            scored = (blocks >= 2 + self.force_first).expand_as(kept)  # query blocks that have candidates
            self._stats = dict(frac_blocks_attended=attended.sum() / available.sum(),
                               blocks_selected=(kept * scored).sum() / scored.sum().clamp(min=1))
            if gates is not None:
                self._stats.update(gate_sel=gates[0].mean(), gate_cmp=gates[1].mean())
                if self.window:
                    self._stats.update(gate_win=gates[2].mean())
        return self._out(o)

    def decode(self, x, state):
        """Incremental pass; state None starts at position 0. The state: the key/value cache, in a
        zero-filled buffer grown by doubling and written in place (no per-token copy of the cache;
        a second decode from an already extended state copies it first), the means (qbar, kbar,
        vbar) of the complete blocks (each appended once, when its block completes), the
        queries of the current partial block (fewer than as_block) and the current block's
        selection and correction (computed at its first token, reused by the others)."""
        q0 = 0 if state is None else state["len"]
        q, k, v = self._heads(x, q0)
        Bk = self.block
        S = q0 + q.shape[2]
        if state is None:
            buf, q_part, means = dict(k=k[:, :, :0], v=v[:, :, :0], filled=0), q[:, :, :0], [q[:, :, :0]] * 3
        else:
            buf, q_part, means = state["buf"], state["q_part"], state["means"]
            if buf["filled"] != q0:  # another decode already extended this buffer: branch off a copy
                buf = dict(k=buf["k"][:, :, :q0].clone(), v=buf["v"][:, :, :q0].clone(), filled=q0)
        need = -(-S // Bk) * Bk  # whole blocks; rows past S stay zero (masked as causally later)
        if buf["k"].shape[2] < need:
            cap = max(need, -(-2 * buf["k"].shape[2] // Bk) * Bk)
            for name in ("k", "v"):
                grown = k.new_zeros(k.shape[0], k.shape[1], cap, k.shape[3])
                grown[:, :, :q0] = buf[name][:, :, :q0]
                buf[name] = grown
        buf["k"][:, :, q0:S], buf["v"][:, :, q0:S] = k, v
        buf["filled"] = S
        k, v = buf["k"], buf["v"]
        n_old, n_new = q0 // Bk, S // Bk  # complete blocks before and after this chunk
        q_blk = torch.cat([q_part, q], 2)  # queries from the start of block n_old
        if n_new > n_old:
            span = slice(n_old * Bk, n_new * Bk)
            done = (q_blk[:, :, :(n_new - n_old) * Bk], k[:, :, span], v[:, :, span])
            means = [torch.cat([m, block_means(t, Bk)], 2) for m, t in zip(means, done)]
        cmp = None
        if self.compress:  # compressed blocks completed by this chunk, appended once each
            length, stride = self.compress
            cmp = [q[:, :, :0]] * 2 if state is None else state["cmp"]
            cmp = [torch.cat([c, compressed_blocks(t, length, stride, c.shape[2], S)], 2) for c, t in zip(cmp, (k, v))]
        cache = {} if state is None else state["selection"]  # the current block's selection, reused per token
        o, _, _ = adaptive_sparse_attention(q, k, v, self._gates(x), q0, Bk, self.scorer(), means=means,
                                            window=self.window, compress=self.compress, compressed=cmp,
                                            selection_cache=cache)
        state = dict(buf=buf, len=S, means=means, q_part=q_blk[:, :, (n_new - n_old) * Bk:], cmp=cmp, selection=cache)
        return self._out(o), state

    def extra_metrics(self):
        """Last forward: fraction of the causally available blocks attended (kept + previous +
        own over blocks 0..i, summed over query blocks and heads), mean number of scored blocks
        kept per query block that has candidates, and mean gates."""
        return {} if self._stats is None else {k: float(v) for k, v in self._stats.items()}

    def attention_stats(self):
        """Scored candidates kept per query block in the last forward, over all rows, heads and the
        query blocks that have candidates (blocks 2..): mean, min, max, and the fraction of them at
        the cap (kept = k_max < candidates). {} before a forward or when no block has candidates."""
        if self.last_kept is None:
            return {}
        i = torch.arange(self.last_kept.shape[-1], device=self.last_kept.device)
        n_cand = (i - 1 - self.force_first).clamp(min=0)  # candidates of block i
        kept, n_cand = self.last_kept[..., n_cand > 0].float(), n_cand[n_cand > 0]
        if kept.numel() == 0:
            return {}
        at_cap = (kept == self.k_max) & (n_cand > self.k_max) if self.k_max is not None else torch.zeros_like(kept)
        stats = torch.stack([kept.mean(), kept.min(), kept.max(), at_cap.float().mean()]).tolist()  # one sync
        return dict(zip(("as/kept_mean", "as/kept_min", "as/kept_max", "as/at_cap"), stats))

    def work_stats(self):
        """The work of the last forward: mean scored candidates kept per query block (over every
        query block, head and row: blocks 0 and 1, which have none, count as 0) and the fraction of
        the T (T + 1) / 2 causal (query, key) pairs attended by the selected-block branch (kept,
        forced first and previous blocks in full, the own block causally; the window branch, when
        on, is not counted). {} before a forward."""
        if self.last_kept is None:
            return {}
        T, Bk = self._last_T, self.block
        kept = self.last_kept.double()
        i = torch.arange(kept.shape[-1], device=kept.device)
        rows = (T - i * Bk).clamp(max=Bk).double()  # query rows of block i (the last may be partial)
        full = kept + (i > 0).double() + (i >= 2).double() * self.force_first  # + block 0 when forced
        pairs = (full * Bk * rows + rows * (rows + 1) / 2).sum(-1).mean()
        return dict(kept_per_block=float(kept.mean()), frac_pairs=float(pairs) / (T * (T + 1) / 2))

    def attn_flops_per_token(self, T):
        # forward + backward (x3), 2 flops per MAC, as DenseAttention counts it: the selected
        # attention per token, plus per query block (shared by its B tokens) the scores, the
        # straight-through pi @ sk, and the correction (logits and values at width max(d, r))
        nb = -(-T // self.block)
        keys = min(T, (n_slots(nb, self.k_max, self.force_first) + 2 + self.force_first) * self.block)
        keys += min(T, self.window)  # the sliding-window branch (an upper bound: ~w keys per token)
        if self.compress:  # the compressed branch instead of the correction: up to n_compressed(T) keys per token
            keys += n_compressed(T, *self.compress)
        width = max(self.head_dim, self.score_dim)
        per_block = nb * 2 * self.score_dim + (0 if self.gate is None else nb * 2 * width)
        return 12 * self.c_proj.in_features * keys + 6 * self.n_head * per_block / self.block


ATTENTION["adaptive-sparse"] = AdaptiveSparseAttention

# --------------------------------------------------------------------------------------
# generative-function: a parameter-free causal comparison in place of attention
# --------------------------------------------------------------------------------------

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
        y, took_prev, took_mean = causal_generative_function(x, self.fn, self.avg_context, self.use_triton)
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
    (kernels/generative.py), forward and backward; elsewhere its PyTorch path runs.

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
    """Pre-norm residual block: x + mix(norm(x)), then x + MLP(norm(x)).

    With config.short_conv = w > 0 the mixer reads a causal depthwise convolution of its input,
    h'_t = sum_{j<w} c_j * h_{t-j} (one filter per channel, zero before position 0), as the
    models of Zoology's recall study and H3 do: it hands each token its predecessors, so
    associative recall needs one retrieval instead of a two-layer induction circuit. The same
    layer sits in front of every block, so it is no block's advantage; off by default."""

    def __init__(self, config):
        super().__init__()
        mixer = ATTENTION[config.attention]
        self.ln_1 = nn.Identity() if mixer.has_input_norm else LayerNorm(config.n_embd, config.bias)
        self.conv = None
        if config.short_conv > 0:
            # holds the filters; mixer_input pads causally itself (with decode's past inputs)
            self.conv = nn.Conv1d(config.n_embd, config.n_embd, config.short_conv, groups=config.n_embd,
                                  bias=config.bias)
        self.attn = mixer(config)
        self.has_mlp = config.mlp_ratio > 0
        if self.has_mlp:
            self.ln_2 = LayerNorm(config.n_embd, config.bias)
            self.mlp = MLP(config)

    def mixer_input(self, x, past=None):
        """norm(x), convolved when short_conv is on. past: the last w-1 normed inputs before x
        (decode); returns (input, the last w-1 normed inputs up to x)."""
        h = self.ln_1(x)
        if self.conv is None:
            return h, None
        w = self.conv.kernel_size[0]
        if past is None:
            past = h.new_zeros(h.size(0), w - 1, h.size(2))
        full = torch.cat([past, h], 1)
        out = F.conv1d(full.transpose(1, 2), self.conv.weight, self.conv.bias, groups=h.size(2))
        return out.transpose(1, 2), full[:, full.size(1) - (w - 1):]

    def forward(self, x, keep=None):
        """keep: optional (B, T) bool mask; then only those positions' outputs, shape (n, C). The mixer
        still reads every position; a position-wise MLP then runs at the kept positions only."""
        x = x + self.attn(self.mixer_input(x)[0])
        pointwise = not self.has_mlp or not hasattr(self.mlp.act, "decode")  # generative mixes positions
        if keep is not None and pointwise:
            x = x[keep]
        if self.has_mlp:
            x = x + self.mlp(self.ln_2(x))
        if keep is not None and not pointwise:
            x = x[keep]
        return x

    def decode(self, x, state):
        state = state or (None, None, None)
        h, s_conv = self.mixer_input(x, state[2])
        a, s_attn = self.attn.decode(h, state[0])
        x = x + a
        s_mlp = None
        if self.has_mlp:
            m, s_mlp = self.mlp.decode(self.ln_2(x), state[1])
            x = x + m
        return x, (s_attn, s_mlp, s_conv)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.attention not in ATTENTION:
            raise ValueError(f"unknown attention {config.attention!r}; valid: {', '.join(ATTENTION)}")
        if config.mlp_activation not in ACTIVATION:
            raise ValueError(f"unknown mlp_activation {config.mlp_activation!r}; valid: {', '.join(ACTIVATION)}")
        self.config = config
        block = ATTENTION[config.attention]
        if config.rope and not getattr(block, "supports_rope", False):
            raise ValueError(f"rope applies to blocks with dense-like q, k heads "
                             f"({', '.join(n for n, c in ATTENTION.items() if getattr(c, 'supports_rope', False))}), "
                             f"not {config.attention!r}")
        self.absolute_positions = block.uses_absolute_positions and not config.rope
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

    def forward(self, idx, targets=None, labelled_only=False):
        """Returns (logits, loss). With targets: logits at every position and the
        cross-entropy plus every block's auxiliary loss (the auxiliary part alone is
        left in self.last_aux_loss). Without targets: logits at the last position.
        labelled_only (with targets): logits only at the positions whose target is not -1,
        shape (n, vocab), in row-major order; the loss is the same, but the last block's
        position-wise MLP, the final norm and the head skip the unlabelled positions (their
        outputs feed nothing else), which pays when few positions carry a loss (recall.py)."""
        x = self._embed(idx)
        keep = targets >= 0 if labelled_only and targets is not None else None
        for i, block in enumerate(self.transformer.h):
            x = block(x, keep if i == len(self.transformer.h) - 1 else None)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        if keep is not None:
            targets = targets[keep]
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
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

    def commit_codebook_updates(self):
        """Apply the codebook statistics gathered by the training forwards since the last call
        (vq's EMA): call it once per optimizer step, after the last micro-batch."""
        for m in self.modules():
            if hasattr(m, "commit_codebook_update"):
                m.commit_codebook_update()

    def extra_metrics(self):
        """Per-layer block diagnostics (codebook health, fraction attended, ...)."""
        out = {}
        for i, block in enumerate(self.transformer.h):
            if hasattr(block.attn, "extra_metrics"):
                for k, v in block.attn.extra_metrics().items():
                    out[f"{self.config.attention}/layer{i}/{k}"] = float(v)
        return out

    def attention_stats(self):
        """Selection statistics of the last forward for the training log, one flat dict of floats:
        '<name>/l<layer>' from every layer whose block has attention_stats() (adaptive-sparse:
        'as/kept_mean/l0', 'as/kept_min/l0', 'as/kept_max/l0', 'as/at_cap/l0', ...); {} for blocks
        without. Reads tensors the forward kept: no extra forward, one device sync per layer."""
        out = {}
        for i, block in enumerate(self.transformer.h):
            if hasattr(block.attn, "attention_stats"):
                out.update({f"{k}/l{i}": float(v) for k, v in block.attn.attention_stats().items()})
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
