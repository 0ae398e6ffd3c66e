# Transformer-VQ (Lingle, ICLR 2024): gated attention unit, VQ keys, block-wise attention + compressive cache
dataset = 'shakespeare_char'
out_dir = 'out-shakespeare-vq'
attention = 'vq'
eval_interval = 250; log_interval = 10
always_save_checkpoint = False
learning_rate = 1e-3; min_lr = 1e-4; beta2 = 0.99; warmup_iters = 100
# the paper's single-head unit (d_k 128, beta 1e-4, EMA decay 0.99). With the GPT's MLP kept, d_v = n_embd
# matches dense attention's parameter count (4 n_embd^2 at n_embd 256); the paper's d_v = 2 n_embd belongs
# to its two-GAUs-no-MLP layout: --vq_d_v_mult=2 --vq_gau_layout=True --mlp_ratio=0
vq_d_k = 128; vq_d_v_mult = 1.0; vq_n_head = 1; vq_beta = 1e-4; vq_ema_decay = 0.99
scales = {
    # T=64, L=16: four blocks, so queries of blocks 2 and 3 read the compressive cache
    'cpu': dict(learning_rate=2e-3, min_lr=2e-4, eval_interval=500, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, max_iters=2500, lr_decay_iters=2500, dropout=0.0,
                vq_block_len=16, vq_codebook_size=64),
    # T=256, L=32: eight blocks, six of which read the cache
    'gpu': dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000, lr_decay_iters=5000, dropout=0.2,
                vq_block_len=32, vq_codebook_size=128),
}
