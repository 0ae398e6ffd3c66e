"""The prepared GPU check: one command, about 2 minutes on one H200 (results/gpu-h200), no downloads.

    python scripts/gpu_check.py OUT_DIR            # on a CUDA machine
    python scripts/gpu_check.py OUT_DIR --smoke    # CPU, tiny sizes, about a minute (CI)

Parts, each wrapped so that a failure is recorded and the next part still runs:
  (a) kernels: pytest on the kernel test files, natively on CUDA (tests/conftest.py picks the
      device), float32 and bfloat16 (tests/test_kernels_device.py is parametrized over both);
  (b) blocks: one block of each attention (dense SDPA, vq, kernel-hashing, adaptive-sparse,
      generative-function; B=1, 6 heads of 64, n_embd 384, knobs of the block's GPU config)
      forward+backward at T = 8k, 32k, 128k: median ms (CUDA events) and peak memory; a size is
      skipped after an OOM at a smaller one, or when its time extrapolated from the smaller size
      (x (T ratio)^2) exceeds the per-item limit;
  (c) training: --max_iters iterations of each config/shakespeare_<block>.py (gpu scale on CUDA)
      through train.py, reading ms/iter, peak memory and the losses from its metrics.jsonl.
Needs data/shakespeare_char prepared beforehand (python prepare_data.py shakespeare_char) under
--workdir (default: the repository); without it part (c) is skipped rather than downloading.
Writes OUT_DIR/results.jsonl (one JSON object per item, with "part") and OUT_DIR/gpu_check.log.
A total time guard (--budget seconds) stops starting new items once spent.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BLOCKS = ["dense", "vq", "kernel-hashing", "adaptive-sparse", "generative-function"]
CONFIG = {"dense": "dense", "vq": "vq", "kernel-hashing": "kernel_hashing", "adaptive-sparse": "adaptive_sparse",
          "generative-function": "generative"}
KERNEL_TESTS = ["tests/test_kernels_device.py", "tests/test_tf32_emulation.py", "tests/test_vq.py",
                "tests/test_adaptive_sparse.py", "tests/test_kernel_hashing.py", "tests/test_generative.py"]
KERNEL_SELECT = "device or tf32 or triton or kernel or tie"  # the kernel tests of the block files
SHAPE_KEYS = {"n_layer", "n_head", "n_embd", "block_size", "dropout", "attention", "vocab_size", "batch_size",
              "max_iters", "lr_decay_iters", "eval_tokens", "gradient_accumulation_steps"}


class Check:
    """Results file, log and the time guard."""

    def __init__(self, out_dir, budget):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.t0, self.budget = out_dir, time.time(), budget
        self.results = open(os.path.join(out_dir, "results.jsonl"), "w")
        self.logf = open(os.path.join(out_dir, "gpu_check.log"), "w")

    def left(self):
        return self.budget - (time.time() - self.t0)

    def log(self, msg):
        line = f"[{time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.logf.write(line + "\n")
        self.logf.flush()

    def record(self, **row):
        row["elapsed_s"] = round(time.time() - self.t0, 2)
        self.results.write(json.dumps(row) + "\n")
        self.results.flush()
        return row


def machine(device):
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "platform": platform.platform()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1))
    return info


# ------------------------------------------------------------------------------------- (a) kernels
def part_kernels(ck, args):
    if ck.left() < 60:
        return ck.record(part="kernels", status="skipped", reason="time budget spent")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS, "-k", KERNEL_SELECT,
           f"--junitxml={os.path.join(ck.out_dir, 'kernel_tests.xml')}"]
    workers = kernel_workers(args.kernel_workers)
    if workers > 1:  # Triton compiles on the host, one kernel at a time per process: spread the files' tests
        cmd += ["-n", str(workers)]
    ck.log(f"kernel tests: {workers} pytest process(es)")
    t = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=min(args.kernel_timeout, ck.left()))
        out, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    with open(os.path.join(ck.out_dir, "kernel_tests.log"), "w") as f:
        f.write(out)
    counts = junit_counts(os.path.join(ck.out_dir, "kernel_tests.xml"))
    ck.log(f"kernel tests: rc {rc}, {counts} in {time.time() - t:.0f}s")
    return ck.record(part="kernels", status="ok" if rc == 0 else "failed", rc=rc, counts=counts,
                     seconds=round(time.time() - t, 1), tail=out[-1500:] if rc != 0 else "")


def junit_counts(path):
    """{tests, failures, errors, skipped} summed over the test suites of a JUnit XML file ({} if unreadable).
    Read from the XML rather than pytest's last line, which plugin warnings can push out of reach."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def kernel_workers(asked):
    """Processes for the kernel tests: `asked`, or min(8, cores) where pytest-xdist is installed (-1), else 1."""
    import importlib.util
    if asked == 0 or importlib.util.find_spec("xdist") is None:
        return 1
    return asked if asked > 0 else max(1, min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------- (b) blocks
def gpu_knobs(name, scale):
    """GPTConfig fields of the block's config (top level, then scales[scale]), shape keys left out;
    the long_<block> config where there is one (it is tuned for long sequences)."""
    from dataclasses import fields

    from model import GPTConfig
    base = CONFIG[name]
    path = os.path.join(ROOT, "config", f"long_{base}.py")
    if not os.path.exists(path):
        path = os.path.join(ROOT, "config", f"shakespeare_{base}.py")
    import configurator
    ns = configurator.exec_config(path)
    allowed = {f.name for f in fields(GPTConfig)} - SHAPE_KEYS
    knobs = {k: v for k, v in ns.items() if k in allowed}
    knobs.update({k: v for k, v in ns.get("scales", {}).get(scale, {}).items() if k in allowed})
    return knobs, os.path.relpath(path, ROOT)


def block_step(name, T, device, scale):
    """(step, dtype): step() runs one fwd+bwd, from fresh gradients, of one block of the attention at T
    (B=1, 6 heads of 64, n_embd 384, the knobs of gpu_knobs), on a fixed random input."""
    import torch

    import bench
    from model import ATTENTION, GPTConfig
    knobs, _ = gpu_knobs(name, scale)
    torch.manual_seed(0)
    cfg = GPTConfig(**{**knobs, "n_embd": 384, "n_head": 6, "block_size": T, "attention": name, "dropout": 0.0})
    module = ATTENTION[name](cfg).to(device).train()
    x = torch.randn(1, T, cfg.n_embd, device=device, requires_grad=True)
    leaves = [x] + [p for p in module.parameters() if p.requires_grad]
    ctx, dtype = bench.autocast_context(torch.device(device).type, "auto")

    def step():
        for t in leaves:
            t.grad = None
        with ctx:
            loss = module(x).float().pow(2).mean()
        loss.backward()
    return step, dtype


def time_block(name, T, device, scale, repeats, item_limit):
    """(median ms, peak MiB, runs) of one fwd+bwd of the block at T."""
    import torch

    import bench
    step, dtype = block_step(name, T, device, scale)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.time()
    first = bench.timed(step, torch.device(device).type)  # warm-up (Triton compiles here)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
    times, spent = [], time.time() - t
    while len(times) < repeats and (not times or spent + (sum(times) / len(times)) / 1000 < item_limit):
        times.append(bench.timed(step, torch.device(device).type))
        spent = time.time() - t
    del step
    return statistics.median(times) if times else first, peak, len(times), dtype


def part_blocks(ck, args, device, scale):
    import torch

    import bench
    for name in BLOCKS:
        prev = None  # (T, ms) of the last size that ran
        for T in args.T:
            item = dict(part="blocks", attention=name, T=T, B=1, n_head=6, head_dim=64)
            if ck.left() < 20:
                ck.record(**item, status="skipped", reason="time budget spent")
                continue
            if prev == "oom":
                ck.record(**item, status="skipped", reason="OOM at a smaller T")
                continue
            if prev is not None and prev[1] / 1000 * (T / prev[0]) ** 2 > args.item_limit:
                ck.record(**item, status="skipped", reason=f"extrapolated time over the {args.item_limit}s item limit")
                continue
            try:
                ms, peak, runs, dtype = time_block(name, T, device, scale, args.repeats, args.item_limit)
                prev = (T, ms)
                row = ck.record(**item, status="ok", ms=round(ms, 3), peak_mib=None if peak is None else round(peak, 1),
                                runs=runs, dtype=dtype, knobs_from=gpu_knobs(name, scale)[1])
                ck.log(f"block {name} T={T}: {ms:.2f} ms, peak {row['peak_mib']} MiB ({runs} runs, {dtype})")
            except Exception as e:  # noqa: BLE001 - one failure must not stop the rest
                oom = bench.is_oom(e) or type(e).__name__ == "OutOfMemoryError"
                prev = "oom" if oom else prev
                ck.record(**item, status="oom" if oom else "error", error=bench.error_note(e),
                          traceback=None if oom else traceback.format_exc()[-1500:])
                ck.log(f"block {name} T={T}: {'OOM' if oom else 'ERROR ' + bench.error_note(e)}")
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------- (c) training
def part_train(ck, args, device):
    data = os.path.join(args.workdir, "data", "shakespeare_char", "meta.json")
    if not os.path.exists(data):
        ck.log(f"training: {data} missing (run: python prepare_data.py shakespeare_char); skipped")
        return ck.record(part="train", status="skipped", reason=f"{data} missing: prepare it beforehand")
    n = args.iters
    for name in BLOCKS:
        base = CONFIG[name]
        item = dict(part="train", attention=name, config=f"config/shakespeare_{base}.py", iters=n)
        if ck.left() < 20:
            ck.record(**item, status="skipped", reason="time budget spent")
            continue
        out = os.path.join(os.path.abspath(ck.out_dir), f"train-{base}")
        cmd = [sys.executable, "-m", "train", os.path.join(ROOT, "config", f"shakespeare_{base}.py"),
               f"--max_iters={n}", f"--lr_decay_iters={n}", f"--eval_interval={n}", f"--out_dir={out}"]
        if args.smoke:  # the cpu-scale model, made small enough for CI: one layer, batches of 2
            cmd += ["--n_layer=1", "--batch_size=2", "--eval_tokens=4096"]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "WANDB_MODE": "disabled"}
        env.pop("TRITON_INTERPRET", None)
        t = time.time()
        try:
            r = subprocess.run(cmd, cwd=args.workdir, env=env, capture_output=True, text=True,
                               timeout=max(10, min(args.train_timeout, ck.left())))
            rc, text = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired:
            rc, text = "timeout", ""
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "stdout.log"), "w") as f:
            f.write(text)
        rows = []
        if os.path.exists(os.path.join(out, "metrics.jsonl")):
            rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
        last = rows[-1] if rows else {}
        mem = {k: v for k, v in last.items() if "mem" in k.lower()}
        losses = {k: v for k, v in last.items() if k.endswith("loss")}
        status = "ok" if rc == 0 and rows else "failed"
        ck.record(**item, status=status, rc=rc, seconds=round(time.time() - t, 1), ms_per_iter=last.get("ms_per_iter"),
                  **mem, **losses, final_iter=last.get("iter"), tail="" if status == "ok" else text[-1500:])
        ck.log(f"train {name}: {status}, {last.get('ms_per_iter')} ms/iter, {mem}, {losses} ({time.time() - t:.0f}s)")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--smoke", action="store_true", help="CPU, T=256, 10 iterations at cpu scale (1 layer, batch 2, 4096 evaluation tokens), no kernel tests")
    p.add_argument("--T", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="block sequence lengths (default 8192,32768,131072; smoke 256)")
    p.add_argument("--iters", type=int, default=None, help="training iterations per config (default 60; smoke 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed block runs per size (median)")
    p.add_argument("--item_limit", type=float, default=45.0, help="seconds one block size may take")
    p.add_argument("--budget", type=float, default=None, help="total seconds (default 470; smoke 300)")
    p.add_argument("--kernel_timeout", type=float, default=150.0)
    p.add_argument("--kernel_workers", type=int, default=-1,
                   help="pytest-xdist processes for the kernel tests (-1: min(8, cores) when xdist is installed; 0: one)")
    p.add_argument("--train_timeout", type=float, default=90.0)
    p.add_argument("--parts", default="kernels,blocks,train")
    p.add_argument("--workdir", default=ROOT, help="directory holding data/shakespeare_char")
    a = p.parse_args(argv)
    a.T = a.T or ([256] if a.smoke else [8192, 32768, 131072])
    a.iters = a.iters or (10 if a.smoke else 60)
    a.budget = a.budget or (300.0 if a.smoke else 470.0)
    if a.smoke:
        a.repeats = min(a.repeats, 2)
        a.parts = ",".join(x for x in a.parts.split(",") if x != "kernels")
    return a


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ck = Check(args.out_dir, args.budget)
    import torch
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    scale = "gpu" if device == "cuda" else "cpu"
    info = machine(device)
    ck.record(part="machine", **info, smoke=args.smoke, argv=sys.argv[1:] if argv is None else argv)
    ck.log(f"gpu_check on {info.get('gpu', 'cpu')}: torch {info['torch']}, triton {info['triton']}")
    if device == "cpu" and not args.smoke:
        ck.log("no CUDA device: running the CPU sizes anyway would take hours; use --smoke")
        ck.record(part="machine", status="no-cuda")
        return 2
    parts = {"kernels": lambda: part_kernels(ck, args), "blocks": lambda: part_blocks(ck, args, device, scale),
             "train": lambda: part_train(ck, args, device)}
    failed = []
    for name in args.parts.split(","):
        try:
            parts[name]()
        except Exception as e:  # noqa: BLE001 - the other parts still run
            failed.append(name)
            ck.record(part=name, status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
            ck.log(f"part {name} raised {type(e).__name__}: {e}")
    ck.log(f"done in {time.time() - ck.t0:.0f}s; results in {os.path.join(args.out_dir, 'results.jsonl')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
