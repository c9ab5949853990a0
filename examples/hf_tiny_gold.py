"""A gold score for examples/hf_tiny.toml: the share of vowels among a response's letters.

A `gold_fn` (like a `reward_fn`) takes the decoded prompts and responses and returns one
float per response; with it the step log has `gold_reward_mean` and the reward-hacking alert
can compare the reward model with the truth.
"""


def vowel_share(prompts: list[str], responses: list[str]) -> list[float]:
    out = []
    for r in responses:
        letters = [c for c in r if c.isalpha()]
        out.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    return out
