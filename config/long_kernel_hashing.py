# the long-context setting (see config/long_dense.py) with kernel-hashing attention (CPU scale, T=4096): exact causal chunks of 256,
# then 4 levels of past rectangles (256 ... 2048 keys), each giving a query a hashed block of 32 keys plus 128
# samples (one per stratum of the hash-sorted keys): a query at position 4095 scores 256 + 4 x 160 = 896 of its 4096 keys.
# Knobs chosen by `python diagnose.py` (results/diagnose-long, error against the bucket block and samples at T=4096):
# on trained q, k, v the error is set by the samples (b 64 + m 64: 0.29; b 32 + m 128: 0.19), and one block's fwd+bwd
# at 32k costs about the same (2.25 s vs 2.23 s on 2 cores; dense 8.5 s).
import os; exec(open(os.path.join(os.path.dirname(__file__), 'long_dense.py')).read())
out_dir = 'out-long-kernel-hashing'
attention = 'kernel-hashing'
kh_hash_bits = 10; kh_min_seq_len = 256; kh_bucket_block = 32; kh_samples = 128
