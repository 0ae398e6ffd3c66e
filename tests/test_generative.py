"""generative-function (Hilsenbek 2024): the f variants against a loop reference, causality
(running mean included), the tie-gradient rule, gradients, the Triton kernels against the
PyTorch path (TRITON_INTERPRET=1), decode-state equality and the config file."""
import pytest
import torch

from conftest import DEVICE, ROOT, assert_causal, rel_err
from model import ACTIVATION, ATTENTION, GPT, GPTConfig, CausalGenerativeFunction

FNS = ["min", "max", "mean"]


def reference(x, fn, avg):
    """Token by token, straight from the definition: y_t = f(x_t, x_{t-1}[, mean(x_0..x_t)])."""
    out = []
    for t in range(x.shape[1]):
        args = [x[:, t], x[:, max(t - 1, 0)]]
        if avg:
            args.append(x[:, :t + 1].mean(dim=1))
        stacked = torch.stack(args)
        out.append({"min": stacked.amin(0), "max": stacked.amax(0), "mean": stacked.mean(0)}[fn])
    return torch.stack(out, dim=1)


def mixer(fn="min", avg=False, use_triton=False):
    m = CausalGenerativeFunction(GPTConfig(gf_fn=fn, gf_avg_context=avg))
    m.use_triton = use_triton
    return m


def tiny_gpt(**kw):
    cfg = dict(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.0,
               attention="generative-function")
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("avg", [False, True])
@pytest.mark.parametrize("fn", FNS)
def test_f_variants_match_loop_reference(fn, avg):
    torch.manual_seed(1)
    x = torch.randn(3, 11, 7, dtype=torch.float64)
    y = mixer(fn, avg)(x)
    torch.testing.assert_close(y, reference(x, fn, avg), rtol=0, atol=1e-12)
    torch.testing.assert_close(y[:, 0], x[:, 0], rtol=0, atol=1e-12)  # y_0 = x_0


def test_block_is_projection_of_the_reference_and_has_no_qkv():
    torch.manual_seed(2)
    cfg = GPTConfig(n_embd=16, n_head=2, gf_avg_context=True)
    block = ATTENTION["generative-function"](cfg).eval()
    assert [n for n, _ in block.named_parameters()] == ["c_proj.weight"]
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(block(x), block.c_proj(reference(x, "min", True)), rtol=1e-6, atol=1e-6)
    assert ATTENTION["generative-function"].uses_absolute_positions
    assert isinstance(ACTIVATION["generative"](cfg), CausalGenerativeFunction)


@pytest.mark.parametrize("fn", FNS)
def test_running_mean_is_causal(fn):
    torch.manual_seed(3)
    x = torch.randn(2, 20, 8)
    t = 9
    other = x.clone()
    other[:, t + 1:] = torch.randn(2, 20 - t - 1, 8) * 3
    m = mixer(fn, avg=True)
    a, b = m(x), m(other)
    assert torch.equal(a[:, :t + 1], b[:, :t + 1])
    # the context does reach back: changing x_0 alone changes outputs far beyond t = 1
    early = x.clone()
    early[:, 0] += 5.0 if fn != "min" else -5.0
    assert not torch.allclose(m(early)[:, 5:], a[:, 5:])
    # without the context it cannot: y_t depends on x_t and x_{t-1} only
    assert torch.equal(mixer(fn, avg=False)(early)[:, 2:], mixer(fn, avg=False)(x)[:, 2:])


@pytest.mark.parametrize("act", ["gelu", "generative"])
@pytest.mark.parametrize("avg", [False, True])
def test_gpt_causality(avg, act):
    m = tiny_gpt(gf_avg_context=avg, mlp_activation=act)
    assert_causal(m, torch.randint(0, 50, (2, 32)), [13], vocab_size=50)


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("fn", ["min", "max"])
def test_tie_gradient_goes_whole_to_the_first_argument(fn, use_triton):
    s = -1.0 if fn == "min" else 1.0
    # t = 2: x_2 = 0 loses to x_1 = s and m_2 = s, which tie: x_{t-1} comes first, so y_2 = x_1 and
    # its gradient goes to x_1 alone (not split with the mean, nor halved as torch.minimum does)
    dev = DEVICE if use_triton else "cpu"
    x = torch.tensor([2 * s, s, 0.0]).view(1, 3, 1).repeat(1, 1, 3).to(dev).requires_grad_(True)
    y = mixer(fn, True, use_triton)(x)
    assert torch.equal(y[0, 2].cpu(), torch.full((3,), s))
    y[0, 2].sum().backward()
    assert torch.equal(x.grad[0, :, 0].cpu(), torch.tensor([0.0, 1.0, 0.0]))
    # a constant sequence ties everywhere: every gradient stays with its own token x_t
    x = torch.full((2, 5, 4), 0.5, device=dev, requires_grad=True)
    g = torch.randn(2, 5, 4).to(dev)
    (mixer(fn, True, use_triton)(x) * g).sum().backward()
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("avg", [False, True])
@pytest.mark.parametrize("fn", FNS)
def test_gradcheck_pytorch_path(fn, avg):
    torch.manual_seed(4)
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)  # ties have probability zero
    assert torch.autograd.gradcheck(mixer(fn, avg), (x,))


@pytest.mark.parametrize("avg", [False, True])
@pytest.mark.parametrize("fn", FNS)
def test_triton_matches_pytorch(fn, avg):
    from kernels.generative import generative_function
    torch.manual_seed(5)
    # T = 45: three chunks of 16 (the last one partial); C = 40: one full and one partial channel block
    x = torch.randn(2, 45, 40).to(DEVICE).requires_grad_()
    g = torch.randn(2, 45, 40).to(DEVICE)
    y, won = generative_function(x, fn, avg, block_t=16)
    (dx,) = torch.autograd.grad(y, x, g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = mixer(fn, avg)(x_ref)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
    assert rel_err(y, y_ref) <= 1e-3 and rel_err(dx, dx_ref) <= 1e-3
    assert not torch.isnan(y).any() and not torch.isnan(dx).any()
    if fn != "mean":  # the winner map is what the backward uses
        xd = x.detach()
        prev = torch.cat([xd[:, :1], xd[:, :-1]], 1)
        assert torch.equal(won == 1, (prev < xd if fn == "min" else prev > xd) & (won != 2))


@pytest.mark.parametrize("avg", [False, True])
def test_block_triton_path_matches_pytorch_path(avg):
    """The whole block (default tile sizes, T = 70 not a multiple of 32), outputs and every gradient."""
    torch.manual_seed(6)
    block = ATTENTION["generative-function"](GPTConfig(n_embd=48, n_head=4, gf_avg_context=avg)).to(DEVICE)
    x = torch.randn(2, 70, 48).to(DEVICE).requires_grad_()
    g = torch.randn(2, 70, 48).to(DEVICE)
    grads = {}
    for use_triton in (False, True):
        block.mix.use_triton = use_triton
        y = block(x)
        grads[use_triton] = (y, *torch.autograd.grad(y, (x, block.c_proj.weight), g))
    for a, b in zip(grads[True], grads[False]):
        assert rel_err(a, b) <= 1e-3


@pytest.mark.parametrize("act", ["gelu", "generative"])
@pytest.mark.parametrize("avg", [False, True])
def test_decode_state_equality(avg, act):
    m = tiny_gpt(gf_avg_context=avg, mlp_activation=act)
    idx = torch.randint(0, 50, (2, 20))
    full, _ = m(idx, idx)
    logits, states = m.decode(idx[:, :12], None, 0)
    torch.testing.assert_close(logits[:, 0], full[:, 11], rtol=1e-5, atol=1e-5)
    logits, states = m.decode(idx[:, 12:17], states, 12)  # a multi-token chunk on top of the state
    torch.testing.assert_close(logits[:, 0], full[:, 16], rtol=1e-5, atol=1e-5)
    sizes = [s.numel() for s in states[0][0] if torch.is_tensor(s)]
    for t in range(17, 20):
        logits, states = m.decode(idx[:, t:t + 1], states, t)
        torch.testing.assert_close(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert [s.numel() for s in states[0][0] if torch.is_tensor(s)] == sizes  # O(1) in T
    # greedy generation, 40 tokens, past block_size=32 where the context is cropped
    a = m.generate(idx[:, :5], 40, temperature=0, use_cache=True)
    b = m.generate(idx[:, :5], 40, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_extra_metrics_report_who_wins():
    m = tiny_gpt(gf_avg_context=True)
    m(torch.randint(0, 50, (2, 32)))
    metrics = m.extra_metrics()
    assert set(metrics) == {f"generative-function/layer{i}/frac_{k}" for i in (0, 1) for k in ("prev", "mean")}
    assert all(0.0 < v < 1.0 for v in metrics.values())
    assert tiny_gpt(gf_fn="mean").extra_metrics() == {}


def test_compile_cases_cover_every_kernel_and_variant():
    from kernels import generative as k
    cases = {(c[1], c[3]["FN"], c[3]["AVG"], c[2]["DY" if "DY" in c[2] else "X"]) for c in k.COMPILE_CASES}
    for kern in (k._gf_fwd_kernel, k._gf_bwd_kernel):
        assert {(fn, avg) for kk, fn, avg, _ in cases if kk is kern} >= {(code, True) for code in k.FN_CODE.values()}
        assert {avg for kk, fn, avg, dt in cases if kk is kern and fn == k.FN_CODE["min"] and dt == "*fp32"} == {False, True}
        assert any(kk is kern and dt == "*bf16" for kk, _, _, dt in cases)


def test_config_file_and_avg_context_flag():
    import configurator
    import train
    path = f"{ROOT}/config/shakespeare_generative.py"
    for scale, T in (("cpu", 64), ("gpu", 256)):
        cfg, _ = configurator.load([path, f"--scale={scale}"], train.DEFAULTS)
        assert cfg["attention"] == "generative-function" and cfg["block_size"] == T and cfg["gf_fn"] == "min"
        assert cfg["gf_avg_context"] is False
    cfg, _ = configurator.load([path, "--scale=cpu", "--gf_avg_context=True"], train.DEFAULTS)
    assert cfg["gf_avg_context"] is True
    model_cfg = GPTConfig(**{k: cfg[k] for k in GPTConfig.__dataclass_fields__ if k != "vocab_size"})
    assert GPT(model_cfg).transformer.h[0].attn.mix.avg_context is True


def test_unknown_function_is_an_error():
    with pytest.raises(ValueError, match="gf_fn must be min, max or mean"):
        tiny_gpt(gf_fn="median")
