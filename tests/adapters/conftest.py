"""One real TRL run per session, shared by the adapter tests: a tiny random GPT-2-style policy,
reward and value model and a character tokenizer built here (no download), trained a few steps
with GRPO and with trl.experimental.ppo's PPOTrainer, each with the kit's callback AND with
report_to="tensorboard"."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fixtures.py

STEPS = 6


def _tokenizer():
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


def _reward_a(completions, **kw):
    return [float(str(c).count("a")) for c in completions]


@pytest.fixture(scope="session")
def trl_runs(tmp_path_factory):
    pytest.importorskip("trl")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
    )
    from trl import GRPOConfig, GRPOTrainer

    from adapters.hf import KitCallback

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trl")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=0, eos_token_id=1
    )
    GPT2LMHeadModel(cfg).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    cfg.num_labels = 1
    GPT2ForSequenceClassification(cfg).save_pretrained(root / "rm")
    prompts = ["abc", "hello", "xyz", "rlhf"] * 8
    out: dict = {"root": root}

    # GRPO: a reward function, KL to the reference (beta > 0), samples every 2 steps
    args = GRPOConfig(
        output_dir=str(root / "grpo_out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=STEPS,
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
        model=str(root / "policy"),
        reward_funcs=_reward_a,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
    )
    cb = KitCallback.attach(trainer, str(root / "runs"), run_id="grpo", samples_every=2)
    t0 = time.perf_counter()
    trainer.train()
    out["grpo"] = {"callback": cb, "train_s": time.perf_counter() - t0, "tb_parent": root / "grpo_out"}

    # PPO (trl.experimental.ppo): policy, reference, reward and value models
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as e:  # pragma: no cover - depends on the installed trl
        out["ppo"] = {"error": str(e)}
        return out
    pargs = PPOConfig(
        output_dir=str(root / "ppo_out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        total_episodes=4 * STEPS,
        response_length=8,
        num_ppo_epochs=1,
        num_mini_batches=1,
        report_to=["tensorboard"],
        logging_steps=1,
        use_cpu=True,
        save_strategy="no",
        seed=0,
        num_sample_generations=0,
        stop_token="eos",
        disable_tqdm=True,
    )
    ppo = PPOTrainer(
        args=pargs,
        processing_class=tok,
        model=AutoModelForCausalLM.from_pretrained(root / "policy"),
        ref_model=AutoModelForCausalLM.from_pretrained(root / "policy"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(root / "rm", num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(root / "rm", num_labels=1),
        train_dataset=Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]}),
    )
    pcb = KitCallback.attach(ppo, str(root / "runs"), run_id="ppo")
    t0 = time.perf_counter()
    ppo.train()
    out["ppo"] = {"callback": pcb, "train_s": time.perf_counter() - t0, "tb_parent": root / "ppo_out"}
    return out
