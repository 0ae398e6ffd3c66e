"""
Sample from a trained model, decoding through each block's cache.

    python sample.py --out_dir=out-shakespeare-vq --start="ROMEO:" --num_samples=2
    python sample.py --out_dir=out-shakespeare-vq --start=FILE:prompt.txt --temperature=0

The tokenizer comes from the dataset meta stored in the checkpoint (characters, bytes or gpt2).
"""

import os
import sys

import torch

import configurator
from model import GPT, GPTConfig

DEFAULTS = dict(
    init_from="resume",  # only checkpoints of this repository
    out_dir="out",
    start="\n",  # or "FILE:prompt.txt"
    num_samples=3,
    max_new_tokens=500,
    temperature=0.8,  # 0 decodes greedily
    top_k=200,  # 0: no limit
    seed=1337,
    device="auto",
    use_cache=True,
)
RANGES = dict(num_samples=">=1", max_new_tokens=">=1", temperature=">=0", top_k=">=0", seed=">=0")


def tokenizer(meta):
    enc = meta.get("encoding", "char")
    if enc == "char":
        stoi, itos = meta["stoi"], meta["itos"]

        def encode(s):
            missing = sorted(set(c for c in s if c not in stoi))
            if missing:
                raise configurator.ConfigError(f"the prompt has characters outside the vocabulary: {missing}")
            return [stoi[c] for c in s]
        return encode, lambda ids: "".join(itos[i] for i in ids)
    if enc == "bytes":
        return lambda s: list(s.encode("utf-8")), lambda ids: bytes(ids).decode("utf-8", errors="replace")
    if enc == "gpt2":
        import prepare_data
        e = prepare_data.gpt2_encoding()
        return lambda s: e.encode(s, allowed_special={"<|endoftext|>"}), e.decode
    raise configurator.ConfigError(f"unknown encoding {enc!r} in the checkpoint's meta")


def main(argv):
    try:
        cfg, _ = configurator.load(argv, DEFAULTS)
        configurator.check_ranges(cfg, RANGES)
        if cfg["init_from"] != "resume":
            raise configurator.ConfigError("init_from must be 'resume' (load out_dir/ckpt.pt)")
        path = os.path.join(cfg["out_dir"], "ckpt.pt")
        if not os.path.exists(path):
            raise configurator.ConfigError(f"no checkpoint at {path}; train first: python train.py config/...")
        device = cfg["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        ckpt = configurator.read_checkpoint(path, ("model", "model_args", "meta"), device)
        try:
            model = GPT(GPTConfig(**ckpt["model_args"]))
            model.load_state_dict(ckpt["model"])
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            raise configurator.ConfigError(f"checkpoint {path}: its weights and model arguments do not make a model "
                                           f"of this model.py ({' '.join(str(e).split())[:200]})") from None
        model.eval().to(device)
        encode, decode = tokenizer(ckpt["meta"])
        start = cfg["start"]
        if start.startswith("FILE:"):
            fname = start[5:]
            if not os.path.isfile(fname):
                raise configurator.ConfigError(f"prompt file not found: {fname}")
            start = open(fname, encoding="utf-8").read()
        ids = encode(start)
        if not ids:
            raise configurator.ConfigError("the prompt is empty")
    except configurator.ConfigError as e:
        configurator.fail(str(e))
    torch.manual_seed(cfg["seed"])
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]
    for _ in range(cfg["num_samples"]):
        y = model.generate(x, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
                           use_cache=cfg["use_cache"])
        print(decode(y[0].tolist()))
        print("---------------")


if __name__ == "__main__":
    main(sys.argv[1:])
