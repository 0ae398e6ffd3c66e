"""The one Triton import of the kernels package: `from kernels._triton import HAS_TRITON, tl, triton`.

Without triton installed, `triton` and `tl` are small stand-ins: @triton.jit leaves a kernel as an
uncalled Python function and tl.constexpr returns its argument (as an annotation it is unused), so every kernels/<block>.py still
imports and its PyTorch paths run. Entry points launch kernels only when HAS_TRITON.
"""
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    from types import SimpleNamespace

    def _jit(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b),
                             next_power_of_2=lambda n: 1 << max(int(n) - 1, 0).bit_length())
    tl = SimpleNamespace(constexpr=lambda value=None: value)  # a module constant such as DOT_PRECISION keeps its value
    HAS_TRITON = False
