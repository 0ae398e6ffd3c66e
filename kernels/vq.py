"""Triton kernels for the Transformer-VQ block (`--attention=vq`, model.py section "vq").

They compute the block-wise attention of one quantized-key head, given the compressive
cache already built (per-code counts and value sums by cumulative sums over blocks, in PyTorch):

    for a query i of block r (rows r*L .. r*L+L-1 of a sequence padded to R*L):
      window logits  q_i . k_j + bias[i, i-j]     keys j of block r (j <= i) and of block r-1,
                                                  bias only for distances i-j <= L
      cache logits   q_i . c_s + log N[r, s]      one per code s, -inf when N[r, s] = 0
      o_i = one softmax over both, applied to [v_j ; U[r, s] / N[r, s]]
    so the weight of the value sum U[r, s] is exp(q_i . c_s - lse_i): the count cancels.

Inputs are float32, contiguous, laid out (B*H, R*L, .) for q, k, v, bias (L+1 columns) and o;
codebook (H, S, DK); counts N (B*H, R, S); value sums U (B*H, R, S, DV).

    _vq_fwd_kernel        per (query block, batch*head): o and the row logsumexp
    _vq_bwd_q_kernel      per (query block, batch*head): window part of dq, and dbias
    _vq_bwd_cache_kernel  per (query block, batch*head): dU, and adds the cache part of dq
    _vq_bwd_kv_kernel     per (key block, batch*head): dk, dv (window part), from the queries
                          of its own block and of the next one
The gradient of U reaches v in PyTorch. No two programs write the same element: no atomics.
"""
import torch
import triton
import triton.language as tl

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
    """Logits of the L queries of block rq against the L keys of block rk (rk = rq or rq - 1),
    position bias included, masked entries at -inf; a negative block index means no block."""
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
def _window_probs(Q, K, BIAS, LSE, bh, rq, rk, T,
                  L: tl.constexpr, DK: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr):
    """Softmax probabilities of the _window_logits, recomputed from the saved row logsumexp."""
    s, ok = _window_logits(Q, K, BIAS, bh, rq, rk, T, L, DK, BL, BK)
    lse = _load_rows(LSE, bh, rq, T, L, BL)
    return tl.where(ok, tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _cache_logits(Q, CB, CNT, bh, h, r, s0, T, R,
                  L: tl.constexpr, S: tl.constexpr, DK: tl.constexpr,
                  BL: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr):
    """For the queries of block r and codes s0..s0+BS-1: q . c_s (-inf for codes absent from
    the cache) and log N_s (0 there), so a softmax logit is their sum."""
    i = tl.arange(0, BL)
    s = s0 + tl.arange(0, BS)
    acc = tl.zeros([BL, BS], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        q = _load_block(Q, bh, r, k0, T, L, DK, BL, BK)
        c = _load_codes(CB + h * S * DK, s0, k0, S, DK, BS, BK)
        acc += tl.dot(q, tl.trans(c), input_precision=DOT_PRECISION)
    n = tl.load(CNT + (bh * R + r) * S + s, mask=s < S, other=0.0)
    valid = (i[:, None] < L) & (n[None, :] > 0)
    logn = tl.log(tl.where(n > 0, n, 1.0))
    return tl.where(valid, acc, float("-inf")), logn, valid


@triton.jit
def _vq_fwd_kernel(Q, K, V, BIAS, CB, CNT, U, O, LSE, T, R, H,
                   L: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   BL: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """o and the row logsumexp; codes are taken BS at a time, so the codebook's size sets the
    loop count, not the tile: a first pass over the code chunks finds each row's max and sum
    (online softmax), a second adds the cache's share into o, written by this program only."""
    r, bh, h = _program(H)
    i = tl.arange(0, BL)
    row_ok = i < L
    s_cur, ok_cur = _window_logits(Q, K, BIAS, bh, r, r, T, L, DK, BL, BK)
    s_prev, ok_prev = _window_logits(Q, K, BIAS, bh, r, r - 1, T, L, DK, BL, BK)
    # the window always holds the query's own key: m is finite on the rows < L
    m = tl.maximum(tl.max(s_cur, 1), tl.max(s_prev, 1))
    m = tl.where(row_ok, m, 0.0)
    l = (tl.sum(tl.where(ok_cur, tl.exp(s_cur - m[:, None]), 0.0), 1)
         + tl.sum(tl.where(ok_prev, tl.exp(s_prev - m[:, None]), 0.0), 1))
    for s0 in range(0, S, BS):  # pass 1: running max and sum over the cache logits q . c_s + log N_s
        qc, logn, ok_c = _cache_logits(Q, CB, CNT, bh, h, r, s0, T, R, L, S, DK, BL, BS, BK)
        x = tl.where(ok_c, qc + logn[None, :], float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.where(ok_c, tl.exp(x - m_new[:, None]), 0.0), 1)
        m = m_new
    l = tl.where(l > 0, l, 1.0)
    lse = m + tl.log(l)
    tl.store(LSE + bh * T + r * L + i, lse, mask=row_ok)
    p_cur = tl.where(ok_cur, tl.exp(s_cur - lse[:, None]), 0.0)
    p_prev = tl.where(ok_prev, tl.exp(s_prev - lse[:, None]), 0.0)
    for v0 in range(0, DV, BV):  # the window's share of o
        v_cur = _load_block(V, bh, r, v0, T, L, DV, BL, BV)
        v_prev = _load_block(V, bh, r - 1, v0, T, L, DV, BL, BV)
        o = (tl.dot(p_cur, v_cur, input_precision=DOT_PRECISION)
             + tl.dot(p_prev, v_prev, input_precision=DOT_PRECISION))
        _store_block(O, o, bh, r, v0, T, L, DV, BL, BV)
    for s0 in range(0, S, BS):  # pass 2: add the cache's share, U weighted by exp(q . c_s - lse)
        qc, logn, ok_c = _cache_logits(Q, CB, CNT, bh, h, r, s0, T, R, L, S, DK, BL, BS, BK)
        w_c = tl.where(ok_c, tl.exp(qc - lse[:, None]), 0.0)  # softmax weight / count
        for v0 in range(0, DV, BV):
            u = _load_codes(U + (bh * R + r) * S * DV, s0, v0, S, DV, BS, BV)
            o_ptrs, o_ok = _block_tile(O, bh, r, v0, T, L, DV, BL, BV)
            o = tl.load(o_ptrs, mask=o_ok, other=0.0) + tl.dot(w_c, u, input_precision=DOT_PRECISION)
            tl.store(o_ptrs, o, mask=o_ok)


@triton.jit
def _vq_bwd_q_kernel(Q, K, V, BIAS, DO, DELTA, LSE, DQ, DBIAS, T, R, H,
                     L: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                     BL: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Window part of dq, and dbias; _vq_bwd_cache_kernel adds the cache part of dq."""
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


@triton.jit
def _vq_bwd_cache_kernel(Q, CB, CNT, U, DO, DELTA, LSE, DQ, DU, T, R, H,
                         L: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                         BL: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dU, and the cache part of dq added to DQ (run after _vq_bwd_q_kernel); codes are
    taken BS at a time, so a large codebook does not need a large tile."""
    r, bh, h = _program(H)
    lse = _load_rows(LSE, bh, r, T, L, BL)
    delta = _load_rows(DELTA, bh, r, T, L, BL)
    for s0 in range(0, S, BS):
        qc, logn, ok_c = _cache_logits(Q, CB, CNT, bh, h, r, s0, T, R, L, S, DK, BL, BS, BK)
        w_c = tl.where(ok_c, tl.exp(qc - lse[:, None]), 0.0)  # weight of U
        dw = tl.zeros([BL, BS], dtype=tl.float32)
        for v0 in range(0, DV, BV):
            do = _load_block(DO, bh, r, v0, T, L, DV, BL, BV)
            u = _load_codes(U + (bh * R + r) * S * DV, s0, v0, S, DV, BS, BV)
            dw += tl.dot(do, tl.trans(u), input_precision=DOT_PRECISION)
            du_ptrs, du_ok = _code_tile(DU + (bh * R + r) * S * DV, s0, v0, S, DV, BS, BV)
            tl.store(du_ptrs, tl.dot(tl.trans(w_c), do, input_precision=DOT_PRECISION), mask=du_ok)
        # logit gradient a (dO . U/N - delta) with softmax weight a = w N
        ds_c = w_c * (dw - tl.exp(logn)[None, :] * delta[:, None])
        for k0 in range(0, DK, BK):
            c = _load_codes(CB + h * S * DK, s0, k0, S, DK, BS, BK)
            dq_ptrs, dq_ok = _block_tile(DQ, bh, r, k0, T, L, DK, BL, BK)
            dq = tl.load(dq_ptrs, mask=dq_ok, other=0.0) + tl.dot(ds_c, c, input_precision=DOT_PRECISION)
            tl.store(dq_ptrs, dq, mask=dq_ok)


@triton.jit
def _vq_bwd_kv_kernel(Q, K, V, BIAS, DO, DELTA, LSE, DK_OUT, DV_OUT, T, R, H,
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


NUM_WARPS = 8


def _fwd_warps(meta):  # blocks of 16: 8 warps over 16-row tiles made ptxas spill the forward on sm_80
    return 4 if meta["BL"] <= 16 else NUM_WARPS


def _pow2(n, lo=16):
    return max(lo, triton.next_power_of_2(n))


def _chunked(meta):  # the forward and cache-gradient kernels: 64 codes and 32 key features at a time (no spills)
    return dict(meta, BS=min(64, meta["BS"]), BK=min(32, meta["BK"]))


def _tiles(L, S, DK, DV):
    return dict(BL=_pow2(L), BS=_pow2(S), BK=min(64, _pow2(DK)), BV=min(32, _pow2(DV)))


class VQBlockAttention(torch.autograd.Function):
    """Block-wise VQ attention (see the module docstring). Arguments, padded to R*L positions:
    q, k (B, H, R*L, DK), v (B, H, R*L, DV), bias (B, H, R*L, L+1), codebook (H, S, DK),
    counts N (B, H, R, S), value sums U (B, H, R, S, DV); then L. Computed in float32.
    Differentiable in q, k, v, bias and U (the codebook and counts are constants)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, codebook, counts, sums, L):
        q, k, v, bias, codebook, counts, sums = (
            t.float().contiguous() for t in (q, k, v, bias, codebook, counts, sums))
        B, H, T, DK = q.shape
        DV, S, R = v.shape[-1], codebook.shape[1], T // L
        o = torch.empty(B, H, T, DV, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        meta = dict(L=L, S=S, DK=DK, DV=DV, **_tiles(L, S, DK, DV))
        _vq_fwd_kernel[(R, B * H)](q, k, v, bias, codebook, counts, sums, o, lse, T, R, H, **_chunked(meta),
                                   num_warps=_fwd_warps(meta))
        ctx.save_for_backward(q, k, v, bias, codebook, counts, sums, o, lse)
        ctx.meta = meta
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, bias, codebook, counts, sums, o, lse = ctx.saved_tensors
        meta = ctx.meta
        do = do.float().contiguous()
        B, H, T, _ = q.shape
        R = T // meta["L"]
        delta = (do * o).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias, dsums = torch.empty_like(bias), torch.empty_like(sums)
        grid = (R, B * H)
        _vq_bwd_q_kernel[grid](q, k, v, bias, do, delta, lse, dq, dbias, T, R, H, **meta, num_warps=NUM_WARPS)
        _vq_bwd_cache_kernel[grid](q, codebook, counts, sums, do, delta, lse, dq, dsums, T, R, H,
                                   **_chunked(meta), num_warps=NUM_WARPS)
        _vq_bwd_kv_kernel[grid](q, k, v, bias, do, delta, lse, dk, dv, T, R, H, **meta, num_warps=NUM_WARPS)
        return dq, dk, dv, dbias, None, None, dsums, None


def vq_block_attention(q, k, v, bias, codebook, counts, sums, L):
    return VQBlockAttention.apply(q, k, v, bias, codebook, counts, sums, L)


# Every kernel, for tests/test_kernels_compile.py and `python -m kernels.gpu_compile`, at
# (L, S, d_k, d_v): the interpreter tests' shapes, the GPU-scale configuration (n_embd 384: d_k 128,
# d_v 384, L 32, S 128), the paper's unit (L 32, S 512, d_v 768) at d_k 64/96/128, and S 1024.
# The forward and cache-gradient kernels take the codes 64 at a time, so S sets only their loop
# count; the other two never touch the codebook (S is unused there: one compile per L, d_k, d_v).
COMPILE_SHAPES = ((16, 24, 40, 40), (12, 150, 72, 72), (12, 200, 40, 100), (32, 128, 128, 384),
                  (32, 512, 64, 768), (32, 512, 96, 768), (32, 512, 128, 768), (32, 1024, 128, 768))


def _compile_cases():
    f32, i32 = "*fp32", "i32"
    kernels = [("fwd", _vq_fwd_kernel, ("Q", "K", "V", "BIAS", "CB", "CNT", "U", "O", "LSE")),
               ("bwd_q", _vq_bwd_q_kernel, ("Q", "K", "V", "BIAS", "DO", "DELTA", "LSE", "DQ", "DBIAS")),
               ("bwd_cache", _vq_bwd_cache_kernel, ("Q", "CB", "CNT", "U", "DO", "DELTA", "LSE", "DQ", "DU")),
               ("bwd_kv", _vq_bwd_kv_kernel, ("Q", "K", "V", "BIAS", "DO", "DELTA", "LSE", "DK_OUT", "DV_OUT"))]
    cases, window_done = [], set()
    for L, S, DK, DV in COMPILE_SHAPES:
        meta = dict(L=L, S=S, DK=DK, DV=DV, **_tiles(L, S, DK, DV))
        for name, fn, ptrs in kernels:
            uses_codes = fn in (_vq_fwd_kernel, _vq_bwd_cache_kernel)
            if not uses_codes:
                if (fn, L, DK, DV) in window_done:
                    continue
                window_done.add((fn, L, DK, DV))
            sig = {**{n: f32 for n in ptrs}, "T": i32, "R": i32, "H": i32, **{n: "constexpr" for n in meta}}
            m = _chunked(meta) if uses_codes else meta
            warps = _fwd_warps(meta) if fn is _vq_fwd_kernel else NUM_WARPS
            cases.append((f"vq_{name}_L{L}_S{S}_dk{DK}_dv{DV}", fn, sig, m, warps))
    return cases


COMPILE_CASES = _compile_cases()
