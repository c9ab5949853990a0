"""A tiny TRL setup built offline (no download), shared by the adapter tests and the live tmux
test: a character tokenizer, a random GPT-2-style policy, and GRPO arguments that log every step."""

from __future__ import annotations

from pathlib import Path


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in "abcdefghijklmnopqrstuvwxyz ":
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def save_tiny_policy(root: Path, tok):
    """A random 2-layer GPT-2 policy (and its tokenizer) in root/policy; returns its config."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=0, eos_token_id=1
    )
    GPT2LMHeadModel(cfg).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    return cfg


def reward_a(completions, **kw):
    """A reward function: the number of 'a's in a completion."""
    return [float(str(c).count("a")) for c in completions]


PROMPTS = ["abc", "hello", "xyz", "rlhf"] * 8


def grpo_args(output_dir: Path, steps: int):
    """GRPO on CPU with a KL term (beta > 0), logging every step to TensorBoard."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=steps,
        logging_steps=1,
        report_to=["tensorboard"],
        beta=0.1,
        use_cpu=True,
        save_strategy="no",
        seed=0,
        learning_rate=1e-3,
        disable_tqdm=True,
    )
