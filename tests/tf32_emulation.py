"""TF32 tensor-core rounding, emulated in the Triton interpreter (tests only).

On an NVIDIA GPU a float32 `tl.dot` whose input_precision is "tf32" (Triton's default) feeds its
operands to the tensor cores with 10 mantissa bits; the interpreter multiplies them in full float32
and hides the difference. `install(mode)` wraps the interpreter's dot so that, for float32 operands
and input precision TF32, both operands are first reduced to 10 mantissa bits:

    mode "round"     round to nearest even (cvt.rna.tf32 would do this)
    mode "truncate"  drop the low 13 bits (what the tensor cores do with raw float32 bits)

IEEE dots, tf32x3 (three TF32 products recovering ~float32 accuracy), bf16x3/x6 and non-float32
operands are left alone. conftest.py installs it for every interpreted test; ATTNLAB_TF32_EMULATION
= round (default) | truncate | off chooses the mode.

The same wrapper fixes the interpreter's bfloat16 dot (Triton 3.9 and 3.6): it stores bfloat16 as
its raw uint16 bits and np.matmul multiplied those integers; the operands are widened to float32
(exactly) first, which is what the tensor cores do with bfloat16 products.
"""
import contextlib

import numpy as np

MODES = ("round", "truncate", "off")
_state = {"mode": "off", "original": None}


def to_tf32(x, mode="round"):
    """float32 array -> float32 array with 10 mantissa bits (NaN and inf kept)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    if mode == "round":
        lsb = (u >> np.uint32(13)) & np.uint32(1)
        r = ((u + np.uint32(0x0FFF) + lsb) & np.uint32(0xFFFFE000)).view(np.float32)
    elif mode == "truncate":
        r = (u & np.uint32(0xFFFFE000)).view(np.float32)
    else:
        raise ValueError(f"unknown TF32 mode {mode!r}")
    return np.where(np.isfinite(x), r, x).astype(np.float32)


def _interpreter():
    from triton.runtime import interpreter
    return interpreter


def _is_tf32(precision):
    from triton._C.libtriton import ir
    return precision == ir.INPUT_PRECISION.TF32


def _bf16_to_f32(h, interp):
    import triton.language as tl
    if h.dtype.scalar == tl.bfloat16 and h.data.dtype == np.uint16:
        bits = h.data.astype(np.uint32) << np.uint32(16)
        return interp.TensorHandle(bits.view(np.float32), tl.float32)
    return h


def install(mode="round"):
    """Wrap the interpreter's create_dot (idempotent): bfloat16 operands widened to float32,
    float32 operands of TF32 dots reduced to TF32 unless mode is 'off'."""
    assert mode in MODES, mode
    interp = _interpreter()
    builder = interp.InterpreterBuilder
    if _state["original"] is None:
        _state["original"] = builder.create_dot
    original = _state["original"]

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if mode != "off" and a.data.dtype == np.float32 and b.data.dtype == np.float32 \
                and _is_tf32(input_precision):
            a = interp.TensorHandle(to_tf32(a.data, mode), a.dtype)
            b = interp.TensorHandle(to_tf32(b.data, mode), b.dtype)
        a, b = _bf16_to_f32(a, interp), _bf16_to_f32(b, interp)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    _state["mode"] = mode


def mode():
    return _state["mode"]


@contextlib.contextmanager
def emulating(new_mode):
    """Temporarily switch the emulation mode."""
    old = _state["mode"]
    install(new_mode)
    try:
        yield
    finally:
        install(old)
