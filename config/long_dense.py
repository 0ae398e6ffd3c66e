# the long-context setting (compare.py --preset=long): dense causal attention (SDPA) at T=4096 (CPU scale; 8192 at the gpu scale), the baseline
# whose cost grows with T^2. Every config/long_*.py shares the model shape and schedule below; only the
# block and its knobs differ, and bench.py --config=long times each block at exactly these knobs.
dataset = 'shakespeare_char'
out_dir = 'out-long-dense'
attention = 'dense'
rope = True  # rotary q, k: with a learned 4096-row position table dense did not learn to use context in 400 steps
eval_interval = 100; log_interval = 10
always_save_checkpoint = False
learning_rate = 2e-3; min_lr = 2e-4; beta2 = 0.99; warmup_iters = 50
eval_tokens = 65536  # 16 windows of 4096 per split (standard error about 0.007 nats)
eval_batch_size = 4  # windows per evaluation forward: the dense-GAU ablation holds T x T logits per window
scales = {
    # 2 layers, 4 heads, 128 wide; one window of 4096 characters per iteration, 400 iterations (1.6M tokens):
    # sized so that six arms x 2 seeds fit in about 100 minutes on 2 cores (compare.py --preset=long)
    'cpu': dict(n_layer=2, n_head=4, n_embd=128, block_size=4096, batch_size=1, max_iters=400, lr_decay_iters=400,
                dropout=0.0),
    'gpu': dict(n_layer=6, n_head=6, n_embd=384, block_size=8192, batch_size=8, max_iters=5000, lr_decay_iters=5000,
                dropout=0.1, eval_tokens=0),
}
