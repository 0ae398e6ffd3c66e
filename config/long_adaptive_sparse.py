# the long-context setting (see config/long_dense.py) with adaptive-sparse attention: 128 blocks of 32 at T=4096;
# a query block keeps the fewest blocks whose scorer mass reaches p = 0.9, at least 1 and at most 32 (a quarter
# of the longest causal row), plus the pooled correction over the dropped ones
import os; exec(open(os.path.join(os.path.dirname(__file__), 'long_dense.py')).read())
out_dir = 'out-long-adaptive-sparse'
attention = 'adaptive-sparse'
as_block = 32; as_threshold = 0.9; as_k_min = 1; as_k_max = 32; as_score_dim = 32
