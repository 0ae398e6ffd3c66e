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
        ns = {}
        try:
            exec(compile(open(path).read(), path, "exec"), ns)
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
