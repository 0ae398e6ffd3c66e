"""--help and -h on every script: the docstring and every key with its type and default, exit code 0."""
import pytest

import configurator
from conftest import run

# script -> (a key, its type and default as --help prints them, a phrase from the docstring)
SCRIPTS = {
    "train.py": ("eval_interval", "int", "250", "Train a GPT with a chosen token-mixing block"),
    "sample.py": ("max_new_tokens", "int", "500", "Sample from a trained model"),
    "prepare_data.py": ("val_fraction", "float", "0.1", "Build a dataset"),
    "compare.py": ("preset", "str", "'blocks'", "Quality at a stated budget"),
    "ngram.py": ("max_order", "int", "8", "The n-gram floor"),
    "bench.py": ("max_case_seconds", "float", "20.0", "Cost against sequence length"),
    "bench_peer.py": ("max_case_seconds", "float", "60.0", "Side by side with the official Transformer-VQ"),
    "bench_trained.py": ("repeats", "int", "7", "Cost of trained models, side by side"),
    "bench_decode.py": ("contexts", "str", "'512,2048,8192'", "Decoding cost against context length"),
    "recall.py": ("pairs", "str", "'8,16,32,64'", "Recall probe: multi-query associative recall"),
    "diagnose.py": ("--n_seqs", "int", "2", "does the seed paper's sparsity assumption hold"),  # argparse
    "diagnose_peer.py": ("--seeds", "int", "3", "Side by side with the public HyperAttention code"),  # argparse
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help(script):
    key, typ, default, doc = SCRIPTS[script]
    flag = "-h" if script.startswith("diagnose") else "--help"  # configurator's -h: test_help_flags below
    r = run([script, flag], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert doc in r.stdout
    line = next(l for l in r.stdout.splitlines() if l.split()[:1] == [key])
    assert typ in line.split() and default in line, line


@pytest.mark.parametrize("flag", configurator.HELP_FLAGS)
def test_help_flags(flag, capsys):
    with pytest.raises(SystemExit) as e:
        configurator.load(["config/x.py", "--n_layer=2", flag], {"n_layer": 4}, lambda: ("cpu", "test"))
    assert e.value.code == 0 and "n_layer" in capsys.readouterr().out
    assert set(configurator.HELP_FLAGS) == {"--help", "-h"}


def test_help_lists_every_key_with_type_and_default():
    text = configurator.help_text({"n_layer": 4, "lr": 1e-3, "name": "x", "flag": False}, doc="Doc line.")
    assert text.startswith("Doc line.")
    rows = {l.split()[0]: l.split()[1:] for l in text.splitlines() if l.startswith("  ")}
    assert rows == {"n_layer": ["int", "4"], "lr": ["float", "0.001"], "name": ["str", "'x'"],
                    "flag": ["bool", "False"]}
