"""
Train a GPT with a chosen token-mixing block.

    python train.py config/shakespeare_vq.py --attention=dense --max_iters=500
    torchrun --standalone --nproc_per_node=2 train.py config/shakespeare_dense.py

Writes out_dir/ckpt.pt (atomically), out_dir/config.json and out_dir/metrics.jsonl (one JSON
object per evaluation: the local source of truth for plots), and logs to wandb when asked.
"""

import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch

import configurator
import ngram
from model import ATTENTION, GPT, GPTConfig

# -----------------------------------------------------------------------------
# defaults; every GPTConfig field (n_layer, attention, vq_block_len, ...) is a key too
out_dir = "out"
eval_interval = 250
log_interval = 10
eval_tokens = 131072  # fixed evaluation set: the first eval_tokens tokens of each split in block_size windows (0: all)
eval_batch_size = 64  # windows per forward pass during evaluation
eval_only = False  # evaluate once and exit
always_save_checkpoint = False  # otherwise save only when val loss improves
init_from = "scratch"  # 'scratch' or 'resume'
wandb_log = False
wandb_project = "attnlab"
wandb_run_name = ""  # defaults to out_dir
wandb_group = ""
dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
learning_rate = 1e-3
max_iters = 2000
max_seconds = 0.0  # > 0: also stop after this much training time (evaluation excluded); the lr decays over it
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # 0 disables clipping
decay_lr = True
warmup_iters = 100
lr_decay_iters = 2000
min_lr = 1e-4
device = "auto"  # auto: cuda, then mps, then cpu
dtype = "auto"  # auto: bfloat16 on CUDA where supported, float32 elsewhere
compile = False  # torch.compile the model
seed = 1337
scale = "auto"  # which `scales` preset of the config file: auto, cpu or gpu
peak_flops = 312e12  # MFU denominator: A100 bf16 peak, as nanoGPT (meaningless on CPU)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))
            and k not in ("DEFAULTS",)}
DEFAULTS.update({k: v for k, v in asdict(GPTConfig()).items() if k not in DEFAULTS})
DEFAULTS["vocab_size"] = 0  # 0: take it from the dataset's meta.json
MODEL_KEYS = list(asdict(GPTConfig()))
# every numeric key and the values that mean something (configurator.check_ranges)
RANGES = dict(
    eval_interval=">=1", log_interval=">=1", eval_tokens=">=0", eval_batch_size=">=1",
    gradient_accumulation_steps=">=1", batch_size=">=1", learning_rate=">=0", max_iters=">=1", max_seconds=">=0",
    weight_decay=">=0", beta1="[0,1)", beta2="[0,1)", grad_clip=">=0", warmup_iters=">=0", lr_decay_iters=">=0",
    min_lr=">=0", seed=">=0", peak_flops=">0",
    vocab_size=">=0", block_size=">=1", n_layer=">=1", n_head=">=1", n_embd=">=1", dropout="[0,1)", mlp_ratio=">=0",
    vq_codebook_size=">=1", vq_block_len=">=1", vq_d_k=">=1", vq_d_v_mult=">0", vq_n_head=">=1", vq_beta=">=0",
    vq_ema_decay="[0,1)", kh_hash_bits="[1,16]", kh_bucket_block=">=1", kh_samples=">=0", kh_min_seq_len=">=1",
    as_block=">=1", as_threshold="(0,1]", as_k_min=">=0", as_k_max=">=0", as_score_dim=">=1", as_window=">=0",
    as_compress=">=0", as_compress_stride=">=1", short_conv=">=0", as_budget=">=0", as_gate_bias="[-20,20]",
)
MEMORY_STEPS = 2  # training steps inside the memory peak (the first allocates the optimizer state)
CKPT_KEYS = ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "rng")


def choose_scale():
    if torch.cuda.is_available():
        return "gpu", f"CUDA device found: {torch.cuda.get_device_name(0)}"
    return "cpu", "no CUDA device found"


def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def lr_at(it, cfg, progress=None):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters. With a time budget,
    progress (train seconds / max_seconds) replaces the iteration count after warmup."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if progress is not None:
        ratio = min(1.0, progress)
    elif it > cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    else:
        ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


def peak_memory(device_type):
    """(key, MiB): CUDA allocator peak on CUDA; on CPU the peak resident set size of this process so far."""
    if device_type == "cuda":
        return "peak_mem_cuda_allocated_mib", torch.cuda.max_memory_allocated() / 2**20
    return "peak_mem_cpu_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib():
    """Resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def duration(seconds):
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def split_batch(batch_size, accum, world):
    """(per-rank batch, per-rank accumulation steps) that keep the global batch batch_size x accum
    over `world` ranks: split the micro-steps when they divide, else the batch; None if neither."""
    if accum % world == 0:
        return batch_size, accum // world
    if batch_size % world == 0:
        return batch_size // world, accum
    return None


def save_atomic(obj, path):
    """torch.save through a temporary file: a crash midway leaves the old checkpoint intact."""
    configurator.write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_json_atomic(obj, path):
    configurator.write_atomic(path, json.dumps(obj, indent=2))


def init_wandb(cfg, master):
    """wandb that never blocks the run: offline without credentials, and any failure only warns.
    Returns the run or None. Called once the memory peak is measured (see MEMORY_STEPS)."""
    if not (cfg["wandb_log"] and master):
        return None
    try:
        import wandb
        if "WANDB_MODE" not in os.environ and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            os.environ["WANDB_MODE"] = "offline"
        run = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or cfg["out_dir"],
                         group=cfg["wandb_group"] or None, config=cfg, dir=cfg["out_dir"],
                         settings=wandb.Settings(init_timeout=30, silent=True))
        print(f"wandb: logging in {os.environ.get('WANDB_MODE', 'online')} mode to {run.dir}")
        return run
    except Exception as e:  # noqa: BLE001 - logging must never stop training
        print(f"warning: wandb disabled ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None


def log_wandb(run, rows, say):
    """Send the pending rows; returns the (empty) pending list. A failure only warns."""
    for row in rows:
        try:
            run.log(row, step=row["iter"])
        except Exception as e:  # noqa: BLE001
            say(f"warning: wandb log failed at iteration {row['iter']}: {e}")
    return []


def _netrc_has_wandb():
    path = os.path.join(os.path.expanduser("~"), ".netrc")
    return os.path.exists(path) and "api.wandb.ai" in open(path).read()


def main(argv):
    try:
        cfg, notes = configurator.load(argv, DEFAULTS, choose_scale)
        configurator.check_ranges(cfg, RANGES)
        given = configurator.given_keys(argv, DEFAULTS, choose_scale) if cfg["init_from"] == "resume" else {}
    except configurator.ConfigError as e:
        configurator.fail(str(e))
    if cfg["attention"] not in ATTENTION:
        configurator.fail(f"unknown attention {cfg['attention']!r}; valid: {', '.join(ATTENTION)}")
    if cfg["init_from"] not in ("scratch", "resume"):
        configurator.fail(f"init_from must be 'scratch' or 'resume', got {cfg['init_from']!r}")

    # processes: torchrun sets RANK/WORLD_SIZE for data parallel training
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = pick_device(cfg["device"])
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    master = rank == 0

    def fail(message):  # one line from rank 0 only; every rank exits 2
        if master:
            configurator.fail(message)
        # the other ranks fail for the same reason; they wait so that rank 0 prints its line before torchrun,
        # seeing a rank exit, stops the rest (a loaded machine could otherwise kill rank 0 first: no message)
        time.sleep(30)
        sys.exit(2)

    split = split_batch(cfg["batch_size"], cfg["gradient_accumulation_steps"], world)
    if split is None:
        fail(f"cannot split the global batch (batch_size {cfg['batch_size']} x gradient_accumulation_steps "
             f"{cfg['gradient_accumulation_steps']}) over {world} processes: make either divisible by {world}")
    B, grad_accum = split  # per rank
    if ddp:
        import torch.distributed as dist
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    say = print if master else (lambda *a, **k: None)
    for n in notes:
        say(n)

    # resume: the checkpoint's model arguments win; a model key asked for that differs is an error
    os.makedirs(cfg["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    iter_num, best_val_loss, checkpoint, checkpoint_seconds, changed = 0, float("inf"), None, 0.0, {}
    if cfg["init_from"] == "resume":
        try:
            checkpoint = configurator.read_checkpoint(ckpt_path, CKPT_KEYS, device)
        except configurator.ConfigError as e:
            fail(str(e))
        unknown = sorted(set(checkpoint["model_args"]) - set(MODEL_KEYS))
        if unknown:
            fail(f"checkpoint {ckpt_path} has model arguments this model.py does not know: {', '.join(unknown)}")
        ck_args = {**asdict(GPTConfig()), **checkpoint["model_args"]}
        conflicts = [f"{k}={cfg[k]!r} ({given[k]}) but the checkpoint has {ck_args[k]!r}" for k in MODEL_KEYS
                     if k in given and cfg[k] != ck_args[k] and not (k == "vocab_size" and cfg[k] == 0)]
        if conflicts:
            fail(f"resuming {ckpt_path}, whose model arguments win: {'; '.join(conflicts)}; "
                 f"drop these settings or train in a new out_dir")
        old = checkpoint.get("config", {})
        changed = {k: [old[k], v] for k, v in cfg.items() if k in old and old[k] != v and k not in MODEL_KEYS
                   and k != "init_from"}
        cfg.update({k: ck_args[k] for k in MODEL_KEYS})
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        checkpoint_seconds = float(checkpoint.get("train_seconds", 0.0))
        if not cfg["eval_only"] and iter_num >= cfg["max_iters"]:
            fail(f"checkpoint {ckpt_path} is at iteration {iter_num}, at or past max_iters={cfg['max_iters']}: "
                 f"nothing to train; raise --max_iters")
        if not cfg["eval_only"] and 0 < cfg["max_seconds"] <= checkpoint_seconds:
            fail(f"checkpoint {ckpt_path} has trained {checkpoint_seconds:.1f} s, at or past "
                 f"max_seconds={cfg['max_seconds']}: nothing to train; raise --max_seconds")
        say(f"resuming from {ckpt_path} at iteration {iter_num}" + ("; changed since it was saved: " + ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) if changed else ""))

    # data: prepare a missing built-in dataset first
    data_dir = os.path.join("data", cfg["dataset"])
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        import prepare_data
        if cfg["dataset"] not in prepare_data.BUILTIN:
            configurator.fail(f"dataset {cfg['dataset']!r} not found in {data_dir}; "
                              f"run: python prepare_data.py --input=FILE --name={cfg['dataset']}")
        if master:
            say(f"dataset {cfg['dataset']} is missing: preparing it first (python prepare_data.py {cfg['dataset']})")
            try:
                prepare_data.prepare(cfg["dataset"])
            except prepare_data.DataError as e:
                configurator.fail(str(e))
        if ddp:
            dist.barrier()
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    say(f"data: {cfg['dataset']} from {meta.get('source', 'unknown source')}")
    data = {s: np.memmap(os.path.join(data_dir, f"{s}.bin"), dtype=np.uint16, mode="r") for s in ("train", "val")}
    T = cfg["block_size"]
    for s, d in data.items():
        if len(d) <= T + 1:
            configurator.fail(f"{s}.bin has {len(d)} tokens, fewer than block_size+2 = {T + 2}; lower --block_size")

    def get_batch(split, rng):
        """B random windows; rng is seeded from (seed, iteration, ...) so batches are reproducible."""
        d = data[split]
        ix = rng.integers(0, len(d) - T - 1, size=B)
        x = torch.from_numpy(np.stack([d[i:i + T] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([d[i + 1:i + 1 + T] for i in ix]).astype(np.int64))
        if device_type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    # model, from scratch or from the checkpoint
    cfg["vocab_size"] = cfg["vocab_size"] or meta["vocab_size"]
    if cfg["vocab_size"] < meta["vocab_size"]:
        fail(f"vocab_size {cfg['vocab_size']}" + (" (the checkpoint's)" if checkpoint else "")
             + f" is smaller than dataset {cfg['dataset']}'s {meta['vocab_size']}")
    model_args = {k: cfg[k] for k in MODEL_KEYS}
    torch.manual_seed(cfg["seed"] + rank)
    try:
        model = GPT(GPTConfig(**model_args)).to(device)
    except (AssertionError, ValueError) as e:
        fail(f"invalid model configuration: {e or 'an internal check of the ' + cfg['attention'] + ' block failed'}")
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
        except (RuntimeError, KeyError, TypeError) as e:
            fail(f"checkpoint {ckpt_path}: its weights do not fit its model arguments ({' '.join(str(e).split())[:200]})")
    say(f"model: {cfg['attention']}, {model.get_num_params() / 1e6:.2f}M parameters, device {device}")

    dtype = cfg["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                           (cfg["beta1"], cfg["beta2"]), device_type)
    if checkpoint is not None:
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
            if device_type == "cuda" and checkpoint["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu())
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
            fail(f"checkpoint {ckpt_path}: its optimizer or RNG state is unusable "
                 f"({type(e).__name__}: {' '.join(str(e).split())[:160]})")
    checkpoint = None
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    eval_starts = {s: ngram.fixed_windows(len(d), T, cfg["eval_tokens"]) for s, d in data.items()}

    @torch.no_grad()
    def evaluate():
        """Cross-entropy over the fixed windows of each split (ngram.fixed_windows: the same tokens
        for every batch size, seed and evaluation), sharded over ranks: the mean over windows and its
        standard error. Auxiliary losses are not included. Diagnostics are from the last val batch."""
        raw_model.eval()
        out = {}
        for split in ("train", "val"):
            starts, d = eval_starts[split], data[split]
            total = torch.zeros(3, dtype=torch.float64, device=device)  # sum, sum of squares, count
            mine = starts[rank::world]
            for a in range(0, len(mine), cfg["eval_batch_size"]):
                s = mine[a:a + cfg["eval_batch_size"]]
                x = torch.from_numpy(np.stack([d[i:i + T] for i in s]).astype(np.int64)).to(device)
                y = torch.from_numpy(np.stack([d[i + 1:i + 1 + T] for i in s]).astype(np.int64)).to(device)
                with ctx:
                    logits, _ = raw_model(x, y)
                nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
                w = nll.view(len(s), T).mean(1).double()
                total += torch.stack([w.sum(), (w * w).sum(), torch.tensor(float(len(s)), device=device,
                                                                           dtype=torch.float64)])
            if ddp:
                dist.all_reduce(total)
            n = total[2].item()
            mean = total[0].item() / n
            var = max(0.0, (total[1].item() - n * mean * mean) / max(1.0, n - 1))
            out[f"{split}/loss"], out[f"{split}/loss_se"] = mean, math.sqrt(var / n)
        out["eval_windows"] = len(eval_starts["val"])
        out.update(raw_model.extra_metrics())
        raw_model.train()
        return out

    def stop(why):  # the checkpoint on disk is from the last good evaluation: leave it alone
        kept = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was saved"
        print(f"error: {why}; stopping, {kept}", file=sys.stderr)
        sys.exit(1)

    tokens_per_iter = grad_accum * world * B * T
    say(f"tokens per iteration: {tokens_per_iter:,} ({grad_accum} accum x {world} ranks x {B} batch x {T} block"
        + (f"; the global batch of batch_size {cfg['batch_size']} x {cfg['gradient_accumulation_steps']} accum "
           f"is split over the ranks)" if ddp else ")"))
    resumed = {"iter": iter_num, "changed": changed} if cfg["init_from"] == "resume" else None
    # wandb starts only after the CPU memory peak is taken (the first evaluation and MEMORY_STEPS training
    # steps: later steps and evaluations allocate the same, except for blocks whose work depends on the data,
    # such as adaptive-sparse's kept blocks), so the peak is the same with and without it
    wandb_cfg, wandb_run, wandb_rows = {**cfg, "data_source": meta.get("source"), "resumed": resumed}, None, []
    metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
    if master:
        write_json_atomic({**cfg, "model_args": model_args, "data_source": meta.get("source"), "resumed": resumed},
                          os.path.join(cfg["out_dir"], "config.json"))
        if cfg["init_from"] == "scratch" and os.path.exists(metrics_path):
            os.remove(metrics_path)  # a fresh run starts a fresh log
        elif os.path.exists(metrics_path):  # rows from the resumed iteration on are logged again: drop them
            kept = []
            for line in open(metrics_path):
                try:
                    r = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if r.get("iter", -1) < iter_num:
                    kept.append(json.dumps(r) + "\n")
            configurator.write_atomic(metrics_path, "".join(kept))
    train_aux, attn_stats = None, {}
    step_ms = []  # training-step times since the last evaluation (evaluation excluded)
    train_seconds = checkpoint_seconds  # training time so far, evaluation excluded
    start_iter, last_ms, mem_key, mem, mem_frozen = iter_num, None, None, None, False
    t_start = time.time()
    model.train()
    while True:
        timed = cfg["max_seconds"] > 0
        lr = lr_at(iter_num, cfg, train_seconds / cfg["max_seconds"] if timed else None)
        for g in optimizer.param_groups:
            g["lr"] = lr
        done = iter_num >= cfg["max_iters"] or (timed and train_seconds >= cfg["max_seconds"]) or cfg["eval_only"]
        if iter_num % cfg["eval_interval"] == 0 or done or iter_num == start_iter:
            row = {"iter": iter_num, **evaluate(), "lr": lr, "tokens": iter_num * tokens_per_iter,
                   "train_seconds": train_seconds, "wall_seconds": time.time() - t_start}
            if train_aux is not None:  # auxiliary loss (e.g. VQ commitment) of the last training step
                row["train/aux_loss"] = train_aux.item()
            row.update(attn_stats)
            ms = float(np.median(step_ms)) if step_ms else None
            if not mem_frozen or device_type == "cuda":  # wandb never touches the CUDA allocator: stay live
                mem_key, mem = peak_memory(device_type)
            last_ms = ms or last_ms
            row.update({"ms_per_iter": ms, "last_step_ms": step_ms[-1] if step_ms else None, "tokens_per_sec": tokens_per_iter / (ms / 1000) if ms else None,
                        mem_key: mem, "mfu": raw_model.estimate_mfu(tokens_per_iter, ms / 1000, cfg["peak_flops"])
                        if ms else None, "attention": cfg["attention"], "params": raw_model.get_num_params(), "device": device,
                        "data_source": meta.get("source"), "time": time.time()})
            step_ms = []
            if not all(math.isfinite(row[k]) for k in ("train/loss", "val/loss")):
                stop(f"non-finite evaluation loss at iteration {iter_num}")
            if master:
                say(f"iter {iter_num}/{cfg['max_iters']}: train loss {row['train/loss']:.4f}, val loss {row['val/loss']:.4f}"
                    + (f", {ms:.1f} ms/iter" if ms else "") + f", {mem_key} {mem:.0f}")
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if wandb_run is not None:
                    log_wandb(wandb_run, [row], say)
                elif cfg["wandb_log"] and not mem_frozen:  # held until wandb starts
                    wandb_rows.append(row)
                if row["val/loss"] < best_val_loss or cfg["always_save_checkpoint"]:
                    best_val_loss = min(best_val_loss, row["val/loss"])
                    if iter_num > 0 and not cfg["eval_only"]:
                        save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "model_args": model_args, "iter_num": iter_num, "best_val_loss": best_val_loss,
                                     "train_seconds": train_seconds,
                                     "config": cfg, "meta": meta,
                                     "rng": {"torch": torch.get_rng_state(),
                                             "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}},
                                    ckpt_path)
                        say(f"saved checkpoint to {ckpt_path}")
        if done:
            break

        t0 = time.perf_counter()
        for micro in range(grad_accum):
            x, y = get_batch("train", np.random.default_rng([cfg["seed"], rank, iter_num, micro]))
            if ddp:  # synchronise gradients on the last micro-step only
                model.require_backward_grad_sync = micro == grad_accum - 1
            with ctx:
                _, loss = model(x, y)
                loss = loss / grad_accum
            if not torch.isfinite(loss):
                stop(f"non-finite training loss ({loss.item()}) at iteration {iter_num}")
            scaler.scale(loss).backward()
        if raw_model.last_aux_loss is not None:
            train_aux = raw_model.last_aux_loss.detach()  # read (synced) only when a row is logged
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        raw_model.commit_codebook_updates()  # vq: one EMA codebook update per optimizer step
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        step_ms.append((time.perf_counter() - t0) * 1000)
        train_seconds += step_ms[-1] / 1000
        if iter_num + 1 == start_iter + MEMORY_STEPS:  # the peak is in: take it, then start wandb
            (mem_key, mem), mem_frozen = peak_memory(device_type), True
            if cfg["wandb_log"] and master:
                wandb_run = init_wandb(wandb_cfg, master)
                wandb_rows = log_wandb(wandb_run, wandb_rows, say) if wandb_run is not None else []
        if iter_num % cfg["log_interval"] == 0:
            attn_stats = raw_model.attention_stats()  # selection of this step (adaptive-sparse), logged with the next row
            wall, left = time.time() - t_start, cfg["max_iters"] - iter_num - 1
            eta = wall / (iter_num + 1 - start_iter) * left  # evaluations included
            if timed:
                eta = min(eta, (cfg["max_seconds"] - train_seconds) * wall / max(1e-9, train_seconds - checkpoint_seconds))
            say(f"iter {iter_num}/{cfg['max_iters']}: loss {loss.item() * grad_accum:.4f}, {step_ms[-1]:.1f} ms, "
                f"lr {lr:.2e}, eta {duration(max(0.0, eta))}")
        iter_num += 1

    if cfg["wandb_log"] and master and wandb_run is None and iter_num < start_iter + MEMORY_STEPS:  # a short run
        wandb_run = init_wandb(wandb_cfg, master)
        wandb_rows = log_wandb(wandb_run, wandb_rows, say) if wandb_run is not None else []
    if wandb_run is not None:
        try:
            wandb_run.summary.update({"best_val_loss": best_val_loss, "final_ms_per_iter": last_ms, mem_key: mem})
            wandb_run.finish()
        except Exception as e:  # noqa: BLE001
            say(f"warning: wandb finish failed: {e}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
