"""Build, offline, the tiny Hugging Face models `examples/hf_tiny.toml` trains on.

    python scripts/make_tiny_hf.py [OUT_DIR]        (default: examples/hf_tiny)

writes
    OUT_DIR/policy/      a random GPT-2-style causal LM (2 layers, 4 heads, width 128) + tokenizer
    OUT_DIR/reward/      a random GPT2ForSequenceClassification (num_labels=1), same tokenizer
    OUT_DIR/prompts.jsonl  {"prompt": ...} lines

Nothing is downloaded: the tokenizer is a character-level `PreTrainedTokenizerFast` built with
the `tokenizers` library, the models come from configs with seeded random weights. The
functions here are also what the tests and `scripts/bench_hf.py` build their models with.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?'"
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3


def make_tokenizer():
    """A character-level fast tokenizer: one token per character, <pad>/<bos>/<eos>/<unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def gpt2_config(tok, n_layer: int = 2, n_head: int = 4, n_embd: int = 128, n_positions: int = 256, **kw):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tok),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )


def llama_config(tok, n_layer: int = 2, n_head: int = 4, hidden: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=max(1, n_head // 2),
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_policy(out: Path, tok, arch: str = "gpt2", seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = gpt2_config(tok) if arch == "gpt2" else llama_config(tok)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_reward_model(out: Path, tok, seed: int = 1, with_tokenizer: bool = True) -> Path:
    import torch
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(gpt2_config(tok, n_layer=1, n_head=2, n_embd=64, num_labels=1))
    model.save_pretrained(out)
    if with_tokenizer:
        tok.save_pretrained(out)
    return out


def write_prompts(path: Path, n: int = 256, seed: int = 0, column: str = "prompt") -> Path:
    """Prompts of 8..20 characters: a few short words of random letters."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [
                "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 5)))
                for _ in range(r.randint(2, 4))
            ]
            f.write(json.dumps({column: " ".join(words)[:20]}) + "\n")
    return path


def build_all(out_dir: str | Path = "examples/hf_tiny", arch: str = "gpt2") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    return {
        "policy": build_policy(out / "policy", tok, arch),
        "reward": build_reward_model(out / "reward", tok),
        "prompts": write_prompts(out / "prompts.jsonl"),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths = build_all(args[0] if args else "examples/hf_tiny")
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
