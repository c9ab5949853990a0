"""Hugging Face causal LMs as the policy: the model-specific half of a PPO step.

`run/trainer.py` runs one PPO step the same way for every model; what depends on the model
sits behind a small backend interface (see `trainer.SyntheticBackend` for the kit's own model):

    prompt_batch(items)         prompt ids (B, P), left-padded, and their attention mask
    generate(prompts, mask, g)  sample responses with a KV cache from the 'sampling' generator
    ref_logprobs(ep)            log-probs of the sampled tokens under the frozen reference
    score(ep), gold(ep)         reward per response (reward model or reward_fn); gold_fn or None
    forward(ep)                 the policy's log-probs, entropy and trunk features on the responses
    values(hidden)              the value head on the (detached) trunk features
    decode(ids)                 text, for samples.jsonl

Everything is loaded from local directories (`from_pretrained` of a path: never the hub), and
`transformers` is imported here only, so the synthetic task never loads it.

Sampling is a plain loop over the model's forward with its KV cache, drawing each token with
`torch.multinomial(probs, 1, generator=g)` (not `generate()`, whose draws come from the global
RNG), so a run is bitwise reproducible and resumable on CPU. Prompts are left-padded; position
ids come from the attention mask, so padding never shifts a prompt. A response is 1 on its
tokens up to and including the first EOS; after it the ids are PAD and the mask is 0.

dtype: the policy keeps fp32 master weights and runs its forward under autocast (bf16, or fp16
with the trainer's GradScaler, CUDA only); the frozen reference and reward model are loaded in
the dtype itself. Log-probs, values and every PPO quantity are fp32.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainerd.errors import ConfigError
from trainerd.rl.backend import Episodes
from trainerd.rl.model import init_weights, token_logprobs

INSTALL_HINT = "model = \"hf\" needs the hf extra: pip install 'rlhf-kit[hf]'"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def import_transformers():
    """transformers, quiet (no progress bars, warnings only), or a one-line ConfigError."""
    try:
        import transformers
    except ModuleNotFoundError:
        raise ConfigError(INSTALL_HINT) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


# -- checks and loaders shared by config validation and the backend ---------------------------------


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def check_model_dir(key: str, path: str, need_tokenizer: bool) -> None:
    """A local model directory: config.json, weights, and (if needed) a tokenizer."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config {key}: {path} does not exist")
    if not p.is_dir():
        raise ConfigError(f"config {key}: {path} is not a directory (a save_pretrained folder)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"config {key}: {path} has no config.json (not a save_pretrained folder)")
    if not any(next(p.glob(g), None) for g in WEIGHT_GLOBS):
        raise ConfigError(f"config {key}: {path} has no weights (*.safetensors or *.bin)")
    if need_tokenizer and not has_tokenizer(p):
        raise ConfigError(f"config {key}: {path} has no tokenizer (save one with tokenizer.save_pretrained)")


def load_callable(key: str, spec: str) -> Callable:
    """'package.module:function' or '/path/to/file.py:function' -> the function."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ConfigError(f"config {key} must look like package.module:function or file.py:function, got {spec!r}")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"config {key}: {mod_name} does not exist")
            name = f"_trainerd_user_{path.stem}_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(name)
            if module is None:
                loader = importlib.util.spec_from_file_location(name, path)
                assert loader is not None and loader.loader is not None
                module = importlib.util.module_from_spec(loader)
                loader.loader.exec_module(module)
                sys.modules[name] = module
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as e:  # ImportError, or the module failed while importing
        raise ConfigError(f"config {key}: cannot import {mod_name}: {type(e).__name__}: {e}".splitlines()[0]) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"config {key}: {mod_name} has no function {fn_name!r}")
    return fn


def read_prompts(path: str, column: str, key: str = "prompts_path") -> list[str]:
    """The prompt column of a JSONL file, a Parquet file, or a `datasets.save_to_disk` folder."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config {key}: {path} does not exist")
    if p.is_dir():
        try:
            import datasets
        except ModuleNotFoundError:
            raise ConfigError(f"config {key}: {path} is a folder; reading it needs `pip install datasets`") from None
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise ConfigError(
                f"config {key}: {path} is not a datasets.save_to_disk folder: {e}".splitlines()[0]
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        if column not in ds.column_names:
            raise ConfigError(f"config prompt_column: {path} has no column {column!r} (it has {ds.column_names})")
        texts = list(ds[column])
    elif p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ModuleNotFoundError:
            raise ConfigError(f"config {key}: reading Parquet needs `pip install pyarrow`") from None
        try:
            table = pq.read_table(p)
        except Exception as e:
            raise ConfigError(f"config {key}: {path} is not a Parquet file: {e}".splitlines()[0]) from None
        if column not in table.column_names:
            raise ConfigError(f"config prompt_column: {path} has no column {column!r} (it has {table.column_names})")
        texts = table.column(column).to_pylist()
    else:
        texts = []
        try:
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        raise ConfigError(f"config {key}: {path} line {n} is not JSON") from None
                    if not isinstance(row, dict) or column not in row:
                        raise ConfigError(f"config prompt_column: {path} line {n} has no column {column!r}")
                    texts.append(row[column])
        except UnicodeDecodeError:
            raise ConfigError(f"config {key}: {path} is not UTF-8 JSONL (use .parquet for Parquet)") from None
        except OSError as e:
            raise ConfigError(f"config {key}: cannot read {path}: {e.strerror}") from None
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"config prompt_column: row {bad} of {path} is not a string")
    if not texts:
        raise ConfigError(f"config {key}: {path} has no prompts")
    return texts


def validate(cfg) -> None:
    """Everything the HF backend will load, checked before a run dir exists (ConfigError)."""
    if not cfg.policy_path:
        raise ConfigError('config model = "hf" needs policy_path (a save_pretrained folder)')
    check_model_dir("policy_path", cfg.policy_path, need_tokenizer=True)
    if cfg.ref_path:
        check_model_dir("ref_path", cfg.ref_path, need_tokenizer=False)
    if bool(cfg.reward_model_path) == bool(cfg.reward_fn):
        raise ConfigError('config model = "hf" needs exactly one of reward_model_path and reward_fn')
    if cfg.reward_model_path:
        check_model_dir("reward_model_path", cfg.reward_model_path, need_tokenizer=False)
    else:
        load_callable("reward_fn", cfg.reward_fn)
    if cfg.gold_fn:
        load_callable("gold_fn", cfg.gold_fn)
    if not cfg.prompts_path:
        raise ConfigError('config model = "hf" needs prompts_path (JSONL, Parquet or a datasets folder)')
    n = len(read_prompts(cfg.prompts_path, cfg.prompt_column))
    if n < cfg.batch_size:
        raise ConfigError(f"config prompts_path has {n} prompts, fewer than batch_size ({cfg.batch_size})")
    if cfg.dtype == "fp16" and not cfg.device.startswith("cuda"):
        raise ConfigError("config dtype fp16 needs a CUDA device (on CPU use fp32 or bf16)")
    if cfg.inject and cfg.inject.split("@")[0] == "reward_hack":
        raise ConfigError('config inject reward_hack needs the synthetic task (model = "synthetic")')


def weights_bytes(path: str | None) -> int:
    """Bytes of a model folder's weights on disk."""
    if not path:
        return 0
    return sum(f.stat().st_size for g in WEIGHT_GLOBS for f in Path(path).glob(g) if f.is_file())


def fp32_bytes(path: str | None) -> int:
    """The folder's weights as fp32 (files in a 16-bit dtype are counted twice)."""
    try:
        conf = json.loads((Path(path) / "config.json").read_text()) if path else {}
    except (OSError, ValueError):
        conf = {}
    dtype = str(conf.get("dtype") or conf.get("torch_dtype") or "float32")
    return weights_bytes(path) * (1 if dtype == "float32" else 2)


def estimated_host_bytes(cfg) -> int:
    """Host memory a run needs, roughly: on CPU the policy with grads and AdamW state (fp32, four
    copies) plus the reference and the reward model; on a GPU the host only holds a model while
    it is loaded. Activations are not estimated."""
    policy, rm = fp32_bytes(cfg.policy_path), fp32_bytes(cfg.reward_model_path)
    ref = fp32_bytes(cfg.ref_path) if cfg.ref_path else policy
    scale = 0.5 if cfg.dtype != "fp32" else 1.0  # reference and reward model in the 16-bit dtype
    if cfg.device.startswith("cuda"):
        return max(policy, ref, rm)
    return int(4 * policy + scale * (ref + rm))


# -- the backend ------------------------------------------------------------------------------------


def _has_param(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _no_dropout(model: nn.Module) -> None:
    """Dropout makes the rollout's and the update's log-probs disagree (and draws from the global
    RNG): switch every dropout of the model off, as the kit's own model has none."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, g: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / T), nucleus-filtered to top_p, drawn with `g`."""
    probs = F.softmax(logits.float() / temperature if temperature != 1.0 else logits.float(), dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=g).squeeze(1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
    sorted_p = sorted_p * keep
    pick = torch.multinomial(sorted_p, 1, generator=g)
    return order.gather(-1, pick).squeeze(1)


class GPT2Decoder:
    """A lean KV-cache decode step for GPT-2: the model's own weights and kernels, without the
    per-call machinery of `forward` (output dataclasses, mask builders, cache objects, kwarg
    wrappers), with preallocated key/value buffers and the MLP's tanh-GELU as one kernel: about
    half of a small model's decode time on CPU. It only samples: the old log-probs PPO uses are
    recomputed by the model's `forward`. A model it does not cover decodes through `forward`;
    tests/trainerd/test_hf.py checks its logits against forward's."""

    def __init__(self, model: nn.Module):
        tr = model.transformer
        self.wte, self.wpe, self.blocks, self.ln_f = tr.wte, tr.wpe, list(tr.h), tr.ln_f
        self.head = model.lm_head
        self.heads = model.config.n_head
        self.tanh_gelu = model.config.activation_function in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

    @staticmethod
    def supports(model: nn.Module) -> bool:
        c = model.config
        return (
            c.model_type == "gpt2"
            and hasattr(model, "transformer")
            and hasattr(model, "lm_head")
            and not c.add_cross_attention
            and not c.reorder_and_upcast_attn
            and getattr(c, "_attn_implementation", "sdpa") in ("sdpa", "eager")
        )

    def start(self, cache, prompt_mask: torch.Tensor, max_new: int) -> dict | None:
        """Buffers for P + max_new positions holding the prefill's keys and values, and the
        weights of this generation (read once: the optimizer updates them between calls)."""
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(self.blocks):
            return None
        B, P = prompt_mask.shape
        kv = []
        for layer in layers:
            k, v = layer.keys, layer.values  # (B, H, P, head_dim)
            K = k.new_empty(B, k.shape[1], P + max_new, k.shape[3])
            V = v.new_empty(B, v.shape[1], P + max_new, v.shape[3])
            K[:, :, :P], V[:, :, :P] = k, v
            kv.append((K, V))
        keys = torch.zeros(B, P + max_new, dtype=torch.bool, device=prompt_mask.device)
        keys[:, :P] = prompt_mask.bool()
        weights = [
            (
                (b.ln_1.weight, b.ln_1.bias, b.ln_1.eps),
                (b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight, b.attn.c_proj.bias, b.attn.scaling),
                (b.ln_2.weight, b.ln_2.bias, b.ln_2.eps),
                (b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias, b.mlp.act),
            )
            for b in self.blocks
        ]
        return {"kv": kv, "keys": keys, "n": P, "weights": weights}

    def step(self, st: dict, ids: torch.Tensor, pos: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after one new token per row at `pos`; `real` is False for a row that
        already ended (its token is padding, masked from every later query). GPT-2's Conv1D is
        `addmm(bias, x, weight)`; one new token per row keeps every activation (B, C)."""
        n = st["n"]
        st["n"] = n + 1
        st["keys"][:, n] = real
        mask = st["keys"][:, None, None, : n + 1]
        B, C, H = ids.shape[0], self.wte.embedding_dim, self.heads
        D = C // H
        x = F.embedding(ids.view(B), self.wte.weight) + F.embedding(pos.view(B), self.wpe.weight)
        for (K, V), (ln1, attn, ln2, mlp) in zip(st["kv"], st["weights"]):
            q, k, v = torch.addmm(attn[1], F.layer_norm(x, (C,), *ln1[:2], ln1[2]), attn[0]).split(C, dim=1)
            K[:, :, n] = k.view(B, H, D)
            V[:, :, n] = v.view(B, H, D)
            y = F.scaled_dot_product_attention(
                q.view(B, H, 1, D), K[:, :, : n + 1], V[:, :, : n + 1], attn_mask=mask, scale=attn[4]
            )
            x = x + torch.addmm(attn[3], y.reshape(B, C), attn[2])
            h = torch.addmm(mlp[1], F.layer_norm(x, (C,), *ln2[:2], ln2[2]), mlp[0])
            h = F.gelu(h, approximate="tanh") if self.tanh_gelu else mlp[4](h)
            x = x + torch.addmm(mlp[3], h, mlp[2])
        return F.linear(self.ln_f(x), self.head.weight, self.head.bias)


class HFBackend:
    """A local Hugging Face causal LM as the policy (with a value head on its trunk), its frozen
    reference, and a reward model or reward function; see the module docstring."""

    saves_pretrained = True

    def __init__(self, cfg, rng, device: torch.device):
        tf = import_transformers()
        self.cfg, self.device = cfg, device
        self.dtype = DTYPES[cfg.dtype]
        self.amp = self.dtype != torch.float32
        self.temperature, self.top_p, self.max_new = cfg.temperature, cfg.top_p, cfg.max_response_len
        self.micro = cfg.micro_batch_size or None

        self.tok = tf.AutoTokenizer.from_pretrained(cfg.policy_path)
        self.tok.padding_side = "left"
        if self.tok.eos_token_id is None:
            raise ConfigError(f"config policy_path: the tokenizer in {cfg.policy_path} has no eos_token")
        self.eos_id = int(self.tok.eos_token_id)
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id)

        self.policy = tf.AutoModelForCausalLM.from_pretrained(cfg.policy_path, dtype=torch.float32)
        _no_dropout(self.policy)
        if cfg.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.ref_path:
            self.ref = tf.AutoModelForCausalLM.from_pretrained(cfg.ref_path, dtype=self.dtype)
        else:
            self.ref = copy.deepcopy(self.policy).to(self.dtype)
        self.ref.requires_grad_(False).eval()
        _no_dropout(self.ref)
        width = self.policy.config.get_text_config().hidden_size
        self.value_head = nn.Sequential(nn.Linear(width, cfg.value_hidden), nn.Tanh(), nn.Linear(cfg.value_hidden, 1))
        init_weights(self.value_head, rng["init"], 1)  # on CPU, from the 'init' generator; then moved
        self.policy.to(device)
        self.ref.to(device)
        self.value_head.to(device)

        self.rm = self.rm_tok = None
        self.reward_fn = self.gold_fn = None
        if cfg.reward_model_path:
            self.rm = tf.AutoModelForSequenceClassification.from_pretrained(cfg.reward_model_path, dtype=self.dtype)
            self.rm.requires_grad_(False).eval().to(device)
            if has_tokenizer(cfg.reward_model_path):
                rm_tok = tf.AutoTokenizer.from_pretrained(cfg.reward_model_path)
                if rm_tok.get_vocab() != self.tok.get_vocab():
                    self.rm_tok = rm_tok  # a different vocabulary: score re-tokenized text
            rm_pad = self.rm_tok.pad_token_id if self.rm_tok is not None else self.pad_id
            if rm_pad is None:
                rm_pad = self.rm_tok.eos_token_id
            self.rm_pad_id = int(rm_pad if rm_pad is not None else 0)
            if self.rm.config.pad_token_id is None:
                self.rm.config.pad_token_id = self.rm_pad_id
        else:
            self.reward_fn = load_callable("reward_fn", cfg.reward_fn)
        if cfg.gold_fn:
            self.gold_fn = load_callable("gold_fn", cfg.gold_fn)
        self.scorer = None  # fault injection may wrap the scoring (reward_hack is synthetic-only)

        texts = read_prompts(cfg.prompts_path, cfg.prompt_column)
        fallback = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eos_id
        self.prompt_ids = [ids[-cfg.max_prompt_len :] or [fallback] for ids in self.tok(texts)["input_ids"]]

        fwd = self.policy.forward
        self._cache_kw = "cache" if _has_param(fwd, "cache") else "past_key_values"
        self._keep_logits = _has_param(fwd, "logits_to_keep")
        self._decoder = GPT2Decoder(self.policy) if GPT2Decoder.supports(self.policy) else None

    # -- the parts a trainer asks for -----------------------------------------------------------
    @property
    def policy_module(self) -> nn.Module:
        return self.policy

    def policy_params(self):
        return self.policy.parameters()

    def value_params(self):
        return self.value_head.parameters()

    def train(self, mode: bool) -> None:
        self.policy.train(mode)
        self.value_head.train(mode)

    def dataset(self) -> torch.Tensor:
        """What the prompt cursor walks: prompt indices."""
        return torch.arange(len(self.prompt_ids))

    def prompt_batch(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.prompt_ids[int(i)] for i in items]
        P = max(len(r) for r in rows)
        ids = torch.full((len(rows), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), P), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, P - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, P - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, prompt_mask: torch.Tensor, g: torch.Generator):
        """Responses (B, R) and their mask, sampled with the model's KV cache; stops once every
        row has its EOS."""
        B, R, dev = prompts.shape[0], self.max_new, prompts.device
        attn = prompt_mask.long()
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        kw = {"logits_to_keep": 1} if self._keep_logits else {}
        with self._autocast():
            out = self.policy(input_ids=prompts, attention_mask=attn, position_ids=pos, use_cache=True, **kw)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        fast = self._decoder.start(cache, prompt_mask, R) if self._decoder is not None else None
        logits = out.logits[:, -1, :]
        last = pos[:, -1:].clone()
        responses = torch.full((B, R), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((B, R), dtype=torch.float32, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        for t in range(R):
            nxt = sample_tokens(logits, self.temperature, self.top_p, g)
            real = ~finished  # this token counts unless its row already ended
            nxt.masked_fill_(finished, self.pad_id)
            responses[:, t] = nxt
            mask[:, t] = real
            finished |= nxt == self.eos_id
            if bool(finished.all()) or t == R - 1:
                break
            last += 1
            with self._autocast():
                if fast is not None:
                    logits = self._decoder.step(fast, nxt[:, None], last, real)
                    continue
                attn = torch.cat([attn, real[:, None].long()], 1)
                out = self.policy(
                    input_ids=nxt[:, None],
                    attention_mask=attn,
                    position_ids=last,
                    use_cache=True,
                    **{self._cache_kw: cache},
                )
            logits = out.logits[:, -1, :]
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return Episodes(prompts, prompt_mask, responses, mask)

    def _chunks(self, B: int) -> list[slice]:
        """No-grad passes run in micro-batches (memory), the same split every time."""
        n = self.micro if self.micro and not torch.is_grad_enabled() else B
        return [slice(i, min(B, i + n)) for i in range(0, B, n)]

    def _lm(self, model: nn.Module, ep, hidden: bool):
        """(logits (B, R, V) fp32 predicting each response token, trunk features (B, R, d) or None)."""
        P, R = ep.prompts.shape[1], ep.responses.shape[1]
        seq = torch.cat([ep.prompts, ep.responses], 1)
        attn = torch.cat([ep.prompt_mask.long(), ep.mask.long()], 1)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        kw = {"logits_to_keep": R + 1} if self._keep_logits else {}
        ctx = self._autocast() if model is self.policy else nullcontext()
        with ctx:
            out = model(
                input_ids=seq, attention_mask=attn, position_ids=pos, use_cache=False, output_hidden_states=hidden, **kw
            )
        logits = out.logits[:, -(R + 1) : -1] if self._keep_logits else out.logits[:, P - 1 : P - 1 + R]
        h = out.hidden_states[-1][:, P - 1 : P - 1 + R] if hidden else None
        return logits.float(), h

    def ref_logprobs(self, ep) -> torch.Tensor:
        parts = []
        for s in self._chunks(ep.responses.shape[0]):
            sub = ep.select(s)
            logits, _ = self._lm(self.ref, sub, hidden=False)
            if self.temperature != 1.0:
                logits = logits / self.temperature
            logp_all = F.log_softmax(logits, dim=-1)  # as token_logprobs, without the entropy
            parts.append(logp_all.gather(-1, sub.responses.unsqueeze(-1)).squeeze(-1))
        return torch.cat(parts)

    def forward(self, ep):
        """The policy on (prompt, response): log-probs and entropy of the response tokens and
        the trunk's features at the positions that predict them."""
        logps, ents, hs = [], [], []
        for s in self._chunks(ep.responses.shape[0]):
            sub = ep.select(s)
            logits, h = self._lm(self.policy, sub, hidden=True)
            logp, ent = token_logprobs(logits, sub.responses, self.temperature)
            logps.append(logp), ents.append(ent), hs.append(h)
        if len(logps) == 1:
            return logps[0], ents[0], hs[0]
        return torch.cat(logps), torch.cat(ents), torch.cat(hs)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden.detach().float()).squeeze(-1)

    # -- reward ------------------------------------------------------------------------------------
    def _real(self, ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        return [[int(t) for t, m in zip(r.tolist(), k.tolist()) if m] for r, k in zip(ids, mask)]

    def texts(self, ep) -> tuple[list[str], list[str]]:
        if "texts" not in ep.cache:
            p = [self.tok.decode(r, skip_special_tokens=True) for r in self._real(ep.prompts, ep.prompt_mask)]
            r = [self.tok.decode(r, skip_special_tokens=True) for r in self._real(ep.responses, ep.mask)]
            ep.cache["texts"] = (p, r)
        return ep.cache["texts"]

    def _call_fn(self, fn, ep, key: str) -> torch.Tensor:
        prompts, responses = self.texts(ep)
        out = [float(x) for x in fn(prompts, responses)]
        if len(out) != len(responses):
            raise ValueError(f"{key} returned {len(out)} scores for {len(responses)} responses")
        return torch.tensor(out, dtype=torch.float32, device=self.device)

    def score(self, ep) -> torch.Tensor:
        if self.reward_fn is not None:
            return self._call_fn(self.reward_fn, ep, "reward_fn")
        if self.rm_tok is not None:  # its own vocabulary: the decoded text, re-tokenized
            p, r = self.texts(ep)
            rows = [ids for ids in self.rm_tok([a + b for a, b in zip(p, r)])["input_ids"]]
        else:
            rows = [a + b for a, b in zip(self._real(ep.prompts, ep.prompt_mask), self._real(ep.responses, ep.mask))]
        scores = []
        for s in self._chunks(len(rows)):
            chunk = rows[s]
            L = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), L), self.rm_pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), L), dtype=torch.long)
            for i, x in enumerate(chunk):  # left-packed: the last position is the last real token
                ids[i, L - len(x) :] = torch.tensor(x, dtype=torch.long)
                attn[i, L - len(x) :] = 1
            ids, attn = ids.to(self.device), attn.to(self.device)
            pos = (attn.cumsum(-1) - 1).clamp_min(0)
            out = self.rm(input_ids=ids, attention_mask=attn, position_ids=pos)
            scores.append(out.logits[:, 0].float())
        return torch.cat(scores)

    def gold(self, ep) -> torch.Tensor | None:
        return self._call_fn(self.gold_fn, ep, "gold_fn") if self.gold_fn is not None else None

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    # -- state -----------------------------------------------------------------------------------
    def constant_state(self) -> dict:
        """Nothing: the reference and the reward model are loaded again from their paths."""
        return {}

    def load_constant_state(self, s: dict) -> None:
        pass

    def policy_state(self) -> dict:
        return {"lm": self.policy.state_dict(), "value_head": self.value_head.state_dict()}

    def load_policy_state(self, s: dict) -> None:
        self.policy.load_state_dict(s["lm"])
        self.value_head.load_state_dict(s["value_head"])

    def save_pretrained(self, out: Path) -> None:
        """The policy as a Hugging Face folder (safetensors) with its tokenizer and value head."""
        from safetensors.torch import save_file

        self.policy.save_pretrained(out, safe_serialization=True)
        self.tok.save_pretrained(out)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
            out / "value_head.safetensors",
        )
