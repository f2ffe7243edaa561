import json

import pytest

from liandan.errors import LiandanError
from liandan.prompts import Prompt, prompts_from_strings, read_prompts


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_txt_one_prompt_per_non_empty_line(tmp_path):
    path = write(tmp_path / "p.txt", ["first", "", "second 你好"])
    prompts = read_prompts(path)
    assert [p.text for p in prompts] == ["first", "second 你好"]
    assert prompts[1].source == f"{path}:3"


def test_jsonl_prompt_and_messages(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = write(tmp_path / "p.jsonl", [json.dumps({"prompt": "a", "id": 7}), json.dumps({"messages": messages})])
    first, second = read_prompts(path)
    assert first.text == "a" and first.meta == {"id": 7}
    assert list(second.messages) == messages
    assert second.display == "Hi"
    # A system prompt from --system does not override the record's own.
    assert second.chat_messages(system="Other")[0]["content"] == "Be brief."
    assert first.chat_messages(system="Sys") == [{"role": "system", "content": "Sys"}, {"role": "user", "content": "a"}]
    assert second.raw_text() == "Be brief.\n\nHi"


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": "ok"', ":1: not valid JSON"),
        ('["a"]', ":1: expected a JSON object, got list"),
        ('{"text": "x"}', ":1: expected a field 'prompt'"),
        ('{"prompt": 3}', ":1: field 'prompt': expected a string, got int"),
        ('{"prompt": "  "}', ":1: field 'prompt': is empty"),
        ('{"messages": []}', ":1: field 'messages': expected a non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', ":1: field 'messages[0].role'"),
        ('{"messages": [{"role": "user", "content": 1}]}', ":1: field 'messages[0].content': expected a string"),
    ],
)
def test_bad_jsonl_record_names_file_line_and_field(tmp_path, line, expected):
    path = write(tmp_path / "bad.jsonl", [line])
    with pytest.raises(LiandanError) as info:
        read_prompts(path)
    assert str(info.value).startswith(str(path)) and expected in str(info.value)


def test_error_points_at_the_right_line(tmp_path):
    path = write(tmp_path / "p.jsonl", ['{"prompt": "fine"}', "", '{"prompt": "broken'])
    with pytest.raises(LiandanError, match=r"p\.jsonl:3: not valid JSON"):
        read_prompts(path)


def test_empty_missing_and_wrong_suffix(tmp_path):
    with pytest.raises(LiandanError, match="has no prompts"):
        read_prompts(write(tmp_path / "e.txt", ["", "  "]))
    with pytest.raises(LiandanError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    with pytest.raises(LiandanError, match="expected a .txt or .jsonl"):
        read_prompts(write(tmp_path / "p.csv", ["a"]))


def test_prompts_from_strings():
    assert prompts_from_strings(["x"]) == [Prompt(text="x", source="--prompt 1")]
    with pytest.raises(LiandanError, match="--prompt number 2 is empty"):
        prompts_from_strings(["x", " "])
