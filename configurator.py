"""
nanoGPT-style configuration, with checks.

    python train.py [config/FILE.py] [--key=value ...]

Order of precedence: the script's module-level defaults < the config file's top level <
the config file's `scales[scale]` preset < command-line flags. A config file may hold a
`scales = {'cpu': {...}, 'gpu': {...}}` dict; `scale='auto'` picks 'gpu' when CUDA is
available and 'cpu' otherwise. Unknown keys and wrong types raise ConfigError, which the
scripts turn into a one-line message and exit code 2. `--help` or `-h` prints the script's
docstring and every key with its type, default and comment, and exits 0 (help_if_asked, which
load() calls first). Also the scripts' shared output rules: fail() for bad input, write_atomic()
for every file they write.
"""

import ast
import os
import re
import sys

HELP_FLAGS = ("--help", "-h")


class ConfigError(Exception):
    pass


def _check_type(key, value, default, where):
    if default is None or value is None:
        return value
    want = type(default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # --T=256 for a comma-separated list of one
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise ConfigError(f"{where}: {key} must be {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parse_value(raw):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word such as --attention=vq is a string
    return raw if isinstance(value, tuple) else value  # --T=1024,4096 is a list written as a string


def _key_comments(path, keys):
    """The comment on the line that sets each key in a script's top part (before its first def or
    class): `key = value  # comment` or `key=value,  # comment`."""
    if not path or not os.path.isfile(path):
        return {}
    top = re.split(r"\n(?:def|class) ", open(path).read())[0]
    found = {}
    for line in top.splitlines():
        m = re.match(r"\s*(\w+)\s*=[^=#][^#]*#\s*(.+)$", line)
        if m and m.group(1) in keys and m.group(1) not in found:
            found[m.group(1)] = m.group(2).strip()
    return found


def help_text(defaults, doc=None, path=None):
    """The script's docstring (default: __main__'s), then one line per key: name, type, default and
    the comment on the line that sets it in the script (path, default: __main__'s file)."""
    main = sys.modules.get("__main__")
    doc = (doc if doc is not None else getattr(main, "__doc__", None) or "").strip("\n")
    notes = _key_comments(path or getattr(main, "__file__", None), defaults)
    rows = [(k, type(v).__name__, repr(v), notes.get(k, "")) for k, v in defaults.items()]
    w = [max([len(r[i]) for r in rows] + [4]) for i in range(3)]
    lines = [doc, "", f"{len(rows)} keys, each set as --key=value (name, type, default, note):"]
    lines += [f"  {k:<{w[0]}}  {t:<{w[1]}}  {v:<{w[2]}}  {c}".rstrip() for k, t, v, c in rows]
    return "\n".join(lines)


def help_if_asked(argv, defaults, doc=None):
    """--help or -h anywhere in argv: print help_text and exit 0."""
    if any(a in HELP_FLAGS for a in argv):
        print(help_text(defaults, doc))
        sys.exit(0)


def exec_config(path):
    """The names a config file defines. __file__ is set, so a config can build on another next to it."""
    ns = {"__file__": os.path.abspath(path)}
    exec(compile(open(path).read(), path, "exec"), ns)
    return ns


def load(argv, defaults, choose_scale=None):
    """Returns (config dict, list of messages to print). `defaults` maps every allowed key
    to its default value; its types are enforced. choose_scale() -> (scale, reason).
    --help or -h in argv prints the help and exits 0."""
    help_if_asked(argv, defaults)
    config, notes = dict(defaults), []
    files = [a for a in argv if not a.startswith("--")]
    flags = [a for a in argv if a.startswith("--")]
    file_vals, scales = {}, {}
    for path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            ns = exec_config(path)
        except Exception as e:  # a config file that does not run is a config error
            raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
        for k, v in ns.items():
            if k.startswith("_") or k == "__builtins__" or type(v).__name__ == "module":
                continue
            if k == "scales":
                scales = v
                continue
            file_vals[k] = v
        notes.append(f"config file: {path}")
    cli_vals = {}
    for arg in flags:
        if "=" not in arg:
            raise ConfigError(f"flag {arg!r} must look like --key=value")
        k, raw = arg[2:].split("=", 1)
        cli_vals[k] = _parse_value(raw)
    if "scale" in defaults:
        scale = cli_vals.get("scale", file_vals.get("scale", defaults["scale"]))
        if scale == "auto" and scales:
            scale, reason = choose_scale() if choose_scale else ("cpu", "default")
        elif scale == "auto":
            reason = "the config file has no scales"
        else:
            reason = "set explicitly"
        if scales and scale not in scales:
            raise ConfigError(f"scale {scale!r} is not in the config's scales: {', '.join(scales)}")
        if scales:
            notes.append(f"scale: {scale} ({reason}; override with --scale={'/'.join(scales)})")
        preset = dict(scales.get(scale, {}))
        file_vals["scale"] = scale
    else:
        preset = {}
    for where, vals in (("config file", file_vals), (f"scales[{file_vals.get('scale')}]", preset),
                        ("command line", cli_vals)):
        for k, v in vals.items():
            if k not in defaults:
                raise ConfigError(f"unknown config key {k!r} ({where})")
            config[k] = _check_type(k, v, defaults[k], where)
    return config, notes


def write_atomic(path, data):
    """Write to a temporary file next to path, then rename it over path: a crash midway leaves
    the old file whole. data: str, bytes, or a function that writes the file at a given path."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def fail(message):
    """One line on stderr, exit code 2: how every script reports bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_ranges(config, rules):
    """Raise ConfigError for the first value outside its range. rules: key -> '>=0', '>0' or an
    interval such as '[0,1)'; None values (not set) pass."""
    for k, rule in rules.items():
        v = config.get(k)
        if v is None:
            continue
        if rule[0] in "[(":
            lo, hi = (float(x) for x in rule[1:-1].split(","))
            ok = (v >= lo if rule[0] == "[" else v > lo) and (v <= hi if rule[-1] == "]" else v < hi)
            want = f"in {rule}"
        else:
            op, bound = (rule[:2], rule[2:]) if rule[1] == "=" else (rule[:1], rule[1:])
            ok = v >= float(bound) if op == ">=" else v > float(bound)
            want = f"{op} {bound}"
        if not ok or v != v:  # v != v: NaN
            raise ConfigError(f"{k} must be {want}, got {v!r}")


def given_keys(argv, defaults, choose_scale=None):
    """{key: 'command line' or 'config file'} for every key argv sets (to any value, the default
    included): load() run with every default unset, so only given keys come back set."""
    unset = {k: (v if k == "scale" else None) for k, v in defaults.items()}
    config, _ = load(argv, unset, choose_scale)
    cli = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and "=" in a}
    return {k: "command line" if k in cli else "config file"
            for k, v in config.items() if v is not None and k != "scale"}


def read_checkpoint(path, need=(), map_location="cpu"):
    """torch.load(path, weights_only=True) as a dict holding the keys in `need`. Anything else
    (unreadable, empty, truncated, random bytes, a pickle with code objects, another program's
    file) is a ConfigError naming the file and what is wrong: one line, never torch's advice to
    load with weights_only=False."""
    import pickle
    import warnings

    import torch
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns (two lines) about odd pickle protocols before failing
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e.strerror or type(e).__name__}") from None
    except EOFError:
        raise ConfigError(f"checkpoint {path} is empty or truncated") from None
    except pickle.UnpicklingError:
        raise ConfigError(f"checkpoint {path} is not a checkpoint of this repository: it is corrupt or holds "
                          f"objects other than tensors and plain data, which are never unpickled") from None
    except Exception as e:  # noqa: BLE001 - zip reader errors and the like
        first = (str(e).splitlines() or [""])[0].split(". ")[0]
        detail = f": {first}" if first and "weights_only" not in first and len(first) < 120 else ""
        raise ConfigError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}{detail})") from None
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ConfigError(f"checkpoint {path} is not a checkpoint of this repository (no {', '.join(missing)})")
    return ckpt
