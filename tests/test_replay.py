import json

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl

from liandan import replay as replay_module
from liandan.cli import app
from liandan.config import SFTConfig
from liandan.errors import LiandanError
from liandan.train import train_sft


@pytest.fixture
def task_file(tmp_path):
    return write_jsonl(tmp_path / "task.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}]}
        for i in range(10)
    ])  # fmt: skip


def config(model, data, out, **kw):
    values = dict(model=str(model), data=[str(data)], output_dir=str(out), max_steps=2, batch_tokens=256, max_length=64,
                  mixed_precision="no", replay_max_new_tokens=12)  # fmt: skip
    values.update(kw)
    return SFTConfig(**values)


def test_self_replay_is_generated_once_cached_and_recorded(tmp_path, stopping_model_dir, task_file, monkeypatch):
    prompts = write_jsonl(tmp_path / "general.jsonl", [{"prompt": f"Tell me thing {i}."} for i in range(8)])
    train_sft(config(stopping_model_dir, task_file, tmp_path / "a", replay="self", replay_ratio=0.5, replay_prompts=str(prompts)))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    replay = manifest["replay"]
    assert replay["source"] == "self" and replay["examples"] == 5 and replay["task_examples"] == 10
    assert manifest["data"]["train_examples"] == 15
    cached = [json.loads(line) for line in open(replay["file"])]
    assert 5 <= len(cached) <= 8  # answers that did not stop are left out
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"] for r in cached)
    assert cached[0]["messages"][0]["content"].startswith("Tell me thing")

    def must_not_generate(*args, **kwargs):
        raise AssertionError("the cached answers should have been used")

    monkeypatch.setattr(replay_module, "generate_answers", must_not_generate)
    train_sft(config(stopping_model_dir, task_file, tmp_path / "b", replay="self", replay_ratio=0.5, replay_prompts=str(prompts)))
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["replay"]["sha256"] == replay["sha256"]
    # The ChatML tools template renders these prompts as the model's own ChatML does: same answers.
    train_sft(config(stopping_model_dir, task_file, tmp_path / "c", replay="self", replay_ratio=0.5, replay_prompts=str(prompts),
                     tools_template="chatml"))  # fmt: skip
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["tools_template"] == "chatml" and manifest["replay"]["sha256"] == replay["sha256"]


def test_replay_file_fewer_examples_than_asked(tmp_path, chat_model_dir, task_file):
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello!"}]} for i in range(4)
    ])  # fmt: skip
    train_sft(config(chat_model_dir, task_file, tmp_path / "run", replay=str(general), replay_ratio=1.0))
    replay = json.loads((tmp_path / "run" / "manifest.json").read_text())["replay"]
    assert replay["examples"] == 4 and replay["available"] == 4 and "asked for 10" in replay["note"]


def test_no_replay_without_ratio(tmp_path, chat_model_dir, task_file):
    train_sft(config(chat_model_dir, task_file, tmp_path / "run", replay="self", replay_ratio=0.0))
    assert "replay" not in json.loads((tmp_path / "run" / "manifest.json").read_text())


def test_replay_ratio_above_one_is_refused_before_any_work(tmp_path, chat_model_dir, task_file):
    with pytest.raises(LiandanError, match="replay_ratio must be between 0 and 1"):
        SFTConfig(replay="self", replay_ratio=1.5)
    result = CliRunner().invoke(app, ["sft", "--model", str(chat_model_dir), "--data", str(task_file), "-o", str(tmp_path / "r"),
                                      "--replay", "self", "--replay-ratio", "1.5"])  # fmt: skip
    assert result.exit_code == 2 and "replay must not outweigh the task" in result.stderr
    assert not (tmp_path / "r").exists()


def test_self_replay_from_a_model_that_never_stops_is_a_clear_error(tmp_path, chat_model_dir, task_file):
    prompts = write_jsonl(tmp_path / "general.jsonl", [{"prompt": "Tell me a thing."}])
    with pytest.raises(LiandanError, match="stopped by itself on none of the 1 prompts"):
        train_sft(config(chat_model_dir, task_file, tmp_path / "run", replay="self", replay_prompts=str(prompts), replay_max_new_tokens=3))
