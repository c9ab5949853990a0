"""A small causal transformer (nanoGPT style), a policy with a value head, and KV-cache sampling.

Read top to bottom: attention, MLP, block, the GPT trunk, the policy (GPT + value head), and
`generate`, which samples with a KV cache from a seeded torch.Generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainerd.rl.task import EOS, PAD


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    d_model: int
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None and "k" in cache:
            # Decoding one new token: it may attend to every cached position, so no mask is needed.
            k = torch.cat([cache["k"], k], dim=2)
            v = torch.cat([cache["v"], v], dim=2)
            causal = False
        else:
            causal = True
        if cache is not None:
            cache["k"], cache["v"] = k, v
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embeddings, pre-LN blocks, final LayerNorm, tied-free LM head."""

    def __init__(self, cfg: GPTConfig, init_generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, init_generator, cfg.n_layer)

    def forward(self, idx: torch.Tensor, caches: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B,T,V), hidden (B,T,C)); with `caches`, continues after the cached positions."""
        B, T = idx.shape
        start = caches[0]["k"].shape[2] if caches and "k" in caches[0] else 0
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None)
        h = self.ln_f(x)
        return self.lm_head(h), h


def init_weights(module: nn.Module, g: torch.Generator | None, n_layer: int) -> None:
    """GPT-2 init drawn from the 'init' generator, so weights do not depend on other RNG use."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                if name.endswith("weight"):  # LayerNorm gain
                    p.fill_(1.0)
                else:
                    p.zero_()
                continue
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
            p.normal_(0.0, std, generator=g)


class Policy(nn.Module):
    """The language model plus a value head.

    The value head is a small MLP on the trunk's *detached* hidden states: the critic learns
    from the policy's features without pushing its own gradients into them, so the policy
    update and the value update are separate optimisations (and separate profiler stages).
    """

    def __init__(self, cfg: GPTConfig, value_hidden: int, init_generator: torch.Generator | None = None):
        super().__init__()
        self.lm = GPT(cfg, init_generator)
        self.value_head = nn.Sequential(nn.Linear(cfg.d_model, value_hidden), nn.Tanh(), nn.Linear(value_hidden, 1))
        init_weights(self.value_head, init_generator, 1)

    def forward(self, idx):
        logits, hidden = self.lm(idx)
        return logits, hidden

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden.detach()).squeeze(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Log-probability of each target token and the entropy of each distribution."""
    logp_all = F.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def response_slice(prompt_len: int, response_len: int) -> slice:
    """Positions whose logits predict the response tokens (each position predicts the next)."""
    return slice(prompt_len - 1, prompt_len - 1 + response_len)


@torch.no_grad()
def generate(
    lm: GPT, prompts: torch.Tensor, max_new: int, generator: torch.Generator, temperature: float = 1.0
) -> torch.Tensor:
    """Sample responses (B, max_new) with a KV cache; PAD after a sequence's EOS.

    Each token is `torch.multinomial(p, 1, generator=g)` from the 'sampling' generator, which
    does not depend on the thread count. Stops early once every sequence has ended.
    """
    B = prompts.shape[0]
    caches = [{} for _ in lm.blocks]
    logits, _ = lm(prompts, caches)
    out = torch.full((B, max_new), PAD, dtype=torch.long, device=prompts.device)
    finished = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    for t in range(max_new):
        probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = torch.where(finished, torch.full_like(nxt, PAD), nxt)
        out[:, t] = nxt
        finished |= nxt == EOS
        if bool(finished.all()) or t == max_new - 1:
            break
        logits, _ = lm(nxt.unsqueeze(1), caches)
    return out


@torch.no_grad()
def generate_shard(
    lm: GPT,
    prompts: torch.Tensor,
    max_new: int,
    generator: torch.Generator,
    temperature: float,
    rows: slice,
    global_batch: int,
    agree_draws,
) -> torch.Tensor:
    """`generate` for rows `rows` of a global batch of `global_batch` prompts (data-parallel
    PPO): the same tokens those rows get in a single-process run of the whole batch.

    `torch.multinomial(p, 1, generator=g)` is `argmax(p / E)` with E ~ Exponential(1) drawn
    from g for the whole (B, V) tensor; so each rank draws E for the global batch and keeps its
    rows. The global run stops when every sequence of the whole batch has ended, so a rank
    whose rows ended earlier draws E for the missing positions too (`agree_draws(n)`: the
    largest n over the ranks), keeping every rank's generator where the single process's is.
    """
    B = prompts.shape[0]
    caches = [{} for _ in lm.blocks]
    logits, _ = lm(prompts, caches)
    out = torch.full((B, max_new), PAD, dtype=torch.long, device=prompts.device)
    finished = torch.zeros(B, dtype=torch.bool, device=prompts.device)

    def noise(vocab: int, dtype: torch.dtype) -> torch.Tensor:
        e = torch.empty((global_batch, vocab), dtype=dtype, device=prompts.device)
        return e.exponential_(1, generator=generator)[rows]

    draws = 0
    for t in range(max_new):
        probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)
        nxt = (probs / noise(probs.shape[-1], probs.dtype)).argmax(-1)
        draws += 1
        nxt = torch.where(finished, torch.full_like(nxt, PAD), nxt)
        out[:, t] = nxt
        finished |= nxt == EOS
        if bool(finished.all()) or t == max_new - 1:
            break
        logits, _ = lm(nxt.unsqueeze(1), caches)
    vocab = lm.cfg.vocab_size
    for _ in range(agree_draws(draws) - draws):
        noise(vocab, torch.float32)
    return out
