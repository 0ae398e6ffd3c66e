"""
Cost against sequence length: forward+backward time and peak memory of every token-mixing block.

    python bench.py                                   # every registered attention, one block, T = 256..32k
    python bench.py --attention=dense,vq --what=block,model --T=1024,4096 --repeats=3
    python bench.py --what=model --readme=True        # also refresh README.md's bench_model section
    python bench.py --config=long --what=block,model --T=4096,8192,32768   # the long-context knobs and shape

what=block times the token-mixing module alone, ATTENTION[name](cfg) with n_embd=256, n_head=4,
block_size=T and the block knobs of its CPU config (config/shakespeare_<name>.py, scales['cpu']),
on a (1, T, 256) input that requires grad, loss y.float().pow(2).mean(). what=model times the whole
GPT (4 layers, 4 heads, 256 embd, vocab 256) on random tokens with cross-entropy (+ aux loss).
Backward always reaches the input and every parameter. With --config=long the knobs come from
config/long_<name>.py and the shape (n_embd, n_head, n_layer) from those files too, so each block is
timed exactly as compare.py --preset=long trains it.

Method. Per T, all attentions are measured in one process and interleaved (round-robin over
attentions, one fwd+bwd each), so machine drift hits all of them alike and the ratios vs dense are
trustworthy. Each case gets `warmup` untimed runs, then between 1 and `repeats` timed runs, no new
ones once `max_case_seconds` of timed runs are spent; we report the median.
- CUDA: CUDA events around each run; the blocks use their Triton kernels; peak memory is
  torch.cuda.max_memory_allocated during the (first) warm-up run minus the memory allocated before it.
- CPU: wall clock (time.perf_counter). Peak memory is measured in a fresh child process per
  (attention, T): build the case (after a small-T warm-up that triggers lazy library setup), reset
  the kernel's resident-set high-water mark (/proc/self/clear_refs), run one fwd+bwd and report VmHWM
  minus the resident set just before the run. The child runs with MALLOC_MMAP_THRESHOLD_ fixed at
  128 KiB so every large tensor is mmapped and returned on free (RSS follows live tensors) and with
  RLIMIT_AS capped at the free memory, so a case that does not fit fails as "OOM" in the child
  instead of invoking the kernel's OOM killer. The child doubles as a safety probe before timing
  (--mem=False skips it: faster, but no memory column and no protection against a size that does
  not fit).
Sizes are skipped (and say so) when an earlier size hit OOM or when the peak memory extrapolated
from the smaller sizes exceeds mem_fraction (80%) of the free memory. The exponent is the least-squares slope of
log time (and log memory) against log T over the sizes in [fit_lo, fit_hi] that ran.

Writes <out>/bench_<what>.csv, .md (with machine facts and the exact command) and .png (log-log
time and memory against T, with reference slopes T and T^2). Usable from other scripts:
time_case(), measure_memory_cpu(), run(), fit_exponent().
"""

import csv
import datetime
import gc
import io
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import torch

import configurator
from model import ATTENTION, GPT, GPTConfig

# -----------------------------------------------------------------------------
# defaults, each overridable by --key=value
attention = "all"  # comma-separated names from model.ATTENTION, or 'all'
what = "block"  # 'block', 'model' or 'block,model'
T = "256,1024,4096,8192,16384,32768"  # sequence lengths, comma-separated
repeats = 5  # at most this many timed runs per case (at least 1)
warmup = 1  # untimed runs per case before timing
max_case_seconds = 20.0  # no new timed run once a case has spent this long in timed runs
device = "auto"  # auto (cuda if available), cpu or cuda
dtype = "auto"  # auto: bfloat16 autocast on CUDA where supported (as train.py), else float32
mem = True  # CPU: measure peak memory in a child process per case (False: skip, faster)
threads = 0  # torch intra-op threads; 0 keeps torch's default (one per core)
fit_lo = 4096  # exponent fit range (inclusive), in tokens
fit_hi = 32768
mem_fraction = 0.8  # skip a size whose extrapolated peak memory exceeds this fraction of free memory
config = "shakespeare"  # knobs from config/<config>_<block>.py; 'long' also takes the model shape from those files
out = "bench_results"
readme = False  # also replace the bench_<what> section of readme_path
readme_path = "README.md"
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
N_EMBD, N_HEAD, N_LAYER, VOCAB = 256, 4, 4, 256  # the benchmark model shape (fixed by the issue)
CONFIG_NAME = {"generative-function": "generative"}  # attention name -> config/shakespeare_<this>.py
NOT_KNOBS = {"n_layer", "n_head", "n_embd", "block_size", "dropout", "attention", "vocab_size"}
HERE = os.path.dirname(os.path.abspath(__file__))


class BenchError(Exception):
    """Bad input; main() turns it into a one-line message and exit code 2."""


# -----------------------------------------------------------------------------
# building and timing one case


def config_path(name, family=None):
    block = CONFIG_NAME.get(name, name.replace('-', '_'))
    return os.path.join(HERE, "config", f"{family or config}_{block}.py")


def _config_values(name, family=None):
    """GPTConfig fields set by config/<family>_<block>.py (top level, then scales['cpu']); {} without a file."""
    path = config_path(name, family)
    if not os.path.exists(path):
        return {}
    ns = configurator.exec_config(path)
    allowed = {f.name for f in fields(GPTConfig)}
    vals = {k: v for k, v in ns.items() if k in allowed}
    vals.update({k: v for k, v in ns.get("scales", {}).get("cpu", {}).items() if k in allowed})
    return vals


def config_knobs(name, family=None):
    """The block's knobs from its CPU config, without the model shape; {} when it has no config file."""
    return {k: v for k, v in _config_values(name, family).items() if k not in NOT_KNOBS}


def bench_shape(name, family=None):
    """(n_embd, n_head, n_layer): the fixed benchmark shape for the shakespeare family, the config
    file's own shape for any other (so a long-context block is timed at the shape it was trained)."""
    if (family or config) == "shakespeare":
        return N_EMBD, N_HEAD, N_LAYER
    v = _config_values(name, family)
    return v.get("n_embd", N_EMBD), v.get("n_head", N_HEAD), v.get("n_layer", N_LAYER)


def bench_config(name, what, T, knobs, family=None):
    """The GPTConfig a case is built from: the benchmark shape over the block's knobs."""
    n_embd, n_head, n_layer = bench_shape(name, family)
    shape = dict(n_embd=n_embd, n_head=n_head, block_size=T, attention=name, dropout=0.0)
    if what == "model":
        shape.update(n_layer=n_layer, vocab_size=VOCAB)
    return GPTConfig(**{**knobs, **shape})


def autocast_context(device_type, dtype_name):
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype_name == "float32":
        return nullcontext(), dtype_name
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype_name)), dtype_name


def make_case(name, what, T, device="cpu", dtype_name="auto"):
    """Builds one case. Returns (step, info): step() runs one forward+backward from fresh gradients."""
    torch.manual_seed(seed)
    knobs = config_knobs(name)
    cfg = bench_config(name, what, T, knobs)
    if what == "block":
        module = ATTENTION[name](cfg).to(device).train()
        x = torch.randn(1, T, cfg.n_embd, device=device, requires_grad=True)
        leaves = [x]
        loss_fn = lambda: module(x).float().pow(2).mean()  # noqa: E731
    else:
        module = GPT(cfg).to(device).train()
        idx = torch.randint(0, cfg.vocab_size, (1, T), device=device)
        targets = torch.randint(0, cfg.vocab_size, (1, T), device=device)
        leaves = []
        loss_fn = lambda: module(idx, targets)[1]  # noqa: E731
    leaves += [p for p in module.parameters() if p.requires_grad]
    ctx, dtype_name = autocast_context(torch.device(device).type, dtype_name)
    commits = [m for m in module.modules() if hasattr(m, "commit_codebook_update")]

    def step():
        for t in leaves:
            t.grad = None  # each run allocates its gradients, as a training step does
        with ctx:
            loss = loss_fn()
        loss.backward()
        for m in commits:  # part of a training step: vq's EMA codebook update
            m.commit_codebook_update()

    # blocks that report the work of their last forward (adaptive-sparse: kept blocks, pairs attended)
    workers = [m for m in module.modules() if hasattr(m, "work_stats")]
    return step, {"n_params": sum(p.numel() for p in module.parameters()), "dtype": dtype_name, "knobs": knobs,
                  "work": (lambda: work_of(workers)) if workers else None}


def work_of(modules):
    """The last forward's kept blocks per query block and fraction of causal pairs attended, averaged
    over the modules (the layers of a model) that report them; {} when none has run."""
    stats = [m.work_stats() for m in modules]
    stats = [st for st in stats if st]
    if not stats:
        return {}
    return {k: statistics.fmean(st[k] for st in stats) for k in ("kept_per_block", "frac_pairs")}


def timed(step, device_type):
    """Milliseconds of one step()."""
    if device_type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1000


def is_oom(e):
    text = str(e).lower()
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text))


def error_note(e):
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"


# -----------------------------------------------------------------------------
# CPU peak memory, in a child process per case


def _proc_status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def mem_available_mib():
    """Memory a new case may use on this machine: MemAvailable of /proc/meminfo, in MiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def _probe(name, what, T, dtype_name, limit_mib=None):
    """Child side of measure_memory_cpu: prints one JSON line."""
    res = {"status": "ok", "peak_mem_mib": None, "mem_method": None, "note": ""}
    try:
        small = min(T, 128)  # trigger lazy library setup (thread pools, kernels) at a small size
        step, _ = make_case(name, what, small, "cpu", dtype_name)
        step()
        del step
        gc.collect()
        step, _ = make_case(name, what, T, "cpu", dtype_name)
        gc.collect()
        vm = _proc_status_kib("VmSize")
        budget_mib = mem_available_mib() * 0.95 if limit_mib is None else limit_mib
        limit = int((vm + budget_mib * 1024) * 1024)  # address space now + the budget, in bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            method, read_peak = "child VmHWM", lambda: _proc_status_kib("VmHWM")
        except OSError:  # no clear_refs: the process-wide maximum, an upper bound
            method, read_peak = "child ru_maxrss", lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        base = _proc_status_kib("VmRSS")
        step()
        res.update(peak_mem_mib=max(0, read_peak() - base) / 1024, mem_method=method)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which carries on
        res.update(status="oom" if is_oom(e) else "error", note=error_note(e))
    print("PROBE " + json.dumps(res), flush=True)


def measure_memory_cpu(name, what, T, dtype_name="auto", timeout=3600, limit_mib=None):
    """Peak resident memory increase (MiB) of one fwd+bwd, measured in a fresh child process
    whose new allocations may total limit_mib (default: 95% of the free memory).
    Returns {status: ok|oom|error|timeout, peak_mem_mib, mem_method, note}."""
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import bench; bench.seed = {seed!r}; "
            f"bench.config = {config!r}; bench.torch.set_num_threads({torch.get_num_threads()}); "  # as many threads as this process
            f"bench._probe({name!r}, {what!r}, {int(T)}, {dtype_name!r}, {limit_mib!r})")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "peak_mem_mib": None, "mem_method": None, "note": f"probe > {timeout} s"}
    for line in r.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    died = f"child exited with {r.returncode}" + (" (killed: out of memory?)" if r.returncode < 0 else "")
    last = (r.stderr.strip().splitlines() or [""])[-1][:200]
    return {"status": "oom" if r.returncode == -9 else "error", "peak_mem_mib": None, "mem_method": None,
            "note": f"{died}; {last}".rstrip("; ")}


# -----------------------------------------------------------------------------
# the measurement loop


def _row(name, what, T, device, **kw):
    row = dict(what=what, attention=name, T=T, device=device, dtype="", status="ok", ms=None, ms_min=None,
               repeats=0, ratio_vs_dense=None, peak_mem_mib=None, mem_method="", note="", n_params=None, knobs="",
               kept_per_block=None, frac_pairs=None)
    row.update(kw)
    return row


def _extrapolate(history, T):
    """Peak memory at T from the measured (T, MiB) points: the local power law of the last two
    points (exponent clamped to [1, 3]); linear from a single point; None without points."""
    pts = [(t, m) for t, m in history if m and m > 0]
    if not pts:
        return None
    if len(pts) == 1:
        return pts[0][1] * T / pts[0][0]
    (t0, m0), (t1, m1) = pts[-2], pts[-1]
    k = min(3.0, max(1.0, math.log(m1 / m0) / math.log(t1 / t0))) if t1 != t0 else 1.0
    return m1 * (T / t1) ** k


def run(names, what, Ts, device="cpu", repeats=5, warmup=1, max_seconds=20.0, dtype_name="auto",
        measure_mem=True, log=lambda msg: print(msg, flush=True)):
    """Measures every (attention, T); returns one row dict per pair (see _row for the keys)."""
    device_type = torch.device(device).type
    rows, oom_at, mem_hist = {}, {}, {n: [] for n in names}
    for T in sorted(Ts):
        # 1. decide who runs at this T: skip after an OOM or when the memory estimate does not fit
        runnable = []
        for name in names:
            free = (torch.cuda.mem_get_info()[0] / 2**20 if device_type == "cuda" else mem_available_mib())
            est = _extrapolate(mem_hist[name], T)
            if name in oom_at:
                rows[name, T] = _row(name, what, T, device, status="skipped", note=f"OOM at T={oom_at[name]}")
            elif est is not None and est > mem_fraction * free:
                rows[name, T] = _row(name, what, T, device, status="skipped",
                                      note=f"est. {est:.0f} MiB > {mem_fraction:.0%} of {free:.0f} MiB free")
            else:
                runnable.append(name)
        log(f"{what} T={T}: measuring {', '.join(runnable) or 'nothing'}")
        # 2. CPU: the child probe measures peak memory and tells whether the case fits at all
        if device_type == "cpu" and measure_mem:
            for name in list(runnable):
                p = measure_memory_cpu(name, what, T, dtype_name)
                rows[name, T] = _row(name, what, T, device, status=p["status"], peak_mem_mib=p["peak_mem_mib"],
                                      mem_method=p["mem_method"] or "", note=p["note"])
                if p["status"] != "ok":
                    runnable.remove(name)
                    oom_at.update({name: T} if p["status"] == "oom" else {})
                    log(f"{what} T={T} {name}: {p['status']} in the memory probe: {p['note']}")
                else:
                    mem_hist[name].append((T, p["peak_mem_mib"]))
        # 3. build and warm up the cases, then interleave timed runs round-robin
        cases, works = {}, {}
        for name in runnable:
            row = rows.get((name, T)) or _row(name, what, T, device)
            rows[name, T] = row
            try:
                step, info = make_case(name, what, T, device, dtype_name)
                row.update(dtype=info["dtype"], n_params=info["n_params"], knobs=json.dumps(info["knobs"]))
                if device_type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                for _ in range(max(warmup, device_type == "cuda")):  # CUDA: memory is read off a warm-up run
                    step()
                if device_type == "cuda":
                    torch.cuda.synchronize()
                    row.update(peak_mem_mib=(torch.cuda.max_memory_allocated() - base) / 2**20,
                               mem_method="cuda max_memory_allocated")
                    mem_hist[name].append((T, row["peak_mem_mib"]))
                cases[name] = (step, [])
                works[name] = info["work"]
            except Exception as e:  # noqa: BLE001 - one failing block must not stop the others
                row.update(status="oom" if is_oom(e) else "error", note=error_note(e))
                oom_at.update({name: T} if row["status"] == "oom" else {})
                log(f"{what} T={T} {name}: {row['status']}: {row['note']}")
                if device_type == "cuda":
                    torch.cuda.empty_cache()
        while True:
            todo = [n for n, (_, ts) in cases.items()
                    if len(ts) < repeats and (not ts or sum(ts) < 1000 * max_seconds)]
            if not todo:
                break
            for name in todo:
                step, ts = cases[name]
                try:
                    ts.append(timed(step, device_type))
                except Exception as e:  # noqa: BLE001
                    rows[name, T].update(status="oom" if is_oom(e) else "error", note=error_note(e))
                    oom_at.update({name: T} if rows[name, T]["status"] == "oom" else {})
                    log(f"{what} T={T} {name}: {rows[name, T]['status']}: {rows[name, T]['note']}")
                    del cases[name]
                    if device_type == "cuda":
                        torch.cuda.empty_cache()
        for name, (_, ts) in cases.items():
            row = rows[name, T]
            row.update(ms=statistics.median(ts), ms_min=min(ts), repeats=len(ts))
            if works.get(name) is not None:  # the work of the last timed forward
                row.update(works[name]())
            mem_txt = f", peak +{row['peak_mem_mib']:.1f} MiB" if row["peak_mem_mib"] is not None else ""
            log(f"{what} T={T} {name}: {row['ms']:.2f} ms (median of {len(ts)}){mem_txt}")
        del cases
        gc.collect()
        if device_type == "cuda":
            torch.cuda.empty_cache()
        dense = rows.get(("dense", T))
        for name in names:
            r = rows[name, T]
            if r["ms"] is not None and dense is not None and dense["ms"]:
                r["ratio_vs_dense"] = r["ms"] / dense["ms"]
    out_rows = [rows[n, t] for n in names for t in sorted(Ts)]
    for name in names:  # the exponents, repeated on each of the attention's rows
        mine = [r for r in out_rows if r["attention"] == name]
        for key, col in (("ms", "time_exponent"), ("peak_mem_mib", "mem_exponent")):
            e = fit_exponent([r["T"] for r in mine], [r[key] for r in mine], fit_lo, fit_hi)
            for r in mine:
                r[col] = e
    return out_rows


def time_case(name, what="block", T=1024, device="cpu", repeats=5, warmup=1, max_seconds=20.0,
              dtype_name="auto", memory=True):
    """One (attention, T) case: median fwd+bwd ms and peak memory, as a row dict."""
    return run([name], what, [T], device, repeats, warmup, max_seconds, dtype_name, memory,
               log=lambda *a: None)[0]


def fit_exponent(Ts, values, lo=4096, hi=32768):
    """Least-squares slope of log(value) against log(T) over lo <= T <= hi; None with < 2 points."""
    pts = [(math.log(t), math.log(v)) for t, v in zip(Ts, values) if lo <= t <= hi and v is not None and v > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


# -----------------------------------------------------------------------------
# reports


def machine_facts(device):
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    facts = {"cpu": cpu, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
             "RAM": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
             "torch": torch.__version__, "device": device,
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.startswith("cuda"):
        import triton
        facts.update(gpu=torch.cuda.get_device_name(0), triton=triton.__version__)
    return facts


def _num(x):
    """Three significant digits or more, never scientific notation."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _cell_time(r):
    if r["status"] != "ok" or r["ms"] is None:
        return r["status"]
    parts = [f"{r['ratio_vs_dense']:.2f}x"] if r["ratio_vs_dense"] is not None else []
    if r.get("kept_per_block") is not None:  # the work behind the time (adaptive-sparse)
        parts.append(f"kept {r['kept_per_block']:.1f}/qblk, {100 * r['frac_pairs']:.1f}% pairs")
    return _num(r["ms"]) + (f" ({'; '.join(parts)})" if parts else "")


def _cell_mem(r):
    if r["status"] != "ok":
        return r["status"]
    return "-" if r["peak_mem_mib"] is None else _num(r["peak_mem_mib"])


def _fmt_exp(e):
    return "-" if e is None else f"{e:.2f}"


def markdown_tables(rows):
    """Time table (ms, ratio vs dense) and peak memory table (MiB), one row per attention."""
    names = list(dict.fromkeys(r["attention"] for r in rows))
    Ts = sorted({r["T"] for r in rows})
    by = {(r["attention"], r["T"]): r for r in rows}
    head = "| attention | " + " | ".join(f"T={t}" for t in Ts) + f" | exponent ({fit_lo}-{fit_hi}) |"
    rule = "|---|" + "---:|" * (len(Ts) + 1)
    work = ("; for blocks that select, the timed forward's mean kept blocks per query block and % of the causal "
            "(query, key) pairs attended" if any(r.get("kept_per_block") is not None for r in rows) else "")
    lines = [f"Forward+backward time, ms (ratio vs dense at the same T{work}):", "", head, rule]
    lines += [f"| {n} | " + " | ".join(_cell_time(by[n, t]) for t in Ts) + f" | {_fmt_exp(by[n, Ts[0]]['time_exponent'])} |"
              for n in names]
    if any(r["peak_mem_mib"] is not None for r in rows):
        lines += ["", "Peak memory of one forward+backward, MiB above the memory held before it:", "", head, rule]
        lines += [f"| {n} | " + " | ".join(_cell_mem(by[n, t]) for t in Ts)
                  + f" | {_fmt_exp(by[n, Ts[0]]['mem_exponent'])} |" for n in names]
    else:
        lines += ["", "Peak memory: not measured (--mem=False)."]
    notes = [f"- {r['attention']} at T={r['T']}: {r['status']}: {r['note']}" for r in rows if r["status"] != "ok"]
    if notes:
        lines += ["", "Not measured:", *notes]
    return "\n".join(lines)


def command_line(argv):
    return "python bench.py" + ("" if not argv else " " + shlex.join(argv))


CSV_COLUMNS = ["what", "attention", "T", "device", "dtype", "status", "ms", "ms_min", "repeats", "ratio_vs_dense",
               "peak_mem_mib", "mem_method", "time_exponent", "mem_exponent", "n_params", "knobs", "kept_per_block",
               "frac_pairs", "note"]


def write_reports(rows, what, out_dir, argv, device):
    """<out>/bench_<what>.csv, .md and .png. Returns (markdown section for README, paths)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"bench_{what}")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    configurator.write_atomic(base + ".csv", buf.getvalue())

    facts = machine_facts(device)
    facts["dtype"] = next((r["dtype"] for r in rows if r["dtype"]), "-")
    machine = ", ".join(f"{k}: {v}" for k, v in facts.items())
    tables = markdown_tables(rows)
    cmd = command_line(argv)
    section = f"{tables}\n\nCommand: `{cmd}`\n\nMachine: {machine}\n"
    shapes = sorted({bench_shape(r["attention"]) for r in rows})
    shape = "; ".join(f"n_embd={e}, n_head={h}" + (f", {nl} layers" if what != "block" else "") for e, h, nl in shapes)
    what_text = (f"one token-mixing block ({shape}, batch 1)" if what == "block" else
                 f"the full GPT ({shape}, vocab {VOCAB}, batch 1)")
    knob_lines = [f"- {n}: {next((r['knobs'] for r in rows if r['attention'] == n and r['knobs']), '{}') or '{}'}"
                  for n in dict.fromkeys(r["attention"] for r in rows)]
    md = "\n".join([
        f"# bench_{what}: forward+backward cost against sequence length", "",
        f"Measured: {what_text}; {'CUDA events' if device.startswith('cuda') else 'wall clock'}, "
        f"median of up to {repeats} timed runs after {warmup} warm-up run(s), at most ~{max_case_seconds:g} s per case; "
        "attentions interleaved per T. Peak memory: "
        + ("torch.cuda.max_memory_allocated minus the memory allocated before the run." if device.startswith("cuda")
           else "resident-set high-water mark of one fwd+bwd in a fresh child process, minus its resident set "
                "before the run (see bench.py's docstring).")
        + f" Exponent: least-squares slope of log value against log T over {fit_lo} <= T <= {fit_hi}.", "",
        "## Machine", "", *[f"- {k}: {v}" for k, v in facts.items()], f"- command: `{cmd}`", "",
        "## Results", "", tables, "",
        "## Block knobs (from each attention's CPU config)", "", *knob_lines, ""])
    configurator.write_atomic(base + ".md", md)
    write_plot(rows, what, base + ".png", device)
    return section, [base + ".csv", base + ".md", base + ".png"]


def write_plot(rows, what, path, device):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(dict.fromkeys(r["attention"] for r in rows))
    for ax, key, label in ((axes[0], "ms", "forward+backward time (ms)"), (axes[1], "peak_mem_mib", "peak memory (MiB)")):
        curves = {}
        for n in names:
            pts = [(r["T"], r[key]) for r in rows if r["attention"] == n and r["status"] == "ok" and r[key]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=n)
                curves[n] = pts
        if curves:  # reference slopes through dense (or the first curve), from the start of the fit range
            pts = curves.get("dense") or next(iter(curves.values()))
            t1 = max(t for c in curves.values() for t, _ in c)
            t0, y0 = min([p for p in pts if fit_lo <= p[0] < t1] or pts)
            for k, style, lab in ((1, ":", r"$\propto T$"), (2, "--", r"$\propto T^2$")):
                ax.plot([t0, t1], [y0, y0 * (t1 / t0) ** k], style, color="black", alpha=0.5, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bench_{what} on {device}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    configurator.write_atomic(path, buf.getvalue())


def replace_readme_section(path, what, section, prefix="bench"):
    """Replace the text between the <prefix>_<what> markers of path (atomically)."""
    begin, end = f"<!-- BEGIN {prefix}_{what} -->", f"<!-- END {prefix}_{what} -->"
    text = open(path).read()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise BenchError(f"{path} has no '{begin}' ... '{end}' markers")
    configurator.write_atomic(path, text[:i + len(begin)] + "\n" + section + text[j:])


# -----------------------------------------------------------------------------
# command line


def parse_args(argv):
    """--key=value flags over the module defaults; raises BenchError on anything wrong."""
    cfg = dict(DEFAULTS)
    for arg in argv:
        if not arg.startswith("--"):
            raise BenchError(f"unexpected argument {arg!r}; flags look like --key=value")
        key, eq, raw = arg[2:].partition("=")
        if key not in DEFAULTS:
            raise BenchError(f"unknown flag --{key}; valid: " + ", ".join(f"--{k}" for k in DEFAULTS))
        default = DEFAULTS[key]
        if not eq and not isinstance(default, bool):
            raise BenchError(f"flag --{key} needs a value: --{key}=...")
        if isinstance(default, bool):
            low = raw.lower() if eq else "true"
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise BenchError(f"--{key} must be True or False, got {raw!r}")
            cfg[key] = low in ("true", "1", "yes")
        elif isinstance(default, (int, float)):
            try:
                cfg[key] = type(default)(raw)
            except ValueError:
                raise BenchError(f"--{key} must be {type(default).__name__}, got {raw!r}") from None
        else:
            cfg[key] = raw
    # checks and derived values
    valid = list(ATTENTION)
    names = valid if cfg["attention"] == "all" else [n.strip() for n in cfg["attention"].split(",") if n.strip()]
    bad = [n for n in names if n not in ATTENTION]
    if bad or not names:
        raise BenchError(f"unknown attention {', '.join(bad) or repr(cfg['attention'])}; valid: {', '.join(valid)} or all")
    whats = [w.strip() for w in cfg["what"].split(",") if w.strip()]
    if not whats or any(w not in ("block", "model") for w in whats):
        raise BenchError(f"--what must be block, model or block,model, got {cfg['what']!r}")
    try:
        Ts = sorted({int(t) for t in str(cfg["T"]).split(",") if t.strip()})
    except ValueError:
        Ts = []
    if not Ts or Ts[0] < 1:
        raise BenchError(f"--T must be comma-separated positive integers, got {cfg['T']!r}")
    if cfg["repeats"] < 1 or cfg["warmup"] < 0 or cfg["max_case_seconds"] <= 0 or cfg["threads"] < 0:
        raise BenchError("need --repeats >= 1, --warmup >= 0, --max_case_seconds > 0 and --threads >= 0")
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    elif cfg["device"] not in ("cpu", "cuda"):
        raise BenchError(f"--device must be auto, cpu or cuda, got {cfg['device']!r}")
    elif cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device=cuda but no CUDA device is available")
    if cfg["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise BenchError(f"--dtype must be auto, float32, bfloat16 or float16, got {cfg['dtype']!r}")
    if not 0 < cfg["mem_fraction"] <= 1:
        raise BenchError("--mem_fraction must be in (0, 1]")
    if cfg["readme"]:  # fail before measuring, not after
        if not os.path.exists(cfg["readme_path"]):
            raise BenchError(f"--readme: {cfg['readme_path']} not found")
        text = open(cfg["readme_path"]).read()
        for w in whats:
            b, e = f"<!-- BEGIN bench_{w} -->", f"<!-- END bench_{w} -->"
            if b not in text or e not in text or text.find(e) < text.find(b):
                raise BenchError(f"{cfg['readme_path']} has no '{b}' ... '{e}' markers")
    return cfg, names, whats, Ts


def main(argv):
    configurator.help_if_asked(argv, DEFAULTS)
    try:
        cfg, names, whats, Ts = parse_args(argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    globals().update(cfg)  # the module-level settings the helpers read (seed, fit range, ...)
    if threads:
        torch.set_num_threads(threads)
    print(f"bench: {', '.join(names)}; {', '.join(whats)}; T={','.join(map(str, Ts))}; device {device}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for w in whats:
        rows = run(names, w, Ts, device, repeats, warmup, max_case_seconds, dtype, mem)
        section, paths = write_reports(rows, w, out, argv, device)
        print()
        print(section)
        print("wrote " + ", ".join(paths))
        if readme:
            try:
                replace_readme_section(readme_path, w, section)
            except (BenchError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            print(f"updated the bench_{w} section of {readme_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
