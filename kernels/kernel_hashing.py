"""The kernel-hashing estimate of causal attention (KernelHashingAttention in model.py): how it is computed.

    reference (PyTorch)  hashes (kh_hash), hyperplanes, Gray ranks and per-level plans (key blocks
                         and samples), shared by every path; kernel_hashing_log_weights: the
                         estimator written densely, O(T^2), for tests and diagnostics
    CPU-fast path        _kh_pieces / _KHAttend: every (chunk or level) piece gathered and scored
                         with batched matmuls, one softmax over its pieces per query, merged through
                         the row LSEs; the backward recomputes the scores piece by piece. Plans and
                         tiles have sizes fixed by the shapes (padding tiles are inactive), so the
                         forward and backward read no tensor value on the host: no GPU sync
    entry point          kernel_hashing_attention (training and prefill: Triton on CUDA, the
                         PyTorch pieces elsewhere); kernel_hashing_query (one query, for decoding).
                         _KHTritonAttend: the Triton path in one autograd Function, levels merged
                         into a running (o, lse); saves q, k, v, o, lse whatever the depth
    Triton kernels       gathered_block_attention: one kernel for the chunks and each level, below

Triton kernels: gathered-block attention.

A *tile* is a group g, a run of query rows in that group's sorted query order and a range of
keys. Each query row is "active" in exactly one tile, and that tile gives it its whole
attention: softmax over the tile's keys plus, in the hashed mode, the group's sampled keys
with an additive log-weight. The kernel returns the output and its log-sum-exp (LSE).

    rectangle mode (causal=False): rows = queries sorted by key block, keys = key block kb of
        the group's keys sorted by hash, plus M sampled keys; a sample that lies in block kb
        is dropped (it is already counted exactly); a sample's score gets + its log-weight.
    diagonal mode (causal=True): rows and keys in their own order, key j <= query i.

Backward takes the gradients of both outputs, dO and dLSE: with P the softmax weights,
dS_ij = P_ij (dO_i . v_j - D_i) where D_i = dO_i . O_i - dLSE_i. Block keys may be shared by
a few tiles (atomic adds); sampled keys are shared by every tile of a group, so their
gradients go to one partial per tile and are summed by the wrapper.
"""
import math

import torch
import torch.nn.functional as F

from kernels._triton import HAS_TRITON, tl, triton

# ------------------------------------------------------------------------------- reference (PyTorch)

KH_SAMPLING = ("importance", "sorted-strata", "uniform")  # how a rectangle's samples are drawn (see _kh_plan)
KH_DEFENSIVE = 0.5  # importance sampling: this share of the probability is spread uniformly over the keys
_KH_M32 = 0xFFFFFFFF
_KH_GOLDEN = 0x9E3779B9


def _kh_mix(x):
    """xorshift-multiply mixer of 32-bit words held in int64 tensors. Every multiplier is
    below 2**31, so no product leaves int64 and CPU and CUDA agree bit for bit."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _KH_M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _KH_M32
    return x ^ (x >> 16)


def kh_hash(first, *fields):
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
    u1 = (kh_hash(seed, 1, level, bi, hi, 2 * e).float() + 0.5) / 2**32  # in (0, 1]
    u2 = kh_hash(seed, 1, level, bi, hi, 2 * e + 1).float() / 2**32
    return (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).view(B, H, d, r)


def _kh_gray_rank(proj):
    """Bucket of each vector from its r hyperplane projections (..., r): the signs read as a Gray
    code, returned as its rank, so buckets adjacent in rank differ in one hyperplane."""
    r = proj.shape[-1]
    weights = 2 ** torch.arange(r - 1, -1, -1, device=proj.device)
    code = ((proj > 0).long() * weights).sum(-1)  # the Gray code, most significant bit first
    shift = 1
    while shift < r:  # Gray -> binary: each bit is the XOR of the bits above it, a prefix XOR in log2(r) steps
        code = code ^ (code >> shift)  # (a cumsum over the r bits ran on CUDA's slow small-row scan)
        shift *= 2
    return code


def _kh_level_ranks(q, k, level, seed, r):
    """Gray ranks of q (B, H, Nq, d) and k (B, H, Nk, d) under the hyperplanes of one level."""
    B, H, _, d = q.shape
    planes = _kh_planes(seed, level, B, H, d, r, q.device)
    return _kh_gray_rank(torch.matmul(q.float(), planes)), _kh_gray_rank(torch.matmul(k.float(), planes))


def _kh_key_log_proxy(q_past, k, scale):
    """Log importance of each key of a rectangle, from the queries of its first half (all past for
    every query that reads it, so the plan stays causal): log E[exp(scale q.k)] for q ~ N(mu, Sigma),
    mu and Sigma the mean and covariance of those queries: scale mu.k + scale^2 k^T Sigma k / 2.
    q_past, k (..., s, d) -> (..., s) float32. O(s d^2)."""
    q_past, k = q_past.float(), k.float()
    mu = q_past.mean(-2, keepdim=True)
    c = q_past - mu
    cov = c.transpose(-1, -2) @ c / q_past.shape[-2]
    return (scale * (k @ mu.transpose(-1, -2)).squeeze(-1)
            + 0.5 * scale * scale * ((k @ cov) * k).sum(-1))


def _kh_inclusion(p, m):
    """Inclusion probabilities pi = min(1, c p) with sum m (p (G, n) rows summing to 1, m < n): the
    keys that p would give more than one draw are taken for sure (weight 1) and the rest share the
    remaining draws in proportion to p. c by water-filling over p sorted in descending order: with
    the k largest capped, c = (m - k) / (sum of the rest), for the first k at which the (k+1)-th
    largest is not capped. No host sync."""
    n = p.shape[1]
    top = p.sort(1, descending=True).values
    rest = top.flip(1).cumsum(1).flip(1)  # sum of the k-th largest and all below it
    k = torch.arange(n, device=p.device, dtype=p.dtype)
    first = ((m - k) * top <= rest).to(torch.uint8).argmax(1, keepdim=True)  # true from k = m - 1 on
    c = (m - first.to(p.dtype)) / rest.gather(1, first)
    return (c * p).clamp(max=1.0)


def _kh_plan(rq, rk, level, pairs, qpos, seed, block, samples, sampling="sorted-strata", key_log_proxy=None):
    """Key blocks and samples for P past rectangles at one level.

    rq (B, H, P, SQ): Gray ranks of the rectangles' queries, at local positions qpos (SQ,) within
    the second half; rk (B, H, P, SK): ranks of their keys (the first halves); pairs (P,): the
    rectangles' indices at this level. Keys are sorted by rank (ties by position) and cut into
    blocks of `block`. A query goes to the key block at its own place in that order: after the
    keys of lower rank, and among keys of its own rank at the fraction of the half it sits at.
    That place depends on the query itself and past keys only, which keeps the block causal.
    Samples: `samples` keys per rectangle; with 'sorted-strata' and 'uniform' each key is included with
    probability m/SK, weight SK/m. sampling='sorted-strata' (default): the hash-sorted key order is cut into m equal strata and one
    key is drawn from each (needs m | SK; otherwise, and with sampling='uniform', m keys are drawn
    uniformly without replacement). Strata of the sorted order spread the samples over the buckets,
    so a cluster of similar keys outside the query's block is sampled in proportion to its size
    instead of by chance: same budget, same unbiasedness, lower variance (diagnose.py measures it).
    sampling='importance': p_j = (1 - a) softmax(key_log_proxy)_j + a / SK (a = KH_DEFENSIVE;
    key_log_proxy (B, H, P, SK) from _kh_key_log_proxy), inclusion probabilities pi_j = min(1, c p_j)
    summing to m (_kh_inclusion); the sorted order is laid out on [0, m), key j taking a length pi_j,
    and the points u, u + 1, ..., u + m - 1 (one uniform offset u per rectangle: systematic sampling)
    pick the m keys: key j is drawn with probability pi_j, never twice, and weighs 1 / pi_j, so the
    sums stay unbiased, the draws stay spread over the buckets, and keys that the past queries score
    high are drawn more often (a key with pi_j = 1 always, weight 1). log_w: (G, m) per-sample
    log-weights (float32), log(SK/m) for the other designs. All is
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
        bhp = (torch.arange(B, device=dev).view(B, 1, 1, 1), torch.arange(H, device=dev).view(1, H, 1, 1),
               pairs.view(1, 1, P, 1))
        log_w = None
        if sampling == "importance" and key_log_proxy is None:
            raise ValueError("sampling='importance' needs key_log_proxy (_kh_key_log_proxy of the rectangles)")
        if sampling == "importance" and m < SK:  # (m = SK: every key once, weight 1, below: exact)
            p = torch.softmax(key_log_proxy.reshape(G, SK).double(), -1) * (1 - KH_DEFENSIVE) + KH_DEFENSIVE / SK
            pi = _kh_inclusion(p, m)
            edges = torch.cumsum(pi.gather(1, k_order), 1)  # key j's interval of [0, m) ends here
            edges[:, -1] = m
            u = (kh_hash(seed, 7, level, *bhp, 0) & 0xFFFFFF).double().reshape(G, 1) / 2**24  # one offset
            at = torch.searchsorted(edges, torch.arange(m, device=dev) + u, right=True).clamp(max=SK - 1)
            s_idx = k_order.gather(1, at)
            log_w = -torch.log(pi.gather(1, s_idx)).float()
        elif sampling == "sorted-strata" and SK % m == 0:
            stride, j = SK // m, torch.arange(m, device=dev)
            slot = j * stride + kh_hash(seed, 5, level, *bhp, j) % stride  # one place in each stratum
            s_idx = k_order.gather(1, slot.reshape(G, m))
        else:
            words = kh_hash(seed, 2, level, *bhp, ar)
            s_idx = ((words << 24) | ar).topk(m, dim=-1).indices.reshape(G, m)  # distinct keys: no ties
        if log_w is None:
            log_w = torch.full((G, m), math.log(SK / m), device=dev)
        plan.update(s_idx=s_idx, s_kb=k_kb.gather(1, s_idx), log_w=log_w)
    return plan


def kh_levels(T, c):
    """Dyadic layout from position 0: chunks of c, then rectangles of side s = c*2^l at level l.
    Yields (level, s, number of rectangles whose query half holds a real position)."""
    level, s = 0, c
    while s < T:
        yield level, s, -(-(T - s) // (2 * s))
        level, s = level + 1, 2 * s


def kernel_hashing_log_weights(q, k, min_seq_len, bucket_block, samples, hash_bits, seed,
                               sampling="sorted-strata"):
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
    for level, s, P in kh_levels(T, c):
        for pair in range(P):
            k0, q0 = pair * 2 * s, pair * 2 * s + s
            nq = min(s, T - q0)
            rq, rk = _kh_level_ranks(q[:, :, q0:q0 + nq], k[:, :, k0:k0 + s], level, seed, hash_bits)
            proxy = None
            if sampling == "importance":
                proxy = _kh_key_log_proxy(q[:, :, k0:k0 + s], k[:, :, k0:k0 + s], d ** -0.5)[:, :, None]
            plan = _kh_plan(rq[:, :, None], rk[:, :, None], level, torch.tensor([pair], device=dev),
                            torch.arange(nq, device=dev), seed, bucket_block, samples, sampling, proxy)
            W[:, :, q0:q0 + nq, k0:k0 + s] = _kh_plan_log_weights(plan, q.dtype).view(B, H, nq, s)
    return W


def _kh_plan_log_weights(plan, dtype=torch.float32):
    """One level's plan written densely: (G, SQ, SK) log-weights, 0 on the query's key block, on
    sampled keys outside it the log of their summed draw weights (n/m each for uniform draws), -inf
    elsewhere."""
    same = plan["k_kb"][:, None, :] == plan["q_kb"][:, :, None]
    w = torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(~same, float("-inf"))
    if plan["s_idx"] is not None:
        weight = torch.zeros(plan["k_kb"].shape, dtype=torch.float64, device=same.device)
        weight.scatter_add_(1, plan["s_idx"], plan["log_w"].double().exp())  # a key drawn twice counts twice
        sampled = torch.where(weight > 0, weight.log(), float("-inf")).to(dtype)
        w = torch.where(same, w, sampled[:, None, :])
    return w


# ------------------------------------------------------------------------------- CPU-fast path

def _kh_tiles(q_kb, rows, nb):
    """Sort queries by key block and cut the sorted order into chunks of `rows`; a tile is a
    (chunk, key block) pair that at least one query of the chunk needs, so each query is active
    in exactly one tile. Fixed size, so no host sync: walking a group's sorted queries, each new
    tile starts a chunk or raises the key block, so a group has at most nch + nb - 1 tiles; the
    slots left over are padding tiles with key block nb, which no query has (inactive).
    Returns q_order, kb_sorted (G, SQ), tile_g, tile_chunk, tile_kb (G * (nch + nb - 1),)."""
    G, SQ = q_kb.shape
    dev = q_kb.device
    kb_sorted, q_order = q_kb.sort(dim=1, stable=True)
    nch = -(-SQ // rows)
    slots = nch + nb - 1
    chunk = torch.arange(SQ, device=dev) // rows
    key = chunk * nb + kb_sorted  # (G, SQ), nondecreasing along each row
    new = torch.ones_like(key, dtype=torch.bool)
    new[:, 1:] = key[:, 1:] != key[:, :-1]
    # the tile of each sorted query, numbered within its group: one flat cumulative sum (CUDA's scan along
    # rows of SQ ran serially within a row: half of the block's time at 128k), minus each row's start
    count = new.long().flatten().cumsum(0).view(G, SQ)
    slot = count - count[:, :1]
    pad = torch.full((G, slots + 1), nch * nb, dtype=key.dtype, device=dev)  # a query's tile or the dump slot
    tiles = pad.scatter_(1, torch.where(new, slot, slots), key)[:, :slots]
    tile_chunk = torch.arange(G, device=dev)[:, None] * nch + (tiles // nb).clamp(max=nch - 1)
    tile_kb = torch.where(tiles < nch * nb, tiles % nb, nb)
    tile_g = torch.arange(G, device=dev)[:, None].expand(G, slots).flatten()
    return q_order, kb_sorted, tile_g, tile_chunk.flatten(), tile_kb.flatten()


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
    kb = tile_kb.clamp(max=nb - 1)  # padding tiles (key block nb) read block nb - 1 and stay inactive
    real_key = (torch.arange(nb * b, device=q_rows.device) < SK).view(nb, b)[kb]
    active = kbs.view(G * nch, b)[tile_chunk] == tile_kb[:, None]
    pieces = [dict(rows_q=q_rows.gather(1, qo).view(G * nch, b)[tile_chunk],
                   rows_k=k_rows.gather(1, ko).view(G * nb, b)[tile_g * nb + kb],
                   mask=active[:, :, None] & real_key[:, None, :], bias=0.0)]
    if plan["s_idx"] is not None:  # sampled keys, minus those in the query's own block
        pieces.append(dict(rows_q=q_rows, rows_k=k_rows.gather(1, plan["s_idx"]),
                           mask=plan["s_kb"][:, None, :] != plan["q_kb"][:, :, None], bias=plan["log_w"][:, None, :]))
    return pieces


def _kh_take(x, rows, nt, r):
    return x.view(nt, r, x.shape[-1]) if rows is None else x.index_select(0, rows.flatten()).view(nt, r, -1)


def _kh_put(acc, rows, val):
    if rows is None:
        acc[:val.shape[0] * val.shape[1]] += val.flatten(0, 1)
    else:
        acc.index_add_(0, rows.flatten(), val.flatten(0, 1))


def _kh_scores(qf, kf, piece, scale):
    nt, r = piece["rows_q"].shape if piece["rows_q"] is not None else piece["shape"]
    kk = piece["rows_k"].shape[1] if piece["rows_k"] is not None else r
    qt, kt = _kh_take(qf, piece["rows_q"], nt, r), _kh_take(kf, piece["rows_k"], nt, kk)
    bias = piece["bias"]  # a number, or per-sample log-weights (NT, 1, K)
    bias = bias.to(qt.dtype) if torch.is_tensor(bias) else torch.full((), bias, dtype=qt.dtype, device=qt.device)
    s = torch.baddbmm(bias, qt, kt.transpose(1, 2), alpha=scale)
    if piece["mask"] is not None:
        s.masked_fill_(~piece["mask"], float("-inf"))
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
    exps, row_max, row_lse = [], [], []
    for pc in pieces:  # one exp per score: e = exp(s - row max), lse_p = max + log sum e
        s = _kh_scores(qf, kf, pc, scale)[0]
        mx = s.amax(-1, keepdim=True).clamp_min(-1e30)  # a row with no key in this piece: -1e30, e = 0
        exps.append(s.sub_(mx).exp_())
        row_max.append(mx)
        row_lse.append(mx.squeeze(-1) + torch.log(s.sum(-1)))
    lse = _kh_row_lse(qf.shape[0], pieces, row_lse)
    o = torch.zeros(qf.shape[0], vf.shape[1], dtype=vf.dtype, device=vf.device)
    for pc, e, mx in zip(pieces, exps, row_max):
        nt, r, kk = e.shape
        w = torch.exp(mx - _kh_take(lse[:, None], pc["rows_q"], nt, r))  # (nt, r, 1): p = e * w
        _kh_put(o, pc["rows_q"], torch.bmm(e, _kh_take(vf, pc["rows_k"], nt, kk)).mul_(w))
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
            p = s.sub_(_kh_take(lse[:, None], pc["rows_q"], nt, r)).exp_()
            dot, vt = _kh_take(do, pc["rows_q"], nt, r), _kh_take(vf, pc["rows_k"], nt, kk)
            _kh_put(dv, pc["rows_k"], torch.bmm(p.transpose(1, 2), dot))
            ds = torch.bmm(dot, vt.transpose(1, 2)).sub_(_kh_take(delta, pc["rows_q"], nt, r)).mul_(p)
            _kh_put(dq, pc["rows_q"], torch.bmm(ds, kt))
            _kh_put(dk, pc["rows_k"], torch.bmm(ds.transpose(1, 2), qt))
        return dq * ctx.scale, dk * ctx.scale, dv, None, None


def _kh_merge(o1, lse1, o2, lse2):
    """Combine two partial softmaxes over disjoint key sets through their log-sum-exps."""
    lse = torch.logaddexp(lse1, lse2)
    return o1 * torch.exp(lse1 - lse)[..., None] + o2 * torch.exp(lse2 - lse)[..., None], lse


# ------------------------------------------------------------------------------- entry point

def _kh_rect_launch(plan, SQ, SK, d, scale, device):
    """One level's plan as the kernel's integer tensors and launch constants (see gathered_block_attention)."""
    b = plan["block"]
    rows = rows_per_tile(b)
    q_order, kb_sorted, tile_g, tile_chunk, tile_kb = _kh_tiles(plan["q_kb"], rows, -(-SK // b))
    tile_q0 = tile_chunk % -(-SQ // rows) * rows
    return _gba_launch(device, d, q_order, kb_sorted, plan["k_order"], plan["s_idx"], plan["s_kb"], tile_g,
                       tile_q0, tile_kb, b, plan["log_w"], scale, False, rows, SQ)


def _kh_diag_launch(G, c, d, scale, device):
    """The chunks' launch: G groups of c tokens, exact causal attention inside each."""
    rows = rows_per_tile(c)
    sub = -(-c // rows)
    tile_g = torch.arange(G, device=device)[:, None].expand(G, sub).flatten()
    tile_q0 = (torch.arange(sub, device=device) * rows).repeat(G)
    return _gba_launch(device, d, None, None, None, None, None, tile_g, tile_q0, torch.zeros_like(tile_g), c, 0.0,
                       scale, True, rows, c)


def _kh_rect_triton(q, k, v, plan, scale):
    """Triton path of one level on its own: q (G, SQ, d), k, v (G, SK, d) -> o (G, SQ, d), lse (G, SQ)."""
    return _GatheredBlockAttention.apply(q, k, v, *_kh_rect_launch(plan, q.shape[1], k.shape[1], q.shape[2], scale,
                                                                   q.device))


def _kh_diag_triton(q, k, v, c, scale):
    """Exact causal attention inside consecutive chunks of c tokens, Triton: (o, lse) over (B, H, Tp)."""
    B, H, Tp, d = q.shape
    G = B * H * (Tp // c)
    o, lse = _GatheredBlockAttention.apply(q.reshape(G, c, d), k.reshape(G, c, d), v.reshape(G, c, d),
                                           *_kh_diag_launch(G, c, d, scale, q.device))
    return o.view(B, H, Tp, d), lse.view(B, H, Tp)


def _kh_half(t, s, P, half):
    """Half `half` (0: keys, 1: queries) of the first P pairs of side s: (B, H, Tp, ...) -> (B H P, s, ...), a copy."""
    B, H, Tp = t.shape[:3]
    return t.reshape(B, H, Tp // (2 * s), 2, s, *t.shape[3:])[:, :, :P, half].reshape(-1, s, *t.shape[3:])


def _kh_half_view(t, s, P, half):
    B, H, Tp = t.shape[:3]
    return t.view(B, H, Tp // (2 * s), 2, s, *t.shape[3:])[:, :, :P, half]


class _KHTritonAttend(torch.autograd.Function):
    """The Triton path of the whole block in one Function: the chunks, then each level merged into a
    running (o, lse) as soon as it is computed. Saved: q, k, v, the merged o and lse and the integer
    plans, O(T d) however many levels. The backward runs each piece's kernel against the final lse
    and delta = dO . O (as _KHAttend does): P_ij = exp(s_ij - lse_i) is already the merged softmax."""

    @staticmethod
    def forward(ctx, q, k, v, diag, levels):
        B, H, Tp, d = q.shape
        c = diag[1]["key_block"]
        G = B * H * (Tp // c)
        o, lse = _gba_fwd(q.view(G, c, d), k.view(G, c, d), v.view(G, c, d), *diag)
        o, lse = o.view(B, H, Tp, d), lse.view(B, H, Tp)
        lse_diag = lse.clone()
        if levels:
            o = o.float()  # the merges run in float32
        for s, P, plan, meta in levels:
            o_r, lse_r = _gba_fwd(_kh_half(q, s, P, 1), _kh_half(k, s, P, 0), _kh_half(v, s, P, 0), plan, meta)
            o_q, l_q = _kh_half_view(o, s, P, 1), _kh_half_view(lse, s, P, 1)
            o_m, l_m = _kh_merge(o_q, l_q, o_r.view(o_q.shape), lse_r.view(l_q.shape))
            o_q.copy_(o_m)
            l_q.copy_(l_m)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.diag, ctx.levels = diag, levels
        ctx.mark_non_differentiable(lse, lse_diag)
        return o, lse, lse_diag

    @staticmethod
    def backward(ctx, do, _dlse, _dlse_diag):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, Tp, d = q.shape
        c = ctx.diag[1]["key_block"]
        G = B * H * (Tp // c)
        do = torch.zeros_like(o) if do is None else do
        delta = (do.float() * o.float()).sum(-1)
        do = do.to(q.dtype).contiguous()  # the kernels read dO in the inputs' dtype
        dq, dk, dv = (t.view(B, H, Tp, d) for t in _gba_bwd(q.view(G, c, d), k.view(G, c, d), v.view(G, c, d),
                                                              do.view(G, c, d), lse.view(G, c), delta.view(G, c),
                                                              *ctx.diag))
        for s, P, plan, meta in ctx.levels:
            dq_r, dk_r, dv_r = _gba_bwd(_kh_half(q, s, P, 1), _kh_half(k, s, P, 0), _kh_half(v, s, P, 0),
                                        _kh_half(do, s, P, 1), _kh_half(lse, s, P, 1), _kh_half(delta, s, P, 1),
                                        plan, meta)
            for full, part, half in ((dq, dq_r, 1), (dk, dk_r, 0), (dv, dv_r, 0)):
                view = _kh_half_view(full, s, P, half)
                view += part.view(view.shape)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def kernel_hashing_attention(q, k, v, min_seq_len, bucket_block, samples, hash_bits, seed,
                             backend="auto", stats=None, sampling="sorted-strata"):
    """The kernel-hashing estimate of causal softmax attention. q, k, v (B, H, T, d) -> (B, H, T, d).
    seed: an int or int64 tensor that fixes every hash plane and sample. backend: 'auto' (Triton
    on CUDA when available), 'torch' or 'triton'. stats: a dict to receive 'approx_mass' (a 0-dim tensor), the
    mean softmax weight that queries past the first chunk give to the approximated rectangles."""
    B, H, T, d = q.shape
    c, scale = min_seq_len, d ** -0.5
    if T <= c and stats is None:  # short sequence: exact attention
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda and HAS_TRITON)
    Tp = c << max(0, (-(-T // c) - 1).bit_length())  # c times a power of two >= T
    q, k, v = (F.pad(t, (0, 0, 0, Tp - T)).contiguous() for t in (q, k, v))
    levels = list(kh_levels(T, c))
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
            proxy = None
            if sampling == "importance":  # from each rectangle's first half: its keys and their queries
                proxy = _kh_key_log_proxy(q.view(B, H, n, 2, s, d)[:, :, :P, 0], k.view(B, H, n, 2, s, d)[:, :, :P, 0],
                                          scale)
            plans.append(_kh_plan(rq, rk, level, torch.arange(P, device=dev), torch.arange(s, device=dev),
                                  seed, bucket_block, samples, sampling, proxy))
    if use_triton:
        assert B * H * Tp < 2**31
        with torch.no_grad():
            diag = _kh_diag_launch(B * H * (Tp // c), c, d, scale, q.device)
            launches = [(s, P, *_kh_rect_launch(plan, s, s, d, scale, q.device))
                        for (level, s, P), plan in zip(levels, plans)]
        o, lse, lse_diag = _KHTritonAttend.apply(q, k, v, diag, launches)
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
            stats["approx_mass"] = w.mean() if w.numel() else w.new_zeros(())  # a tensor: read it later, no sync here
    return o[:, :, :T]


def kernel_hashing_query(q, k, v, min_seq_len, bucket_block, samples, hash_bits, seed, sampling="sorted-strata",
                         q_past=None):
    """The same estimate for one query at the last position: q (B, H, 1, d), k, v (B, H, S, d);
    q_past (B, H, S, d): the queries at every position (sampling='importance' reads those of each
    rectangle's first half). Hashes and samples only the past rectangles this query sees; used by decoding."""
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
        proxy = None
        if sampling == "importance":
            if q_past is None:
                raise ValueError("sampling='importance' needs the past queries (q_past)")
            proxy = _kh_key_log_proxy(q_past[:, :, pair * 2 * s:pair * 2 * s + s], kr, d ** -0.5)[:, :, None]
        plan = _kh_plan(rq[:, :, None], rk[:, :, None], level, torch.tensor([pair], device=dev),
                        torch.tensor([i - pair * 2 * s - s], device=dev), seed, bucket_block, samples, sampling,
                        proxy)
        pieces += _kh_pieces(plan, bh, bh * S + pair * 2 * s + torch.arange(s, device=dev))
    o, _, _ = _kh_attend(q.reshape(B * H, d), k.reshape(B * H * S, d), v.reshape(B * H * S, d), pieces, d ** -0.5)
    return o.view(B, H, 1, d)


# ------------------------------------------------------------------------------- Triton kernels

# float32 dots in full IEEE precision: Triton's default, TF32, keeps 10 mantissa bits of each
# operand on the tensor cores (the interpreter would hide it). Ignored for bfloat16 operands.
DOT_PRECISION = tl.constexpr("ieee")


@triton.jit
def _kh_fwd_kernel(Q, K, V, O, LSE, QORD, QKB, KORD, SIDX, SKB, SLW, TG, TQ0, TKB,
                   SQ, SK, M, KBLK, D, scale,
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
    if not CAUSAL:  # the sampled keys, each with its log-weight, minus those already in block kb
        for s0 in range(0, M, BM):
            j = s0 + tl.arange(0, BM)
            jvalid = j < M
            si = tl.load(SIDX + g * M + j, mask=jvalid, other=0)
            skb = tl.load(SKB + g * M + j, mask=jvalid, other=-1)
            lw = tl.load(SLW + g * M + j, mask=jvalid, other=0.0)  # the sample's log-weight
            krow = (g * SK + si).to(tl.int64)
            kvmask = jvalid[:, None] & dmask[None, :]
            k = tl.load(K + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
            v = tl.load(V + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale + lw[None, :]
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
def _kh_bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, DKS, DVS, QORD, QKB, KORD, SIDX, SKB, SLW, TG, TQ0, TKB,
                   SQ, SK, M, KBLK, D, scale,
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
            lw = tl.load(SLW + g * M + j, mask=jvalid, other=0.0)  # the sample's log-weight
            krow = (g * SK + si).to(tl.int64)
            kvmask = jvalid[:, None] & dmask[None, :]
            k = tl.load(K + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
            v = tl.load(V + krow[:, None] * D + dofs[None, :], mask=kvmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale + lw[None, :]
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


def _gba_fwd(q, k, v, plan, meta):
    """Launch the forward kernel: o in q's dtype, lse float32."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    G, SQ, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(G, SQ, device=q.device, dtype=torch.float32)
    _kh_fwd_kernel[(plan[6].numel(),)](q, k, v, o, lse, *plan, SQ, k.shape[1], meta["M"], meta["key_block"], D,
                                       meta["scale"], CAUSAL=meta["causal"], num_warps=FWD_WARPS,
                                       **meta["launch"])
    return o, lse


def _gba_bwd(q, k, v, do, lse, delta, plan, meta):
    """Launch the backward kernel with the rows' lse and delta_i = dO_i . O_i - dLSE_i: float32 dq, dk, dv."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    G, SQ, D = q.shape
    SK, M = k.shape[1], meta["M"]
    tile_g = plan[6]
    ntiles = tile_g.numel()
    dq = torch.empty(G, SQ, D, device=q.device, dtype=torch.float32)
    dk = torch.zeros(G, SK, D, device=q.device, dtype=torch.float32)
    dv = torch.zeros(G, SK, D, device=q.device, dtype=torch.float32)
    dks = torch.empty(max(ntiles * M, 1), D, device=q.device, dtype=torch.float32)
    dvs = torch.empty(max(ntiles * M, 1), D, device=q.device, dtype=torch.float32)
    _kh_bwd_kernel[(ntiles,)](q, k, v, do, lse.contiguous(), delta.float().contiguous(), dq, dk, dv, dks, dvs,
                              *plan, SQ, SK, M, meta["key_block"], D, meta["scale"],
                              CAUSAL=meta["causal"], num_warps=BWD_WARPS, **meta["launch"])
    if M > 0 and ntiles > 0:  # sum the tiles' partials per group, then add them at the sampled keys
        s_idx = plan[3].long()[:, :, None].expand(G, M, D)
        for part, full in ((dks, dk), (dvs, dv)):
            per_group = torch.zeros(G, M, D, device=q.device, dtype=torch.float32)
            per_group.index_add_(0, tile_g.long(), part[:ntiles * M].view(ntiles, M, D))
            full.scatter_add_(1, s_idx, per_group)
    return dq, dk, dv


class _GatheredBlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, meta):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _gba_fwd(q, k, v, plan, meta)
        ctx.save_for_backward(q, k, v, o, lse, *plan)
        ctx.meta = meta
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *plan = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        delta = (do.float() * o.float()).sum(-1)  # the LSE's own gradient enters as a shift of dO . O
        if dlse is not None:
            delta = delta - dlse.float()
        dq, dk, dv = _gba_bwd(q, k, v, do, lse, delta, plan, ctx.meta)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _gba_launch(device, d, q_order, q_kb, k_order, s_idx, s_kb, tile_g, tile_q0, tile_kb, key_block, log_w, scale,
                causal, rows, SQ):
    """The kernels' integer plan (int32 tensors) and launch constants; arguments as gathered_block_attention."""
    i32 = lambda x: x.to(device=device, dtype=torch.int32).contiguous()  # noqa: E731
    dummy = torch.zeros(1, device=device, dtype=torch.int32)
    M = 0 if (causal or s_idx is None) else s_idx.shape[1]
    if M and not torch.is_tensor(log_w):  # one weight for every sample
        log_w = torch.full(s_idx.shape, float(log_w))
    slw = log_w.to(device=device, dtype=torch.float32).contiguous() if M else torch.zeros(1, device=device)
    plan = (dummy if q_order is None else i32(q_order), dummy if q_kb is None else i32(q_kb),
            dummy if k_order is None else i32(k_order), i32(s_idx) if M else dummy, i32(s_kb) if M else dummy,
            slw, i32(tile_g), i32(tile_q0), i32(tile_kb))
    assert rows in (16, 32), "rows per tile must be 16 or 32"
    kblk = SQ if causal else key_block
    meta = dict(M=M, key_block=int(kblk), scale=float(scale), causal=bool(causal),
                launch=_launch_args(d, M, rows, rows if causal else key_block))
    return plan, meta


def gathered_block_attention(q, k, v, q_order, q_kb, k_order, s_idx, s_kb, tile_g, tile_q0, tile_kb,
                             key_block, log_w, scale, causal, rows):
    """Attention of each query over its key block (and the sampled keys), with its log-sum-exp.

    q (G, SQ, D); k, v (G, SK, D). Plan (integer tensors, no gradient):
      q_order (G, SQ): query indices in sorted order; q_kb (G, SQ): key block of each sorted query;
      k_order (G, SK): key indices sorted by hash (block b = sorted positions b*key_block ...);
      s_idx, s_kb (G, M): sampled key indices and the key block each lies in (M may be 0);
      log_w: the samples' log-weights, a number for all or (G, M) float per sample;
      tile_g, tile_q0, tile_kb (NT,): a tile's group, first sorted query row (a multiple of
      `rows`) and key block (a block no query has: an inactive tile). causal=True: diagonal mode
      (orders, q_kb, samples unused).
    Returns o (G, SQ, D) in q's dtype and lse (G, SQ) float32, differentiable in q, k, v.
    """
    assert q.shape[0] * max(q.shape[1], k.shape[1]) < 2**31
    plan, meta = _gba_launch(q.device, q.shape[2], q_order, q_kb, k_order, s_idx, s_kb, tile_g, tile_q0, tile_kb,
                             key_block, log_w, scale, causal, rows, q.shape[1])
    return _GatheredBlockAttention.apply(q, k, v, plan, meta)


# --------------------------------------------------------------------------- GPU compile cases
def _signature(names, fp):
    ptrs = {n: f"*{fp}" for n in names["float"]}
    ptrs.update({n: "*fp32" for n in names["fp32"]})
    ptrs.update({n: "*i32" for n in names["int"]})
    ptrs.update({n: "i32" for n in ("SQ", "SK", "M", "KBLK", "D")})
    ptrs.update({"scale": "fp32", "SLW": "*fp32"})
    ptrs.update({n: "constexpr" for n in ("DP", "BQ", "BK", "BM", "CAUSAL")})
    return ptrs


_INT = ["QORD", "QKB", "KORD", "SIDX", "SKB", "TG", "TQ0", "TKB"]
_PLAN = ["QORD", "QKB", "KORD", "SIDX", "SKB", "SLW", "TG", "TQ0", "TKB"]  # the kernels' plan arguments, in order


def _fwd_sig(fp):
    names = {"float": ["Q", "K", "V", "O"], "fp32": ["LSE"], "int": _INT}
    order = ["Q", "K", "V", "O", "LSE"] + _PLAN + ["SQ", "SK", "M", "KBLK", "D", "scale",
                                                    "DP", "BQ", "BK", "BM", "CAUSAL"]
    sig = _signature(names, fp)
    return {n: sig[n] for n in order}


def _bwd_sig(fp):
    names = {"float": ["Q", "K", "V", "DO"], "fp32": ["LSE", "DELTA", "DQ", "DK", "DV", "DKS", "DVS"], "int": _INT}
    order = ["Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "DK", "DV", "DKS", "DVS"] + _PLAN + [
        "SQ", "SK", "M", "KBLK", "D", "scale", "DP", "BQ", "BK", "BM", "CAUSAL"]
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
