import pytest

from conftest import write_jsonl

from liandan.errors import LiandanError
from liandan.preference import read_pairs


def test_every_preference_shape_is_read(tmp_path):
    rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": {"role": "assistant", "content": "No."}},
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye."}]},
    ]  # fmt: skip
    pairs = read_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.prompt[-1] for p in pairs] == [{"role": "user", "content": "Hi"}] * 3
    assert pairs[1].prompt[0]["role"] == "system"
    assert [(p.chosen, p.rejected) for p in pairs] == [("Hello!", "Go away."), ("Hello!", "No."), ("Hello!", "Bye.")]
    assert pairs[2].source.endswith("p.jsonl:3")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "Hi", "chosen": "Hello"}, "p.jsonl:1: field 'rejected': missing"),
        ({"prompt": "Hi", "chosen": "Hello", "rejected": " Hello "}, "field 'rejected': is the same as 'chosen'"),
        ({"prompt": "Hi", "chosen": "", "rejected": "No"}, "field 'chosen': expected a non-empty reply"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt': expected a non-empty string"),
        ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
         "field 'chosen.role': expected 'assistant'"),
        ({"prompt": [{"role": "assistant", "content": "Hi"}], "chosen": "a", "rejected": "b"}, "expected the prompt to end with a user turn"),
        ({"chosen": "a", "rejected": "b"}, "field 'prompt': missing"),
        ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
          "rejected": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "b"}]}, "must share every turn"),
    ],
)  # fmt: skip
def test_bad_preference_records(tmp_path, record, message):
    with pytest.raises(LiandanError) as error:
        read_pairs(write_jsonl(tmp_path / "p.jsonl", [record]))
    assert message in str(error.value)
