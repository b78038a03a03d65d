"""Verifiable rewards, reward combination and prompt sets (training/rl/rewards.py) on real GSM8K rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from training.rl.rewards import (
    PromptSetError, arithmetic_prompts, correctness_reward, extract_answer, format_reward, load_gsm8k_jsonl,
    r1_shaping, require_verifiable, score_samples,
)

GSM8K = Path(__file__).parent / "data" / "rl" / "gsm8k_test_head16.jsonl"


def test_gsm8k_reference_solutions_score_correct_and_formatted():
    examples = load_gsm8k_jsonl(GSM8K)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    assert len(examples) == 16 and all(e.answer for e in examples)
    assert examples[0].answer == "18"  # Janet's ducks
    for ex, row in zip(examples, rows):
        assert correctness_reward(row["answer"], ex.answer) == 1.0
        assert format_reward(row["answer"]) == 1.0
    # another problem's solution is (almost always) wrong for this one
    wrong = sum(correctness_reward(rows[(i + 1) % 16]["answer"], e.answer) for i, e in enumerate(examples))
    assert wrong <= 2


def test_extract_answer_prefers_final_marker_then_last_number():
    assert extract_answer("3 + 4 = 7, so\n#### 7") == "7"
    assert extract_answer("#### 5 ... no wait #### 1,234") == "1,234"
    assert extract_answer("The total is $1,200.50 after 3 days.") == "3"
    assert extract_answer("no digits here") is None
    assert correctness_reward("so she pays $1,200.", "1200") == 1.0
    assert correctness_reward("it is 12.0", "12") == 1.0
    assert correctness_reward("-4 degrees", "-4") == 1.0
    assert correctness_reward("about 13", "12") == 0.0
    assert format_reward("answer: 7") == 0.0
    with pytest.raises(ValueError, match="no reference answer"):
        correctness_reward("7", None)


def test_r1_shaping_orders_wrong_below_right():
    assert r1_shaping(0.0, 1.0) == pytest.approx(0.5)
    assert r1_shaping(10.0, 0.0, alpha=1.0) < r1_shaping(-10.0, 1.0, alpha=1.0)
    assert r1_shaping(2.0, 1.0, alpha=0.5) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert r1_shaping(2.0, 0.0, alpha=0.5) == pytest.approx(1 / (1 + math.exp(-1.0)) - 1)
    # the audit's case under the default weights (correct 1, format 0.2), reward-model scores ±8: the old
    # formula gave wrong-but-formatted 0.1997 > right-but-unformatted 0.0003
    wrong = r1_shaping(8.0, 0.0, bonuses=[(0.2, 1.0)])
    right = r1_shaping(-8.0, 1.0, bonuses=[(0.2, 0.0)])
    assert wrong < 0 < right
    assert right == pytest.approx((1 / (1 + math.exp(8))) / 1.2)
    assert r1_shaping(0.0, 1.0, scale=2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive 'correct' weight"):
        r1_shaping(0.0, 1.0, scale=0.0)


def test_score_samples_weights_and_counts_a_raising_reward():
    def flaky(completion, answer, prompt):
        if "boom" in completion:
            raise RuntimeError("reward server down")
        return 1.0

    prompts = ["q1", "q2", "q3"]
    completions = ["#### 7", "boom 3", "it is 5"]
    answers = ["7", "3", "4"]
    out = score_samples(prompts, completions, answers, {"correct": 1.0, "format": 0.5, "flaky": 2.0},
                        functions={"flaky": flaky})
    assert out.components["correct"] == [1.0, 1.0, 0.0]
    assert out.components["format"] == [1.0, 0.0, 0.0]
    assert out.components["flaky"] == [1.0, 0.0, 1.0]
    assert out.total == [1.0 + 0.5 + 2.0, 1.0, 2.0]
    assert out.failures == {"flaky": 1} and "reward server down" in out.first_errors["flaky"]
    with pytest.raises(ValueError, match="unknown reward component"):
        score_samples(prompts, completions, answers, {"corect": 1.0})
    with pytest.raises(ValueError, match="needs a reward model"):
        score_samples(prompts, completions, answers, {"reward_model": 1.0})


def test_prompt_set_without_answers_is_a_clear_error(tmp_path):
    path = tmp_path / "no_answers.jsonl"
    path.write_text('{"question": "Why is the sky blue?", "answer": "Rayleigh scattering."}\n' * 3)
    examples = load_gsm8k_jsonl(path)
    assert [e.answer for e in examples] == [None] * 3
    with pytest.raises(PromptSetError, match="no verifiable answers"):
        require_verifiable(examples, str(path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(PromptSetError, match="bad.jsonl:1"):
        load_gsm8k_jsonl(bad)


def test_arithmetic_prompts_are_deterministic_and_correct():
    a, b = arithmetic_prompts(50, seed=3), arithmetic_prompts(50, seed=3)
    assert a == b and a != arithmetic_prompts(50, seed=4)
    for ex in a:
        nums = [int(n) for n in extract_answer_all(ex.question)]
        assert int(ex.answer) in {nums[0] + nums[1], nums[0] - nums[1], nums[0] * nums[1]}
        assert int(ex.answer) >= 0


def extract_answer_all(text: str) -> list[str]:
    import re

    return re.findall(r"\d+", text)


def test_heldout_arithmetic_questions_never_appear_in_training_draws():
    from training.rl.rewards import heldout_arithmetic_prompts, is_heldout_question

    heldout = heldout_arithmetic_prompts()
    questions = [e.question for e in heldout]
    assert len(questions) == len(set(questions)) >= 100 and all(map(is_heldout_question, questions))
    assert all(str(eval(_expression(e.question))) == e.answer for e in heldout)  # exact answers
    for seed in range(5):
        assert not {e.question for e in arithmetic_prompts(300, seed=seed)} & set(questions)
    assert heldout_arithmetic_prompts(7) == heldout[:7]


def _expression(question: str) -> str:
    """'What is 7 minus 3?' → '7 - 3' (an independent reading of the five templates)."""
    import re

    a, b = map(int, re.findall(r"\d+", question))
    op = "+" if ("plus" in question or "buys" in question) else "*" if "times" in question else "-"
    return f"{a} {op} {b}"
