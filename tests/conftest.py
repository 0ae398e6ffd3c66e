"""Shared test setup.

- Kernel tests run on DEVICE: "cuda" natively when torch sees a GPU, else "cpu" with the
  Triton kernels in the interpreter (TRITON_INTERPRET=1, set before any kernel module is
  imported). ATTNLAB_TEST_DEVICE=cpu forces the interpreter on a GPU machine.
- In the interpreter, float32 dots with TF32 input precision have their operands rounded to
  10 mantissa bits, as the tensor cores would (tests/tf32_emulation.py;
  ATTNLAB_TF32_EMULATION=round|truncate|off).
- torch.empty / empty_like / new_empty return NaN-filled floating buffers, so an
  output element a kernel never wrote shows up as NaN instead of stale memory.
"""
import os
import sys

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DEVICE = os.environ.get("ATTNLAB_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # native kernels: the interpreter would reject CUDA tensors' pointers
    os.environ.pop("TRITON_INTERPRET", None)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRETED:
    try:
        import triton  # noqa: E402,F401
    except ImportError:
        pass
    else:
        import tf32_emulation  # noqa: E402
        tf32_emulation.install(os.environ.get("ATTNLAB_TF32_EMULATION", "round"))

_empty, _empty_like, _new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty


def _poison(t):
    if t.is_floating_point() and t.numel() > 0:
        t.fill_(float("nan"))
    return t


def _poisoned_empty(*args, **kwargs):
    return _poison(_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poison(_empty_like(*args, **kwargs))


def _poisoned_new_empty(self, *args, **kwargs):
    return _poison(_new_empty(self, *args, **kwargs))


torch.empty = _poisoned_empty
torch.empty_like = _poisoned_empty_like
torch.Tensor.new_empty = _poisoned_new_empty


@pytest.fixture(autouse=True)
def one_thread():
    """Test tensors are tiny: one intra-op thread avoids thread hand-offs on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_causal(model, idx, positions, vocab_size, atol=0.0, rtol=0.0):
    """Changing the tokens after position t leaves the logits at positions <= t unchanged
    (bitwise when atol = rtol = 0) and changes the logits after t, for every t in positions."""
    base, _ = model(idx, idx)
    for t in positions:
        other = idx.clone()
        g = torch.Generator().manual_seed(1000 + t)
        other[:, t + 1:] = torch.randint(0, vocab_size, other[:, t + 1:].shape, generator=g)
        changed, _ = model(other, other)
        if atol == 0 and rtol == 0:
            assert torch.equal(base[:, :t + 1], changed[:, :t + 1]), f"position <= {t} saw the future"
        else:
            assert torch.allclose(base[:, :t + 1], changed[:, :t + 1], atol=atol, rtol=rtol), \
                f"position <= {t} saw the future"
        assert not torch.allclose(base[:, t + 1:], changed[:, t + 1:], atol=max(atol, 1e-8)), \
            f"changing tokens after {t} changed nothing after it"


def rel_err(actual, expected):
    """RMS of the difference over RMS of the reference (fla's ratio metric)."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def run(args, cwd=ROOT, timeout=600, env=None):
    """Run `python args...` (a repository script) in cwd; returns CompletedProcess (text)."""
    import subprocess
    e = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


_SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique_consecutive",
            "_unique", "_unique2", "unique_dim", "bincount", "repeat_interleave"}  # host syncs on a GPU


class SyncingOps(TorchDispatchMode):
    """Records every aten op that needs a tensor's values on the host (or an output size that depends on them)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNCING and not (name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def host_syncs(monkeypatch, fn):
    """Runs fn() and returns the syncing aten ops it called; Tensor.item/tolist/bool/int/float/index
    raise AssertionError("host sync: ...") meanwhile."""
    def refuse(name):
        def f(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name}")
        return f
    with SyncingOps() as probe:
        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
                mp.setattr(torch.Tensor, name, refuse(name))
            fn()
    return probe.calls
