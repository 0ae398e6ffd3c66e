# Transformer-VQ (Lingle, ICLR 2024): gated attention unit, VQ keys, block-wise attention + compressive cache
dataset = 'shakespeare_char'
out_dir = 'out-shakespeare-vq'
attention = 'vq'
eval_interval = 250; log_interval = 10
always_save_checkpoint = False
learning_rate = 1e-3; min_lr = 1e-4; beta2 = 0.99; warmup_iters = 100
# the paper's single-head unit (d_k 128, beta 1e-4, EMA decay 0.99). Parameter parity with dense (GPT's MLP kept):
# a unit holds W_q, W_k, W_r (n_embd x d_k each) and W_v, W_g, W_o (n_embd x d_v each) where dense attention
# holds 4 n_embd^2, so parity needs 3 (d_k + d_v) ~ 4 n_embd. The gpu scale has it (n_embd 384, d_k 128, d_v 384:
# 10,648,320 parameters vs dense 10,646,784); the cpu scale does not (n_embd 128, d_k 128, d_v 128: 928,000 vs
# 795,904, +16.6%); there --vq_d_k=64 --vq_d_v_mult=0.83 (d_v 106) gives 795,392 (-0.06%). Counts: get_num_params().
# The paper's d_v = 2 n_embd belongs to its two-GAUs-no-MLP layout: --vq_d_v_mult=2 --vq_gau_layout=True --mlp_ratio=0
vq_d_k = 128; vq_d_v_mult = 1.0; vq_n_head = 1; vq_beta = 1e-4; vq_ema_decay = 0.99
scales = {
    # T=64, L=16: four blocks, so queries of blocks 2 and 3 read the compressive cache
    'cpu': dict(learning_rate=4e-3, min_lr=4e-4, eval_interval=500, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, max_iters=2500, lr_decay_iters=2500, dropout=0.0,
                vq_block_len=16, vq_codebook_size=64),
    # T=256, L=32: eight blocks, six of which read the cache
    'gpu': dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000, lr_decay_iters=5000, dropout=0.2,
                vq_block_len=32, vq_codebook_size=128),
}
