"""Transformer-VQ's attention (`--attention=vq`, VQGatedUnit in model.py): how it is computed.

    reference (PyTorch)  vq_compressive_cache + vq_block_attention_torch: block by block, a cache per
                         block (what every path computes); straight_through, the quantizer's STE
    CPU-fast path        vq_chunk_attention_torch: chunk by chunk (G blocks), a cache per chunk; rms_norm
    entry point          vq_attention: the Triton kernels on CUDA, the chunked path elsewhere
    streaming (no grad)  vq_attention with a carry + vq_cache_fold: one piece at a time through the
                         chunked path, after the block before it and a running cache (counts, value
                         sums): memory independent of T (eval, prefill)
    dense-GAU ablation   gau_dense_attention: exact causal attention over unquantized keys with the
                         same position terms (vq_quantize=False), a plain masked softmax, O(T^2)
    Triton kernels       vq_block_attention (VQBlockAttention): forward and backward, below; chunk by
                         chunk too (a cache per chunk; G by default chunk_blocks_cuda)

The chunked path, C = G L positions per chunk: its queries score key by key the block before the
chunk and the chunk itself (q . k^_j = q . c_z_j gives an old key the logit its code has in the
cache); only blocks older than that go through a cache kept per chunk. Time O(T (L + S + C) d),
memory O(T d + (T/C) S d_v): fewer, larger matrix products and a cache G times smaller than block
by block, which is what makes it fast on a CPU.

Triton kernels. They compute the chunked form above with chunks of G blocks (G = 1: the
block-wise form), given the per-chunk compressive cache already built (per-code counts and value
sums by cumulative sums over chunks, in PyTorch, vq_compressive_cache(z, v, S, L, G)):

    for a query i of block r in chunk c = r // G (rows r*L .. r*L+L-1 of a sequence padded to R*L):
      window logits  q_i . k_j + bias[i, i-j]     keys j of block r (j <= i) and of block r-1,
                                                  bias only for distances i-j <= L
      older logits   q_i . k^_j                   keys of blocks cG-1 .. r-2 (none when G = 1),
                                                  the logits their codes have in the cache
      cache logits   q_i . c_s + log N[c, s]      one per code s, -inf when N[c, s] = 0
      o_i = one softmax over all three, applied to [v_j ; v_j ; U[c, s] / N[c, s]]
    so the weight of the value sum U[c, s] is exp(q_i . c_s - lse_i): the count cancels. The cache
    takes (R/G) S DV floats instead of R S DV (chunk_blocks_cuda picks G L ~ S: about T DV).

Inputs are float32, contiguous, laid out (B*H, R*L, .) for q, k, v, bias (L+1 columns) and o;
codebook (H, S, DK); counts N (B*H, R/G, S); value sums U (B*H, R/G, S, DV).

    _vq_lse_kernel        per (query block, batch*head): the row logsumexp (one online pass)
    _vq_fwd_kernel        per (query block, batch*head): o, given the logsumexp
    _vq_bwd_q_kernel      per (query block, batch*head): window and older part of dq, and dbias
    _vq_bwd_cache_kernel  per (query block, batch*head): adds the cache part of dq
    _vq_bwd_sums_kernel   per (chunk, batch*head): dU, the chunk's query blocks added in turn
    _vq_bwd_kv_kernel     per (key block, batch*head): dk, dv (window part) from the queries
                          of its own block and of the next one; dv from the later query blocks
                          that read it as an older key, up to the end of the chunk holding the
                          next block (no dk: the cache's codeword)
The gradient of U reaches v in PyTorch. No two programs write the same element: no atomics.
"""
import torch
import torch.nn.functional as F

from kernels._triton import HAS_TRITON, tl, triton

# ------------------------------------------------------------------------------- reference (PyTorch)

class _StraightThrough(torch.autograd.Function):
    """Forward: exactly the codewords. Backward: the gradient goes to the keys unchanged."""

    @staticmethod
    def forward(ctx, k, codewords):
        return codewords.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(k, codewords):
    """Straight-through estimator: the value of the codewords, the gradient of k."""
    return _StraightThrough.apply(k, codewords)


def vq_compressive_cache(z, v, S, L, G=1):
    """Cache per chunk of G blocks (G = 1: per block) of the keys in blocks <= cG-2 for chunk c,
    by cumulative sums over chunks: counts N (B, H, R/G, S) per code and value sums
    U (B, H, R/G, S, d_v) (differentiable in v). z (B, H, R*L) codes, v (B, H, R*L, d_v) values."""
    Tp = z.shape[2]
    # key t (block t//L) enters at chunk ceil((t//L + 2) / G), so that the inclusive sum at
    # chunk c covers blocks 0..cG-2 (G = 1: block r's cache covers blocks 0..r-2)
    first = (torch.arange(Tp, device=z.device) // L + 1 + G) // G
    return _cache(z, v, first, Tp // (G * L), S)


def vq_block_attention_torch(q, k, v, bias, codebook, counts, sums, L):
    """Block-wise attention, PyTorch. Same arguments as VQBlockAttention below:
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
    logn = _log_counts(counts)
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


# ------------------------------------------------------------------------------- CPU-fast path

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


def _scan_rows_(x, reverse=False):
    """In place: inclusive sum of x (N, R, ...) over R (from the end if reverse), one row at a time on
    the CPU (R - 1 additions and no new buffer; torch.cumsum over a middle dimension is far slower
    there); on CUDA a cumulative sum copied back."""
    R = x.shape[1]
    if x.is_cuda:
        return x.copy_(x.flip(1).cumsum(1).flip(1) if reverse else x.cumsum(1))
    for r in (range(R - 2, -1, -1) if reverse else range(1, R)):
        x[:, r] += x[:, r + 1 if reverse else r - 1]
    return x


class _CacheSums(torch.autograd.Function):
    """Value sums U (N, R, S, d_v) per cache row r and code s, from values v (N, T, d_v) with
    codes z (N, T): position t counts in rows r >= first[t] (first (T,) non-decreasing). Forward:
    an index_add at row first[t], then a cumulative sum over rows. Backward: the reverse
    cumulative sum, read back at each position's row (zero where first[t] >= R)."""

    @staticmethod
    def forward(ctx, v, z, first, R, S):
        N, T, dv = v.shape
        # rows past N R S take the positions no row uses (no read of first's values on the host)
        rows = torch.where(first < R, first * S + torch.arange(N, device=z.device)[:, None] * (R * S), N * R * S) + z
        U = v.new_zeros(N * R * S + S, dv).index_add_(0, rows.view(-1), v.reshape(-1, dv))[:N * R * S]
        ctx.save_for_backward(z, first)
        ctx.shape = (R, S)
        return _scan_rows_(U.view(N, R, S * dv)).view(N, R, S, dv)

    @staticmethod
    def backward(ctx, g):
        z, first = ctx.saved_tensors
        R, S = ctx.shape
        N, dv, T = g.shape[0], g.shape[-1], z.shape[1]
        # in place in the incoming gradient (the chunk mix's fresh buffer, U's only reader)
        g = _scan_rows_(g.contiguous().view(N, R, S * dv), reverse=True).view(N * R * S, dv)
        rows = first.clamp(max=R - 1) * S + z + torch.arange(N, device=z.device)[:, None] * (R * S)
        dv_ = g.index_select(0, rows.view(-1)).view(N, T, dv)
        dv_.masked_fill_((first >= R).view(1, T, 1), 0)  # positions that enter no row of the cache
        return dv_, None, None, None, None


def _cache(z, v, first, R, S):
    """Counts N (B, H, R, S) and value sums U (B, H, R, S, d_v) of the positions t with
    first[t] <= r, for z (B, H, T) codes and v (B, H, T, d_v) values (U differentiable in v)."""
    B, H, T = z.shape
    dv = v.shape[-1]
    slot = first.clamp(max=R) * S + z  # (B, H, T); row R takes the positions no row uses
    counts = torch.zeros(B, H, (R + 1) * S, device=z.device, dtype=v.dtype).scatter_add_(
        2, slot, torch.ones_like(slot, dtype=v.dtype))
    counts = counts.view(B, H, -1, S)[:, :, :R].cumsum(2)
    sums = _CacheSums.apply(v.reshape(B * H, T, dv), z.reshape(B * H, T), first, R, S)
    return counts, sums.view(B, H, R, S, dv)


_WINDOW_INDEX = {}


def _window_index(t, p, L, device):
    """(t, p + t) column of the padded bias table for query i and key j (queries at the last t of
    p + t key positions): the distance d = p + i - j when 0 <= d <= L, L + 1 (zero: no position
    term) beyond the window, L + 2 (-inf) for a future key. Kept per shape (few: whole chunks and
    one partial one)."""
    key = (t, p, L, str(device))
    if key not in _WINDOW_INDEX:
        d = p + torch.arange(t, device=device)[:, None] - torch.arange(p + t, device=device)[None, :]
        _WINDOW_INDEX[key] = torch.where(d < 0, L + 2, torch.where(d > L, L + 1, d))
        if len(_WINDOW_INDEX) > 64:
            _WINDOW_INDEX.pop(next(iter(_WINDOW_INDEX)))
    return _WINDOW_INDEX[key]


def _log_counts(counts):
    """log N per code (the cache logit's count term), -inf where a code holds no key."""
    return torch.where(counts > 0, counts.clamp(min=1).log(), float("-inf"))


def _window_table(q, bias, n, C, L):
    """The window's position bias (B, H, n C, L+1) of the queries q (B, H, n C, .), or zeros when
    None, padded to (B, H, n, C, L+3) = [bias | 0 | -inf] for _window_index's columns: bias[p, d]
    belongs at column L + p - d, zero beyond the window, -inf for a later key, so one gather places
    the bias and the causal mask together."""
    B, H = q.shape[:2]
    if bias is None:
        bias = q.new_zeros(B, H, n * C, L + 1)
    return torch.cat([bias.view(B, H, n, C, L + 1), bias.new_zeros(B, H, n, C, 1),
                      bias.new_full((B, H, n, C, 1), float("-inf"))], -1)


# The three chunk products below run over the chunks of every (batch, head) flattened into one batch
# of matrices, so each term is one bmm written into its place (out= or baddbmm_) with no temporary of
# the output's size (at 32k each such temporary is 32-64 MiB, mapped and faulted in afresh). "The
# block before" chunk i is then the end of flat chunk i - 1, which for the first chunk of a (batch,
# head) belongs to the previous one: that pairing is overwritten (_chunk_scores) or meets weights
# that are exactly zero there (_chunk_mix, _chunk_mix_t: the first chunk's before-columns are
# probabilities of -inf logits, or gradients through them), so it adds nothing, given finite inputs.

def _chunks(t):
    """(B, H, n, C, d) -> (B H n, C, d): a view where the layout allows (a slice of a wider buffer's
    columns included), else a copy."""
    return t.reshape(-1, *t.shape[-2:])


def _chunk_scores(x, y, L, before_first, out=None):
    """s = x [y_before | y_chunk]^T per chunk: x, y (B, H, n, C, d) -> (B, H, n, C, L+C), where
    y_before is the last block of the previous chunk; before_first fills the first chunk's.
    out: a (B, H, n, C, L+C) view to write into (the columns of a wider buffer)."""
    B, H, n, C, _ = x.shape
    s = x.new_empty(B, H, n, C, L + C) if out is None else out
    sf, xf, yf = s.view(-1, C, L + C), _chunks(x), _chunks(y)
    torch.bmm(xf, yf.transpose(1, 2), out=sf[..., L:])
    torch.bmm(xf[1:], yf[:-1, C - L:].transpose(1, 2), out=sf[1:, :, :L])
    s[:, :, 0, :, :L] = before_first  # after the product: it paired (b, h)'s first chunk with the one before
    return s


def _chunk_mix(a, y, L):
    """The product back: a [y_before | y_chunk], a (B, H, n, C, L+C) -> (B, H, n, C, d), the first
    chunk's before-columns of a being zero."""
    B, H, n, C, d = y.shape
    af, yf = _chunks(a), _chunks(y)
    o = torch.bmm(af[..., L:], yf)
    o[1:].baddbmm_(af[1:, :, :L], yf[:-1, C - L:])
    return o.view(B, H, n, C, d)


def _chunk_mix_t(a, x, L):
    """The transposed product: a^T x, each chunk's first L columns of a landing on the last
    block of the previous chunk (nothing for the first chunk's, whose before-columns are zero)."""
    B, H, n, C, d = x.shape
    af, xf = _chunks(a), _chunks(x)
    o = torch.bmm(af[..., L:].transpose(1, 2), xf)
    o[:-1, C - L:].baddbmm_(af[1:, :, :L].transpose(1, 2), xf[1:])
    return o.view(B, H, n, C, d)


def _code_logits(q, codebook, out):
    """out = q C^T per (batch, head), the logits against the codes: q (B, H, T, d_k), codebook (H, S, d_k),
    out a (B H, T, S) view to write into (the first columns of a wider buffer)."""
    B, H, T, dk = q.shape
    codes_t = codebook.to(q.dtype).transpose(-1, -2).expand(B, H, dk, codebook.shape[1]).reshape(B * H, dk, -1)
    return torch.bmm(q.reshape(B * H, T, dk), codes_t, out=out)


class _ChunkProbs(torch.autograd.Function):
    """Attention probabilities of each chunk's queries q (B, H, n, C, d_k), in one buffer
    (B, H, n, C, S + L + C): logits against the S codewords plus log N (logn (B, H, n, S), -inf for an
    empty code), then against the block before the chunk and the chunk itself (_chunk_scores) plus
    the window's position bias and causal mask, gathered from table (B, H, n, C, L+3) = [bias | 0 |
    -inf] at index (C, L+C); the softmax runs in place, and its backward in place in the incoming
    gradient. Backward: q from every logit; k from the window pairs only (older pairs stand for cache
    entries, whose key is a codeword); the bias through the gather."""

    @staticmethod
    def forward(ctx, q, k, table, codebook, logn, idx, L):
        B, H, n, C, dk = q.shape
        S = codebook.shape[1]
        a = q.new_empty(B, H, n, C, S + L + C)
        _code_logits(q.view(B, H, n * C, dk), codebook, a[..., :S].view(B * H, n * C, S))
        a[..., :S] += logn.unsqueeze(3)
        _chunk_scores(q, k, L, float("-inf"), out=a[..., S:])
        a[..., S:] += torch.gather(table, -1, idx.expand(B, H, n, C, L + C))
        torch.softmax(a, -1, out=a)  # in place: each row is read whole (its max) before it is written
        ctx.save_for_backward(q, k, codebook, idx, a)
        ctx.L, ctx.table_shape = L, table.shape
        return a

    @staticmethod
    def backward(ctx, da):
        q, k, codebook, idx, a = ctx.saved_tensors
        L = ctx.L
        B, H, n, C, dk = q.shape
        S = codebook.shape[1]
        ds = da.contiguous()  # _ChunkMix's fresh buffer: turned into the logits' gradient in place
        torch._softmax_backward_data(ds, a, -1, a.dtype, grad_input=ds)  # a (ds - <a, ds>), row by row
        ds_cache, ds_keys = ds[..., :S], ds[..., S:]
        dq = _chunk_mix(ds_keys, k, L)
        dq += ds_cache @ codebook.unsqueeze(1)
        dtable = ds.new_zeros(ctx.table_shape).scatter_add_(-1, idx.expand(B, H, n, C, L + C), ds_keys)
        if C > L:  # only the own and previous blocks' pairs reach k (with one block per chunk, all do)
            e = torch.arange(L + C, device=q.device)
            p = torch.arange(C, device=q.device)
            ds_keys = ds_keys * (e[None, :] // L >= p[:, None] // L)
        dk = _chunk_mix_t(ds_keys, q, L)
        return dq, dk, dtable, None, None, None, None


class _ChunkMix(torch.autograd.Function):
    """The values side of _ChunkProbs: o = a_keys [v_before | v_chunk] + (a_cache / N) U for the
    probabilities a (B, H, n, C, S + L + C), values v (B, H, n, C, d_v), chunk caches U (B, H, n, S,
    d_v) and counts N (B, H, n, S); the gradient of a comes back as one buffer. Nothing but its inputs
    is kept for the backward (the weights a_cache / N are not), and dU = (a_cache^T do) / N needs no
    copy of them."""

    @staticmethod
    def forward(ctx, a, v, U, counts, L):
        B, H, n, C, dv = v.shape
        S = U.shape[3]
        w = a[..., :S] / counts.clamp(min=1).unsqueeze(3)  # cache values are U / N: divide the weights
        o = _chunk_mix(a[..., S:], v, L)
        o.view(-1, C, dv).baddbmm_(w.view(-1, C, S), U.reshape(-1, S, dv))
        ctx.save_for_backward(a, v, U, counts)
        ctx.L = L
        return o

    @staticmethod
    def backward(ctx, do):
        a, v, U, counts = ctx.saved_tensors
        L, S = ctx.L, U.shape[3]
        n_inv = 1 / counts.clamp(min=1).unsqueeze(-1)  # (B, H, n, S, 1)
        da = torch.empty_like(a)
        _chunk_scores(do, v, L, 0.0, out=da[..., S:])
        torch.bmm(_chunks(do), _chunks(U).transpose(1, 2), out=da[..., :S].view(-1, do.shape[3], S))
        da[..., :S] *= n_inv.transpose(-1, -2)
        dv = _chunk_mix_t(a[..., S:], do, L)
        dU = (a[..., :S].transpose(-1, -2) @ do).mul_(n_inv)
        return da, dv, dU, None, None


def vq_chunk_attention_torch(q, k, z, v, bias, codebook, L, G, carry=None):
    """Block-wise VQ attention computed chunk by chunk, the CPU path: the same result as
    vq_block_attention_torch over vq_compressive_cache(z, v, S, L), with no per-block cache.
    A chunk is G blocks, C = G L positions. Its queries attend key by key, with logits
    q . k^_j, to the block before the chunk and to the chunk itself: window pairs (own and
    previous block) with the position bias, older pairs as the cache would count them
    (q . k^_j = q . c_z_j, no gradient to k). Blocks older than that are in a per-chunk cache
    (counts and value sums by cumulative sums over chunks): (T/C) S d_v floats instead of
    (T/L) S d_v, for (L + C) keys per query instead of 2L. G = 1 is the block-wise form.
    k must hold the quantized keys (values equal to the codewords of z), as VQGatedUnit's do.
    q, k, v (B, H, n*C, .), z (B, H, n*C), bias (B, H, n*C, L+1) or None. Returns (B, H, n*C, d_v).
    carry (no autograd; the streaming forward): the positions start at a block boundary after
    earlier ones, given as (counts (B, H, S), value sums (B, H, S, d_v)) of every key before the
    last block preceding them, and that block's quantized keys, values and codes (B, H, L, .)."""
    if carry is not None or not torch.is_grad_enabled():
        return _chunk_attention_nograd(q, k, z, v, bias, codebook, L, G, carry)
    if codebook.requires_grad:  # older pairs inside a chunk read it through k^, so it would get a partial gradient
        raise ValueError("vq_chunk_attention_torch: the codebook takes no gradient (VQGatedUnit moves it by EMA)")
    B, H, Tp, dk = q.shape
    C, S, dv = G * L, codebook.shape[1], v.shape[-1]
    n = Tp // C
    # the chunk cache of chunk c holds the positions t < c C - L: t enters at chunk (t + L) // C + 1
    counts, sums = _cache(z, v, (torch.arange(Tp, device=z.device) + L) // C + 1, n, S)
    logn = _log_counts(counts)
    a = _ChunkProbs.apply(q.view(B, H, n, C, dk), k.view(B, H, n, C, dk), _window_table(q, bias, n, C, L),
                          codebook, logn, _window_index(C, L, L, q.device), L)  # (B, H, n, C, S + L + C)
    return _ChunkMix.apply(a, v.view(B, H, n, C, dv), sums, counts, L).view(B, H, Tp, dv)


# Query rows per product of the no-grad path: chunks are taken ceil(NOGRAD_ROWS / C) at a time (at most half
# of a piece's), so short chunks (the long config's C = 64) still make products of about 256 rows instead of
# one small product per chunk; the paper's unit (C = 256) takes one chunk at a time.
NOGRAD_ROWS = 256


def nograd_chunk_group(n, C):
    """Chunks per group of the no-grad path (n chunks of C positions): each group holds a cache per chunk."""
    return max(1, min(-(-NOGRAD_ROWS // C), n // 2))


def _bmm4(out, x, y, accumulate=False):
    """out = x @ y (or out += x @ y) over two batch dimensions (N, M, ., .) that need not flatten into
    one (views of wider buffers): min(N, M) batched products, no copies of the operands on the CPU."""
    N, M = out.shape[:2]
    for i in range(min(N, M)):
        at = (i,) if N <= M else (slice(None), i)
        if accumulate:
            out[at].baddbmm_(x[at], y[at])
        else:
            torch.bmm(x[at], y[at], out=out[at])


@torch.no_grad()
def _chunk_attention_nograd(q, k, z, v, bias, codebook, L, G, carry):
    """vq_chunk_attention_torch without autograd (evaluation, the streaming forward), holding little
    beyond the logits and the output: every key is a codeword, so one product q C^T, written into the
    logits, makes the logits against the codes and the window's are gathered from it at the keys' codes
    (k itself is not read); the position bias is added along the window's diagonals in place, the
    causal mask by a fill, the softmax runs in place, and the cache columns' probabilities are divided
    by the counts N in place (p / N . U = p . U / N). Then a group of chunks at a time
    (nograd_chunk_group): the caches of the group's chunks are built from the running one by one
    index_add and a sum over chunks, and the output is p_cache U plus p_window times the window's
    values, views of v (v is copied once where its batch and head dimensions do not flatten into one,
    as for a head-major view of a (B, T, H, d_v) buffer with B, H > 1: VQGatedUnit._stream_piece
    makes it contiguous first). Same arguments and result."""
    B, H, Tp = q.shape[:3]
    C, S, dv = G * L, codebook.shape[1], v.shape[-1]
    n, W, BH = Tp // C, S + L + C, B * H
    v3, z2 = v.reshape(BH, Tp, dv), z.reshape(BH, Tp)
    per_bh = torch.arange(BH, device=z.device)[:, None]
    # chunk c's cache holds the positions t < c C - L (and the carry's): t enters at chunk
    # (t + L) // C + 1, the positions (c - 1) C - L <= t < c C - L; the carry's block (just before t = 0) at chunk 1
    enter = ((torch.arange(Tp, device=z.device) + L) // C + 1).clamp(max=n)
    counts = v.new_zeros(BH, n + 1, S)  # row n takes the positions no chunk reads
    counts.view(BH, -1).scatter_add_(1, enter * S + z2, v.new_ones(()).expand(BH, Tp))
    U = v.new_zeros(BH, S, dv)  # the running cache's value sums (before the current group)
    if carry is not None:
        counts0, sums0, pk, pv, pz = carry
        pv, pz = pv.reshape(BH, L, dv), pz.reshape(BH, L)
        U += sums0.reshape(BH, S, dv)
        counts[:, 0] += counts0.reshape(BH, S)
        counts[:, min(1, n)].scatter_add_(1, pz, v.new_ones(()).expand(BH, L))
    _scan_rows_(counts[:, :n])  # inclusive sums over chunks
    logits = q.new_empty(BH, n, C, W)
    # every key is a codeword (k^_j = c_{z_j}), so q . k^_j is column z_j of q C^T: the window's
    # logits are gathered from the codes' instead of a second product against the keys
    lw = logits[..., S:]
    _code_logits(q, codebook, logits.view(BH, n * C, W)[..., :S])
    # the window's codes: [block before the first chunk | every position], chunk c's at c C .. c C + L + C
    zw = z.new_zeros(BH, L + Tp)
    zw[:, L:] = z2
    if carry is not None:
        zw[:, :L] = pz
    torch.gather(logits[..., :S], -1, zw.as_strided((BH, n, C, L + C), (L + Tp, C, 0, 1)), out=lw)
    logits[..., :S] += _log_counts(counts[:, :n]).unsqueeze(2)
    # position bias d = 0..L of query i sits at window column L + i - d: a diagonal band of the logits
    if bias is not None:
        band = logits.as_strided((BH, n, C, L + 1), (n * C * W, C * W, W + 1, 1), logits.storage_offset() + S)
        band += bias.reshape(BH, n, C, L + 1).flip(-1)
    lw[..., L:].masked_fill_(_window_index(C, L, L, q.device)[:, L:] == L + 2, float("-inf"))  # later keys
    if carry is None:
        lw[:, 0, :, :L] = float("-inf")  # no block before the first chunk
    a = torch.softmax(logits, -1, out=logits)  # in place, as in _ChunkProbs
    a[..., :S] /= counts[:, :n].clamp(min=1).unsqueeze(2)
    o = v.new_empty(BH, n, C, dv)
    # chunk c >= 1's window (block before, chunk) is rows c C - L .. c C + C of v: window c - 1 of this view
    s0, s1, s2 = v3.stride()
    win = v3.as_strided((BH, max(n - 1, 0), L + C, dv), (s0, C * s1, s1, s2), v3.storage_offset() + (C - L) * s1)
    g = nograd_chunk_group(n, C)
    for c0 in range(0, n, g):
        m = min(g, n - c0)
        if m == 1:  # the caches of chunks c0 .. c0 + m - 1: one chunk's is the running cache itself
            Ug = U.unsqueeze(1)
        else:
            Ug = v.new_zeros(BH, m, S, dv)
            Ug[:, 0], U = U, None
        lo, hi = max(0, (c0 - 1) * C - L), max(0, (c0 + m - 1) * C - L)  # the positions entering at them
        if hi > lo:
            rows = (enter[lo:hi] - c0) * S + z2[:, lo:hi] + per_bh * (m * S)
            Ug.view(-1, dv).index_add_(0, rows.reshape(-1), v3[:, lo:hi].reshape(-1, dv))
        if carry is not None and c0 <= 1 < c0 + m:
            Ug.view(-1, dv).index_add_(0, ((1 - c0) * S + pz + per_bh * (m * S)).reshape(-1), pv.reshape(-1, dv))
        _scan_rows_(Ug)
        U = Ug[:, 0] if m == 1 else Ug[:, m - 1].clone()
        _bmm4(o[:, c0:c0 + m], a[:, c0:c0 + m, :, :S], Ug)
        c1 = max(c0, 1)
        if c1 < c0 + m:
            _bmm4(o[:, c1:c0 + m], a[:, c1:c0 + m, :, S:], win[:, c1 - 1:c0 + m - 1], accumulate=True)
        Ug = None
    o[:, 0].baddbmm_(a[:, 0, :, S + L:], v3[:, :C])  # chunk 0's window: the carry's block, then the chunk
    if carry is not None:
        o[:, 0].baddbmm_(a[:, 0, :, S:S + L], pv)
    return o.view(B, H, Tp, dv)



# ------------------------------------------------------------------------------- entry point

# Cost of one cached value per chunk (building the chunk's cache: scatter, scan, copies, the division
# by the counts, and their backward), in units of one attention multiply-add: fitted to this CPU's
# fwd+bwd times of the paper's unit with L 16 at 8k (G = 1, 2, 8: 1271, 770, 435 ms; where the cache
# and attention terms trade off); mostly memory traffic. Checked by bench_peer.py --chunks
# (results/peer-vq/chunks-*, re-measured after the cache sums moved in place, which made the build
# cheaper; not refitted): the pick is the fastest G measured at L 256 and at the long config's
# L 64, S 128, and within 7% of it at L 16.
CACHE_BUILD_COST = 80


def chunk_blocks_by_cost(L, S, dk, dv, T=None):
    """Blocks per chunk of the CPU path, G, minimising its cost per query: attention over
    L + G L keys and S codes, (L + G L + S)(d_k + d_v), plus a share of its chunk's cache,
    CACHE_BUILD_COST S d_v / (G L), times the padding of T to whole chunks (T None: no padding).
    Without padding the minimum is near G = sqrt(CACHE_BUILD_COST S d_v / (L^2 (d_k + d_v))):
    1 (the block-wise form) unless blocks are short against the codebook (the paper's unit,
    L 256, S 512, and the long config, L 64, S 128: 1; L 16, S 512: 11)."""
    g = (CACHE_BUILD_COST * S * dv / (L * L * (dk + dv))) ** 0.5
    top = int(2 * g) + 2 if T is None else min(-(-T // L), int(2 * g) + 2)

    def cost(G):
        pad = 1.0 if T is None else -(-T // (G * L)) * G * L / T
        return ((L + G * L + S) * (dk + dv) + CACHE_BUILD_COST * S * dv / (G * L)) * pad
    return min(range(1, max(1, top) + 1), key=cost)


def chunk_blocks_cuda(L, S, T=None):
    """Blocks per chunk of the Triton path: chunks of about S positions (G = S // L, at least 1), so
    the per-chunk cache holds (T/(G L)) S d_v ~ T d_v floats, as many as v itself, where a cache
    per block would hold S/L times that (51 GB per layer for the paper's unit at 128k, B 8); the
    older pairs of a chunk add at most S keys per query, as many as the codebook. Never more blocks
    than T has (one chunk already means no cache), so a short T is padded to whole blocks only.
    A memory choice, not tuned for speed: it ran on an H200 (results/gpu-h200, vq at 128k 0.42x dense's
    time), but no other G was timed there."""
    G = max(1, S // L)
    return G if T is None else max(1, min(G, -(-T // L)))


def vq_attention(q, k_hat, z, v, codebook, L, bias=None, chunk_blocks=None, carry=None, backend=None):
    """Transformer-VQ attention of (B, H, T, .) queries, quantized keys k_hat with codes z,
    and values; codebook (H, S, d_k); optional window bias (B, H, T, L+1) for distances 0..L.
    Runs the Triton kernels on CUDA, the chunked PyTorch path otherwise, both with a cache per
    chunk of chunk_blocks blocks (default: chunk_blocks_cuda on CUDA, chunk_blocks_by_cost
    elsewhere). T is padded to a whole number of chunks; padding sits after every real query,
    so it is never attended to. carry (the streaming forward, no autograd, chunked path
    only): what the positions before these contribute, as vq_chunk_attention_torch takes it.
    backend: "triton" or "torch" to choose the path (tests: the interpreter runs Triton on a CPU)."""
    T = q.shape[2]
    if torch.is_autocast_enabled(q.device.type):  # computed in float32, as the Triton kernels do
        with torch.autocast(q.device.type, enabled=False):
            f32 = (t if t is None else t.float() for t in (q, k_hat, v, codebook, bias))
            q32, k32, v32, c32, b32 = f32
            return vq_attention(q32, k32, z, v32, c32, L, b32, chunk_blocks, carry, backend)
    cuda = q.is_cuda and HAS_TRITON and carry is None if backend is None else backend == "triton"
    if cuda and carry is not None:
        raise ValueError("vq_attention: the streaming carry runs on the chunked PyTorch path only")
    S = codebook.shape[1]
    G = chunk_blocks or (chunk_blocks_cuda(L, S, T) if cuda else chunk_blocks_by_cost(L, S, q.shape[-1], v.shape[-1], T))
    pad = -T % (G * L)
    if pad:
        q, k_hat, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k_hat, v))
        z = F.pad(z, (0, pad))
        bias = None if bias is None else F.pad(bias, (0, 0, 0, pad))
    if cuda:
        counts, sums = vq_compressive_cache(z, v, S, L, G)
        if bias is None:
            bias = q.new_zeros(*q.shape[:3], L + 1)
        o = vq_block_attention(q, k_hat, v, bias, codebook, counts, sums, L, G)
    else:
        o = vq_chunk_attention_torch(q, k_hat, z, v, bias, codebook, L, G, carry)
    return o[:, :, :T]


def vq_cache_fold(counts, sums, z, v):
    """Add keys with codes z (B, H, n) and their values v (B, H, n, d_v) to the cache, in place:
    counts (B, H, S) and value sums (B, H, S, d_v)."""
    counts.scatter_add_(2, z, torch.ones_like(z, dtype=counts.dtype))
    sums.scatter_add_(2, z.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]), v.to(sums.dtype))


# ------------------------------------------------------------------------------- dense-GAU ablation

def _band(pos, n, L):
    """Position logits pos (B, H, t, L+1) for distances 0..L of t queries sitting at the last t of
    n key positions, laid out as (B, H, t, n): entry (i, j) is pos[i, d] with d = n - t + i - j the
    distance, zero for d outside 0..L. A skew by padding (each row shifted one further than the
    last), no index tensor."""
    t = pos.shape[-2]
    skew = F.pad(pos.flip(-1), (0, t)).flatten(-2)[..., :t * (L + t)].unflatten(-1, (t, L + t))
    off = n - t - L  # key position of the skewed table's first column
    return F.pad(skew, (off, 0)) if off >= 0 else skew[..., -off:]


def gau_dense_attention(q, k, v, L, pos=None):
    """Exact causal softmax attention of t queries q (B, H, t, d_k) at the last t of the n positions
    of keys k (B, H, n, d_k) and values v (B, H, n, d_v): logits q . k_j (q, k pre-scaled), plus
    pos[i, i-j] for distances i-j <= L when pos (B, H, t, L+1) is given. Computed in float32 at
    least; time and memory O(t n) (a t x n logit matrix: the ablation's cost, not a fast path)."""
    if torch.is_autocast_enabled(q.device.type):
        with torch.autocast(q.device.type, enabled=False):
            return gau_dense_attention(q.float(), k.float(), v.float(), L, None if pos is None else pos.float())
    t, n = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2)
    if pos is not None:
        s = s + _band(pos, n, L)
    causal = torch.ones(t, n, dtype=torch.bool, device=q.device).tril(n - t)
    return torch.softmax(s.masked_fill_(~causal, float("-inf")), dim=-1) @ v


# ------------------------------------------------------------------------------- Triton kernels

# float32 dots in full IEEE precision: Triton's default, TF32, keeps 10 mantissa bits of each
# operand on the tensor cores (the interpreter would hide it). Ignored for bfloat16 operands.
DOT_PRECISION = tl.constexpr("ieee")


@triton.jit
def _program(H):
    """This program's block index, batch*head index (int64, for the offsets) and head."""
    r = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    return r, bh, bh % H


@triton.jit
def _block_tile(X, bh, rb, c0, T, L: tl.constexpr, D: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    """Pointers into the (B*H, T, D) tensor X, and mask, of the [BL, BC] tile of rows
    rb*L .. rb*L+L-1 of sequence bh and columns c0 .. c0+BC-1; a negative block index means
    no block (all masked)."""
    i = tl.arange(0, BL)
    c = c0 + tl.arange(0, BC)
    rows = rb * L + i
    n_rows = tl.where(rb >= 0, L, 0)  # none for a negative block (`& (rb >= 0)` fails in the interpreter)
    # offsets added to the pointer term by term (summing them in 64 bits first costs registers)
    return (X + bh * T * D + rows[:, None] * D + c[None, :],
            (i[:, None] < n_rows) & (c[None, :] < D))


@triton.jit
def _load_block(X, bh, rb, c0, T, L: tl.constexpr, D: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    """The _block_tile tile of X, zero where masked."""
    ptrs, ok = _block_tile(X, bh, rb, c0, T, L, D, BL, BC)
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _store_block(X, x, bh, rb, c0, T, L: tl.constexpr, D: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    """Store x into the _block_tile tile of X."""
    ptrs, ok = _block_tile(X, bh, rb, c0, T, L, D, BL, BC)
    tl.store(ptrs, x, mask=ok)


@triton.jit
def _add_block(X, x, bh, rb, c0, T, L: tl.constexpr, D: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    """Add x into the _block_tile tile of X (read and written through one pointer construction, so
    each element by the same thread)."""
    ptrs, ok = _block_tile(X, bh, rb, c0, T, L, D, BL, BC)
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + x, mask=ok)


@triton.jit
def _code_tile(X, s0, c0, S: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr):
    """Pointers into the (S, D) matrix at X (one head's codebook, one block's value sums), and
    mask, of the [BS, BC] tile of codes s0 .. s0+BS-1 and columns c0 .. c0+BC-1."""
    s = s0 + tl.arange(0, BS)
    c = c0 + tl.arange(0, BC)
    return X + s[:, None] * D + c[None, :], (s[:, None] < S) & (c[None, :] < D)


@triton.jit
def _load_codes(X, s0, c0, S: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr):
    """The _code_tile tile of the (S, D) matrix at X, zero where masked."""
    ptrs, ok = _code_tile(X, s0, c0, S, D, BS, BC)
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _load_rows(X, bh, rb, T, L: tl.constexpr, BL: tl.constexpr):
    """Entries rb*L .. rb*L+L-1 of row bh of the (B*H, T) tensor X (the row logsumexp, or
    delta = rowsum(dO * O)); zero past the block, or everywhere for a negative block index."""
    i = tl.arange(0, BL)
    rows = rb * L + i
    return tl.load(X + bh * T + rows, mask=(i < L) & (rows >= 0), other=0.0)


@triton.jit
def _window_logits(Q, K, BIAS, bh, rq, rk, T,
                   L: tl.constexpr, DK: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr):
    """Logits of the L queries of block rq against the L keys of block rk <= rq, position bias
    included (distances <= L only: none for rk <= rq - 2), masked entries at -inf; a negative
    block index means no block."""
    i = tl.arange(0, BL)
    j = tl.arange(0, BL)
    q_rows = rq * L + i
    k_rows = rk * L + j
    acc = tl.zeros([BL, BL], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        q = _load_block(Q, bh, rq, k0, T, L, DK, BL, BK)
        k = _load_block(K, bh, rk, k0, T, L, DK, BL, BK)
        acc += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    # distance from query to key; the bias table has columns 0..L
    dist = (rq - rk) * L + i[:, None] - j[None, :]
    valid = (i[:, None] < L) & (j[None, :] < L) & (dist >= 0) & (q_rows[:, None] >= 0) & (k_rows[None, :] >= 0)
    near = valid & (dist <= L)
    b = tl.load(BIAS + bh * T * (L + 1) + q_rows[:, None] * (L + 1) + dist, mask=near, other=0.0)
    return tl.where(valid, acc + b, float("-inf")), valid


@triton.jit
def _probs(Q, K, BIAS, lse, bh, rq, rk, T,
           L: tl.constexpr, DK: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr):
    """Softmax probabilities of the _window_logits, given the row logsumexp lse [BL]."""
    s, ok = _window_logits(Q, K, BIAS, bh, rq, rk, T, L, DK, BL, BK)
    return tl.where(ok, tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _window_probs(Q, K, BIAS, LSE, bh, rq, rk, T,
                  L: tl.constexpr, DK: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr):
    """Softmax probabilities of the _window_logits, recomputed from the saved row logsumexp."""
    return _probs(Q, K, BIAS, _load_rows(LSE, bh, rq, T, L, BL), bh, rq, rk, T, L, DK, BL, BK)


@triton.jit
def _cache_logits(Q, CB, CNT, bh, h, r, c, s0, T, NC,
                  L: tl.constexpr, S: tl.constexpr, DK: tl.constexpr,
                  BL: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr):
    """For the queries of block r (in chunk c) and codes s0..s0+BS-1: q . c_s (-inf for codes
    absent from chunk c's cache) and log N_s (0 there), so a softmax logit is their sum."""
    i = tl.arange(0, BL)
    s = s0 + tl.arange(0, BS)
    acc = tl.zeros([BL, BS], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        q = _load_block(Q, bh, r, k0, T, L, DK, BL, BK)
        cb = _load_codes(CB + h * S * DK, s0, k0, S, DK, BS, BK)
        acc += tl.dot(q, tl.trans(cb), input_precision=DOT_PRECISION)
    n = tl.load(CNT + (bh * NC + c) * S + s, mask=s < S, other=0.0)
    valid = (i[:, None] < L) & (n[None, :] > 0)
    logn = tl.log(tl.where(n > 0, n, 1.0))
    return tl.where(valid, acc, float("-inf")), logn, valid


@triton.jit
def _online_softmax(m, l, x, ok):
    """One step of the running row max m and sum l (of exp(x - m)) over the logits x, valid where ok."""
    m_new = tl.maximum(m, tl.max(x, 1))
    return m_new, l * tl.exp(m - m_new) + tl.sum(tl.where(ok, tl.exp(x - m_new[:, None]), 0.0), 1)


@triton.jit
def _older_blocks(r, G):
    """The blocks a query block r reads key by key without a position bias (the older pairs of
    its chunk, see the module docstring): cG-1 .. r-2 for r in chunk c = r // G; none when G = 1."""
    return tl.maximum((r // G) * G - 1, 0), r - 1


@triton.jit
def _vq_lse_kernel(Q, K, BIAS, CB, CNT, LSE, T, R, NC, G, H,
                   L: tl.constexpr, S: tl.constexpr, DK: tl.constexpr,
                   BL: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr):
    """The row logsumexp over the window, the older blocks and the cache, in one pass (online
    softmax); codes are taken BS at a time, so the codebook's size sets the loop count, not the tile."""
    r, bh, h = _program(H)
    c = r // G
    lo, hi = _older_blocks(r, G)
    i = tl.arange(0, BL)
    row_ok = i < L
    s_cur, ok_cur = _window_logits(Q, K, BIAS, bh, r, r, T, L, DK, BL, BK)
    s_prev, ok_prev = _window_logits(Q, K, BIAS, bh, r, r - 1, T, L, DK, BL, BK)
    # the window always holds the query's own key: m is finite on the rows < L
    m = tl.maximum(tl.max(s_cur, 1), tl.max(s_prev, 1))
    m = tl.where(row_ok, m, 0.0)
    l = (tl.sum(tl.where(ok_cur, tl.exp(s_cur - m[:, None]), 0.0), 1)
         + tl.sum(tl.where(ok_prev, tl.exp(s_prev - m[:, None]), 0.0), 1))
    for rb in range(lo, hi):  # the older blocks' logits q . k^_j ...
        x, ok = _window_logits(Q, K, BIAS, bh, r, rb, T, L, DK, BL, BK)
        m, l = _online_softmax(m, l, x, ok)
    for s0 in range(0, S, BS):  # ... and the cache logits q . c_s + log N_s
        qc, logn, ok_c = _cache_logits(Q, CB, CNT, bh, h, r, c, s0, T, NC, L, S, DK, BL, BS, BK)
        m, l = _online_softmax(m, l, tl.where(ok_c, qc + logn[None, :], float("-inf")), ok_c)
    l = tl.where(l > 0, l, 1.0)
    tl.store(LSE + bh * T + r * L + i, m + tl.log(l), mask=row_ok)


@triton.jit
def _vq_fwd_kernel(Q, K, V, BIAS, CB, CNT, U, LSE, O, T, R, NC, G, H,
                   L: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   BL: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """o, given the row logsumexp (_vq_lse_kernel): the window's share, then the older blocks'
    and the cache's added in, written by this program only."""
    r, bh, h = _program(H)
    c = r // G
    lo, hi = _older_blocks(r, G)
    lse = _load_rows(LSE, bh, r, T, L, BL)
    p_cur = _probs(Q, K, BIAS, lse, bh, r, r, T, L, DK, BL, BK)
    p_prev = _probs(Q, K, BIAS, lse, bh, r, r - 1, T, L, DK, BL, BK)
    for v0 in range(0, DV, BV):  # the window's share of o
        v_cur = _load_block(V, bh, r, v0, T, L, DV, BL, BV)
        v_prev = _load_block(V, bh, r - 1, v0, T, L, DV, BL, BV)
        o = (tl.dot(p_cur, v_cur, input_precision=DOT_PRECISION)
             + tl.dot(p_prev, v_prev, input_precision=DOT_PRECISION))
        _store_block(O, o, bh, r, v0, T, L, DV, BL, BV)
    for rb in range(lo, hi):  # the older blocks' share ...
        p = _probs(Q, K, BIAS, lse, bh, r, rb, T, L, DK, BL, BK)
        for v0 in range(0, DV, BV):
            _add_block(O, tl.dot(p, _load_block(V, bh, rb, v0, T, L, DV, BL, BV), input_precision=DOT_PRECISION),
                       bh, r, v0, T, L, DV, BL, BV)
    for s0 in range(0, S, BS):  # ... and the cache's, U weighted by exp(q . c_s - lse)
        qc, logn, ok_c = _cache_logits(Q, CB, CNT, bh, h, r, c, s0, T, NC, L, S, DK, BL, BS, BK)
        w_c = tl.where(ok_c, tl.exp(qc - lse[:, None]), 0.0)  # softmax weight / count
        for v0 in range(0, DV, BV):
            u = _load_codes(U + (bh * NC + c) * S * DV, s0, v0, S, DV, BS, BV)
            _add_block(O, tl.dot(w_c, u, input_precision=DOT_PRECISION), bh, r, v0, T, L, DV, BL, BV)


@triton.jit
def _vq_bwd_q_kernel(Q, K, V, BIAS, DO, DELTA, LSE, DQ, DBIAS, T, R, G, H,
                     L: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                     BL: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Window and older-block part of dq, and dbias; _vq_bwd_cache_kernel adds the cache part of dq."""
    r, bh, _ = _program(H)
    p_cur = _window_probs(Q, K, BIAS, LSE, bh, r, r, T, L, DK, BL, BK)
    p_prev = _window_probs(Q, K, BIAS, LSE, bh, r, r - 1, T, L, DK, BL, BK)
    delta = _load_rows(DELTA, bh, r, T, L, BL)
    dp_cur = tl.zeros([BL, BL], dtype=tl.float32)
    dp_prev = tl.zeros([BL, BL], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        do = _load_block(DO, bh, r, v0, T, L, DV, BL, BV)
        v_cur = _load_block(V, bh, r, v0, T, L, DV, BL, BV)
        v_prev = _load_block(V, bh, r - 1, v0, T, L, DV, BL, BV)
        dp_cur += tl.dot(do, tl.trans(v_cur), input_precision=DOT_PRECISION)
        dp_prev += tl.dot(do, tl.trans(v_prev), input_precision=DOT_PRECISION)
    ds_cur = p_cur * (dp_cur - delta[:, None])
    ds_prev = p_prev * (dp_prev - delta[:, None])
    # bias gradient: column d of row i comes from key i-d of this block (d <= i), else
    # from key L+i-d of the previous one (zero in block 0); every column is written once
    ii = tl.arange(0, BL)[:, None]
    jj = tl.arange(0, BL)[None, :]
    base = DBIAS + bh * T * (L + 1) + (r * L + ii) * (L + 1)
    tl.store(base + (ii - jj), ds_cur, mask=(ii < L) & (jj <= ii))
    tl.store(base + (L + ii - jj), ds_prev, mask=(ii < L) & (jj >= ii) & (jj < L))
    for k0 in range(0, DK, BK):
        k_cur = _load_block(K, bh, r, k0, T, L, DK, BL, BK)
        k_prev = _load_block(K, bh, r - 1, k0, T, L, DK, BL, BK)
        dq = (tl.dot(ds_cur, k_cur, input_precision=DOT_PRECISION)
              + tl.dot(ds_prev, k_prev, input_precision=DOT_PRECISION))
        _store_block(DQ, dq, bh, r, k0, T, L, DK, BL, BK)
    lo, hi = _older_blocks(r, G)
    for rb in range(lo, hi):  # older blocks of the chunk: no bias, logits q . k^_j
        p = _window_probs(Q, K, BIAS, LSE, bh, r, rb, T, L, DK, BL, BK)
        dp = tl.zeros([BL, BL], dtype=tl.float32)
        for v0 in range(0, DV, BV):
            dp += tl.dot(_load_block(DO, bh, r, v0, T, L, DV, BL, BV),
                         tl.trans(_load_block(V, bh, rb, v0, T, L, DV, BL, BV)), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        for k0 in range(0, DK, BK):
            _add_block(DQ, tl.dot(ds, _load_block(K, bh, rb, k0, T, L, DK, BL, BK), input_precision=DOT_PRECISION),
                       bh, r, k0, T, L, DK, BL, BK)


@triton.jit
def _vq_bwd_cache_kernel(Q, CB, CNT, U, DO, DELTA, LSE, DQ, T, R, NC, G, H,
                         L: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                         BL: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The cache part of dq, added to DQ (run after _vq_bwd_q_kernel); codes are taken BS at a
    time, so a large codebook needs no large tile."""
    r, bh, h = _program(H)
    c = r // G
    lse = _load_rows(LSE, bh, r, T, L, BL)
    delta = _load_rows(DELTA, bh, r, T, L, BL)
    for s0 in range(0, S, BS):
        qc, logn, ok_c = _cache_logits(Q, CB, CNT, bh, h, r, c, s0, T, NC, L, S, DK, BL, BS, BK)
        w_c = tl.where(ok_c, tl.exp(qc - lse[:, None]), 0.0)  # weight of U
        dw = tl.zeros([BL, BS], dtype=tl.float32)
        for v0 in range(0, DV, BV):
            do = _load_block(DO, bh, r, v0, T, L, DV, BL, BV)
            u = _load_codes(U + (bh * NC + c) * S * DV, s0, v0, S, DV, BS, BV)
            dw += tl.dot(do, tl.trans(u), input_precision=DOT_PRECISION)
        # logit gradient a (dO . U/N - delta) with softmax weight a = w N
        ds_c = w_c * (dw - tl.exp(logn)[None, :] * delta[:, None])
        for k0 in range(0, DK, BK):
            cb = _load_codes(CB + h * S * DK, s0, k0, S, DK, BS, BK)
            _add_block(DQ, tl.dot(ds_c, cb, input_precision=DOT_PRECISION), bh, r, k0, T, L, DK, BL, BK)


@triton.jit
def _vq_bwd_sums_kernel(Q, CB, CNT, DO, LSE, DU, T, R, NC, G, H,
                        L: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        BL: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Per chunk: dU = sum over the chunk's query blocks of w^T dO, w = exp(q . c_s - lse) the
    weight of U; the blocks add into DU in turn (zero on entry), so no two programs write one
    element."""
    c, bh, h = _program(H)
    for r in range(c * G, tl.minimum(c * G + G, R)):
        lse = _load_rows(LSE, bh, r, T, L, BL)
        for s0 in range(0, S, BS):
            qc, logn, ok_c = _cache_logits(Q, CB, CNT, bh, h, r, c, s0, T, NC, L, S, DK, BL, BS, BK)
            w_c = tl.where(ok_c, tl.exp(qc - lse[:, None]), 0.0)
            for v0 in range(0, DV, BV):
                du_ptrs, du_ok = _code_tile(DU + (bh * NC + c) * S * DV, s0, v0, S, DV, BS, BV)
                du = tl.load(du_ptrs, mask=du_ok, other=0.0) + tl.dot(
                    tl.trans(w_c), _load_block(DO, bh, r, v0, T, L, DV, BL, BV), input_precision=DOT_PRECISION)
                tl.store(du_ptrs, du, mask=du_ok)


@triton.jit
def _vq_bwd_kv_kernel(Q, K, V, BIAS, DO, DELTA, LSE, DK_OUT, DV_OUT, T, R, G, H,
                      L: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      BL: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    r, bh, _ = _program(H)  # r: key block
    rn = tl.where(r + 1 < R, r + 1, -1)  # next query block, -1 when there is none
    # queries of block r and of block r+1 against the keys of block r
    p_cur = _window_probs(Q, K, BIAS, LSE, bh, r, r, T, L, DK, BL, BK)
    p_nxt = _window_probs(Q, K, BIAS, LSE, bh, rn, r, T, L, DK, BL, BK)
    dl_cur = _load_rows(DELTA, bh, r, T, L, BL)
    dl_nxt = _load_rows(DELTA, bh, rn, T, L, BL)
    dp_cur = tl.zeros([BL, BL], dtype=tl.float32)
    dp_nxt = tl.zeros([BL, BL], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        v = _load_block(V, bh, r, v0, T, L, DV, BL, BV)
        do_cur = _load_block(DO, bh, r, v0, T, L, DV, BL, BV)
        do_nxt = _load_block(DO, bh, rn, v0, T, L, DV, BL, BV)
        dp_cur += tl.dot(do_cur, tl.trans(v), input_precision=DOT_PRECISION)
        dp_nxt += tl.dot(do_nxt, tl.trans(v), input_precision=DOT_PRECISION)
        dv = (tl.dot(tl.trans(p_cur), do_cur, input_precision=DOT_PRECISION)
              + tl.dot(tl.trans(p_nxt), do_nxt, input_precision=DOT_PRECISION))
        _store_block(DV_OUT, dv, bh, r, v0, T, L, DV, BL, BV)
    ds_cur = p_cur * (dp_cur - dl_cur[:, None])
    ds_nxt = p_nxt * (dp_nxt - dl_nxt[:, None])
    for k0 in range(0, DK, BK):
        q_cur = _load_block(Q, bh, r, k0, T, L, DK, BL, BK)
        q_nxt = _load_block(Q, bh, rn, k0, T, L, DK, BL, BK)
        dk = (tl.dot(tl.trans(ds_cur), q_cur, input_precision=DOT_PRECISION)
              + tl.dot(tl.trans(ds_nxt), q_nxt, input_precision=DOT_PRECISION))
        _store_block(DK_OUT, dk, bh, r, k0, T, L, DK, BL, BK)
    # the query blocks that read block r as an older block of their chunk, r+2 .. the end of the
    # chunk holding block r+1: their weights reach v only (k^ stands for the cache's codeword)
    for rq in range(r + 2, tl.minimum(((r + 1) // G + 1) * G, R)):
        p = _window_probs(Q, K, BIAS, LSE, bh, rq, r, T, L, DK, BL, BK)
        for v0 in range(0, DV, BV):
            _add_block(DV_OUT, tl.dot(tl.trans(p), _load_block(DO, bh, rq, v0, T, L, DV, BL, BV),
                                      input_precision=DOT_PRECISION), bh, r, v0, T, L, DV, BL, BV)


# A program stores a tile and later reloads it (O, DQ, DU, DV_OUT) through the same pointer construction, so
# each element is stored and loaded by the same thread: no barrier needed while a tile (at least 16 x 16) has
# no fewer elements than the program has threads (8 warps: 256).
NUM_WARPS = 8


def _fwd_warps(meta):  # blocks of 16: 8 warps over 16-row tiles made ptxas spill the forward on sm_80
    return 4 if meta["BL"] <= 16 else NUM_WARPS


def _pow2(n, lo=16):
    return max(lo, triton.next_power_of_2(n))


def _chunked(meta):  # the forward and cache-gradient kernels: 64 codes and 32 key features at a time (no spills)
    return dict(meta, BS=min(64, meta["BS"]), BK=min(32, meta["BK"]))


def _sums_meta(meta):  # _vq_bwd_sums_kernel: 32 codes at a time (64 spilled 88-160 bytes on sm_80)
    return dict(_chunked(meta), BS=min(32, meta["BS"]))


def _lse_meta(meta):  # _vq_lse_kernel reads no values
    return {k: v for k, v in meta.items() if k not in ("DV", "BV")}


def _tiles(L, S, DK, DV):
    return dict(BL=_pow2(L), BS=_pow2(S), BK=min(64, _pow2(DK)), BV=min(32, _pow2(DV)))


class VQBlockAttention(torch.autograd.Function):
    """Block-wise VQ attention (see the module docstring) with a cache per chunk of G blocks.
    Arguments, padded to R*L positions, R a multiple of G: q, k (B, H, R*L, DK) (k the quantized
    keys), v (B, H, R*L, DV), bias (B, H, R*L, L+1), codebook (H, S, DK), counts N (B, H, R/G, S)
    and value sums U (B, H, R/G, S, DV) from vq_compressive_cache(z, v, S, L, G); then L, G.
    Computed in float32. Differentiable in q, k, v, bias and U (the codebook and counts are
    constants; the older pairs of a chunk give no gradient to k, as the cache's codewords would)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, codebook, counts, sums, L, G):
        q, k, v, bias, codebook, counts, sums = (
            t.float().contiguous() for t in (q, k, v, bias, codebook, counts, sums))
        B, H, T, DK = q.shape
        DV, S, R, NC = v.shape[-1], codebook.shape[1], T // L, counts.shape[2]
        if R != NC * G:
            raise ValueError(f"VQBlockAttention: {R} blocks do not make {NC} chunks of {G}")
        o = torch.empty(B, H, T, DV, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        meta = dict(L=L, S=S, DK=DK, DV=DV, **_tiles(L, S, DK, DV))
        _vq_lse_kernel[(R, B * H)](q, k, bias, codebook, counts, lse, T, R, NC, G, H, **_lse_meta(_chunked(meta)),
                                   num_warps=_fwd_warps(meta))
        _vq_fwd_kernel[(R, B * H)](q, k, v, bias, codebook, counts, sums, lse, o, T, R, NC, G, H, **_chunked(meta),
                                   num_warps=_fwd_warps(meta))
        ctx.save_for_backward(q, k, v, bias, codebook, counts, sums, o, lse)
        ctx.meta, ctx.G = meta, G
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, bias, codebook, counts, sums, o, lse = ctx.saved_tensors
        meta, G = ctx.meta, ctx.G
        do = do.float().contiguous()
        B, H, T, _ = q.shape
        R, NC = T // meta["L"], counts.shape[2]
        delta = (do * o).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias, dsums = torch.empty_like(bias), torch.zeros_like(sums)  # the chunk's blocks add into dsums
        grid = (R, B * H)
        _vq_bwd_q_kernel[grid](q, k, v, bias, do, delta, lse, dq, dbias, T, R, G, H, **meta, num_warps=NUM_WARPS)
        _vq_bwd_cache_kernel[grid](q, codebook, counts, sums, do, delta, lse, dq, T, R, NC, G, H,
                                   **_chunked(meta), num_warps=NUM_WARPS)
        _vq_bwd_sums_kernel[(NC, B * H)](q, codebook, counts, do, lse, dsums, T, R, NC, G, H,
                                         **_sums_meta(meta), num_warps=NUM_WARPS)
        _vq_bwd_kv_kernel[grid](q, k, v, bias, do, delta, lse, dk, dv, T, R, G, H, **meta, num_warps=NUM_WARPS)
        return dq, dk, dv, dbias, None, None, dsums, None, None


def vq_block_attention(q, k, v, bias, codebook, counts, sums, L, G=1):
    return VQBlockAttention.apply(q, k, v, bias, codebook, counts, sums, L, G)


# Every kernel, for tests/test_kernels_compile.py and `python -m kernels.gpu_compile`, at
# (L, S, d_k, d_v): the interpreter tests' shapes, the GPU-scale configuration (n_embd 384: d_k 128,
# d_v 384, L 32, S 128), the paper's unit (L 32, S 512, d_v 768) at d_k 64/96/128, and S 1024.
# The forward and cache-gradient kernels take the codes 64 at a time, so S sets only their loop
# count; the other two never touch the codebook (S is unused there: one compile per L, d_k, d_v).
COMPILE_SHAPES = ((16, 24, 40, 40), (12, 150, 72, 72), (12, 200, 40, 100), (32, 128, 128, 384),
                  (32, 512, 64, 768), (32, 512, 96, 768), (32, 512, 128, 768), (32, 1024, 128, 768))


def _compile_cases():
    f32, i32 = "*fp32", "i32"
    kernels = [("lse", _vq_lse_kernel, ("Q", "K", "BIAS", "CB", "CNT", "LSE")),
               ("fwd", _vq_fwd_kernel, ("Q", "K", "V", "BIAS", "CB", "CNT", "U", "LSE", "O")),
               ("bwd_q", _vq_bwd_q_kernel, ("Q", "K", "V", "BIAS", "DO", "DELTA", "LSE", "DQ", "DBIAS")),
               ("bwd_cache", _vq_bwd_cache_kernel, ("Q", "CB", "CNT", "U", "DO", "DELTA", "LSE", "DQ")),
               ("bwd_sums", _vq_bwd_sums_kernel, ("Q", "CB", "CNT", "DO", "LSE", "DU")),
               ("bwd_kv", _vq_bwd_kv_kernel, ("Q", "K", "V", "BIAS", "DO", "DELTA", "LSE", "DK_OUT", "DV_OUT"))]
    cases, window_done = [], set()
    for L, S, DK, DV in COMPILE_SHAPES:
        meta = dict(L=L, S=S, DK=DK, DV=DV, **_tiles(L, S, DK, DV))
        for name, fn, ptrs in kernels:
            uses_codes = fn in (_vq_lse_kernel, _vq_fwd_kernel, _vq_bwd_cache_kernel, _vq_bwd_sums_kernel)
            if not uses_codes:
                if (fn, L, DK, DV) in window_done:
                    continue
                window_done.add((fn, L, DK, DV))
            ints = ("T", "R", "NC", "G", "H") if uses_codes else ("T", "R", "G", "H")
            m = _chunked(meta) if uses_codes else meta
            m = _lse_meta(m) if fn is _vq_lse_kernel else _sums_meta(meta) if fn is _vq_bwd_sums_kernel else m
            sig = {**{n: f32 for n in ptrs}, **{n: i32 for n in ints}, **{n: "constexpr" for n in m}}
            warps = _fwd_warps(meta) if fn in (_vq_lse_kernel, _vq_fwd_kernel) else NUM_WARPS
            cases.append((f"vq_{name}_L{L}_S{S}_dk{DK}_dv{DV}", fn, sig, m, warps))
    return cases


COMPILE_CASES = _compile_cases()
