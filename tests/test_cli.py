import json
from pathlib import Path

from typer.testing import CliRunner

from liandan.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_compare_two_models_two_modes_writes_html(tmp_path, chat_model_dir, base_model_dir):
    out = tmp_path / "cmp.html"
    result = run(
        "compare", "--model", chat_model_dir, "--model", base_model_dir, "--mode", "chat", "--mode", "raw",
        "--prompt", "请将这段话翻译成英文：“我想弄明白这两种大模型的差别。”然后", "--max-new-tokens", 4, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.count("<div class='col'>") == 4 and "[raw]" in page and "[chat]" in page
    assert "我想弄明白" in page


def test_generate_from_prompts_file_to_jsonl(tmp_path, gguf_model_file):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "o.jsonl"
    result = run("generate", "--model", gguf_model_file, "--prompts", prompts, "--max-new-tokens", 3, "--out", out)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_index"] for r in records] == [0, 1]
    assert all(r["new_tokens"] <= 3 for r in records)


def bad_inputs(tmp_path, chat_model_dir):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{"prompt": \n')
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"question": "x"}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 100)
    m = ["--model", chat_model_dir]
    return [
        (["--model", "nobody/nothing/here", "-p", "x"], "model 'nobody/nothing/here' not found"),
        (["--model", no_weights, "-p", "x"], "has no weights"),
        (["--model", corrupt, "-p", "x"], "corrupt.gguf"),
        ([*m, "--prompts", bad_json], f"{bad_json}:2: not valid JSON"),
        ([*m, "--prompts", no_field], f"{no_field}:1: expected a field 'prompt'"),
        ([*m, "--prompts", empty], "has no prompts"),
        (m, "no prompts"),
        ([*m, "-p", "x", "--max-new-tokens", 0], "--max-new-tokens must be at least 1"),
        ([*m, "-p", "x", "--temperature", -1], "--temperature must be 0 or more"),
        ([*m, "-p", "x", "--mode", "poem"], "--mode poem"),
        ([*m, "-p", "x", "--out", tmp_path / "x.pdf"], "expected a file ending in"),
    ]


def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path, chat_model_dir):
    for args, message in bad_inputs(tmp_path, chat_model_dir):
        result = run("compare", *args)
        assert result.exit_code == 2, (args, result.output)
        err = result.stderr.strip()
        assert err.startswith("error:") and message in " ".join(err.split()), (args, err)
        assert "Traceback" not in result.output + result.stderr
        assert len(err.splitlines()) == 1


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("compare", "generate", "sft", "dpo", "pretrain", "merge", "inspect-data", "eval", "quickstart", "bake", "chat", "serve",
                    "export", "examples"):
        assert command in result.output, command


def test_chat_command_scripted_session(tmp_path, stopping_model_dir):
    saved = tmp_path / "talk.jsonl"
    script = f"Question 1?\n/system Be brief.\nQuestion 2?\n/save {saved}\n/quit\n"
    result = runner.invoke(app, ["chat", str(stopping_model_dir), "--max-new-tokens", "8"], input=script)
    assert result.exit_code == 0, result.output
    assert "Fine." in result.output
    messages = json.loads(saved.read_text())["messages"]
    # /system starts a new conversation under the new prompt
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "Be brief." and messages[2]["content"] == "Fine."


def test_a_setting_of_another_stage_is_refused_by_the_command(tmp_path, chat_model_dir):
    text = tmp_path / "t.txt"
    text.write_text("Some text. " * 50)
    result = run("pretrain", "--model", chat_model_dir, "--data", text, "-o", tmp_path / "run", "--set", "packing=true")
    assert result.exit_code == 2
    assert "pretrain: unknown setting 'packing' (a setting of sft, which pretrain does not use)" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_examples_are_copied_out_and_recipes_run_from_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("examples")
    assert result.exit_code == 0, result.output
    for name in ("sft-pirate.yaml", "pirate.jsonl", "extract/train.jsonl", "general/probes.jsonl", "persona/system.txt"):
        assert (tmp_path / "examples" / name).is_file(), name
    from liandan.config import SFTConfig, load_config

    recipe = load_config(SFTConfig, "examples/sft-pirate.yaml")  # the README's command, from this directory
    assert all(Path(p).is_file() for p in recipe.data)
    again = run("examples")
    assert again.exit_code == 2 and "already exists" in again.output
    assert [p.name for p in tmp_path.iterdir()] == ["examples"]  # nothing half-copied beside it


def test_quickstart_inputs_are_found_from_any_directory(tmp_path, monkeypatch):
    from liandan.quickstart import QuickstartConfig, check_inputs

    monkeypatch.chdir(tmp_path)  # not the repository: the shipped copies are used
    config = QuickstartConfig(out=str(tmp_path / "qs"))
    assert check_inputs(config) == tmp_path / "qs"
    assert all(Path(p).is_file() for p in (config.train, config.test, config.schema))
    assert QuickstartConfig(schema="none").schema is None  # --schema none: a task that is not JSON
