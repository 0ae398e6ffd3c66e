# the long-context setting (see config/long_dense.py) with kernel-hashing attention (CPU scale, T=4096): exact causal chunks of 256,
# then 4 levels of past rectangles (256 ... 2048 keys), each giving a query a hashed block of 32 keys plus 160
# importance-weighted samples (drawn along the hash-sorted keys, more often where the rectangle's past queries
# score high, each weighted 1 / (m p)): a query at position 4095 scores 256 + 4 x 192 = 1024 of its 4096 keys.
# Knobs chosen by `python diagnose.py` (results/diagnose-long): on trained q, k, v the error is set by the samples;
# at T=4096 b 32 + m 128 with one sample per stratum gave 0.294 / 0.292 (kernel-hashing / dense checkpoint), the
# importance draws at m 160 give 0.217 / 0.217, and one block's fwd+bwd at 32k stays 3.3x faster than dense's
# (results/bench-long-kh-importance: 2.5 s vs 8.4 s on 2 cores). The long preset's runs at the previous knobs
# (m 128, kh_sampling 'sorted-strata') are kept in results/long-cpu-kh-m128-strata.
import os; exec(open(os.path.join(os.path.dirname(__file__), 'long_dense.py')).read())
out_dir = 'out-long-kernel-hashing'
attention = 'kernel-hashing'
kh_hash_bits = 10; kh_min_seq_len = 256; kh_bucket_block = 32; kh_samples = 160; kh_sampling = 'importance'
