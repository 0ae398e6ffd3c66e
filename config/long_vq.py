# the long-context setting (see config/long_dense.py) with Transformer-VQ: 64 blocks of L=64 at T=4096 (CPU scale), so
# almost every query reads the compressive cache of S=128 codes
import os; exec(open(os.path.join(os.path.dirname(__file__), 'long_dense.py')).read())
out_dir = 'out-long-vq'
attention = 'vq'
vq_n_head = 1; vq_beta = 1e-4; vq_ema_decay = 0.99
# parameter parity with dense: W_q, W_k, W_r (d_k each) and W_v, W_g, W_o (d_v each) give 3 (d_k + d_v) n_embd,
# dense has 4 n_embd^2: d_k 64, d_v 106 gives 795,392 parameters against dense's 795,904 (-0.06%; both without
# dense's 524,288-parameter absolute position table, which vq does not have)
vq_d_k = 64; vq_d_v_mult = 0.83
vq_block_len = 64; vq_codebook_size = 128
rope = False  # its own relative sinusoids
