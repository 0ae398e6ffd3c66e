# NSA's structure at small scale (Yuan et al. 2025, "Native Sparse Attention"), built from adaptive-sparse's
# options on the long-context setting: selection blocks of 64 with at most 16 kept (NSA: l'=64, n=16), a forced
# initial block, a sliding-window branch of 512 tokens (NSA: w=512) and NSA's per-token compressed branch over
# overlapping blocks of 32 tokens taken every 16 (NSA: l=32, d=16), the three gated per token. Not NSA's: the
# compressor is a mean (NSA: a learned MLP with intra-block positions), and selection is by the learned
# scorer's top-p mass over block means, not from the compressed branch's attention scores
import os; exec(open(os.path.join(os.path.dirname(__file__), 'long_adaptive_sparse.py')).read())
out_dir = 'out-long-nsa'
as_window = 512; as_force_first = True; as_compress = 32; as_compress_stride = 16
