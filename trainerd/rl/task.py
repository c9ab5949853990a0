"""The synthetic task: a text task whose true quality the code knows (the "gold" rule).

A prompt is a few random letters, e.g. `^dkag=`; the policy answers with letters ending in
`.`. The hidden gold rule scores a response per letter:

    +1 for a "good" letter (the first half of the alphabet), -1 for any other letter,
    -1 more for a letter equal to the one before it (no stuttering),
    summed and divided by `max_response_len` (so the best answer, a full-length
    non-stuttering answer of good letters, scores 1.0; demonstrations average about 0).

The reward model only ever sees preference pairs labelled by this rule on demonstration-like
responses, so it is an imperfect proxy: where the policy drifts away from that distribution
(longer answers, stuttering, odd letter mixes) the proxy and the gold score can part, which is
what reward hacking looks like. Everything is generated from a seeded numpy Generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PAD, BOS, SEP, EOS = 0, 1, 2, 3
SPECIALS = "_^=."  # printable forms of PAD, BOS, SEP, EOS
FIRST_LETTER = len(SPECIALS)


class Tokenizer:
    """Character-level: one token per special symbol or letter."""

    def __init__(self, n_letters: int):
        self.letters = "abcdefghijklmnopqrstuvwxyz"[:n_letters]
        self.itos = list(SPECIALS) + list(self.letters)
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)


@dataclass
class Batch:
    """Token ids of prompts (B, P+2: BOS letters SEP) and responses (B, R), PAD after EOS."""

    prompts: torch.Tensor
    responses: torch.Tensor


class Task:
    def __init__(self, n_letters: int, prompt_letters: int, max_response_len: int, rng: np.random.Generator):
        self.tok = Tokenizer(n_letters)
        self.n_letters = n_letters
        self.prompt_letters = prompt_letters
        self.max_response_len = max_response_len
        self.rng = rng  # the task's own numpy Generator (captured in checkpoints)

    @property
    def prompt_len(self) -> int:
        return self.prompt_letters + 2

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.max_response_len

    def _letters(self, shape) -> np.ndarray:
        return self.rng.integers(FIRST_LETTER, FIRST_LETTER + self.n_letters, size=shape)

    def make_prompts(self, n: int) -> torch.Tensor:
        """n prompts `^ l1..lP =` as a (n, P+2) int64 tensor."""
        letters = self._letters((n, self.prompt_letters))
        out = np.empty((n, self.prompt_len), dtype=np.int64)
        out[:, 0] = BOS
        out[:, 1:-1] = letters
        out[:, -1] = SEP
        return torch.from_numpy(out)

    def demonstrations(self, prompts: torch.Tensor) -> torch.Tensor:
        """Mediocre demonstrations: a random length and uniformly random letters (half of them
        good on average). The warm-started policy imitates these, so PPO has room to improve;
        the reward model is trained on pairs of them, so it knows little about responses
        unlike them (long runs of one letter, only-good-letter answers): room for hacking."""
        n, R = prompts.shape[0], self.max_response_len
        rng = self.rng
        lengths = rng.integers(1, R, size=n)  # letters before EOS: 1..R-1
        letters = self._letters((n, R))
        pos = np.arange(R)[None, :]
        out = np.where(pos < lengths[:, None], letters, PAD)
        out[np.arange(n), lengths] = EOS
        return torch.from_numpy(out.astype(np.int64))

    def preference_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n (prompt, chosen, rejected) triples labelled by the gold rule; ties are dropped."""
        chunks_p, chunks_c, chunks_r, have = [], [], [], 0
        while have < n:
            m = 2 * (n - have) + 8
            prompts = self.make_prompts(m)
            a, b = self.demonstrations(prompts), self.demonstrations(prompts)
            ga, gb = self.gold(prompts, a), self.gold(prompts, b)
            keep = ga != gb
            a_wins = (ga > gb)[keep]
            prompts, a, b = prompts[keep], a[keep], b[keep]
            chosen = torch.where(a_wins[:, None], a, b)
            rejected = torch.where(a_wins[:, None], b, a)
            chunks_p.append(prompts), chunks_c.append(chosen), chunks_r.append(rejected)
            have += int(keep.sum())
        return (torch.cat(chunks_p)[:n], torch.cat(chunks_c)[:n], torch.cat(chunks_r)[:n])

    @property
    def n_good(self) -> int:
        return max(1, self.n_letters // 2)

    def gold(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        return gold_score(prompts, responses, self.max_response_len, self.n_good)


def response_mask(responses: torch.Tensor) -> torch.Tensor:
    """1.0 for generated tokens up to and including the first EOS, 0.0 for padding after it."""
    is_eos = responses == EOS
    eos_before = torch.cumsum(is_eos.to(torch.int64), dim=1) - is_eos.to(torch.int64)
    return (eos_before == 0).to(torch.float32)


def gold_score(prompts: torch.Tensor, responses: torch.Tensor, max_response_len: int, n_good: int) -> torch.Tensor:
    """The hidden true score of each response (B,), float32. See the module docstring."""
    resp = responses.cpu()
    mask = response_mask(resp).bool()
    is_letter = mask & (resp >= FIRST_LETTER)
    good = is_letter & (resp < FIRST_LETTER + n_good)
    bad = is_letter & ~good
    stutter = is_letter[:, 1:] & is_letter[:, :-1] & (resp[:, 1:] == resp[:, :-1])
    return (good.sum(1) - bad.sum(1) - stutter.sum(1)).to(torch.float32) / max_response_len
