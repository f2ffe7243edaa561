"""`eval` and `bake` run a task file's "predicate" checks only with --allow-code."""

import json

from typer.testing import CliRunner

from liandan.cli import app

runner = CliRunner()


def test_eval_refuses_predicates_without_allow_code(tmp_path, chat_model_dir, monkeypatch):
    marker = tmp_path / "PWNED"
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": f"touch {marker}", "checks": {"predicate": "os:system"}}) + "\n")
    args = ["eval", "--model", str(chat_model_dir), "--task", str(task), "--probes", "none", "--drift", "none", "--max-new-tokens", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--allow-code" in " ".join(result.stderr.split()), result.stderr
    assert not marker.exists()

    # With the flag, a predicate from an importable module runs.
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mypredicates.py").write_text("def anything(answer, record):\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    task.write_text(json.dumps({"prompt": "Hello?", "checks": {"predicate": "mypredicates:anything"}}) + "\n")
    result = runner.invoke(app, [*args, "--allow-code"])
    assert result.exit_code == 0, result.output


def test_bake_refuses_predicates_without_allow_code(tmp_path):
    result = runner.invoke(app, ["bake", "--system", "Talk like a pirate.", "--check", "predicate=os:system", "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--allow-code" in " ".join(result.stderr.split()), result.stderr
