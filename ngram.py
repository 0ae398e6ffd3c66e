"""
The n-gram floor, and the fixed evaluation windows every model and the floor are scored on.

    python ngram.py --dataset=shakespeare_char --block_size=64     # fit, choose the order, score val

Evaluation windows: the first `eval_tokens` tokens of a split cut into non-overlapping windows of
block_size (inputs d[s:s+T], targets d[s+1:s+T+1]); they depend on nothing but (split length,
block_size, eval_tokens), so every run of a comparison, whatever its batch size or seed, is scored
on the same tokens. A target at position i of a window sees i+1 tokens of context.

The floor: a count-based token n-gram with interpolated absolute discounting (Ney, Essen & Kneser
1994), numpy only:

    P_n(w | h) = max(c(h w) - D_n, 0) / c(h) + D_n N1+(h .) / c(h) * P_{n-1}(w | h')    if c(h) > 0
               = P_{n-1}(w | h')                                                           otherwise
    P_0(w)     = 1 / V,          D_n = n1 / (n1 + 2 n2)   (n1, n2: n-grams seen once, twice)

h' is h without its oldest token. Within a window the context is cut at the window's start, as it
is for the models. The order is chosen on a held-out tenth of train (fit on the rest), then the
model is refit on all of train and scored on the val windows. A model whose loss is not below this
floor has learned nothing a table of counts would not.
"""

import json
import os
import sys

import numpy as np

DEFAULTS = dict(
    dataset="shakespeare_char",
    block_size=64,
    eval_tokens=131072,  # tokens of val scored (as train.py's default) (windows of block_size from the start of the split)
    max_order=8,  # orders 1..max_order are tried on held-out train
    out="",  # optional: write the result as JSON here
)


def fixed_windows(n_tokens, block_size, eval_tokens):
    """Start offsets of the evaluation windows: non-overlapping, from the start of the split,
    covering min(eval_tokens, what fits) target tokens. eval_tokens <= 0: the whole split."""
    fit = (n_tokens - 1) // block_size
    want = fit if eval_tokens <= 0 else max(1, eval_tokens // block_size)
    if fit < 1:
        raise ValueError(f"a split of {n_tokens} tokens holds no window of block_size {block_size}")
    return np.arange(min(fit, want), dtype=np.int64) * block_size


class NGram:
    """Interpolated absolute discounting over token ids 0..V-1 (V**order must fit in int64)."""

    def __init__(self, order, vocab_size):
        if order < 1 or vocab_size < 2 or vocab_size ** order >= 2 ** 62:
            raise ValueError(f"order {order} with vocabulary {vocab_size} is out of range")
        self.order, self.V = order, vocab_size

    def fit(self, tokens):
        t = np.asarray(tokens, dtype=np.int64)
        self.tables = []  # per order n: sorted n-gram codes, their counts, and per-context (codes, c(h), N1+(h))
        for n in range(1, self.order + 1):
            code = np.zeros(len(t) - n + 1, dtype=np.int64)
            for j in range(n):  # code = ((t_1 V + t_2) V + ...) V + t_n
                code = code * self.V + t[j:len(t) - n + 1 + j]
            grams, counts = np.unique(code, return_counts=True)
            n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
            D = n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.5
            ctx, first = np.unique(grams // self.V, return_index=True)  # grams are sorted, so contexts are grouped
            c_h = np.add.reduceat(counts, first)
            kinds = np.diff(np.append(first, len(grams)))  # N1+(h .): distinct next tokens after h
            self.tables.append(dict(grams=grams, counts=counts, D=D, ctx=ctx, c_h=c_h, kinds=kinds))
        return self

    @staticmethod
    def _lookup(keys, table_keys, values):
        i = np.searchsorted(table_keys, keys)
        i = np.minimum(i, len(table_keys) - 1)
        hit = table_keys[i] == keys
        return np.where(hit, values[i], 0)

    def _prob(self, hist, nxt, ctx_len):
        """P(nxt | hist) for rows of hist (N, order-1; newest last), using at most ctx_len[r] tokens."""
        p = np.full(len(nxt), 1.0 / self.V)
        h = np.zeros(len(nxt), dtype=np.int64)  # context code of the n-1 newest tokens
        for n in range(1, self.order + 1):
            tb = self.tables[n - 1]
            if n > 1:
                h = h + hist[:, self.order - n] * self.V ** (n - 2)  # prepend the next-older token
            use = ctx_len >= n - 1
            c_h = self._lookup(h, tb["ctx"], tb["c_h"]).astype(np.float64)
            kinds = self._lookup(h, tb["ctx"], tb["kinds"]).astype(np.float64)
            c_hw = self._lookup(h * self.V + nxt, tb["grams"], tb["counts"]).astype(np.float64)
            seen = use & (c_h > 0)
            safe = np.where(seen, c_h, 1.0)
            p_n = np.maximum(c_hw - tb["D"], 0.0) / safe + tb["D"] * kinds / safe * p
            p = np.where(seen, p_n, p)
        return p

    def distribution(self, context):
        """The full next-token distribution after `context` (a sequence of ids, newest last)."""
        k = self.order - 1
        ctx = list(context)[-k:] if k else []
        hist = np.zeros((self.V, k), dtype=np.int64)
        if ctx:
            hist[:, k - len(ctx):] = ctx
        return self._prob(hist, np.arange(self.V), np.full(self.V, len(ctx)))

    def window_nll(self, data, starts, block_size):
        """Mean negative log-likelihood (nats) of each window's block_size targets, context cut at the
        window start: the same quantity a model's cross-entropy measures on that window."""
        data = np.asarray(data, dtype=np.int64)
        k = self.order - 1
        out = np.empty(len(starts))
        pos = np.arange(block_size)
        for a in range(0, len(starts), 4096):
            s = starts[a:a + 4096]
            tgt = s[:, None] + pos[None, :] + 1  # (W, T) target indices
            hist = np.zeros(tgt.shape + (k,), dtype=np.int64)
            for j in range(k):  # hist[..., k-1-j] is the token j+1 before the target
                hist[..., k - 1 - j] = data[np.maximum(tgt - 1 - j, 0)]
            ctx_len = np.broadcast_to(pos + 1, tgt.shape)  # tokens of the window before the target
            p = self._prob(hist.reshape(tgt.size, k), data[tgt].reshape(-1), ctx_len.reshape(-1))
            out[a:a + len(s)] = -np.log(p).reshape(tgt.shape).mean(1)
        return out


def choose_order(train, vocab_size, block_size, max_order, eval_tokens):
    """Fit each order on the first 90% of train, score windows of the last 10%: {order: nll}."""
    cut = int(len(train) * 0.9)
    fit, held = train[:cut], train[cut:]
    starts = fixed_windows(len(held), block_size, eval_tokens)
    limit = max(1, int(np.floor(62 * np.log(2) / np.log(vocab_size))) - 1)
    return {n: float(NGram(n, vocab_size).fit(fit).window_nll(held, starts, block_size).mean())
            for n in range(1, min(max_order, limit) + 1)}


def floor(data_dir, block_size, eval_tokens, max_order=8):
    """The n-gram floor on the val windows of (block_size, eval_tokens), cached in data_dir as JSON."""
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    key = f"ngram_floor_T{block_size}_E{eval_tokens}_O{max_order}.json"
    cache = os.path.join(data_dir, key)
    if os.path.exists(cache):
        res = json.load(open(cache))
        if "val_by_order" in res:  # older caches lack it: refit
            return res
    train = np.fromfile(os.path.join(data_dir, "train.bin"), dtype=np.uint16).astype(np.int64)
    val = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=np.uint16).astype(np.int64)
    by_order = choose_order(train, meta["vocab_size"], block_size, max_order, eval_tokens)
    order = min(by_order, key=by_order.get)
    starts = fixed_windows(len(val), block_size, eval_tokens)
    nll = NGram(order, meta["vocab_size"]).fit(train).window_nll(val, starts, block_size)
    res = {"val/loss": float(nll.mean()), "val/loss_se": float(nll.std(ddof=1) / np.sqrt(len(nll)))
           if len(nll) > 1 else 0.0, "order": order, "held_out_by_order": by_order, "windows": len(starts),
           "block_size": block_size, "eval_tokens": eval_tokens, "model": "interpolated absolute discounting"}
    # every order on the same val windows: reference levels (order 2: what the current token alone predicts)
    res["val_by_order"] = {n: float(NGram(n, meta["vocab_size"]).fit(train).window_nll(val, starts, block_size).mean())
                           for n in by_order}
    import configurator
    configurator.write_atomic(cache, json.dumps(res, indent=1))
    return res


def main(argv):
    import configurator
    try:
        o, _ = configurator.load(argv, DEFAULTS)
    except configurator.ConfigError as e:
        configurator.fail(str(e))
    data_dir = os.path.join("data", o["dataset"])
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        configurator.fail(f"dataset {o['dataset']!r} not found in {data_dir}; run prepare_data.py first")
    if o["block_size"] < 1 or o["max_order"] < 1:
        configurator.fail("block_size and max_order must be positive")
    res = floor(data_dir, o["block_size"], o["eval_tokens"], o["max_order"])
    print(f"n-gram floor on {o['dataset']} val ({res['windows']} windows of {o['block_size']}): "
          f"{res['val/loss']:.4f} ± {res['val/loss_se']:.4f} nats/token, order {res['order']} "
          f"(held-out train: " + ", ".join(f"{k}: {v:.4f}" for k, v in res["held_out_by_order"].items()) + ")")
    if o["out"]:
        configurator.write_atomic(o["out"], json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
