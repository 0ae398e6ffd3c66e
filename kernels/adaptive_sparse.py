"""Adaptive-sparse attention (AdaptiveSparseAttention in model.py): how it is computed.

    reference (PyTorch)  score_and_select: block scores, top-p selection, the straight-through bias
                         and the correction (PyTorch on every device); n_slots;
                         as_block_sparse_attention_torch: the selected-block attention by gathering
                         every slot up to k_max (batched gather + softmax, empty slots masked)
    CPU-fast path        as_block_sparse_attention_buckets: the same, with query blocks grouped by how
                         many blocks they list, so the work follows the kept blocks, not k_max (and
                         only the new rows of a decode query block), each group in cache-sized
                         sub-batches recomputed in the backward (_GroupAttention, flash-style: memory
                         linear in the kept pairs' rows, no group-sized score tensor); window_attention: the sliding-
                         window branch on the same path (every device: no Triton kernel for it);
                         compressed_attention: NSA's per-token compressed branch over the windows of
                         compressed_blocks (SDPA in row ranges, recomputed in the backward)
    entry point          adaptive_sparse_attention: selection (in query-block ranges, recomputed in the
                         backward when there are several and many scores: memory linear in T), then the
                         selected-block attention (Triton on CUDA, the bucketed path otherwise), gates;
                         block_means, which decode keeps incrementally and passes in (means=)
    Triton kernels       block_sparse_attention: block-sparse flash attention, below

Triton kernels: block-sparse flash attention.

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
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels._triton import HAS_TRITON, tl, triton

# ------------------------------------------------------------------------------- reference (PyTorch)

class Scorer(NamedTuple):
    """The learned block scorer and the selection rule: score_q, score_k (H, d, r) projections, log_temp
    (H,) log-temperatures; keep the top-p (threshold) mass, at least k_min, at most k_max (None: no
    cap; 0: none, the correction covers every candidate) candidates. The (nq, nk) scores are
    computed in ranges of query blocks holding about `chunk_scores` scores per (batch, head) each,
    at least `min_blocks` query blocks; when there are several ranges, a gradient is needed and the
    whole score matrix (over batch and heads) exceeds `recompute_scores` entries, each range is
    recomputed in the backward (nothing of size nq x nk is kept). straight_through=False
    drops the straight-through bias's gradient (the dense-equivalent setting: no gradient path
    through the pooled means)."""
    score_q: torch.Tensor
    score_k: torch.Tensor
    log_temp: torch.Tensor
    threshold: float
    k_min: int
    k_max: Optional[int]
    chunk_scores: int = 1 << 16
    min_blocks: int = 64
    recompute_scores: int = 1 << 22
    straight_through: bool = True
    first: int = 0  # 1: block 0 is forced (always attended), not a candidate
    softness: float = 0.0  # > 0: also return the expected kept count, sigmoid((p - mass before) / softness) per slot

    @property
    def counts_kept(self):
        """Whether score_and_select returns the expected kept count (a soft count needs the
        straight-through gradient and a threshold that can drop blocks)."""
        return self.softness > 0 and self.straight_through and self.threshold < 1.0


def n_slots(n_blocks, k_max, first=0):
    """Selected slots per query block: every candidate (blocks first..i-2) can be kept unless k_max caps it."""
    n = max(n_blocks - 2 - first, 0)
    return n if k_max is None else min(k_max, n)


def score_and_select(q_prev, kbar, vbar, q_block0, scorer, correction=True):
    """Scoring, top-p selection and the correction for query blocks q_block0.. (q_prev: their
    previous block's mean query, (B, H, nq, D); kbar, vbar: (B, H, nk, D) block means).
    Returns sel (B, H, nq, k): kept candidate ids, best first, -1 = none; st (B, H, nq, k):
    the straight-through bias of those slots; c (B, H, nq, D) the correction, or None; kept
    (B, H, nq): with scorer.softness > 0, a straight-through bias and a threshold below 1, the
    expected kept count sum_r sigmoid((p - M_r) / softness) over the ranked slots (M_r: the
    scorer mass of the better-ranked candidates; 1 for the first k_min), differentiable in the
    scorer (the budget regulariser's input), else None."""
    B, H, nq, D = q_prev.shape
    nk = kbar.shape[2]
    first = scorer.first
    k = min(nk, n_slots(q_block0 + nq, scorer.k_max, first))  # the most slots any of these blocks has
    dev = q_prev.device
    dt = torch.promote_types(q_prev.dtype, torch.float32)
    if nk <= first or n_slots(q_block0 + nq, None, first) == 0 or (k == 0 and not correction):
        # at most two blocks (nothing to score, nothing dropped), or k_max = 0 without a correction
        empty = torch.zeros(B, H, nq, 0, device=dev)
        return empty.long(), empty.to(dt), q_prev.new_zeros(B, H, nq, D, dtype=dt) if correction else None, None
    with torch.autocast(dev.type, enabled=False):
        temp = scorer.log_temp.to(dt).exp().view(H, 1, 1) / math.sqrt(D)
        sq = torch.einsum("bhnd,hdr->bhnr", q_prev.to(dt), scorer.score_q.to(dt)) * temp
        sk = torch.einsum("bhnd,hdr->bhnr", kbar.to(dt), scorer.score_k.to(dt))
        i = torch.arange(q_block0, q_block0 + nq, device=dev).view(nq, 1)
        j = torch.arange(nk, device=dev)
        cand = (j <= i - 2) & (j >= first)  # fully past and not forced: (nq, nk)
        with torch.no_grad():  # the ranking is discrete: no graph through the (nq, nk) scores
            s = (sq @ sk.transpose(-1, -2)).masked_fill_(~cand, -1e9)  # finite: rows without candidates stay NaN-free
            top = s.topk(k, dim=-1).indices  # best first; ranked by s, not pi, which can underflow to 0
            pi = s.softmax(-1)
            del s
            top_p = pi.gather(-1, top)
            rank = torch.arange(k, device=dev)
            valid = (rank < (i - 1 - first).clamp(min=0)) & (top <= i - 2) & (top >= first)  # a real candidate
            if scorer.threshold >= 1.0:
                keep = chosen = valid.expand(B, H, nq, k)
            else:
                mass_before = top_p.cumsum(-1) - top_p  # mass of the better-ranked blocks
                chosen = valid & (mass_before < scorer.threshold)  # kept by the top-p rule itself
                keep = chosen | (valid & (rank < scorer.k_min))  # ... or forced in by k_min
        sel = torch.where(keep, top, torch.full_like(top, -1))
        # straight-through bias: value 0, gradient of log pi at the kept blocks. log pi_ij =
        # s_ij - logsumexp_j s_ij, and the logsumexp's gradient is pi, so sq_i . (pi_i @ sk)
        # (pi held constant) has the same first-order gradient at a cost of O(nq nk r).
        if scorer.straight_through:
            rows = (torch.arange(B * H, device=dev).view(B, H, 1, 1) * nk + top).reshape(-1)
            sk_top = sk.reshape(B * H * nk, -1).index_select(0, rows).view(B, H, nq, k, sk.shape[-1])
            log_pi = (sq.unsqueeze(-2) * sk_top).sum(-1) - (sq * (pi @ sk)).sum(-1, keepdim=True)
            st = torch.where(chosen, log_pi - log_pi.detach(), torch.zeros_like(log_pi))
        else:  # a constant 0: no gradient reaches q, k or the scorer through the pooled means
            st = torch.zeros(B, H, nq, k, dtype=dt, device=dev)
        kept = None
        if scorer.counts_kept:
            # pi at the ranked slots with its gradient (the same first-order term as st's), then
            # the soft form of the top-p rule: a slot counts as kept as far as the mass before it < p
            p_top = torch.where(valid, top_p * (log_pi - log_pi.detach()).exp(), torch.zeros_like(top_p))
            soft = torch.sigmoid((scorer.threshold - (p_top.cumsum(-1) - p_top)) / scorer.softness)
            kept = torch.where(valid, torch.where(rank < scorer.k_min, torch.ones_like(soft), soft),
                               torch.zeros_like(soft)).sum(-1)
        if not correction:
            return sel, st, None, kept
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
    return sel, st, c, kept


def _run_range(fn, args, recompute):
    """fn(*args), under activation checkpointing when recompute (the backward recomputes it)."""
    if recompute:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def _select_in_chunks(q_prev, kbar, vbar, q_block0, scorer, correction):
    """score_and_select over ranges of query blocks, each against only the key blocks it can see
    (the score matrix is block-lower-triangular: about half the work). With more than one range,
    a gradient to compute and more than scorer.recompute_scores scores in all (over batch and
    heads), each range runs under activation checkpointing: its backward
    recomputes the range's scores, so what autograd keeps is linear in the number of blocks (the
    inputs and outputs), and the peak holds one range's scores, about chunk_scores per (batch, head)."""
    nq, nk = q_prev.shape[2], kbar.shape[2]
    k = n_slots(q_block0 + nq, scorer.k_max, scorer.first)
    per = max(scorer.min_blocks, scorer.chunk_scores // max(nk, 1))
    # below recompute_scores (about 40 MB kept) recomputing costs more than it saves: torch's
    # checkpointing held ~58 MB more resident memory than it freed for one block at T=32k, blocks of 64
    n_scores = q_prev.shape[0] * q_prev.shape[1] * nq * nk
    recompute = nq > per and torch.is_grad_enabled() and n_scores > scorer.recompute_scores
    sels, sts, cs, kepts = [], [], [], []
    for a in range(0, nq, per):
        e = min(nq, a + per)
        width = max(q_block0 + e - 2, 0)  # candidates of the range's last block: j <= q_block0+e-3
        args = (q_prev[:, :, a:e], kbar[:, :, :width], vbar[:, :, :width], q_block0 + a, scorer, correction)
        sel, st, c, kept = _run_range(score_and_select, args, recompute)
        sels.append(F.pad(sel, (0, k - sel.shape[-1]), value=-1))  # same number of slots everywhere
        sts.append(F.pad(st, (0, k - st.shape[-1])))
        cs.append(c)
        kepts.append(kept if kept is not None else sel.new_zeros(sel.shape[:3], dtype=st.dtype))
    soft = scorer.counts_kept
    if len(sels) == 1:
        return sels[0], sts[0], cs[0], kepts[0] if soft else None
    return (torch.cat(sels, 2), torch.cat(sts, 2), torch.cat(cs, 2) if correction else None,
            torch.cat(kepts, 2) if soft else None)


# ------------------------------------------------------------------------------- CPU-fast path

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


class _GroupAttention(torch.autograd.Function):
    """Attention of R query blocks (rows qs (R, rq, D)) that each list the same number n of key
    blocks, rows krows (R n,) of the key and value tables kf, vf (N, block D), with one logit bias
    per listed block b (R, n), hiding keys at kpos (R, 1, n block) later than the query at qpos
    (R, rq) (or window or more before it). Flash-style on the CPU: sub-batches of about SUB_SCORES
    scores are gathered, scored and normalised in turn, and the backward recomputes them from the
    saved log-sum-exp, so no (R, rq, n block) tensor, and no gathered copy of the keys for the whole
    group, is kept: the working set stays in cache, where the score-sized passes run several times
    faster than over a group-sized tensor."""

    SUB_SCORES = 1 << 20

    @staticmethod
    def _scores(qs, kf, vf, krows, b, kpos, qpos, window, block, scale, rs):
        n = b.shape[1]
        R_, rq, D = qs[rs].shape
        kr = krows.view(-1, n)[rs].reshape(-1)
        kg = kf.index_select(0, kr).view(R_, n * block, D)
        vg = vf.index_select(0, kr).view(R_, n * block, D)
        bb = b[rs].to(qs.dtype).repeat_interleave(block, dim=-1).unsqueeze(1)
        att = torch.baddbmm(bb, qs[rs], kg.transpose(-1, -2), alpha=scale)
        hide = kpos[rs] > qpos[rs].unsqueeze(-1)
        if window:
            hide |= kpos[rs] <= qpos[rs].unsqueeze(-1) - window
        return att.masked_fill_(hide, float("-inf")), kg, vg, kr

    @staticmethod
    def forward(ctx, qs, kf, vf, krows, b, kpos, qpos, window, block, scale):
        R, rq, D = qs.shape
        n = b.shape[1]
        sub = max(1, _GroupAttention.SUB_SCORES // (rq * n * block))
        o = qs.new_empty(R, rq, D)
        lse = qs.new_empty(R, rq, 1, dtype=torch.promote_types(qs.dtype, torch.float32))
        for r0 in range(0, R, sub):
            rs = slice(r0, min(R, r0 + sub))
            att, _, vg, _ = _GroupAttention._scores(qs, kf, vf, krows, b, kpos, qpos, window, block, scale, rs)
            lse[rs] = torch.logsumexp(att, -1, keepdim=True)
            o[rs] = att.sub_(lse[rs].to(att.dtype)).exp_() @ vg
        ctx.save_for_backward(qs, kf, vf, krows, b, kpos, qpos, o, lse)
        ctx.args = (window, block, scale, sub)
        return o

    @staticmethod
    def backward(ctx, do):
        qs, kf, vf, krows, b, kpos, qpos, o, lse = ctx.saved_tensors
        window, block, scale, sub = ctx.args
        R, rq, D = qs.shape
        n = b.shape[1]
        do = do.contiguous()
        delta = (do * o).sum(-1, keepdim=True)
        dq = torch.empty_like(qs)
        dkf, dvf = torch.zeros_like(kf), torch.zeros_like(vf)
        db = torch.empty(R, n, dtype=b.dtype, device=b.device)
        for r0 in range(0, R, sub):
            rs = slice(r0, min(R, r0 + sub))
            att, kg, vg, kr = _GroupAttention._scores(qs, kf, vf, krows, b, kpos, qpos, window, block, scale, rs)
            p = att.sub_(lse[rs].to(att.dtype)).exp_()
            ds = (do[rs] @ vg.transpose(-1, -2)).sub_(delta[rs]).mul_(p)
            dq[rs] = (ds @ kg).mul_(scale)
            m = ds.shape[0]
            dkf.index_add_(0, kr, (ds.transpose(-1, -2) @ qs[rs]).mul_(scale).view(m * n, block * D).to(dkf.dtype))
            dvf.index_add_(0, kr, (p.transpose(-1, -2) @ do[rs]).view(m * n, block * D).to(dvf.dtype))
            db[rs] = ds.view(m, rq, n, block).sum((1, 3)).to(db.dtype)
        return dq, dkf, dvf, None, db, None, None, None, None, None


def as_block_sparse_attention_buckets(q, k, v, idx, bias, block, q_block0=0, work=None, row0=0, window=0):
    """as_block_sparse_attention_torch (same arguments and result) at a cost set by the listed
    blocks, not the slots: query blocks are grouped by how many blocks they list, and each group
    gathers exactly that many, so empty slots cost nothing. work: optional dict; work["tiles"] is
    increased by the (query block, key block) tiles computed (a FLOP proxy: 4 block^2 D each).
    With one query block (nq = 1), q may hold only some of its rows: those at offsets row0.. in
    the block (decode: the new tokens only, not the whole block). window > 0: a query at t also
    ignores the keys s <= t - window (the sliding-window branch)."""
    B, H, Tq, D = q.shape
    nq, ns = idx.shape[2], idx.shape[3]
    rows_q = Tq // nq  # query rows per block: block, or the rows given (nq = 1)
    if Tq != nq * rows_q or (nq > 1 and (rows_q != block or row0 != 0)) or row0 + rows_q > block:
        raise ValueError(f"as_block_sparse_attention_buckets: {Tq} query rows at offset {row0} do not fit "
                         f"{nq} blocks of {block}")
    nk = k.shape[2] // block
    dev = q.device
    listed = idx >= 0
    order = torch.argsort((~listed).to(torch.uint8), dim=-1, stable=True)  # listed slots first
    idx_c = idx.gather(-1, order).view(B * H * nq, ns)
    bias_c = bias.gather(-1, order).view(B * H * nq, ns)
    count = listed.sum(-1).view(-1)
    qrow = torch.arange(B * H * nq, device=dev)
    krow0 = qrow // nq * nk  # first row of the query block's head in the (B*H*nk) key table
    qf = q.reshape(B * H * nq, rows_q, D)
    kf, vf = k.reshape(B * H * nk, block * D), v.reshape(B * H * nk, block * D)
    offs = torch.arange(block, device=dev)
    rows_all, outs = [], []
    for n in torch.unique(count).tolist():  # at most n_slots + 1 groups
        rows = (count == n).nonzero().squeeze(1)
        R = rows.numel()
        if n == 0:  # nothing listed: no keys (the model always lists the own block)
            rows_all.append(rows)
            outs.append(qf.new_zeros(R, rows_q, D))
            continue
        ids = idx_c.index_select(0, rows)[:, :n]
        krows = (krow0.index_select(0, rows).unsqueeze(1) + ids).reshape(-1)
        qpos = (q_block0 + rows % nq).unsqueeze(1) * block + row0 + offs[:rows_q]  # (R, rows_q)
        kpos = (ids.unsqueeze(-1) * block + offs).view(R, 1, n * block)
        rows_all.append(rows)
        outs.append(_GroupAttention.apply(qf.index_select(0, rows), kf, vf, krows, bias_c.index_select(0, rows)[:, :n],
                                          kpos, qpos, window, block, 1.0 / math.sqrt(D)))
        if work is not None:
            work["tiles"] = work.get("tiles", 0) + R * n
    rows_all = torch.cat(rows_all)
    o = torch.cat(outs).index_select(0, torch.argsort(rows_all))  # back to query-block order
    return o.view(B, H, Tq, D)


# ------------------------------------------------------------------------------- entry point

def _kernel_for(t):
    """The Triton block-sparse attention for a CUDA tensor when triton is installed, None otherwise."""
    return block_sparse_attention if t.is_cuda and HAS_TRITON else None


def block_means(t, block):
    """Means of t (B, H, S, D) over each complete block of `block` tokens: (B, H, S // block, D)."""
    B, H, S, D = t.shape
    n = S // block
    return t[:, :, :n * block].reshape(B, H, n, block, D).mean(3)


def window_attention(q, kp, vp, q0, S, block, window, work=None):
    """The sliding-window branch: each query t of q (B, H, S - q0, D), at positions q0..S-1, attends
    causally to the keys t - window < s <= t of kp, vp (whole blocks, rows past S unused): the
    blocked path with each query block listing the ceil((window - 1) / block) blocks before it."""
    B, H, _, D = q.shape
    i0, nb = q0 // block, -(-S // block)
    nq, back = nb - i0, -(-(window - 1) // block)
    blocks = torch.arange(i0, nb, device=q.device).view(nq, 1) + torch.arange(-back, 1, device=q.device)
    idx = torch.where(blocks >= 0, blocks, -1).expand(B, H, nq, back + 1)
    bias = q.new_zeros(1, 1, 1, 1).expand(B, H, nq, back + 1)
    if nq == 1:  # decode: only the new rows
        return as_block_sparse_attention_buckets(q, kp, vp, idx, bias, block, i0, work, q0 - i0 * block, window)
    qp = F.pad(q, (0, 0, q0 - i0 * block, nb * block - S))
    o = as_block_sparse_attention_buckets(qp, kp, vp, idx, bias, block, i0, work, window=window)
    return o[:, :, q0 - i0 * block:S - i0 * block]


def n_compressed(S, length, stride):
    """Compressed blocks complete among S tokens: windows [j stride, j stride + length) inside 0..S-1."""
    return 0 if S < length else (S - length) // stride + 1


def compressed_blocks(t, length, stride, j0=0, S=None):
    """Means of t (B, H, >= S, D) over the complete windows j0.. of `length` tokens taken every
    `stride` tokens among its first S (default: all) rows: (B, H, n_compressed(S) - j0, D)."""
    S = t.shape[2] if S is None else S
    n = n_compressed(S, length, stride)
    if n <= j0:
        return t.new_zeros(t.shape[0], t.shape[1], 0, t.shape[3])
    return t[:, :, j0 * stride:(n - 1) * stride + length].unfold(2, length, stride).mean(-1)


def _compressed_rows(q, kc, vc, q0, length, stride):
    """Queries q (B, H, R, D) at positions q0.. against the compressed blocks complete at each
    (j stride + length - 1 <= t), plus a null slot of logit 0 and value 0 (a query before the
    first complete block gets 0)."""
    B, H, R, D = q.shape
    t = torch.arange(q0, q0 + R, device=q.device).view(R, 1)
    n = kc.shape[2]
    mask = torch.arange(n + 1, device=q.device) <= torch.div(t + 1 - length, stride, rounding_mode="floor") + 1
    null = q.new_zeros(B, H, 1, D)
    return F.scaled_dot_product_attention(q, torch.cat([null, kc.to(q.dtype)], 2),
                                          torch.cat([null, vc.to(q.dtype)], 2), attn_mask=mask)


def compressed_attention(q, kc, vc, q0, length, stride, chunk_scores=1 << 16, min_rows=64,
                         recompute_scores=1 << 22):
    """NSA's compressed branch: each query t of q (B, H, R, D), at positions q0..q0+R-1, attends
    (softmax over q_t . kc_j / sqrt(D), plus a null slot) to the compressed keys/values kc, vc
    (B, H, >= n_compressed(q0 + R), D) of the windows complete at t. Query rows run in ranges of
    about chunk_scores scores per (batch, head) (at least min_rows rows), each against only the
    blocks it can see; with several ranges, a gradient to compute and more than recompute_scores
    scores in all, each range is recomputed in the backward (memory linear in T, as for the scores)."""
    R = q.shape[2]
    per = max(min_rows, chunk_scores // max(n_compressed(q0 + R, length, stride), 1))
    B, H = q.shape[:2]
    recompute = R > per and torch.is_grad_enabled() and B * H * R * kc.shape[2] > recompute_scores
    outs = []
    for a in range(0, R, per):
        e = min(R, a + per)
        n = n_compressed(q0 + e, length, stride)
        args = (q[:, :, a:e], kc[:, :, :n], vc[:, :, :n], q0 + a, length, stride)
        outs.append(_run_range(_compressed_rows, args, recompute))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def adaptive_sparse_attention(q, k, v, gates, q0, block, scorer, work=None, means=None, window=0, compress=None,
                               compressed=None, selection_cache=None, expected_kept=None):
    """The adaptive-sparse mixing of the queries q (B, H, S - q0, D) at positions q0..S-1 against
    k, v (B, H, >= S, D) (rows past S are ignored): outputs (B, H, S - q0, D), the kept candidates (B, H, nq, n_slots) of the
    query blocks computed (block ids, best first, -1 = none; no grad) and their ids (nq,). gates:
    (g_sel, g_cmp), each (B, H, S - q0, 1), or None (no correction), plus g_win with window > 0
    (the sliding-window branch of window tokens, added as g_win * o_win); compress: (length, stride)
    or None: NSA's per-token compressed branch (compressed_attention) takes the place of the
    per-block correction under g_cmp, over `compressed` = (kc, vc), the compressed blocks of the
    cache (decode keeps them incrementally), or None: computed here from k, v. scorer: a Scorer. means: the
    block means (qbar, kbar, vbar), each (B, H, >= ceil(S/block) - 1, D), of the complete blocks
    (decode keeps them incrementally), or None: computed here from q, k, v (then q0 must be 0).
    selection_cache: a dict (decode): when every query lies in one block, that block's selection and
    correction are kept there and reused by the next queries of the same block (they depend only on
    the complete blocks before it and the scorer, so every token of a block gets the same ones).
    expected_kept: a list, or None: with scorer.softness > 0 the expected kept count of every query
    block computed, (B, H, nq) with its gradient (score_and_select), is appended to it.
    The selected-block attention runs the Triton kernel on CUDA for block >= 16, a power of two
    (and q0 < block), as_block_sparse_attention_buckets otherwise (work: its tile counter)."""
    if window and (gates is None or len(gates) < 3):
        raise ValueError("adaptive_sparse_attention: window > 0 needs the gates (g_sel, g_cmp, g_win)")
    if compress and gates is None:
        raise ValueError("adaptive_sparse_attention: compress needs the gates (g_sel, g_cmp)")
    B, H, _, D = k.shape
    S = q0 + q.shape[2]  # k, v may run past S (decode keeps its cache padded to whole blocks)
    Bk = block
    nb = -(-S // Bk)
    i0 = q0 // Bk  # first query block computed
    if means is None:
        if q0 != 0:
            raise ValueError("adaptive_sparse_attention: q0 > 0 needs the block means of the cache (means=...)")
        means = [block_means(t, Bk) for t in (q, k, v)]
    qbar, kbar, vbar = means  # only complete blocks (j <= i-2 for k, v; i-1 for q) are ever used
    if qbar.shape[2] < nb - 1 or kbar.shape[2] < nb - 1 or vbar.shape[2] < nb - 1:
        raise ValueError(f"adaptive_sparse_attention: means cover fewer than the {nb - 1} complete blocks")
    pad = nb * Bk - S
    # whole key blocks (rows past S are masked as causally later); a longer cache of whole blocks is
    # used as it is: slicing it would make the key table non-contiguous, a copy of the whole cache
    kp, vp = (t if t.shape[2] >= nb * Bk and t.shape[2] % Bk == 0 else F.pad(t[:, :, :S], (0, 0, 0, nb * Bk - S))
              for t in (k, v))
    q_prev = qbar[:, :, max(i0 - 1, 0):nb - 1]  # previous block's mean query
    if i0 == 0:  # block 0 has no previous block (and no candidates): a zero placeholder
        q_prev = torch.cat([q_prev.new_zeros(B, H, 1, D), q_prev], 2)
    nq = nb - i0
    correction = gates is not None and not compress  # the per-block correction (else the compressed branch)
    key = (i0, correction) + tuple(p._version for p in scorer[:3])  # a training step bumps the versions
    if selection_cache is not None and nq == 1 and selection_cache.get("key") == key:
        sel, st, c = selection_cache["value"]
    else:
        sel, st, c, kept = _select_in_chunks(q_prev, kbar, vbar, i0, scorer, correction=correction)
        if expected_kept is not None and kept is not None:
            expected_kept.append(kept)
        if selection_cache is not None and nq == 1:
            selection_cache.update(key=key, value=(sel, st, c))
    blocks = torch.arange(i0, nb, device=q.device)
    forced = [torch.where(blocks > 0, blocks - 1, -1), blocks]  # previous block, own block
    if scorer.first:  # and block 0, from block 2 on (before, it is the previous or own block)
        forced.insert(0, torch.where(blocks >= 2, 0, -1))
    forced = torch.stack(forced, -1).expand(B, H, nq, len(forced))
    idx = torch.cat([sel, forced], -1)  # slots: kept candidates, then the forced blocks
    bias = torch.cat([st, st.new_zeros(B, H, nq, forced.shape[-1])], -1)
    kernel = _kernel_for(q) if Bk >= 16 and Bk & (Bk - 1) == 0 and i0 == 0 else None
    r0 = 0  # o's first row, counted from the start of block i0
    if kernel is not None:  # i0 = 0: the queries from position 0 (zeros before q0), unpadded like k
        o = kernel(F.pad(q, (0, 0, q0, 0)) if q0 else q, k[:, :, :S], v[:, :, :S], idx, bias, Bk)
    elif nq == 1:  # all queries in one block (decode): only their rows, not the whole block
        r0 = q0 - i0 * Bk
        o = as_block_sparse_attention_buckets(q, kp, vp, idx, bias, Bk, i0, work, row0=r0)
    else:  # whole query blocks i0..nb-1 (rows before q0: zeros, dropped)
        qp = F.pad(q, (0, 0, q0 - i0 * Bk, pad))
        o = as_block_sparse_attention_buckets(qp, kp, vp, idx, bias, Bk, i0, work)
    if q0 == 0 and pad == 0:  # the usual forward: rows are whole blocks, no slicing needed
        if correction:  # every token of block i gets its block's correction, gated per token
            g_sel, g_cmp = (g.view(B, H, nq, Bk, 1) for g in gates[:2])
            o = o.view(B, H, nq, Bk, D) * g_sel + g_cmp * c.to(o.dtype).unsqueeze(3)
        o = o.view(B, H, S, D)
    else:
        o = o[:, :, q0 - i0 * Bk - r0:S - i0 * Bk - r0]
        if correction:
            rows = slice(q0 - i0 * Bk, S - i0 * Bk)
            o = gates[0] * o + gates[1] * c.to(o.dtype).repeat_interleave(Bk, dim=2)[:, :, rows]
    if compress:
        length, stride = compress
        kc, vc = compressed if compressed is not None else (compressed_blocks(t, length, stride, S=S) for t in (k, v))
        o_cmp = compressed_attention(q, kc, vc, q0, length, stride, scorer.chunk_scores, scorer.min_blocks * block,
                                     scorer.recompute_scores)
        o = gates[0] * o + gates[1] * o_cmp.to(o.dtype)
    if window:
        o = o + gates[2] * window_attention(q, kp, vp, q0, S, Bk, window, work).to(o.dtype)
    return o, sel, blocks


# ------------------------------------------------------------------------------- Triton kernels

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
