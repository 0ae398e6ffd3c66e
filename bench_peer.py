"""
Side by side with the official Transformer-VQ (transformer-vq/transformer_vq, JAX/Flax): the same
single-head unit in both, weights loaded across, outputs and gradients compared, then fwd+bwd and
forward-only times (and peak memory) against T.

    /work/venv-jax/bin/python bench_peer.py                       # check at 1024, time 2k, 8k, 32k
    /work/venv-jax/bin/python bench_peer.py --T=2048 --check_T=512 --mem=False
    python bench_peer.py --chunks=1,2,4 --T=8192    # ours alone against the chunk length (no JAX needed)
    python bench_peer.py --stream_lens=512,1024,2048 --T=8192    # ours alone against the streaming piece length

Needs JAX, Flax and chex next to this repository's torch, and a checkout of the official code; neither is
a dependency of the repository. Without them the script prints how to set them up and exits 0 (skip).
Setup used for the committed results (CPU wheels; the official code's jnp.clip(a_min=) needs jax < 0.6):

    python -m venv --system-site-packages /work/venv-jax
    /work/venv-jax/bin/pip install jax==0.4.38 jaxlib==0.4.38 flax==0.10.2 chex
    git clone https://github.com/transformer-vq/transformer_vq /work/transformer_vq_src

The unit (one head, batch `batch`): ours is model.VQGatedUnit; theirs is nn/attn.py's VQAttention under
nn.scan over blocks (as its TransformerLayer runs it, without the nn.remat around the layer unless
remat=True), mem_len = block_len = L, agg_cache and grad_thru_cache on, dropout rates 0, a fresh cache
state per sequence. Weights go ours -> theirs: W_q -> q_proj, [W_k; W_v; W_g] -> kvg_proj (its split
order), W_r -> r_proj, W_o -> res_proj (Dense kernels are (in, out): transposed), the input RMSNorm gain
-> input_ln.g with its bias b = 0, our u and w -> its u and v unchanged (both multiply them by
d_k^-1/4 where they are added to q), codebook statistics c_sum, c_count copied (c = c_sum /
max(c_count, 0.01) in both). Deliberate deviations configured away: its pe_lam is set to our sinusoid
base (pe_lam), its mem_len to L. Same eps (1e-6) in every RMSNorm.

Agreement, at each check_T, float32 both: loss = sum(y * G) + beta * commitment (G fixed random), relative
error |ours - theirs| / |theirs| of y, of the loss, of dL/dx and of every parameter's gradient but the
codebook's (ours: buffers moved by EMA; theirs: parameters moved by a surrogate loss).
Timing, per T: each case `warmup` untimed runs (JAX compiles in the first), then round-robin over the
four cases (ours fwd+bwd, theirs fwd+bwd, ours fwd, theirs fwd), at most `repeats` timed runs each and no
new round once max_case_seconds of timed runs are spent per case; median ms (wall clock). order=balanced
takes the rounds from a Williams Latin square, so each case runs right after each other one equally often:
in a fixed order "ours fwd" always ran right after the official training step, after which torch work runs
at about half speed for a few tens of milliseconds (results/peer-vq/aftermath). pause idles before each
run. malloc=heap keeps freed memory in glibc's heap for the whole process (both codes): by default each
buffer above 32 MiB is mapped afresh and faulted in page by page (results/peer-vq/heap against the
default-allocator runs). Forward is
ours under torch.no_grad() in eval mode and theirs with is_train=False, jit-compiled; fwd+bwd is ours in
training mode (gathering codebook statistics) and theirs jax.value_and_grad over every parameter
(including its codebook's surrogate loss) and x, jit-compiled. Peak memory (mem=True): a fresh child
process per case runs it once (warm), resets the resident-set high-water mark, runs it again and
reports VmHWM minus the resident set before that run (the warm run's garbage collected first: freed during
the measured run, it made the probe under-read). With mem=True the report adds XLA's compiled memory plan of
the official forward and training step (scratch plus outputs, jax's memory_analysis), a cross-check of the
probe's reading of the official code.

Writes <out>/peer.md (tables, command, machine facts) and <out>/peer.csv.
"""

import csv
import gc
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import configurator

# -----------------------------------------------------------------------------
# defaults, each overridable by --key=value
d_model = 256  # the unit's width (n_embd)
d_k = 128  # query/key width
d_v = 512  # value and gate width
L = 256  # block length (the official mem_len is set to it too)
S = 512  # codebook size
batch = 1
T = "2048,8192,32768"  # timed sequence lengths, comma-separated multiples of L ('' skips timing)
check_T = "1024"  # sequence lengths of the agreement check, comma-separated ('' skips it)
beta = 1.0  # commitment weight in the compared loss (large, so its gradient counts in the comparison)
pe_lam = 10000.0  # sinusoid base of the relative positions, both models (ours is fixed at 1e4)
repeats = 5  # at most this many timed runs per case
warmup = 1  # untimed runs per case before timing (JAX compiles in the first)
max_case_seconds = 60.0  # no new round once a case has spent this long in timed runs
order = "balanced"  # 'balanced': rounds follow a Williams Latin square (each case runs after each other one equally often); 'fixed': the same order every round
pause = 0.0  # seconds of idle before each timed run (lets the other runtime's worker threads go to sleep)
malloc = "default"  # 'heap': glibc keeps freed memory in the heap (no mmap, no trim) for the whole process, both codes; 'default': glibc's own
threads = 0  # torch intra-op threads; 0 keeps torch's default (XLA's come from XLA_FLAGS)
mem = True  # peak memory per case in a child process (False: skip)
remat = False  # wrap the official scan in nn.remat, as its TransformerLayer is in a full model
seed = 0
official = "/work/transformer_vq_src"  # checkout of transformer-vq/transformer_vq (its src/ is imported)
out = "results/peer-vq"
stream_len = 0  # ours: positions per piece of the no-grad forward (0 keeps VQGatedUnit.stream_len)
chunks = ""  # ours only, no official code needed: time at these blocks per chunk of the CPU path (e.g. 1,2,8), write chunks.md
stream_lens = ""  # ours only, likewise: no-grad forward time at these piece lengths of the streaming forward, write stream-len.md
mem_case = ""  # internal: 'ours|theirs,fwd|fwdbwd,T' runs one case and prints its peak memory

AGREE = 1e-5  # relative error below which the two units agree (float32 rounding: about 1e-6 at T = 1024)
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and k not in ("HERE",) and isinstance(v, (int, float, bool, str))}
SETUP = ("python -m venv --system-site-packages /work/venv-jax && "
         "/work/venv-jax/bin/pip install jax==0.4.38 jaxlib==0.4.38 flax==0.10.2 chex && "
         "git clone https://github.com/transformer-vq/transformer_vq {official}; "
         "then run /work/venv-jax/bin/python bench_peer.py --official={official}")


def _ints(s):
    return [int(t) for t in str(s).split(",") if t.strip()]


def parse_args(argv):
    try:
        cfg, _ = configurator.load(argv, DEFAULTS)
        configurator.check_ranges(cfg, {k: ">0" for k in ("d_model", "d_k", "d_v", "L", "S", "batch", "repeats")})
        Ts, checks = _ints(cfg["T"]), _ints(cfg["check_T"])
    except (configurator.ConfigError, ValueError) as e:
        configurator.fail(str(e))
    if cfg["order"] not in ("balanced", "fixed") or cfg["malloc"] not in ("default", "heap") or cfg["pause"] < 0:
        configurator.fail("order must be balanced or fixed, malloc default or heap, pause >= 0")
    if cfg["d_model"] % 2:
        configurator.fail("d_model must be even (sinusoidal position features)")
    bad = [t for t in Ts + checks if t <= 0 or t % cfg["L"]]
    if bad:
        configurator.fail(f"every T and check_T must be a positive multiple of L={cfg['L']} "
                          f"(the official code takes whole blocks), got {bad[0]}")
    return cfg, Ts, checks


def missing_peer(path):
    """None when JAX, Flax, chex and the official checkout are all there, else what is missing."""
    need = []
    for mod in ("jax", "flax", "chex"):
        try:
            __import__(mod)
        except ImportError:
            need.append(mod)
    if not os.path.isfile(os.path.join(path, "src", "transformer_vq", "nn", "attn.py")):
        need.append(f"the official checkout at {path}")
    return ", ".join(need) or None


# -----------------------------------------------------------------------------
# the two units


def build_ours(cfg):
    import torch
    from model import GPTConfig, VQGatedUnit
    torch.manual_seed(cfg["seed"])
    conf = GPTConfig(n_embd=cfg["d_model"], vq_d_k=cfg["d_k"], vq_d_v_mult=cfg["d_v"] / cfg["d_model"],
                     vq_block_len=cfg["L"], vq_codebook_size=cfg["S"], vq_n_head=1, dropout=0.0,
                     vq_beta=cfg["beta"], attention="vq")
    unit = VQGatedUnit(conf)
    if cfg["stream_len"]:
        unit.stream_len = cfg["stream_len"]
    assert unit.dv == cfg["d_v"], "d_v = round(vq_d_v_mult * d_model) did not come back"
    with torch.no_grad():  # move the zero/one initialisations so the comparison sees them
        unit.ln_w.mul_(1 + 0.1 * torch.randn_like(unit.ln_w))
        unit.xl_u.normal_(0, 0.5)
        unit.xl_w.normal_(0, 0.5)
        unit.c_count.uniform_(0.5, 2.0)
    return unit


def ours_to_theirs(unit):
    """Our weights as the official VQAttention's parameter tree (numpy float32)."""
    import numpy as np
    w = lambda t: t.detach().cpu().float().numpy().copy()  # noqa: E731
    dk = unit.dk
    W = w(unit.c_attn.weight)  # (dk + dk + dv + dv, C): rows q, k, v, g
    return {
        "input_ln": {"g": w(unit.ln_w), "b": np.zeros(unit.C, np.float32)},
        "q_proj": {"kernel": W[:dk].T.copy()},
        "kvg_proj": {"kernel": W[dk:].T.copy()},  # its split order is k, v, g: ours too
        "r_proj": {"kernel": w(unit.c_r.weight).T.copy()},
        "res_proj": {"kernel": w(unit.c_proj.weight).T.copy()},
        "u": w(unit.xl_u),
        "v": w(unit.xl_w),
        "quantizer": {"c_sum": w(unit.c_sum), "c_count": w(unit.c_count)},
    }


GRAD_NAMES = {  # ours -> (their path, transpose)
    "ln_w": (("input_ln", "g"), False),
    "c_r.weight": (("r_proj", "kernel"), True),
    "c_proj.weight": (("res_proj", "kernel"), True),
    "xl_u": (("u",), False),
    "xl_w": (("v",), False),
}


def build_theirs(cfg, is_train, Tn):
    """(jitted function, params): fwd(params, x) -> y, or fwdbwd(params, x, G) -> (loss, (y, dparams, dx))."""
    sys.path.insert(0, os.path.join(cfg["official"], "src"))
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from transformer_vq.nn.attn import VQAttention
    from transformer_vq.nn.types import TransformerConfig
    from transformer_vq.nn.vq import VQSpec

    B, Lb = cfg["batch"], cfg["L"]
    tc = TransformerConfig.create(
        param_dtype="float32", dtype="float32", global_batch_size=B, sequence_len=Tn, update_len=Tn,
        block_len=Lb, mem_len=Lb, grad_thru_cache=True, agg_cache=True, d_model=cfg["d_model"],
        d_k=cfg["d_k"], d_v=cfg["d_v"], d_ff=0, n_head=1, n_code=cfg["S"], n_layer=1, n_vocab=2,
        pe_abs=False, pe_lam=cfg["pe_lam"], p_dropemb=0.0, p_dropsin=0.0, p_dropres=0.0, p_droplyr=0.0,
        p_nucleus=1.0, c_beta=cfg["beta"], c_gamma=0.99, e_tie=False, e_preln=False, e_scale=1.0,
        is_train=is_train)

    class Unit(nn.Module):  # one VQAttention scanned over blocks, as its TransformerLayer does
        config: TransformerConfig

        @nn.compact
        def __call__(self, x):
            b, t, d = x.shape
            K = t // Lb
            xb = jnp.transpose(jnp.reshape(x, [b, K, Lb, d]), (1, 0, 2, 3))
            spec = VQSpec(n_device=jnp.ones([K, 1]), n_block_per_update=jnp.ones([K, 1]),
                          loss_mask=jnp.ones([K, b, Lb])) if is_train else None
            attn = nn.scan(VQAttention, variable_broadcast="params", in_axes=0, out_axes=0,
                           split_rngs=dict(params=False, timeless=False, ephemeral=True))
            attn = attn(self.config, name="attn")
            state = VQAttention.initial_state(self.config, b)
            _, o = attn(state, dict(input_features=xb, doc_ids=jnp.zeros([K, b, Lb], jnp.int32), vq_spec=spec))
            y = jnp.reshape(jnp.transpose(o["res"], (1, 0, 2, 3)), [b, t, d])
            return y, jnp.mean(o["l_commit"]), jnp.mean(o["l_codebook"])

    mod = nn.remat(Unit)(tc) if cfg["remat"] else Unit(tc)
    if not is_train:
        return jax.jit(lambda p, x: mod.apply({"params": p}, x)[0]), mod

    def loss_fn(p, x, G):
        y, commit, codebook = mod.apply({"params": p}, x)
        # its training loss adds beta * l_commit and the codebook's surrogate l_codebook (gradient to c_sum,
        # c_count only; its value is not part of the compared loss)
        return jnp.sum(y * G) + cfg["beta"] * commit + codebook - jax.lax.stop_gradient(codebook), y

    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)), mod


def theirs_params(unit, mod, cfg):
    """Our weights in its tree, checked against the tree its init builds."""
    import jax
    import jax.numpy as jnp
    p = {"attn": jax.tree_util.tree_map(jnp.asarray, ours_to_theirs(unit))}
    ref = mod.init(jax.random.PRNGKey(0), jnp.zeros([cfg["batch"], cfg["L"], cfg["d_model"]]))["params"]
    shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(a.shape), t)  # noqa: E731
    if shapes(ref) != shapes(p):
        raise RuntimeError(f"official parameter tree changed: {shapes(ref)} vs ours {shapes(p)}")
    return p


# -----------------------------------------------------------------------------
# agreement


def _rel(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(cfg, Tn):
    """Relative errors ours vs theirs at length Tn: {name: rel error}."""
    import torch
    unit = build_ours(cfg)
    unit.train()
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    x = torch.randn(cfg["batch"], Tn, cfg["d_model"], generator=g)
    G = torch.randn(cfg["batch"], Tn, cfg["d_model"], generator=g)
    xr = x.clone().requires_grad_(True)
    y = unit(xr)
    loss = (y * G).sum() + unit.aux_loss
    loss.backward()
    fn, mod = build_theirs(cfg, True, Tn)
    p = theirs_params(unit, mod, cfg)
    (tl, ty), (dp, dx) = fn(p, x.numpy(), G.numpy())
    dp = dp["attn"]
    W = unit.c_attn.weight.grad.numpy()
    dk = unit.dk
    err = {"y": _rel(y.detach().numpy(), ty), "loss": _rel(loss.item(), float(tl)), "dx": _rel(xr.grad.numpy(), dx),
           "dW_q": _rel(W[:dk].T, dp["q_proj"]["kernel"]), "dW_kvg": _rel(W[dk:].T, dp["kvg_proj"]["kernel"])}
    params = dict(unit.named_parameters())
    for name, (path, tr) in GRAD_NAMES.items():
        theirs = dp
        for k in path:
            theirs = theirs[k]
        ours = params[name].grad.numpy()
        err["d" + name] = _rel(ours.T if tr else ours, theirs)
    return err


# -----------------------------------------------------------------------------
# timing and memory


def ours_cases(cfg, Tn):
    """Our unit, its input x and loss weights G (batch, Tn, d_model), and {"ours fwd+bwd", "ours fwd"}:
    zero-argument functions running one training step's forward and backward, or one no-grad forward."""
    import torch
    unit = build_ours(cfg)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    x = torch.randn(cfg["batch"], Tn, cfg["d_model"], generator=g)
    G = torch.randn(cfg["batch"], Tn, cfg["d_model"], generator=g)

    def ours_fwdbwd():
        unit.train()
        unit.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        y = unit(xr)
        ((y * G).sum() + unit.aux_loss).backward()

    def ours_fwd():
        unit.eval()
        with torch.no_grad():
            unit(x)
    return unit, x, G, {"ours fwd+bwd": ours_fwdbwd, "ours fwd": ours_fwd}


def both_units(cfg, Tn):
    """Our cases (ours_cases) and the official code's jitted steps with their arguments, our weights loaded:
    (ours, {"fwd+bwd": (fn, args), "fwd": (fn, args)})."""
    import jax
    unit, x, G, ours = ours_cases(cfg, Tn)
    fb, mod = build_theirs(cfg, True, Tn)
    fw, _ = build_theirs(cfg, False, Tn)
    p = theirs_params(unit, mod, cfg)
    xj, Gj = jax.numpy.asarray(x.numpy()), jax.numpy.asarray(G.numpy())
    return ours, {"fwd+bwd": (fb, (p, xj, Gj)), "fwd": (fw, (p, xj))}


def make_cases(cfg, Tn):
    """{case: zero-argument function running it once, synchronously}."""
    import jax
    ours, theirs = both_units(cfg, Tn)
    cases = dict(ours)
    for mode, (fn, args) in theirs.items():
        cases[f"official {mode}"] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    return {c: cases[c] for c in ("ours fwd+bwd", "official fwd+bwd", "ours fwd", "official fwd")}


def official_plan(cfg, Tn):
    """XLA's memory plan of the official code's compiled forward and training step at Tn: scratch buffers
    plus outputs (temp_size + output_size of jax's memory_analysis), MiB: {"fwd": ., "fwdbwd": .}, or
    None where this jax does not report it. A plan, not a reading: it cross-checks the probe."""
    _, theirs = both_units(cfg, Tn)
    out = {}
    for mode, (fn, args) in theirs.items():
        try:
            m = fn.lower(*args).compile().memory_analysis()
            out[mode.replace("+", "")] = (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20
        except (AttributeError, TypeError, NotImplementedError):
            return None
    return out


def round_order(names, r, order):
    """The cases of round r: the same order every round ('fixed'), or the rows of a Williams Latin
    square in turn ('balanced'): over len(names) rounds (twice that for an odd count) each case runs
    right after each other case equally often, so no case always inherits one neighbour's aftermath."""
    n = len(names)
    if order == "fixed" or n < 2:
        return list(names)
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    rows = [[(f + i) % n for f in first] for i in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [names[k] for k in rows[r % len(rows)]]


def time_all(cfg, Tn):
    cases = make_cases(cfg, Tn)
    for fn in cases.values():
        for _ in range(cfg["warmup"]):
            fn()
    times = {c: [] for c in cases}
    for r in range(cfg["repeats"]):
        for c in round_order(list(cases), r, cfg["order"]):
            if sum(times[c]) / 1e3 >= cfg["max_case_seconds"]:
                continue
            time.sleep(cfg["pause"])
            t0 = time.perf_counter()
            cases[c]()
            times[c].append((time.perf_counter() - t0) * 1e3)
    return {c: (statistics.median(v), len(v)) for c, v in times.items()}


def keep_heap():
    """glibc: serve every allocation from the heap and never give freed memory back (M_MMAP_MAX 0,
    M_TRIM_THRESHOLD 2 GiB - 1, the largest an int takes), process-wide, so both codes reuse warm pages instead of faulting fresh
    ones for each large buffer (glibc maps buffers above 32 MiB anew on every allocation). False where
    it does not apply (no glibc)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2 ** 31 - 1)))


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))


def run_mem_case(cfg):
    """Child process: one case, run warm, then peak resident memory of a second run over the RSS before it."""
    who, mode, Tn = cfg["mem_case"].split(",")
    name = ("ours " if who == "ours" else "official ") + ("fwd+bwd" if mode == "fwdbwd" else "fwd")
    fn = make_cases(cfg, int(Tn))[name]
    fn()
    gc.collect()  # the warm run's garbage in reference cycles, else freed during the measured run (an under-read)
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fn()
    print("MEM " + json.dumps({"case": name, "T": int(Tn), "peak_mib": (_rss_kib("VmHWM") - base) / 1024}))


def measure_mem(argv, who, mode, Tn):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # large buffers mmapped: RSS follows live memory
    args = [a for a in argv if not a.startswith("--mem_case=")] + [f"--mem_case={who},{mode},{Tn}"]
    r = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, cwd=HERE, env=env,
                       capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("MEM "):
            return json.loads(line[4:])["peak_mib"]
    print(f"  memory of {who} {mode} at T={Tn} failed: {(r.stderr.strip().splitlines() or [''])[-1][:200]}")
    return None


# -----------------------------------------------------------------------------
# report


def machine_facts():
    """bench.machine_facts plus what the JAX side depends on."""
    import flax
    import jax

    import bench
    facts = bench.machine_facts("cpu")
    facts.update({"affinity": len(os.sched_getaffinity(0)), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                  "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""), "jax": jax.__version__,
                  "flax": flax.__version__})
    return facts


def official_commit(path):
    r = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown (not a git checkout)"


def write_report(cfg, argv, checks, rows):
    os.makedirs(cfg["out"], exist_ok=True)
    cmd = f"{sys.executable} bench_peer.py " + " ".join(shlex.quote(a) for a in argv)
    md = ["# vq: ours vs the official Transformer-VQ (JAX/Flax)", "", f"Command: `{cmd}`", "",
          f"Unit: d_model {cfg['d_model']}, d_k {cfg['d_k']}, d_v {cfg['d_v']}, one head, L {cfg['L']}, "
          f"S {cfg['S']}, batch {cfg['batch']}, float32; official remat={cfg['remat']}, "
          f"official code {cfg['official']} at {official_commit(cfg['official'])}.", ""]
    md += ["Machine: " + "; ".join(f"{k} {v}" for k, v in machine_facts().items()), ""]
    if checks:
        names = list(next(iter(checks.values())))
        md += ["## Agreement (relative error |ours - official| / |official|)", "",
               "| T | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        md += [f"| {t} | " + " | ".join(f"{e[n]:.1e}" for n in names) + " |" for t, e in checks.items()]
        worst = max(max(e.values()) for e in checks.values())
        md += ["", f"Largest: {worst:.1e} ({'agree' if worst < AGREE else 'DISAGREE'}: the bound is {AGREE:g}).", ""]
    if rows:
        md += ["## Time (median ms) and peak memory above the resident set (MiB)", "",
               "| T | ours fwd+bwd | official fwd+bwd | ours / official | ours fwd | official fwd | ours / official "
               "| mem ours fwd | mem official fwd | mem ours fwd+bwd | mem official fwd+bwd |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        f = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        for r in rows:
            md.append(f"| {r['T']} | {f(r['ours_fwdbwd_ms'])} | {f(r['official_fwdbwd_ms'])} | "
                      f"{r['ours_fwdbwd_ms'] / r['official_fwdbwd_ms']:.2f} | {f(r['ours_fwd_ms'])} | "
                      f"{f(r['official_fwd_ms'])} | {r['ours_fwd_ms'] / r['official_fwd_ms']:.2f} | "
                      f"{f(r['mem_ours_fwd_mib'])} | {f(r['mem_official_fwd_mib'])} | "
                      f"{f(r['mem_ours_fwdbwd_mib'])} | {f(r['mem_official_fwdbwd_mib'])} |")
        md.append("")
        md.append(f"Runs per case (at most {cfg['repeats']}, round-robin, order {cfg['order']}, pause {cfg['pause']:g} s, "
                  f"malloc {cfg['malloc']}): "
                  + "; ".join(f"T={r['T']}: {r['runs']}" for r in rows) + ".")
        if any(r.get("plan_official_fwd_mib") is not None for r in rows):
            md += ["", "## The official code's memory plan (MiB)", "",
                   "XLA's compiled plan of the official code (jax's memory_analysis: scratch buffers plus outputs), "
                   "a cross-check of the probe's reading above, against our probe's peak (which includes the "
                   "output too):", "",
                   "| T | ours fwd (probe) | official fwd (plan) | ours / official | ours fwd+bwd (probe) "
                   "| official fwd+bwd (plan) | ours / official |", "|---|---|---|---|---|---|---|"]
            ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.2f}"  # noqa: E731
            md += [f"| {r['T']} | {f(r['mem_ours_fwd_mib'])} | {f(r['plan_official_fwd_mib'])} | "
                   f"{ratio(r['mem_ours_fwd_mib'], r['plan_official_fwd_mib'])} | {f(r['mem_ours_fwdbwd_mib'])} | "
                   f"{f(r['plan_official_fwdbwd_mib'])} | {ratio(r['mem_ours_fwdbwd_mib'], r['plan_official_fwdbwd_mib'])} |"
                   for r in rows]
    else:
        md.append("No timing in this run (T empty).")
    configurator.write_atomic(os.path.join(cfg["out"], "peer.md"), "\n".join(md) + "\n")
    buf = io.StringIO()
    keys = ["kind", "T", "name", "value", "runs"]
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for t, e in checks.items():
        for n, v in e.items():
            w.writerow(dict(kind="rel_error", T=t, name=n, value=v, runs=""))
    for r in rows:
        for n, v in r.items():
            if n not in ("T", "runs"):
                w.writerow(dict(kind="time_ms" if n.endswith("_ms") else "mem_mib", T=r["T"], name=n, value=v,
                                runs=r["runs"]))
    configurator.write_atomic(os.path.join(cfg["out"], "peer.csv"), buf.getvalue())
    return [os.path.join(cfg["out"], n) for n in ("peer.md", "peer.csv")]


SWEEPS = {  # ours-only sweeps: option -> (unit attribute, table column, file, title, the cases timed)
    "chunks": ("chunk_blocks", "G (blocks per chunk)", "chunks.md", "time against the chunk length of the CPU path",
               ("ours fwd", "ours fwd+bwd")),
    "stream_lens": ("stream_len", "piece length (positions)", "stream-len.md",
                    "no-grad forward time against the streaming piece length", ("ours fwd",)),
}


def time_sweep(cfg, Ts, argv, option):
    """Ours alone at each value of one knob (SWEEPS[option]: blocks per chunk of the CPU path, G, or the
    streaming forward's piece length), round-robin over the values, medians; writes <out>/<file> (the
    measurements behind kernels/vq.py's CACHE_BUILD_COST and model.py's STREAM_LOGITS)."""
    import bench
    from kernels.vq import chunk_blocks_by_cost
    attr, column, fname, title, modes = SWEEPS[option]
    values = _ints(cfg[option])
    lines = [f"# vq: {title} (ours only)", "",
             f"Command: `{sys.executable} bench_peer.py " + " ".join(shlex.quote(a) for a in argv) + "`", "",
             f"Unit: d_model {cfg['d_model']}, d_k {cfg['d_k']}, d_v {cfg['d_v']}, one head, L {cfg['L']}, "
             f"S {cfg['S']}, batch {cfg['batch']}, float32; chunk_blocks_by_cost picks "
             f"G = {chunk_blocks_by_cost(cfg['L'], cfg['S'], cfg['d_k'], cfg['d_v'])}.", "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in bench.machine_facts("cpu").items()), "",
             f"| T | {column} | " + " | ".join(m[5:] + " ms" for m in modes) + " |", "|---|---|" + "---|" * len(modes)]
    for Tn in Ts:
        unit, _, _, cases = ours_cases(cfg, Tn)
        times = {(v, m): [] for v in values for m in modes}
        for rep in range(cfg["warmup"] + cfg["repeats"]):
            for (v, m), ts in times.items():
                setattr(unit, attr, v)
                t0 = time.perf_counter()
                cases[m]()
                if rep >= cfg["warmup"]:
                    ts.append((time.perf_counter() - t0) * 1e3)
        for v in values:
            lines.append(f"| {Tn} | {v} | " + " | ".join(f"{statistics.median(times[(v, m)]):.0f}" for m in modes) + " |")
            print(lines[-1], flush=True)
    lines += ["", f"Medians of {cfg['repeats']} runs after {cfg['warmup']} warm-up, round-robin over the values."]
    os.makedirs(cfg["out"], exist_ok=True)
    path = os.path.join(cfg["out"], fname)
    configurator.write_atomic(path, "\n".join(lines) + "\n")
    print("wrote " + path)


def main(argv):
    configurator.help_if_asked(argv, DEFAULTS)
    cfg, Ts, checks = parse_args(argv)
    if cfg["malloc"] == "heap" and not keep_heap():
        configurator.fail("--malloc=heap needs glibc (mallopt)")
    sweep = next((o for o in SWEEPS if cfg[o]), None)
    if sweep:
        sys.path.insert(0, HERE)
        if cfg["threads"]:
            import torch
            torch.set_num_threads(cfg["threads"])
        time_sweep(cfg, Ts, argv, sweep)
        return
    why = missing_peer(cfg["official"])
    if why:
        print(f"bench_peer: skipped, missing {why}; set up with: " + SETUP.format(official=cfg["official"]))
        return
    sys.path.insert(0, HERE)
    import torch
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["mem_case"]:
        run_mem_case(cfg)
        return
    errs = {}
    for t in checks:
        errs[t] = check(cfg, t)
        worst = max(errs[t].values())
        print(f"check T={t}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs[t].items())
              + f"; largest {worst:.1e}: {'agree' if worst < AGREE else 'DISAGREE'}")
    rows = []
    for t in Ts:
        tm = time_all(cfg, t)
        row = {"T": t, "ours_fwdbwd_ms": tm["ours fwd+bwd"][0], "official_fwdbwd_ms": tm["official fwd+bwd"][0],
               "ours_fwd_ms": tm["ours fwd"][0], "official_fwd_ms": tm["official fwd"][0],
               "runs": "/".join(str(n) for _, n in tm.values())}
        for who in ("ours", "official"):
            for mode in ("fwd", "fwdbwd"):
                row[f"mem_{who}_{mode}_mib"] = measure_mem(argv, "ours" if who == "ours" else "theirs", mode, t) \
                    if cfg["mem"] else None
        plan = official_plan(cfg, t) if cfg["mem"] else None
        row["plan_official_fwd_mib"] = plan and plan["fwd"]
        row["plan_official_fwdbwd_mib"] = plan and plan["fwdbwd"]
        rows.append(row)
        print(f"T={t}: " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print("wrote " + ", ".join(write_report(cfg, argv, errs, rows)))


if __name__ == "__main__":
    main(sys.argv[1:])
