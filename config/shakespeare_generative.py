# the parameter-free generative function min(x_t, x_{t-1}) in place of attention (Hilsenbek 2024); add --gf_avg_context=True for the running-mean context
dataset = 'shakespeare_char'
out_dir = 'out-shakespeare-generative'
attention = 'generative-function'
eval_interval = 250; log_interval = 10
always_save_checkpoint = False  # keep the best val checkpoint
learning_rate = 1e-3; min_lr = 1e-4; beta2 = 0.99; warmup_iters = 100
gf_fn = 'min'  # the paper's function; 'max' and 'mean' are the alternatives
gf_avg_context = False  # True: also compare with the causal running mean m_t = mean(x_0..x_t)
mlp_ratio = 4.0  # nanoGPT's perceptron; --mlp_ratio=16.0 makes it four times larger, as in the paper's timing
# nothing to scale with T: every position compares with its predecessor, and the running
# mean covers the whole context at T=64 and T=256 alike
scales = {
    'cpu': dict(learning_rate=4e-3, min_lr=4e-4, eval_interval=500, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, max_iters=2500, lr_decay_iters=2500,
                dropout=0.0),
    'gpu': dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000, lr_decay_iters=5000,
                dropout=0.2),
}
