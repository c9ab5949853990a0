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
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
    from tiny_trl import PROMPTS, grpo_args, reward_a, save_tiny_policy, tiny_tokenizer

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    save_tiny_policy(out, tok)

    class Pace(TrainerCallback):
        def on_log(self, args, state, control, **kw):
            time.sleep(0.4)  # a real step takes seconds; this one 0.1 s: slow it to be watched

    trainer = GRPOTrainer(
        model=str(out / "policy"),
        reward_funcs=reward_a,
        args=grpo_args(out / "grpo_out", steps),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tok,
        callbacks=[Pace()],
    )
    trainer.train()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 40)
