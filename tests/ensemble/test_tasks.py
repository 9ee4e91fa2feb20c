from __future__ import annotations

import re

import pytest

from fuseflow.ensemble.tasks import TASKS, Task, get_task


def reference_answer(question: str) -> int:
    """Recompute the answer from the question's words alone."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if "gives" in question and "buys" in question:
        return n[0] + n[1] - n[2]
    if "more." in question:
        return n[0] + n[1]
    if "gave" in question:
        return n[0] - n[1]
    if "in each bag" in question:
        return n[0] * n[1]
    raise AssertionError(question)


@pytest.mark.parametrize("name", sorted(n for n, t in TASKS.items() if t.kind == "arithmetic"))
def test_problems_are_seeded_and_answers_right(name):
    task = get_task(name)
    problems = task.problems(50, seed=3)
    assert problems == task.problems(50, seed=3)
    assert problems != task.problems(50, seed=4)
    assert len({p.id for p in problems}) == 50
    for p in problems:
        assert p.answer == reference_answer(p.question), p
        assert p.answer >= 0
    if name == "arithmetic":
        assert any("gives" in p.question for p in problems)  # two-step problems are in the mix
    else:
        assert not any("gives" in p.question for p in problems)


def test_prompt_is_few_shot_and_ends_open():
    task = get_task("arithmetic")
    problem, shots = task.problems(1, 0)[0], task.shots(2, 0)
    prompt = task.prompt(problem, shots)
    assert prompt.count("Question:") == 3 and prompt.endswith(f"Question: {problem.question}\nAnswer:")
    assert f"Answer: {shots[0].answer}\n\n" in prompt
    assert {s.id for s in shots}.isdisjoint({p.id for p in task.problems(20, 0)})


@pytest.mark.parametrize("text, value", [(" 8\n", 8), (" -3 apples", -3), ("1,200", 1200), ("none", None), ("", None), (" 12.", 12)])
def test_extract(text, value):
    assert Task.extract(text) == value


def test_unknown_task_names_the_field():
    with pytest.raises(ValueError, match="eval.task"):
        get_task("gsm9k")


def test_next_word_problems_are_held_out_passages_ending_before_their_word():
    task = get_task("next-word")
    problems = task.problems(4, seed=0, languages=["en"], context_chars=200)
    assert problems == task.problems(4, seed=0, languages=["en"], context_chars=200)
    assert len(problems) == 4 and len({p.id for p in problems}) == 4
    from fuseflow.corpus import CorpusConfig, iter_documents

    docs = {f"en/{d.index}": d.text for d in iter_documents(CorpusConfig(source="builtin", held_out_fraction=0.2), "held_out")}
    for p in problems:
        assert p.group == "en" and p.answer.isalpha() and len(p.answer) >= 2
        doc, pos = p.id.split("@")
        text = docs[doc]  # a held-out document
        assert text[: int(pos)].endswith(p.question) and text[int(pos) :].startswith(" " + p.answer)
        assert task.prompt(p, task.shots(2, 0)) == p.question
        assert task.correct(f" {p.answer}, and more", p) and not task.correct(f" {p.answer}x", p)


def test_next_word_dev_and_test_splits_share_no_document():
    task = get_task("next-word")
    test = task.problems(6, seed=0, languages=["en"], context_chars=200)
    dev = task.problems(6, seed=0, languages=["en"], context_chars=200, split="dev")
    assert len(test) == len(dev) == 6
    docs = lambda ps: {p.id.split("@")[0] for p in ps}  # noqa: E731
    assert docs(test).isdisjoint(docs(dev))
    assert test == task.problems(6, seed=0, languages=["en"], context_chars=200, split="test")
    with pytest.raises(ValueError, match="eval.split"):
        task.problems(2, seed=0, languages=["en"], split="train")
