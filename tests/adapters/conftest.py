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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fixtures.py, tiny_trl.py
from tiny_trl import PROMPTS, grpo_args, reward_a, save_tiny_policy, tiny_tokenizer  # noqa: E402

STEPS = 6


@pytest.fixture(scope="session")
def trl_runs(tmp_path_factory):
    pytest.importorskip("trl")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2ForSequenceClassification
    from trl import GRPOTrainer

    from adapters.hf import KitCallback

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trl")
    tok = tiny_tokenizer()
    cfg = save_tiny_policy(root, tok)
    cfg.num_labels = 1
    GPT2ForSequenceClassification(cfg).save_pretrained(root / "rm")
    prompts = PROMPTS
    out: dict = {"root": root}

    # GRPO: a reward function, KL to the reference (beta > 0), samples every 2 steps
    args = grpo_args(root / "grpo_out", STEPS)
    trainer = GRPOTrainer(
        model=str(root / "policy"),
        reward_funcs=reward_a,
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
