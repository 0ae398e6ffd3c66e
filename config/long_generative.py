# the long-context setting (see config/long_dense.py) with the generative function min(x_t, x_{t-1}):
# nothing to tune with T (each position reads its predecessor only)
import os; exec(open(os.path.join(os.path.dirname(__file__), 'long_dense.py')).read())
out_dir = 'out-long-generative'
attention = 'generative-function'
gf_fn = 'min'; gf_avg_context = False
rope = False  # nanoGPT's wpe table, as the paper
