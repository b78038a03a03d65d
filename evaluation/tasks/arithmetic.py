"""Held-out arithmetic: the verifiable task GRPO and PPO train on, scored greedily on the questions
reserved for evaluation (``training.rl.rewards.heldout_arithmetic_prompts``: no training prompt is
among them).

Each question is asked exactly as the RL stages ask it (``training.rl.common.chat_prompt_ids``) — a
user turn ``"{question}\\n{INSTRUCTION}"`` in the chat template, or that text and a newline for a
tokenizer without one — and a greedy answer is correct when its number equals the exact result
(``correctness_reward``: the ``#### N`` answer, else the last number in the text).
"""

from __future__ import annotations

from evaluation.tasks import TaskResult
from training.rl.rewards import INSTRUCTION, correctness_reward, heldout_arithmetic_prompts

STOP_SEQUENCES = ("<|im_end|>", "</s>")


def evaluate(model, limit: int | None = None, max_new_tokens: int = 24, progress: bool = True) -> TaskResult:
    items = heldout_arithmetic_prompts(limit)
    texts = [f"{e.question}\n{INSTRUCTION}" for e in items]
    if getattr(model.tokenizer, "chat_template", None):
        prompts = [model.chat_prompt([{"role": "user", "content": t}]) for t in texts]
    else:
        prompts = [t + "\n" for t in texts]
    generations = model.generate_until(prompts, STOP_SEQUENCES, max_new_tokens, progress=progress)
    samples = [{"question": e.question, "gold": e.answer, "generation": g, "accuracy": correctness_reward(g, e.answer)}
               for e, g in zip(items, generations)]
    accuracy = sum(s["accuracy"] for s in samples) / max(1, len(samples))
    return TaskResult("arithmetic", {"accuracy": accuracy}, len(samples), 0, [], samples)
