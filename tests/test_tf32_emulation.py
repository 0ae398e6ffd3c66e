"""The kernels' float32 dots are IEEE, not TF32: TF32 emulated in the interpreter
(tests/tf32_emulation.py) makes a TF32 dot miss the float32 tolerance, would make the VQ and
adaptive-sparse kernels miss it, and leaves our kernels (IEEE dots) within it. On a GPU the
hardware itself does TF32, so the dot test holds there too."""
import ast
import glob
import os

import pytest
import torch

from conftest import DEVICE, INTERPRETED, ROOT, rel_err

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
import tf32_emulation  # noqa: E402


@triton.jit
def _dot_kernel(A, B, C, N: tl.constexpr, PREC: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(A + i[:, None] * N + i[None, :])
    b = tl.load(B + i[:, None] * N + i[None, :])
    tl.store(C + i[:, None] * N + i[None, :], tl.dot(a, b, input_precision=PREC))


def _dot(a, b, prec):
    c = torch.empty_like(a)
    _dot_kernel[(1,)](a, b, c, N=a.shape[0], PREC=prec)
    return c


def _cancelling_inputs(n=32):
    """Rows near 1 times zero-sum columns: the product is the small part, which TF32's 10
    mantissa bits of the near-1 entries blur."""
    g = torch.Generator().manual_seed(0)
    a = 1 + 1e-3 * torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    b = b - b.mean(0)
    return a.to(DEVICE), b.to(DEVICE)


def test_to_tf32_keeps_10_mantissa_bits():
    x = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -10 + 2 ** -12, -3.0, float("inf")]).numpy()
    assert tf32_emulation.to_tf32(x, "round").tolist() == [1.0, 1 + 2 ** -9, 1 + 2 ** -10, -3.0, float("inf")]
    assert tf32_emulation.to_tf32(x, "truncate").tolist() == [1.0, 1 + 2 ** -10, 1 + 2 ** -10, -3.0, float("inf")]


@pytest.mark.parametrize("mode", ["round", "truncate"])
def test_tf32_dot_misses_the_float32_tolerance_and_ieee_does_not(mode):
    if INTERPRETED:
        ctx = tf32_emulation.emulating(mode)
    elif mode == "round":
        pytest.skip("the GPU's own TF32 rounding is tested once")
    else:
        import contextlib
        ctx = contextlib.nullcontext()
    a, b = _cancelling_inputs()
    ref = (a.double() @ b.double())
    with ctx:
        assert rel_err(_dot(a, b, "tf32"), ref) > 1e-2
        assert rel_err(_dot(a, b, "ieee"), ref) < 1e-3  # the float32 tolerance
    if INTERPRETED:  # without the emulation the interpreter hides TF32 entirely
        with tf32_emulation.emulating("off"):
            assert rel_err(_dot(a, b, "tf32"), ref) < 1e-3


def test_every_kernel_dot_is_ieee():
    """Each tl.dot in kernels/*.py passes input_precision=DOT_PRECISION, and that is 'ieee'."""
    import importlib
    n = 0
    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        tree = ast.parse(open(path).read())
        dots = [c for c in ast.walk(tree) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                and c.func.attr == "dot" and getattr(c.func.value, "id", None) == "tl"]
        for c in dots:
            kw = {k.arg: k.value for k in c.keywords}
            assert getattr(kw.get("input_precision"), "id", None) == "DOT_PRECISION", f"{path}:{c.lineno}"
        if dots:
            mod = importlib.import_module(f"kernels.{os.path.basename(path)[:-3]}")
            assert mod.DOT_PRECISION.value == "ieee"
        n += len(dots)
    assert n >= 30


@pytest.mark.skipif(not INTERPRETED, reason="switches a kernel module's dot precision in the interpreter")
def test_kernels_with_tf32_dots_would_miss_the_tolerance(monkeypatch):
    """Switched to TF32, the VQ and adaptive-sparse kernels miss the float32 tolerance under the
    emulation and pass without it: the IEEE setting is what keeps them within it."""
    import kernels.adaptive_sparse
    import kernels.vq
    from test_kernels_device import TOL, as_errors, vq_errors
    for mod in (kernels.vq, kernels.adaptive_sparse):
        monkeypatch.setattr(mod, "DOT_PRECISION", tl.constexpr("tf32"))
    runs = {"vq": lambda: vq_errors(1, 1, 29, 12, 150, 72, 72, torch.float32, seed=29),
            "as": lambda: as_errors(1, 1, 70, 32, 32, torch.float32, seed=70)}
    for name, run in runs.items():
        with tf32_emulation.emulating("round"):
            assert max(run().values()) > TOL[torch.float32], name
        with tf32_emulation.emulating("off"):
            assert max(run().values()) <= TOL[torch.float32], name
