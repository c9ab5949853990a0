"""The model-specific half of a PPO step, behind one small interface.

`run/trainer.py` runs a PPO step the same way for every model; it asks a backend for

    dataset(), prompt_batch(items)  what the prompt cursor walks; a batch of prompt ids + mask
    generate(prompts, mask, g)      sampled responses (an `Episodes`), drawn from generator g
    ref_logprobs(ep)                log-probs of the sampled tokens under the frozen reference
    score(ep), gold(ep)             reward per response; the true score, or None if unknown
    forward(ep)                     the policy's log-probs, entropy, trunk features on the responses
    values(hidden)                  the value head on the (detached) trunk features
    decode(ids)                     text for samples.jsonl
    policy_params(), value_params(), train(mode), policy_module, state and save_pretrained

Two backends: `SyntheticBackend` (the kit's char transformer on the synthetic task, below) and
`rl/hf.HFBackend` (a local Hugging Face causal LM). The PPO math (rl/ppo.py) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainerd.rl.model import Policy, generate, generate_shard, response_slice, token_logprobs
from trainerd.rl.reward import RewardModel
from trainerd.rl.task import FIRST_LETTER, Task, response_mask


@dataclass
class Episodes:
    """One step's prompts and sampled responses, as the backends see them."""

    prompts: torch.Tensor  # (B, P) token ids (left-padded where prompts differ in length)
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    responses: torch.Tensor  # (B, R) token ids, PAD after EOS
    mask: torch.Tensor  # (B, R) float32: 1 on tokens up to and including EOS
    cache: dict = field(default_factory=dict)  # per-batch memo of a backend (decoded text)

    def select(self, idx) -> Episodes:
        return Episodes(self.prompts[idx], self.prompt_mask[idx], self.responses[idx], self.mask[idx])


class SyntheticBackend:
    """The kit's own policy (rl/model.py), reference, reward model and task (rl/task.py)."""

    saves_pretrained = False

    def __init__(self, task: Task, policy: Policy, ref: torch.nn.Module, rm: RewardModel, cfg, device):
        self.task, self.policy, self.ref, self.rm = task, policy, ref, rm
        self.device = device
        self.max_new, self.temperature = cfg.max_response_len, cfg.temperature
        self.n_prompts = cfg.n_prompts
        self.scorer = None  # what PPO scores with: the RM, or a fault-injection wrapper of it (M3)

    @property
    def policy_module(self) -> torch.nn.Module:
        return self.policy

    def policy_params(self):
        return self.policy.lm.parameters()

    def value_params(self):
        return self.policy.value_head.parameters()

    def train(self, mode: bool) -> None:
        self.policy.train(mode)

    def dataset(self) -> torch.Tensor:
        return self.task.make_prompts(self.n_prompts)

    def prompt_batch(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = items.to(self.device)
        return prompts, torch.ones_like(prompts)

    def generate(
        self, prompts: torch.Tensor, prompt_mask: torch.Tensor, g: torch.Generator, shard: tuple | None = None
    ) -> Episodes:
        """`shard` = (rows, global batch, agree_draws): data-parallel, see model.generate_shard."""
        if shard is None:
            responses = generate(self.policy.lm, prompts, self.max_new, g, self.temperature)
        else:
            responses = generate_shard(self.policy.lm, prompts, self.max_new, g, self.temperature, *shard)
        return Episodes(prompts, prompt_mask, responses, response_mask(responses))  # 1 up to and including EOS

    def _rs(self, ep: Episodes) -> slice:
        return response_slice(ep.prompts.shape[1], self.max_new)

    def ref_logprobs(self, ep: Episodes) -> torch.Tensor:
        ref_logits, _ = self.ref(torch.cat([ep.prompts, ep.responses], 1))
        return token_logprobs(ref_logits[:, self._rs(ep)], ep.responses, self.temperature)[0]

    def forward(self, ep: Episodes):
        logits, hidden = self.policy(torch.cat([ep.prompts, ep.responses], 1))
        rs = self._rs(ep)
        logp, entropy = token_logprobs(logits[:, rs], ep.responses, self.temperature)
        return logp, entropy, hidden[:, rs]

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.policy.values(hidden)

    def score(self, ep: Episodes) -> torch.Tensor:
        return (self.scorer or self.rm)(ep.prompts, ep.responses)  # normalised RM score, one per response

    def gold(self, ep: Episodes) -> torch.Tensor:
        return self.task.gold(ep.prompts, ep.responses)

    def decode(self, ids: list[int]) -> str:
        return self.task.tok.decode(i for i in ids if i >= FIRST_LETTER)  # letters only

    def constant_state(self) -> dict:
        """Parts that PPO never changes: the reference policy and the reward model."""
        return {"ref": self.ref.state_dict(), "reward_model": self.rm.state_dict()}

    def load_constant_state(self, s: dict) -> None:
        self.ref.load_state_dict(s["ref"])
        self.rm.load_state_dict(s["reward_model"])

    def policy_state(self) -> dict:
        return self.policy.state_dict()

    def load_policy_state(self, s: dict) -> None:
        self.policy.load_state_dict(s)
