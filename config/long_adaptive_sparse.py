# adaptive-sparse attention at long context on character-level Shakespeare: 1k tokens on CPU, 4k on GPU
dataset = 'shakespeare_char'
out_dir = 'out-long-adaptive-sparse'
attention = 'adaptive-sparse'
eval_interval = 250; log_interval = 10
always_save_checkpoint = False
learning_rate = 1e-3; min_lr = 1e-4; beta2 = 0.99; warmup_iters = 100
as_threshold = 0.9
as_k_min = 1
as_score_dim = 32
scales = {
    # T=1024 in 64 blocks of 16: at most 6 blocks (96 keys) per query plus the pooled correction
    'cpu': dict(n_layer=4, n_head=4, n_embd=128, block_size=1024, batch_size=4, max_iters=2000,
                lr_decay_iters=2000, dropout=0.0, as_block=16, as_k_max=4),
    # T=4096 in 128 blocks of 32: at most 10 blocks (320 keys) per query plus the pooled correction
    'gpu': dict(n_layer=6, n_head=6, n_embd=384, block_size=4096, batch_size=8, max_iters=5000,
                lr_decay_iters=5000, dropout=0.2, as_block=32, as_k_max=8),
}
