# kernel-hashing attention at long context: character-level Shakespeare in windows of 1k (CPU) / 8k (GPU) tokens
# (compare with the same file and --attention=dense; dense's cost grows with T^2, this block's with T log T)
dataset = 'shakespeare_char'
out_dir = 'out-long-kernel-hashing'
attention = 'kernel-hashing'
eval_interval = 250
log_interval = 10
always_save_checkpoint = False
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
kh_hash_bits = 10  # enough hyperplanes to order rectangles of up to 4k keys finely
scales = {
    # T=1024: exact chunks of 64, then 4 levels of rectangles (64 ... 512 keys): block 32 + 32 samples
    'cpu': dict(n_layer=4, n_head=4, n_embd=128, block_size=1024, batch_size=2,
                max_iters=2000, lr_decay_iters=2000, dropout=0.0,
                kh_min_seq_len=64, kh_bucket_block=32, kh_samples=32),
    # T=8192: exact chunks of 256, then 5 levels (256 ... 4096 keys): block 64 + 64 samples
    'gpu': dict(n_layer=6, n_head=6, n_embd=384, block_size=8192, batch_size=4, gradient_accumulation_steps=4,
                max_iters=5000, lr_decay_iters=5000, dropout=0.1,
                kh_min_seq_len=256, kh_bucket_block=64, kh_samples=64),
}
