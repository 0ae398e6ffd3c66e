"""Triton block-sparse flash attention for the adaptive-sparse block (AdaptiveSparseAttention in model.py).

Tokens are split into blocks of BLOCK. Query block i attends to the key blocks listed in
idx[b, h, i, :] (-1 marks an empty slot), each listed block with one logit bias per slot; the
causal mask is applied inside the diagonal block (key position <= query position):

    s_ts = q_t . k_s / sqrt(d) + bias[b, h, i, slot(s)]      for s in the listed blocks, s <= t
    o_t  = sum_s softmax_s(s_ts) v_s

Forward: one program per (query block, batch*head) walks its list with an online softmax and
stores o and the row log-sum-exp. Backward: delta_t = do_t . o_t (PyTorch); a dQ program per
query block recomputes P over its list, accumulates dQ and sums dS over each slot's tile (the
gradient of that slot's bias); a dK/dV program per key block walks the reverse list (every
(query block, slot) that listed it, grouped by one argsort), so no atomics are needed.
tl.dot needs tiles of at least 16: BLOCK >= 16, a power of two (the model falls back to its
PyTorch path otherwise). Inputs may be float32 or bfloat16; softmax statistics are float32.
"""
import math

import torch
import triton
import triton.language as tl

# float32 dots in full IEEE precision: Triton's default, TF32, keeps 10 mantissa bits of each
# operand on the tensor cores (the interpreter would hide it). Ignored for bfloat16 operands.
DOT_PRECISION = tl.constexpr("ieee")


@triton.jit
def _tile(blk, base, T, BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token positions of block blk, which of them are < T, and the element offsets and mask of
    their (BLOCK, BLOCK_D) tile in a (T, D) head starting at element base."""
    pos = blk * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    pos_ok = pos < T
    off = base + pos[:, None] * D + dims[None, :]
    mask = pos_ok[:, None] & (dims < D)[None, :]
    return pos, pos_ok, off, mask


@triton.jit
def _load_kv(K, V, kb, base, T, BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key block kb: its tile (_tile) and its k and v (0 outside the mask)."""
    keys, key_ok, kv_off, kv_mask = _tile(kb, base, T, BLOCK, D, BLOCK_D)
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    return keys, key_ok, kv_off, kv_mask, k, v


@triton.jit
def _load_q_bwd(Q, DO, LSE, DELTA, qb, bh, base, T, BLOCK: tl.constexpr, D: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Query block qb for the backward: its tile (_tile), q and do (0 outside the mask), and the
    rows' lse and delta (0 past T)."""
    rows, row_ok, q_off, q_mask = _tile(qb, base, T, BLOCK, D, BLOCK_D)
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
    return rows, row_ok, q_off, q_mask, q, do, lse, delta


@triton.jit
def _logits(q, k, bias, scale, rows, keys, key_ok, qb, kb):
    """Logits s = q k^T * scale + bias of query block qb against key block kb, and the mask of
    the keys each row may attend to (not padding rows: callers add row_ok where needed)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale + bias
    # causal mask: only bites inside the diagonal block (kb == qb)
    ok = key_ok[None, :] & ((keys[None, :] <= rows[:, None]) | (kb < qb))
    return s, ok


@triton.jit
def _bwd_p(q, k, lse, bias, scale, rows, row_ok, keys, key_ok, qb, kb):
    """Recomputed P = exp(s - lse) of one (query block, key block) tile, 0 where masked and on
    padding rows."""
    s, ok = _logits(q, k, bias, scale, rows, keys, key_ok, qb, kb)
    return tl.where(row_ok[:, None] & ok, tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _bwd_ds(p, do, v, delta):
    """dS = P (dP - delta) with dP = dO V^T."""
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return p * (dp - delta[:, None])


@triton.jit
def _as_fwd_kernel(Q, K, V, IDX, BIAS, O, LSE, T, NQ, NSLOT, scale,
                   BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * T * D
    rows, row_ok, q_off, q_mask = _tile(qb, base, T, BLOCK, D, BLOCK_D)
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    m = tl.full([BLOCK], float("-inf"), tl.float32)  # running row max
    l = tl.zeros([BLOCK], tl.float32)  # running row sum of exp
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    lst = (bh * NQ + qb) * NSLOT
    for slot in range(NSLOT):
        kb = tl.load(IDX + lst + slot)
        if kb >= 0:
            bias = tl.load(BIAS + lst + slot)
            keys, key_ok, _, _, k, v = _load_kv(K, V, kb, base, T, BLOCK, D, BLOCK_D)
            s, ok = _logits(q, k, bias, scale, rows, keys, key_ok, qb, kb)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
            alpha = tl.exp(m - m_ref)
            p = tl.exp(s - m_ref[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m = m_new
    l_ref = tl.where(l > 0, l, 1.0)
    o = acc / l_ref[:, None]
    tl.store(O + q_off, o.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh.to(tl.int64) * T + rows, tl.where(l > 0, m + tl.log(l_ref), 0.0), mask=row_ok)


@triton.jit
def _as_bwd_q_kernel(Q, K, V, IDX, BIAS, DO, DELTA, LSE, DQ, DBIAS, T, NQ, NSLOT, scale,
                     BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * T * D
    rows, row_ok, q_off, q_mask, q, do, lse, delta = _load_q_bwd(Q, DO, LSE, DELTA, qb, bh, base, T,
                                                                 BLOCK, D, BLOCK_D)
    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    lst = (bh * NQ + qb) * NSLOT
    for slot in range(NSLOT):
        kb = tl.load(IDX + lst + slot)
        if kb >= 0:
            bias = tl.load(BIAS + lst + slot)
            keys, key_ok, _, _, k, v = _load_kv(K, V, kb, base, T, BLOCK, D, BLOCK_D)
            p = _bwd_p(q, k, lse, bias, scale, rows, row_ok, keys, key_ok, qb, kb)
            ds = _bwd_ds(p, do, v, delta)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            tl.store(DBIAS + lst + slot, tl.sum(tl.sum(ds, 1), 0))
        else:
            tl.store(DBIAS + lst + slot, 0.0)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _as_bwd_kv_kernel(Q, K, V, BIAS, DO, DELTA, LSE, REV, OFFS, DK, DV, T, NQ, NSLOT, scale,
                      BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * T * D
    keys, key_ok, kv_off, kv_mask, k, v = _load_kv(K, V, kb, base, T, BLOCK, D, BLOCK_D)
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    lists = bh * NQ * NSLOT  # this head's (query block, slot) entries
    start = tl.load(OFFS + bh * (NQ + 1) + kb)
    end = tl.load(OFFS + bh * (NQ + 1) + kb + 1)
    for e in range(start, end):
        entry = tl.load(REV + lists + e)  # = query block * NSLOT + slot
        qb = entry // NSLOT
        bias = tl.load(BIAS + lists + entry)
        rows, row_ok, _, _, q, do, lse, delta = _load_q_bwd(Q, DO, LSE, DELTA, qb, bh, base, T,
                                                            BLOCK, D, BLOCK_D)
        p = _bwd_p(q, k, lse, bias, scale, rows, row_ok, keys, key_ok, qb, kb)
        # dv before dP: fewer registers (sm_80, BLOCK 32)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
        ds = _bwd_ds(p, do, v, delta)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def reverse_lists(idx, n_blocks):
    """For each (batch*head, key block): the flat (query block * n_slots + slot) entries that list
    it, contiguous in rev[bh, offs[bh, j]:offs[bh, j + 1]]. idx: (BH, NQ, NSLOT), -1 = empty."""
    BH = idx.shape[0]
    flat = idx.reshape(BH, -1).long()
    key = torch.where(flat >= 0, flat, torch.full_like(flat, n_blocks))  # empty slots sort last
    rev = torch.argsort(key, dim=1, stable=True).to(torch.int32)
    counts = torch.zeros(BH, n_blocks + 1, dtype=torch.long, device=idx.device)
    counts.scatter_add_(1, key, torch.ones_like(key))
    offs = torch.zeros(BH, n_blocks + 1, dtype=torch.int32, device=idx.device)
    offs[:, 1:] = counts[:, :n_blocks].cumsum(1)
    return rev.contiguous(), offs.contiguous()


class BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, bias, block):
        B, H, T, D = q.shape
        NQ, NSLOT = idx.shape[2], idx.shape[3]
        assert NQ == triton.cdiv(T, block), "one index list per query block"
        assert block >= 16 and block & (block - 1) == 0, "BLOCK must be a power of two >= 16"
        q, k, v = (t.contiguous() for t in (q, k, v))
        idx = idx.to(torch.int32).reshape(B * H, NQ, NSLOT).contiguous()
        bias = bias.float().reshape(B * H, NQ, NSLOT).contiguous()
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        meta = dict(BLOCK=block, D=D, BLOCK_D=_block_d(D))
        scale = 1.0 / math.sqrt(D)
        _as_fwd_kernel[(NQ, B * H)](q, k, v, idx, bias, o, lse, T, NQ, NSLOT, scale, **meta)
        ctx.save_for_backward(q, k, v, idx, bias, o, lse)
        ctx.meta, ctx.scale = meta, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, bias, o, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        NQ, NSLOT = idx.shape[1], idx.shape[2]
        do = do.to(q.dtype).contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias = torch.empty(B * H, NQ, NSLOT, device=q.device, dtype=torch.float32)
        _as_bwd_q_kernel[(NQ, B * H)](q, k, v, idx, bias, do, delta, lse, dq, dbias,
                                      T, NQ, NSLOT, ctx.scale, **ctx.meta)
        rev, offs = reverse_lists(idx, NQ)
        _as_bwd_kv_kernel[(NQ, B * H)](q, k, v, bias, do, delta, lse, rev, offs, dk, dv,
                                       T, NQ, NSLOT, ctx.scale, **ctx.meta)
        return dq, dk, dv, None, dbias.view(B, H, NQ, NSLOT), None


def block_sparse_attention(q, k, v, idx, bias, block):
    """q, k, v: (B, H, T, D); idx: (B, H, ceil(T/block), n_slots) key-block ids, -1 = empty;
    bias: (B, H, ceil(T/block), n_slots) logit bias per slot. Returns o (B, H, T, D)."""
    return BlockSparseAttention.apply(q, k, v, idx, bias, block)


def _cases():
    """Every kernel at the GPU-scale head size (n_embd 384 / 6 heads = 64), for the GPU config's
    block (16) and a larger one, in float32 and in bfloat16 (the dtype under autocast)."""
    return _variant_cases([(16, 64, "fp32"), (16, 64, "bf16"), (32, 64, "bf16")])


def _variant_cases(variants):
    cases = []
    for block, d, dtype in variants:
        meta = dict(BLOCK=block, D=d, BLOCK_D=_block_d(d))
        t = f"*{dtype}"
        dims = {"T": "i32", "NQ": "i32", "NSLOT": "i32", "scale": "fp32", **{n: "constexpr" for n in meta}}
        fwd = dict(Q=t, K=t, V=t, IDX="*i32", BIAS="*fp32", O=t, LSE="*fp32", **dims)
        bq = dict(Q=t, K=t, V=t, IDX="*i32", BIAS="*fp32", DO=t, DELTA="*fp32", LSE="*fp32", DQ=t,
                  DBIAS="*fp32", **dims)
        bkv = dict(Q=t, K=t, V=t, BIAS="*fp32", DO=t, DELTA="*fp32", LSE="*fp32", REV="*i32", OFFS="*i32",
                   DK=t, DV=t, **dims)
        tag = f"b{block}_d{d}_{dtype}"
        cases += [(f"fwd_{tag}", _as_fwd_kernel, fwd, meta),
                  (f"bwd_q_{tag}", _as_bwd_q_kernel, bq, meta),
                  (f"bwd_kv_{tag}", _as_bwd_kv_kernel, bkv, meta)]
    return cases


# every kernel variant the block launches on the GPU config: python -m kernels.gpu_compile
COMPILE_CASES = _cases()
# head dims 96 and 128, block 32 in float32, and the interpreter tests' shapes: python -m kernels.gpu_compile --all
EXTRA_COMPILE_CASES = _variant_cases([(32, 64, "fp32")] + [(block, d, dtype) for d in (96, 128) for block in (16, 32)
                                                           for dtype in ("fp32", "bf16")]
                                     + [(16, 24, "fp32"), (16, 16, "fp32"), (32, 32, "fp32")])
