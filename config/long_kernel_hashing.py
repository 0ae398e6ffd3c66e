# the long-context setting (see config/long_dense.py) with kernel-hashing attention (CPU scale, T=4096): exact causal chunks of 256,
# then 4 levels of past rectangles (256 ... 2048 keys), each giving a query a hashed block of 64 keys plus 64
# uniformly sampled ones: a query at position 4095 scores 256 + 4 x 128 = 768 of its 4096 keys
import os; exec(open(os.path.join(os.path.dirname(__file__), 'long_dense.py')).read())
out_dir = 'out-long-kernel-hashing'
attention = 'kernel-hashing'
kh_hash_bits = 10; kh_min_seq_len = 256; kh_bucket_block = 64; kh_samples = 64
