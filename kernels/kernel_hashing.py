"""Gathered-block attention for the kernel-hashing block (model.py, section "kernel-hashing").

A *tile* is a group g, a run of query rows in that group's sorted query order and a range of
keys. Each query row is "active" in exactly one tile, and that tile gives it its whole
attention: softmax over the tile's keys plus, in the hashed mode, the group's sampled keys
with an additive log-weight. The kernel returns the output and its log-sum-exp (LSE).

    rectangle mode (causal=False): rows = queries sorted by key block, keys = key block kb of
        the group's keys sorted by hash, plus M sampled keys; a sample that lies in block kb
        is dropped (it is already counted exactly); a sample's score gets + log_w.
    diagonal mode (causal=True): rows and keys in their own order, key j <= query i.

Backward takes the gradients of both outputs, dO and dLSE: with P the softmax weights,
dS_ij = P_ij (dO_i . v_j - D_i) where D_i = dO_i . O_i - dLSE_i. Block keys may be shared by
a few tiles (atomic adds); sampled keys are shared by every tile of a group, so their
gradients go to one partial per tile and are summed by the wrapper.
"""
import torch
import triton
import triton.language as tl

# float32 dots in full IEEE precision: Triton's default, TF32, keeps 10 mantissa bits of each
# operand on the tensor cores (the interpreter would hide it). Ignored for bfloat16 operands.
DOT_PRECISION = tl.constexpr("ieee")


@triton.jit
def _kh_fwd_kernel(Q, K, V, O, LSE, QORD, QKB, KORD, SIDX, SKB, TG, TQ0, TKB,
                   SQ, SK, M, KBLK, D, scale, log_w,
                   DP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                   CAUSAL: tl.constexpr):
    t = tl.program_id(0)
    g = tl.load(TG + t).to(tl.int64)
    q0 = tl.load(TQ0 + t)
    kb = tl.load(TKB + t)
    rows = q0 + tl.arange(0, BQ)
    valid = rows < SQ
    dofs = tl.arange(0, DP)
    dmask = dofs < D
    if CAUSAL:  # rows are queries in their own order; keys 0 .. last row of the tile
        qi = rows
        active = valid
        k_lo = 0
        k_hi = tl.minimum(q0 + BQ, SK)
    else:  # rows are queries sorted by key block; only rows whose block is kb are ours
        qi = tl.load(QORD + g * SQ + rows, mask=valid, other=0)
        active = valid & (tl.load(QKB + g * SQ + rows, mask=valid, other=-1) == kb)
        k_lo = kb * KBLK
        k_hi = tl.minimum(k_lo + KBLK, SK)
    qrow = (g * SQ + qi).to(tl.int64)
    q = tl.load(Q + qrow[:, None] * D + dofs[None, :], mask=active[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BQ], -1e30, tl.float32)  # finite start: a fully masked block gives exp(-inf) = 0
    l_i = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, DP], tl.float32)
    for start in range(k_lo, k_hi, BK):
        kpos = start + tl.arange(0, BK)
        kvalid = kpos < k_hi
        if CAUSAL:
            ki = kpos
        else:
            ki = tl.load(KORD + g * SK + kpos, mask=kvalid, other=0)
        krow = (g * SK + ki).to(tl.int64)
        kvmask = kvalid[:, None] & dmask[None, :]
        k = tl.load(K + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
        v = tl.load(V + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        keep = kvalid[None, :]
        if CAUSAL:
            keep = keep & (ki[None, :] <= qi[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if not CAUSAL:  # the sampled keys, weighted by n/m, minus those already in block kb
        for s0 in range(0, M, BM):
            j = s0 + tl.arange(0, BM)
            jvalid = j < M
            si = tl.load(SIDX + g * M + j, mask=jvalid, other=0)
            skb = tl.load(SKB + g * M + j, mask=jvalid, other=-1)
            krow = (g * SK + si).to(tl.int64)
            kvmask = jvalid[:, None] & dmask[None, :]
            k = tl.load(K + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
            v = tl.load(V + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale + log_w
            s = tl.where((jvalid & (skb != kb))[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
    l_safe = tl.where(active, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + qrow[:, None] * D + dofs[None, :], out.to(O.dtype.element_ty), mask=active[:, None] & dmask[None, :])
    tl.store(LSE + qrow, m_i + tl.log(l_safe), mask=active)


@triton.jit
def _kh_bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, DKS, DVS, QORD, QKB, KORD, SIDX, SKB, TG, TQ0, TKB,
                   SQ, SK, M, KBLK, D, scale, log_w,
                   DP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                   CAUSAL: tl.constexpr):
    t = tl.program_id(0)
    g = tl.load(TG + t).to(tl.int64)
    q0 = tl.load(TQ0 + t)
    kb = tl.load(TKB + t)
    rows = q0 + tl.arange(0, BQ)
    valid = rows < SQ
    dofs = tl.arange(0, DP)
    dmask = dofs < D
    if CAUSAL:
        qi = rows
        active = valid
        k_lo = 0
        k_hi = tl.minimum(q0 + BQ, SK)
    else:
        qi = tl.load(QORD + g * SQ + rows, mask=valid, other=0)
        active = valid & (tl.load(QKB + g * SQ + rows, mask=valid, other=-1) == kb)
        k_lo = kb * KBLK
        k_hi = tl.minimum(k_lo + KBLK, SK)
    qrow = (g * SQ + qi).to(tl.int64)
    qmask = active[:, None] & dmask[None, :]
    q = tl.load(Q + qrow[:, None] * D + dofs[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + qrow[:, None] * D + dofs[None, :], mask=qmask, other=0.0)
    lse = tl.load(LSE + qrow, mask=active, other=0.0)
    delta = tl.load(DELTA + qrow, mask=active, other=0.0)  # dO_i . O_i - dLSE_i
    dq = tl.zeros([BQ, DP], tl.float32)
    for start in range(k_lo, k_hi, BK):
        kpos = start + tl.arange(0, BK)
        kvalid = kpos < k_hi
        if CAUSAL:
            ki = kpos
        else:
            ki = tl.load(KORD + g * SK + kpos, mask=kvalid, other=0)
        krow = (g * SK + ki).to(tl.int64)
        kvmask = kvalid[:, None] & dmask[None, :]
        k = tl.load(K + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
        v = tl.load(V + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        keep = active[:, None] & kvalid[None, :]
        if CAUSAL:
            keep = keep & (ki[None, :] <= qi[:, None])
        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION) * scale
        tl.atomic_add(DV + krow[:, None] * D + dofs[None, :], dv, mask=kvmask)
        tl.atomic_add(DK + krow[:, None] * D + dofs[None, :], dk, mask=kvmask)
    if not CAUSAL:
        for s0 in range(0, M, BM):
            j = s0 + tl.arange(0, BM)
            jvalid = j < M
            si = tl.load(SIDX + g * M + j, mask=jvalid, other=0)
            skb = tl.load(SKB + g * M + j, mask=jvalid, other=-1)
            krow = (g * SK + si).to(tl.int64)
            kvmask = jvalid[:, None] & dmask[None, :]
            k = tl.load(K + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
            v = tl.load(V + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale + log_w
            keep = active[:, None] & (jvalid & (skb != kb))[None, :]
            p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
            dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION) * scale
            prow = (t * M + j).to(tl.int64)  # this tile's partial for the shared sampled keys
            tl.store(DVS + prow[:, None] * D + dofs[None, :], dv, mask=kvmask)
            tl.store(DKS + prow[:, None] * D + dofs[None, :], dk, mask=kvmask)
    tl.store(DQ + qrow[:, None] * D + dofs[None, :], dq * scale, mask=qmask)


FWD_WARPS, BWD_WARPS = 4, 8  # the backward holds twice the tiles: 8 warps keep it off local memory


def _pow2(n, lo=16, hi=32):
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def rows_per_tile(n):
    """Query rows per tile for a key block (or diagonal chunk) of n keys: a power of two in [16, 32]
    (larger blocks loop over keys in steps of 32; 32 x 64 tiles keep the backward off local memory)."""
    return _pow2(n)


def _launch_args(d, m, rows, key_block):
    """Tile shapes: the head dim padded to a power of two, and key and sample steps of at most 32."""
    return dict(DP=_pow2(d, 16, 1 << 16), BQ=rows, BK=_pow2(key_block), BM=_pow2(m))


class _GatheredBlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, meta):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        G, SQ, D = q.shape
        SK = k.shape[1]
        ntiles = plan[5].numel()
        o = torch.empty_like(q)
        lse = torch.empty(G, SQ, device=q.device, dtype=torch.float32)
        _kh_fwd_kernel[(ntiles,)](q, k, v, o, lse, *plan, SQ, SK, meta["M"], meta["key_block"], D,
                                  meta["scale"], meta["log_w"], CAUSAL=meta["causal"], num_warps=FWD_WARPS,
                                  **meta["launch"])
        ctx.save_for_backward(q, k, v, o, lse, *plan)
        ctx.meta = meta
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *plan = ctx.saved_tensors
        meta = ctx.meta
        G, SQ, D = q.shape
        SK, M = k.shape[1], meta["M"]
        tile_g = plan[5]
        ntiles = tile_g.numel()
        do = torch.zeros_like(o) if do is None else do.contiguous()
        delta = (do.float() * o.float()).sum(-1)  # the LSE's own gradient enters as a shift of dO . O
        if dlse is not None:
            delta = delta - dlse.float()
        dq = torch.empty(G, SQ, D, device=q.device, dtype=torch.float32)
        dk = torch.zeros(G, SK, D, device=q.device, dtype=torch.float32)
        dv = torch.zeros(G, SK, D, device=q.device, dtype=torch.float32)
        dks = torch.empty(max(ntiles * M, 1), D, device=q.device, dtype=torch.float32)
        dvs = torch.empty(max(ntiles * M, 1), D, device=q.device, dtype=torch.float32)
        _kh_bwd_kernel[(ntiles,)](q, k, v, do, lse, delta.contiguous(), dq, dk, dv, dks, dvs, *plan, SQ, SK, M,
                                  meta["key_block"], D, meta["scale"], meta["log_w"],
                                  CAUSAL=meta["causal"], num_warps=BWD_WARPS, **meta["launch"])
        if M > 0 and ntiles > 0:  # sum the tiles' partials per group, then add them at the sampled keys
            s_idx = plan[3].long()[:, :, None].expand(G, M, D)
            for part, full in ((dks, dk), (dvs, dv)):
                per_group = torch.zeros(G, M, D, device=q.device, dtype=torch.float32)
                per_group.index_add_(0, tile_g.long(), part[:ntiles * M].view(ntiles, M, D))
                full.scatter_add_(1, s_idx, per_group)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def gathered_block_attention(q, k, v, q_order, q_kb, k_order, s_idx, s_kb, tile_g, tile_q0, tile_kb,
                             key_block, log_w, scale, causal, rows):
    """Attention of each query over its key block (and the sampled keys), with its log-sum-exp.

    q (G, SQ, D); k, v (G, SK, D). Plan (integer tensors, no gradient):
      q_order (G, SQ): query indices in sorted order; q_kb (G, SQ): key block of each sorted query;
      k_order (G, SK): key indices sorted by hash (block b = sorted positions b*key_block ...);
      s_idx, s_kb (G, M): sampled key indices and the key block each lies in (M may be 0);
      tile_g, tile_q0, tile_kb (NT,): a tile's group, first sorted query row (a multiple of
      `rows`) and key block. causal=True: diagonal mode (orders, q_kb, samples unused).
    Returns o (G, SQ, D) in q's dtype and lse (G, SQ) float32, differentiable in q, k, v.
    """
    dev = q.device
    G = q.shape[0]
    i32 = lambda x: x.to(device=dev, dtype=torch.int32).contiguous()  # noqa: E731
    dummy = torch.zeros(1, device=dev, dtype=torch.int32)
    M = 0 if (causal or s_idx is None) else s_idx.shape[1]
    plan = (dummy if q_order is None else i32(q_order), dummy if q_kb is None else i32(q_kb),
            dummy if k_order is None else i32(k_order), i32(s_idx) if M else dummy, i32(s_kb) if M else dummy,
            i32(tile_g), i32(tile_q0), i32(tile_kb))
    assert rows in (16, 32), "rows per tile must be 16 or 32"
    kblk = q.shape[1] if causal else key_block
    meta = dict(M=M, key_block=int(kblk), scale=float(scale), log_w=float(log_w), causal=bool(causal),
                launch=_launch_args(q.shape[2], M, rows, rows if causal else key_block))
    assert G * max(q.shape[1], k.shape[1]) < 2**31
    return _GatheredBlockAttention.apply(q, k, v, plan, meta)


# --------------------------------------------------------------------------- GPU compile cases
def _signature(names, fp):
    ptrs = {n: f"*{fp}" for n in names["float"]}
    ptrs.update({n: "*fp32" for n in names["fp32"]})
    ptrs.update({n: "*i32" for n in names["int"]})
    ptrs.update({n: "i32" for n in ("SQ", "SK", "M", "KBLK", "D")})
    ptrs.update({"scale": "fp32", "log_w": "fp32"})
    ptrs.update({n: "constexpr" for n in ("DP", "BQ", "BK", "BM", "CAUSAL")})
    return ptrs


_INT = ["QORD", "QKB", "KORD", "SIDX", "SKB", "TG", "TQ0", "TKB"]


def _fwd_sig(fp):
    names = {"float": ["Q", "K", "V", "O"], "fp32": ["LSE"], "int": _INT}
    order = ["Q", "K", "V", "O", "LSE"] + _INT + ["SQ", "SK", "M", "KBLK", "D", "scale", "log_w",
                                                   "DP", "BQ", "BK", "BM", "CAUSAL"]
    sig = _signature(names, fp)
    return {n: sig[n] for n in order}


def _bwd_sig(fp):
    names = {"float": ["Q", "K", "V", "DO"], "fp32": ["LSE", "DELTA", "DQ", "DK", "DV", "DKS", "DVS"], "int": _INT}
    order = ["Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "DK", "DV", "DKS", "DVS"] + _INT + [
        "SQ", "SK", "M", "KBLK", "D", "scale", "log_w", "DP", "BQ", "BK", "BM", "CAUSAL"]
    sig = _signature(names, fp)
    return {n: sig[n] for n in order}


def _consts(d, rows, bk, bm, causal):
    return dict(DP=d, BQ=rows, BK=bk, BM=bm, CAUSAL=causal)


COMPILE_CASES = [  # (name, kernel, signature, constexprs, num_warps): the launches gathered_block_attention makes
    # GPU shakespeare scale: head dim 64, key blocks and samples of 32 (tiles of 32), bf16 under autocast
    ("fwd_hashed_bf16_d64", _kh_fwd_kernel, _fwd_sig("bf16"), _consts(64, 32, 32, 32, False), FWD_WARPS),
    ("bwd_hashed_bf16_d64", _kh_bwd_kernel, _bwd_sig("bf16"), _consts(64, 32, 32, 32, False), BWD_WARPS),
    ("fwd_diagonal_bf16_d64", _kh_fwd_kernel, _fwd_sig("bf16"), _consts(64, 32, 32, 16, True), FWD_WARPS),
    ("bwd_diagonal_bf16_d64", _kh_bwd_kernel, _bwd_sig("bf16"), _consts(64, 32, 32, 16, True), BWD_WARPS),
    # float32 inputs
    ("fwd_hashed_fp32_d64", _kh_fwd_kernel, _fwd_sig("fp32"), _consts(64, 32, 32, 32, False), FWD_WARPS),
    ("bwd_hashed_fp32_d64", _kh_bwd_kernel, _bwd_sig("fp32"), _consts(64, 32, 32, 32, False), BWD_WARPS),
    ("bwd_diagonal_fp32_d64", _kh_bwd_kernel, _bwd_sig("fp32"), _consts(64, 32, 32, 16, True), BWD_WARPS),
]
# head dims 96 and 128 (both padded to DP 128; D is a runtime argument), both dtypes, both modes,
# and the interpreter tests' tiles: python -m kernels.gpu_compile --all
EXTRA_COMPILE_CASES = [(f"{kind}_{mode}_{fp}_d128", kern, sig(fp), _consts(128, 32, 32, bm, causal), warps)
                  for fp in ("bf16", "fp32") for mode, bm, causal in (("hashed", 32, False), ("diagonal", 16, True))
                  for kind, kern, sig, warps in (("fwd", _kh_fwd_kernel, _fwd_sig, FWD_WARPS),
                                                 ("bwd", _kh_bwd_kernel, _bwd_sig, BWD_WARPS))]
# the interpreter tests' tiles: head dims 16 and 24 (DP 16, 32), rows, keys and samples of 16
EXTRA_COMPILE_CASES += [(f"{kind}_{mode}_fp32_dp{dp}_tests", kern, sig("fp32"), _consts(dp, 16, 16, 16, causal), warps)
                  for dp in (16, 32) for mode, causal in (("hashed", False), ("diagonal", True))
                  for kind, kern, sig, warps in (("fwd", _kh_fwd_kernel, _fwd_sig, FWD_WARPS),
                                                 ("bwd", _kh_bwd_kernel, _bwd_sig, BWD_WARPS))]
