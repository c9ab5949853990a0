"""Measure each memory knob's real saving and slowdown on this machine (CPU), one fresh process
per setting, and say which knobs only a GPU can show.

    OMP_NUM_THREADS=1 python scripts/bench_memory.py [--quick] [--no-hf] [--repeat N] [--json OUT]

Each setting builds the trainer's models and optimizers as `trainerd start` would (no warm
start: memory and time of a PPO step do not depend on the weights' values much) and runs PPO
steps through `trainerd/run/memory.py`'s `probe`: three unprofiled steps (the step's CPU
seconds, one thread, the least of the steps after the first and of `--repeat` rounds: CPU time is
what a shared machine disturbs least; the per-stage RSS high-water marks and the process peak are
recorded) and one step under
torch.profiler with profile_memory=True (each stage's transient allocations, exact). Saving
and slowdown are against the setting's baseline row:

- synthetic policy, width 512, batch 256, minibatch 128 (large enough that the stage
  peaks differ beyond allocator noise): baseline, micro_batch_size 64 and 32,
  continue_on_nonfinite (no per-step copy of the healthy state), and glibc returning freed
  blocks to the OS (MALLOC_MMAP_THRESHOLD_=131072: the RSS then follows the live tensors);
- a GPT-2-style Hugging Face policy (6 layers, width 256, built offline like
  scripts/make_tiny_hf.py): baseline, gradient_checkpointing, and with --bf16-cpu bf16 autocast
  (memory only: bf16 matmuls on a CPU without bf16 units take minutes a step; a GPU's are faster).

What only a GPU can show, and is not measured here: bf16's speed-up, offloading the reference
and reward model between stages (there is no device memory to free on a CPU), and
`torch.cuda.max_memory_allocated` per stage (the code path is the same; it runs unchanged on
CUDA). Sharing the trunk between policy and reference needs LoRA adapters, which the kit does not
train: its saving is the reference's parameters, computed by `trainerd memory`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYNTH = dict(d_model=512, n_head=8, batch_size=256, minibatch_size=128, ppo_epochs=1, n_prompts=1024, device="cpu")
QUICK_SYNTH = dict(d_model=256, n_head=4, batch_size=128, minibatch_size=64, ppo_epochs=1, n_prompts=512, device="cpu")
HF = dict(
    model="hf",
    max_prompt_len=32,
    max_response_len=48,
    batch_size=32,
    minibatch_size=32,
    ppo_epochs=1,
    device="cpu",
    prompt_column="prompt",
)


def settings(quick: bool, hf_dir: Path | None, bf16_cpu: bool = False) -> list[tuple[str, str, dict, dict]]:
    """(group, name, config changes, environment changes); the first row of a group is its baseline."""
    base = QUICK_SYNTH if quick else SYNTH
    mb = base["minibatch_size"]
    rows = [
        ("synthetic", "baseline", {}, {}),
        ("synthetic", f"micro_batch_size={mb // 2}", {"micro_batch_size": mb // 2}, {}),
        ("synthetic", f"micro_batch_size={mb // 4}", {"micro_batch_size": mb // 4}, {}),
        ("synthetic", "continue_on_nonfinite=true", {"continue_on_nonfinite": True}, {}),
        ("synthetic", "MALLOC_MMAP_THRESHOLD_=131072", {}, {"MALLOC_MMAP_THRESHOLD_": "131072"}),
    ]
    rows = [(g, n, {**base, **c}, e) for g, n, c, e in rows]
    if hf_dir is not None:
        hf = {
            **HF,
            "policy_path": str(hf_dir / "policy"),
            "reward_model_path": str(hf_dir / "reward"),
            "prompts_path": str(hf_dir / "prompts.jsonl"),
        }
        rows += [
            ("hf", "baseline", hf, {}),
            ("hf", "gradient_checkpointing=true", {**hf, "gradient_checkpointing": True}, {}),
        ]
        if bf16_cpu:  # minutes per step on a CPU without bf16 matmul units: off by default
            rows.append(("hf", "dtype=bf16", {**hf, "dtype": "bf16"}, {}))
    return rows


def build_hf(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_tiny_hf as m
    import torch
    from transformers import AutoModelForCausalLM

    tok = m.make_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(m.gpt2_config(tok, n_layer=6, n_head=4, n_embd=256))
    model.save_pretrained(out / "policy")
    tok.save_pretrained(out / "policy")
    m.build_reward_model(out / "reward", tok)
    m.write_prompts(out / "prompts.jsonl")
    return out


def one(changes: dict) -> dict:
    """In a fresh process: probe one config, print the numbers that matter as JSON."""
    from trainerd import config as config_mod
    from trainerd.run.memory import probe

    cfg = config_mod.from_dict({**changes, "steps": 10}, source="bench_memory")
    cfg.validate()
    r = probe(cfg, None, steps_timed=3)
    trans = {s: v["transient_bytes"] for s, v in r["stage_transient"].items()}
    later = r["step_times_s"][1:] or r["step_times_s"]
    cpu = r["step_cpu_times_s"][1:] or r["step_cpu_times_s"]
    return {
        "step_time_s": min(later),  # wall: the least disturbed step after the first
        "step_cpu_s": min(cpu),  # CPU seconds of the step (one thread): what the slowdown compares
        "process_peak_bytes": r["rss_peak_timed_bytes"],
        "stage_peak_bytes": r["stage_peak_bytes"],
        "step_peak_bytes": max(r["stage_peak_bytes"].values()) if r["stage_peak_bytes"] else None,
        "transient_bytes": trans,
        "largest_transient_bytes": max(trans.values()) if trans else None,
        "healthy_copy_bytes": r["healthy_copy_bytes"],
    }


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller synthetic shape (minutes less)")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face rows")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--bf16-cpu", action="store_true", help="also bf16 autocast on the CPU (very slow)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all settings; the fastest round counts")
    ap.add_argument("--only", default=None, help="comma-separated parts of setting names (baselines always run)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one is not None:
        print(json.dumps(one(json.loads(a.one))))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        hf_dir = None if a.no_hf else build_hf(Path(tmp))
        rows = settings(a.quick, hf_dir, a.bf16_cpu)
        if a.only:  # the named settings and their groups' baselines
            want = [w.strip() for w in a.only.split(",") if w.strip()]
            rows = [r for r in rows if r[1] == "baseline" or any(w in r[1] for w in want)]
        best: dict[tuple[str, str], dict] = {}
        for rnd in range(max(1, a.repeat)):
            # alternate the order each round, so a slow spell of the machine does not hit one setting
            for group, name, changes, env in rows if rnd % 2 == 0 else rows[::-1]:
                e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
                p = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(changes)], capture_output=True, text=True, env=e
                )
                if p.returncode != 0:
                    print(f"{group} {name}: failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r.update(group=group, setting=name)
                old = best.get((group, name))
                if old is None or r["step_cpu_s"] < old["step_cpu_s"]:
                    best[(group, name)] = r
                msg = f"round {rnd + 1} {group} {name}: step {r['step_cpu_s']:.3f} CPU s"
                print(msg, file=sys.stderr, flush=True)
        results = [best[(g, n)] for g, n, _, _ in rows if (g, n) in best]
    print(
        f"{'group':<10}{'setting':<32}{'CPU s':>8}{'slowdown':>9}{'peak MiB':>10}{'saved':>8}"
        f"{'update MiB':>11}{'saved':>8}{'largest stage MiB':>18}"
    )
    base: dict[str, dict] = {}
    for r in results:
        b = base.setdefault(r["group"], r)
        upd = r["transient_bytes"].get("policy_update")
        bupd = b["transient_bytes"].get("policy_update")
        r["slowdown"] = r["step_cpu_s"] / b["step_cpu_s"] - 1
        r["process_peak_saved_bytes"] = b["process_peak_bytes"] - r["process_peak_bytes"]
        r["update_transient_saved_bytes"] = (bupd - upd) if upd is not None and bupd is not None else None
        print(
            f"{r['group']:<10}{r['setting']:<32}{r['step_cpu_s']:>8.3f}{r['slowdown']:>+9.1%}"
            f"{mib(r['process_peak_bytes']):>10}{mib(r['process_peak_saved_bytes']):>8}"
            f"{mib(upd):>11}{mib(r['update_transient_saved_bytes']):>8}{mib(r['largest_transient_bytes']):>18}"
        )
    print(
        "\nCPU s: one step's CPU seconds (one thread); slowdown: against the group's baseline. peak: the\n"
        "process's RSS high-water mark (setup and three steps); update: policy_update's transient\n"
        "allocations under torch.profiler. GPU only (not measured here): bf16 speed, offloading reference and\n"
        "reward model between stages, CUDA per-stage peaks; trunk sharing needs LoRA (not in the kit)."
    )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
