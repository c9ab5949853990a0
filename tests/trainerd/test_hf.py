"""PPO on Hugging Face causal LMs (model = "hf"), offline: tiny random models built here.

One session fixture builds a character tokenizer, a GPT-2-style policy, a Llama-style policy, a
GPT-2 reward model, a prompts file and a reward/gold function file (about 3 s), then starts the
real `trainerd` processes two at a time: the reference run, a same-seed twin, a run SIGKILLed in
step 3 and resumed, and a reward_fn + Llama + bf16 + gradient-checkpointing run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from protocol import catalogue  # noqa: E402
from protocol.jsonl import read_jsonl  # noqa: E402
from protocol.rundir import RunPaths, read_events, read_manifest  # noqa: E402
from protocol.steplog import read_steplog  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
MAIN = "from trainerd.cli import main; main()"

FNS = """
def reward(prompts, responses):
    return [sum(c in "aeiou" for c in r) / (1 + len(r)) for r in responses]

def gold(prompts, responses):
    return [float(len(r) > 3) for r in responses]
"""

# SIGKILL in step 3, at its first value-head update (the policy already updated in memory)
KILL_IN_STEP_3 = textwrap.dedent("""
    import os, signal
    import trainerd.run.trainer as _t
    _orig = _t.Trainer.ppo_step
    def _ppo_step(self, step):
        if step == 3:
            self.c.value_opt.step = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        return _orig(self, step)
    _t.Trainer.ppo_step = _ppo_step
""")


def _make_tiny():
    spec = importlib.util.spec_from_file_location("make_tiny_hf", REPO / "scripts" / "make_tiny_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_trainerd(*args: str, bootstrap: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SEED", None)
    return subprocess.run(
        [sys.executable, "-c", bootstrap + "\n" + MAIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def write_toml(path: Path, **keys) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def records(paths: RunPaths) -> list[dict]:
    recs, _ = read_steplog(paths.steps)
    return recs


def bits(v):
    return struct.pack("<d", v) if isinstance(v, float) else v


def assert_bitwise_equal(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in catalogue.deterministic_fields():
            assert (k in ra) == (k in rb), (ra["step"], k)
            if k in ra:
                assert bits(ra[k]) == bits(rb[k]), f"step {ra['step']} {k}: {ra[k]!r} != {rb[k]!r}"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    mk = _make_tiny()
    root = tmp_path_factory.mktemp("hf_tiny")
    tok = mk.make_tokenizer()
    out = {
        "root": root,
        "policy": mk.build_policy(root / "policy", tok, "gpt2"),
        "llama": mk.build_policy(root / "llama", tok, "llama"),
        "reward": mk.build_reward_model(root / "reward", tok, with_tokenizer=False),
        "prompts": mk.write_prompts(root / "prompts.jsonl", n=32),
        "no_tok": mk.build_reward_model(root / "no_tok", tok, with_tokenizer=False),  # a model dir, no tokenizer
    }
    (root / "fns.py").write_text(FNS)
    base = dict(
        model="hf",
        device="cpu",
        seed=3,
        steps=STEPS,
        checkpoint_every=2,
        samples_every=2,
        batch_size=4,
        minibatch_size=2,
        micro_batch_size=1,  # gradient accumulation over two micro-batches
        ppo_epochs=2,
        max_prompt_len=16,
        max_response_len=8,
        learning_rate=1e-3,
        lr_warmup_steps=1,
        profile_steps="",
    )
    out["base"] = base
    out["rm_cfg"] = write_toml(
        root / "rm.toml",
        **base,
        policy_path="policy",
        reward_model_path="reward",
        gold_fn="fns.py:gold",
        prompts_path="prompts.jsonl",
    )
    out["fn_cfg"] = write_toml(
        root / "fn.toml",
        **{**base, "steps": 2, "dtype": "bf16", "gradient_checkpointing": True, "micro_batch_size": 0},
        policy_path="llama",
        reward_fn="fns.py:reward",
        prompts_path="prompts.jsonl",
    )
    return out


@pytest.fixture(scope="session")
def hf_runs(tiny):
    """The runs, two processes at a time: reference + twin, then killed + reward_fn run."""
    runs = tiny["root"] / "runs"

    def start(run_id, cfg, bootstrap=""):
        args = ["start", "--foreground", "--config", str(cfg), "--runs-dir", str(runs), "--run-id", run_id]
        return run_trainerd(*args, bootstrap=bootstrap)

    def killed_then_resumed():
        killed = start("killed", tiny["rm_cfg"], KILL_IN_STEP_3)
        resumed = run_trainerd("resume", str(runs / "killed"), "--foreground")
        return killed, resumed

    with ThreadPoolExecutor(2) as pool:
        ref, twin = pool.submit(start, "ref", tiny["rm_cfg"]), pool.submit(start, "twin", tiny["rm_cfg"])
        ref, twin = ref.result(), twin.result()
        kr, fn = pool.submit(killed_then_resumed), pool.submit(start, "fn", tiny["fn_cfg"])
        (killed, resumed), fn = kr.result(), fn.result()
    return {
        "runs": runs,
        "ref": ref,
        "twin": twin,
        "killed": killed,
        "resumed": resumed,
        "fn": fn,
    }


def test_run_writes_a_complete_run_dir(hf_runs):
    assert hf_runs["ref"].returncode == 0, hf_runs["ref"].stderr[-3000:]
    paths = RunPaths(hf_runs["runs"] / "ref")
    recs = records(paths)
    assert len(recs) == STEPS
    for r in recs:
        assert catalogue.check_record(r) == []
        assert "gold_reward_mean" in r  # a gold_fn is set
        assert set(r["stage_s"]) == set(catalogue.STAGES)
        assert r["stage_s"]["rollout"] > 0 and r["stage_s"]["policy_update"] > 0
        assert set(r["stage_peak_bytes"]) == set(catalogue.STAGES) - {"other"}
        assert all(v > 0 for v in r["stage_peak_bytes"].values())
        assert 0 < r["tokens"] <= 4 * 8 and r["batch_size"] == 4
        assert all(math.isfinite(r[k]) for k in ("kl", "entropy", "policy_loss", "value_loss", "reward_mean"))
    assert recs[-1]["approx_kl"] != 0.0  # the second epoch sees an updated policy
    samples = read_jsonl(paths.samples)
    assert {s["step"] for s in samples} == {2, 4} and len(samples) == 6
    for s in samples:
        assert isinstance(s["prompt"], str) and s["prompt"] and isinstance(s["response"], str)
        assert "<pad>" not in s["prompt"] + s["response"] and "<eos>" not in s["response"]
        assert isinstance(s["gold"], float) and 1 <= s["length"] <= 8
    m = read_manifest(paths)
    assert m["status"] == "finished" and m["config"]["model"] == "hf"
    assert Path(m["config"]["policy_path"]).is_absolute()  # resolved against the TOML's folder
    ck = paths.checkpoints
    assert (ck / "step_000004").is_dir() and (ck / "step_000004_hf" / "model.safetensors").is_file()
    final = ck / "final_hf"
    assert (final / "model.safetensors").is_file() and (final / "value_head.safetensors").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)


def test_two_same_seed_runs_are_bitwise_equal(hf_runs):
    assert hf_runs["twin"].returncode == 0, hf_runs["twin"].stderr[-3000:]
    ref = records(RunPaths(hf_runs["runs"] / "ref"))
    assert_bitwise_equal(ref, records(RunPaths(hf_runs["runs"] / "twin")))


def test_sigkilled_run_resumes_bitwise_equal(hf_runs):
    assert hf_runs["killed"].returncode == -9, hf_runs["killed"].stderr[-3000:]
    assert hf_runs["resumed"].returncode == 0, hf_runs["resumed"].stderr[-3000:]
    paths = RunPaths(hf_runs["runs"] / "killed")
    resumed = [e for e in read_events(paths) if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 2
    ref = records(RunPaths(hf_runs["runs"] / "ref"))
    assert_bitwise_equal(ref, records(paths))
    checks = [e for e in read_events(paths) if e["event"] == "resume_check"]
    assert checks and checks[-1].get("identical") is True, checks


def test_reward_fn_llama_bf16_checkpointing_run(hf_runs):
    assert hf_runs["fn"].returncode == 0, hf_runs["fn"].stderr[-3000:]
    paths = RunPaths(hf_runs["runs"] / "fn")
    recs = records(paths)
    assert len(recs) == 2
    for r in recs:
        assert catalogue.check_record(r) == []
        assert "gold_reward_mean" not in r  # no gold_fn: the optional field is left out
        assert math.isfinite(r["reward_mean"]) and math.isfinite(r["kl"])
    samples = read_jsonl(paths.samples)
    assert samples and all(s["gold"] is None for s in samples)
    assert "gold_reward_mean" not in json.dumps(recs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"policy_path": "missing"}, "policy_path"),
        ({"policy_path": "no_tok"}, "has no tokenizer"),
        ({"prompt_column": "text"}, "no column 'text'"),
        ({"reward_model_path": None, "reward_fn": None}, "exactly one of reward_model_path and reward_fn"),
    ],
)
def test_bad_config_is_one_line_exit_2_and_no_run_dir(tiny, change, message):
    keys = dict(
        tiny["base"],
        policy_path="policy",
        reward_model_path="reward",
        prompts_path="prompts.jsonl",
    )
    keys.update(change)
    keys = {k: v for k, v in keys.items() if v is not None}
    cfg = write_toml(tiny["root"] / f"bad_{len(message)}.toml", **keys)
    runs = tiny["root"] / f"bad_runs_{len(message)}"
    r = run_trainerd("start", "--foreground", "--config", str(cfg), "--runs-dir", str(runs), timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_prompts_from_parquet_and_a_datasets_folder(tiny, tmp_path):
    from trainerd.errors import ConfigError
    from trainerd.rl.hf import read_prompts

    texts = read_prompts(str(tiny["prompts"]), "prompt")
    assert len(texts) == 32
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": texts}), tmp_path / "p.parquet")
    assert read_prompts(str(tmp_path / "p.parquet"), "q") == texts
    with pytest.raises(ConfigError, match="no column 'prompt'"):
        read_prompts(str(tmp_path / "p.parquet"), "prompt")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"prompt": texts}).save_to_disk(str(tmp_path / "ds"))
    assert read_prompts(str(tmp_path / "ds"), "prompt") == texts


def test_smoke_never_imports_transformers():
    code = textwrap.dedent("""
        import sys
        from trainerd.config import load_config
        from trainerd.run.determinism import apply_determinism
        from trainerd.run.trainer import build_components
        cfg = load_config(preset="smoke", n_prompts=64)
        rng, _ = apply_determinism(cfg.seed, 1, "cpu")
        build_components(cfg, rng, rng.device)
        assert "transformers" not in sys.modules, "transformers was imported"
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]


def test_gpt2_fast_decoder_matches_the_models_forward(tiny):
    """The lean GPT-2 decode step samples from the same distribution as the model's forward
    (left padding, a row that ended, the KV cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainerd.rl.hf import GPT2Decoder

    model = AutoModelForCausalLM.from_pretrained(tiny["policy"]).eval()
    assert GPT2Decoder.supports(model)
    assert not GPT2Decoder.supports(AutoModelForCausalLM.from_pretrained(tiny["llama"]))
    dec = GPT2Decoder(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 30, (3, 6), generator=g)
    attn = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    ids = ids.masked_fill(attn == 0, 0)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        cache = out.cache
        st = dec.start(cache, attn, 5)
        last = pos[:, -1:].clone()
        for t in range(5):
            nxt = torch.randint(4, 30, (3,), generator=g)
            real = torch.tensor([True, t < 2, True])
            attn = torch.cat([attn, real[:, None].long()], 1)
            last += 1
            fast = dec.step(st, nxt[:, None], last, real)
            out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=last, cache=cache, use_cache=True)
            cache = out.cache
            ref = out.logits[:, -1]
            assert torch.allclose(fast[real], ref[real], atol=1e-5, rtol=0), (fast - ref).abs().max()


def test_top_p_sampling_and_fp16_needs_cuda(tiny):
    import torch

    from trainerd.config import from_dict
    from trainerd.errors import ConfigError
    from trainerd.rl.hf import sample_tokens

    sharp = torch.tensor([[4.0, 3.0, 0.0, -1.0]] * 64)
    flat = torch.zeros(64, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_tokens(sharp, 1.0, 0.5, g).tolist()) == {0}  # the top token holds > 0.5
    assert set(sample_tokens(flat, 1.0, 0.5, g).tolist()) == {0, 1}  # the smallest prefix reaching 0.5
    assert set(sample_tokens(flat, 1.0, 1.0, g).tolist()) == {0, 1, 2, 3}
    root = tiny["root"]
    keys = dict(
        tiny["base"],
        policy_path=str(root / "policy"),
        reward_model_path=str(root / "reward"),
        prompts_path=str(root / "prompts.jsonl"),
        dtype="fp16",
    )
    keys.pop("profile_steps")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        from_dict(keys).validate()
