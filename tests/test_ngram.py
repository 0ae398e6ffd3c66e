"""ngram.py: the fixed evaluation windows and the n-gram floor (a proper distribution, scored like a model)."""
import json
import numpy as np
import pytest

import ngram


def corpus(n=20_000, V=7, seed=0):
    rng = np.random.default_rng(seed)
    t = [0]
    for _ in range(n - 1):  # a sticky Markov chain, so higher orders help
        t.append(t[-1] if rng.random() < 0.5 else int(rng.integers(V)))
    return np.array(t)


def test_windows_depend_only_on_split_length_block_size_and_budget():
    w = ngram.fixed_windows(1000, 16, 320)
    assert list(w) == list(range(0, 320, 16))
    assert len(ngram.fixed_windows(1000, 16, 0)) == 999 // 16  # 0: every whole window
    assert len(ngram.fixed_windows(100, 16, 10_000)) == 99 // 16  # capped by the split
    with pytest.raises(ValueError):
        ngram.fixed_windows(10, 16, 0)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_probabilities_sum_to_one_at_every_context(order):
    V = 7
    m = ngram.NGram(order, V).fit(corpus(V=V))
    rng = np.random.default_rng(1)
    contexts = [[], [3], [6, 6]] + [list(rng.integers(V, size=k)) for k in range(order + 2) for _ in range(5)]
    contexts.append([6] * order)  # likely unseen at high order: pure back-off
    for ctx in contexts:
        p = m.distribution(ctx)
        assert p.shape == (V,) and (p > 0).all()
        assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_window_scores_equal_the_distribution_token_by_token():
    V, T = 7, 12
    data = corpus(V=V)
    m = ngram.NGram(3, V).fit(data[:15_000])
    val = data[15_000:]
    starts = ngram.fixed_windows(len(val), T, 5 * T)
    got = m.window_nll(val, starts, T)
    for w, s in enumerate(starts):  # context cut at the window start, as the models see it
        nll = [-np.log(m.distribution(val[s:s + i + 1])[val[s + i + 1]]) for i in range(T)]
        assert got[w] == pytest.approx(np.mean(nll), rel=1e-12)


def test_higher_order_helps_on_a_markov_chain_and_is_chosen():
    by_order = ngram.choose_order(corpus(40_000), 7, 16, 4, 0)
    assert by_order[2] < by_order[1] - 0.1  # the chain's one-step memory is found
    assert min(by_order, key=by_order.get) >= 2


def test_floor_reports_every_order_on_the_same_windows(tmp_path):
    data = corpus(20_000)
    data[:18_000].astype(np.uint16).tofile(tmp_path / "train.bin")
    data[18_000:].astype(np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 7}))
    res = ngram.floor(str(tmp_path), 16, 0, max_order=3)
    assert set(res["val_by_order"]) == {1, 2, 3} and res["val_by_order"][res["order"]] == res["val/loss"]
    assert res["val_by_order"][2] < res["val_by_order"][1]  # the chain's one-step memory
    again = ngram.floor(str(tmp_path), 16, 0, max_order=3)  # cached (JSON: the orders come back as strings)
    assert again["val/loss"] == res["val/loss"] and len(again["val_by_order"]) == 3
