"""train.py with adaptive-sparse's straight-through term switched off (Scorer.straight_through=False): the
selection then gets no gradient. A diagnostic for README "Known problems", not a training option.

    python results/as-kmin-probe/no_straight_through.py config/shakespeare_adaptive_sparse.py --key=value ...
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
import model  # noqa: E402

scorer = model.AdaptiveSparseAttention.scorer
model.AdaptiveSparseAttention.scorer = lambda self: scorer(self)._replace(straight_through=False)
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
