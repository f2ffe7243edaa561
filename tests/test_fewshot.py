"""The few-shot baseline's prompt: which examples, in which order, and what they cost."""

import pytest

from conftest import chat_row, write_jsonl

from liandan.errors import LiandanError
from liandan.evaluation import EvalConfig
from liandan.fewshot import few_shot_name, few_shot_turns, prompt_tokens, with_shots
from liandan.prompts import Prompt, prompts_from_strings


@pytest.fixture
def train(tmp_path):
    rows = [chat_row(f"Question {i}?", f"Answer {i}.") for i in range(10)]
    rows[3]["messages"].insert(0, {"role": "system", "content": "Its own system prompt."})
    return write_jsonl(tmp_path / "train.jsonl", rows)


def questions(turns):
    return [t["content"] for t in turns if t["role"] == "user"]


def test_k_examples_drawn_by_the_seed_as_alternating_turns_in_file_order(train):
    turns = few_shot_turns(str(train), 4, seed=0)
    assert len(turns) == 8 and [t["role"] for t in turns] == ["user", "assistant"] * 4
    asked = questions(turns)
    assert [t["content"] for t in turns[1::2]] == [q.replace("Question", "Answer").replace("?", ".") for q in asked]
    assert asked == sorted(asked, key=lambda q: int(q.split()[1].rstrip("?")))  # the file's order
    assert few_shot_turns(str(train), 4, seed=0) == turns  # the same seed, the same examples
    draws = {tuple(questions(few_shot_turns(str(train), 4, seed=s))) for s in range(6)}
    assert len(draws) > 1  # the seed decides
    # a training conversation's own system turn is dropped: the baseline's system prompt is given with it
    every = few_shot_turns(str(train), 10, seed=0)
    assert all(t["role"] != "system" for t in every) and len(every) == 20


def test_eval_prompts_are_never_examples(train):
    held_out = [Prompt(text="Question 1?"), Prompt(messages=({"role": "user", "content": " Question 2? "},)),
                Prompt(messages=({"role": "system", "content": "x"}, {"role": "user", "content": "Question 3?"}))]  # fmt: skip
    for seed in range(5):
        asked = questions(few_shot_turns(str(train), 7, seed=seed, exclude=held_out))
        assert len(asked) == 7 and not {"Question 1?", "Question 2?", "Question 3?"} & set(asked)
    with pytest.raises(LiandanError, match=r"--few-shot 8: '.*train.jsonl' has only 7 examples that are not eval prompts \(3 skipped"):
        few_shot_turns(str(train), 8, exclude=held_out)
    with pytest.raises(LiandanError, match="--few-shot 0: expected a number of examples of at least 1"):
        few_shot_turns(str(train), 0)


def test_with_shots_puts_the_system_prompt_first_then_the_examples_then_the_prompt():
    turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    plain, own_system = prompts_from_strings(["Hello"])[0], Prompt(messages=({"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}))
    shot, shot_own = with_shots([plain, own_system], turns)
    assert shot.chat_messages("Be brief.") == [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "Hello"}]
    assert shot_own.chat_messages("ignored") == [{"role": "system", "content": "S"}, *turns, {"role": "user", "content": "Hi"}]
    assert (shot.display, shot.source) == ("Hello", plain.source)  # reports show the prompt itself
    assert with_shots([plain], []) == [plain]
    assert few_shot_name("default", 4) == "default + 4-shot"


def test_prompt_tokens_count_each_added_turn(chat_model_dir):
    """ChatML: each turn is <|im_start|> ROLE\\nCONTENT <|im_end|> \\n; the assistant header ends the prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir)

    def turn(role, content):  # counted by hand: the two special tokens, the text between, the newline
        return 1 + len(tok(f"{role}\n{content}", add_special_tokens=False)["input_ids"]) + 1 + len(tok("\n", add_special_tokens=False)["input_ids"])

    header = 1 + len(tok("assistant\n", add_special_tokens=False)["input_ids"])
    shots = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    prompt = prompts_from_strings(["hello there"])
    assert prompt_tokens(tok, prompt, None) == [turn("user", "hello there") + header]
    assert prompt_tokens(tok, with_shots(prompt, shots), "Be brief.") == [
        turn("system", "Be brief.") + turn("user", "Say hi") + turn("assistant", "hi") + turn("user", "hello there") + header
    ]


def test_config_refuses_few_shot_settings_that_would_do_nothing():
    with pytest.raises(LiandanError, match="--few-shot needs --few-shot-data"):
        EvalConfig(task="t.jsonl", few_shot=2)
    with pytest.raises(LiandanError, match="--few-shot needs .* a --task set"):
        EvalConfig(few_shot=2, few_shot_data="train.jsonl")
    with pytest.raises(LiandanError, match="do nothing without --few-shot K"):
        EvalConfig(task="t.jsonl", few_shot_data="train.jsonl")
    with pytest.raises(LiandanError, match="--few-shot -1"):
        EvalConfig(few_shot=-1)
