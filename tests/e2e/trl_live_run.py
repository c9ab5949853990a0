"""A real TRL GRPO run that logs to TensorBoard, slowly enough to be watched live.

    python tests/e2e/trl_live_run.py OUTPUT_DIR [STEPS]

A tiny random GPT-2 policy and a character tokenizer are built here (no download); each
step sleeps a little after logging so a monitor in another pane sees the steps arrive."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(out: Path, steps: int) -> None:
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in "abcdefghijklmnopqrstuvwxyz ":
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=0, eos_token_id=1
    )
    GPT2LMHeadModel(cfg).save_pretrained(out / "policy")
    tok.save_pretrained(out / "policy")

    class Pace(TrainerCallback):
        def on_log(self, args, state, control, **kw):
            time.sleep(0.4)  # a real step takes seconds; this one 0.1 s: slow it to be watched

    args = GRPOConfig(
        output_dir=str(out / "grpo_out"),
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
    trainer = GRPOTrainer(
        model=str(out / "policy"),
        reward_funcs=lambda completions, **kw: [float(str(c).count("a")) for c in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["abc", "hello", "xyz", "rlhf"] * 8}),
        processing_class=tok,
        callbacks=[Pace()],
    )
    trainer.train()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 40)
