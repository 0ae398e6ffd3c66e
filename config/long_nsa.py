# NSA's structure at small scale (Yuan et al. 2025, "Native Sparse Attention"), built from adaptive-sparse's
# options on the long-context setting: selection blocks of 64 with at most 16 kept (NSA: l'=64, n=16), a forced
# initial block, and a sliding-window branch of 512 tokens (NSA: w=512), gated per token. Not NSA's: the
# compressed branch is adaptive-sparse's pooled correction over the dropped blocks (one vector per query block),
# not per-token attention over all overlapping compressed blocks, and selection is by the learned scorer's top-p
import os; exec(open(os.path.join(os.path.dirname(__file__), 'long_adaptive_sparse.py')).read())
out_dir = 'out-long-nsa'
as_window = 512; as_force_first = True
