# the long-context setting (see config/long_dense.py) with Transformer-VQ: 64 blocks of L=64 at T=4096, so
# almost every query reads the compressive cache of S=128 codes
import os; exec(open(os.path.join(os.path.dirname(__file__), 'long_dense.py')).read())
out_dir = 'out-long-vq'
attention = 'vq'
vq_n_head = 1; vq_beta = 1e-4; vq_ema_decay = 0.99
vq_d_k = 128; vq_d_v_mult = 1.0  # parameter parity with dense: see the comment in config/shakespeare_vq.py
vq_block_len = 64; vq_codebook_size = 128
