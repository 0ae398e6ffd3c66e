"""How each token-mixing block of model.py is computed. model.py says what a block computes and
calls one functional op; kernels/<block>.py (vq, kernel_hashing, adaptive_sparse, generative) holds
everything behind it, in the same sections: reference (PyTorch), CPU-fast path, entry point (picks
CUDA + Triton, or PyTorch), Triton kernels. _triton.py is the one Triton import (HAS_TRITON);
gpu_compile.py compiles every kernel's COMPILE_CASES for sm_80/sm_90. Tests: tests/test_<block>.py."""
