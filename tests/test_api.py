"""The Python API as a notebook uses it: every public name works on the second call too, results
display themselves in Jupyter, and the README's "From Python" code runs as written."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
from conftest import write_jsonl

import liandan

README = Path(__file__).parent.parent / "README.md"


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("api") / "task.jsonl"
    return write_jsonl(path, [{"prompt": "Say fine", "checks": {"contains": "Fine"}}, {"prompt": "Hello?", "checks": {"regex": "."}}])


def public_calls(model_dir: Path, task: Path, prompts_file: Path) -> dict:
    """One call per public name, as a user would write it."""

    def load_and_release():
        model, _ = liandan.load_model(str(model_dir), device="cpu", dtype="float32")
        liandan.release_model(model)

    def generate():
        model, tokenizer = liandan.load_model(str(model_dir), device="cpu", dtype="float32")
        return liandan.generate(model, tokenizer, ["What is 2+2?"], config=liandan.SamplingConfig(max_new_tokens=4))

    config = liandan.EvalConfig(models=[str(model_dir)], task=str(task), probes="none", drift="none",
                                max_new_tokens=4, device="cpu", dtype="float32")  # fmt: skip
    return {
        "load_model": load_and_release,
        "release_model": load_and_release,
        "generate": generate,
        "SamplingConfig": lambda: liandan.SamplingConfig(max_new_tokens=4),
        "compare": lambda: liandan.compare([str(model_dir)], ["Hi"], modes=["chat", "raw"],
                                           config=liandan.SamplingConfig(max_new_tokens=4)),  # fmt: skip
        "evaluate": lambda: liandan.evaluate(config),
        "EvalConfig": lambda: liandan.EvalConfig(models=[str(model_dir)]),
        "Prompt": lambda: liandan.Prompt(text="Hi"),
        "read_prompts": lambda: liandan.read_prompts(prompts_file),
        "LiandanError": lambda: liandan.LiandanError("bad input"),
    }


def test_every_public_name_works_twice_in_one_process(chat_model_dir, task_file, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Hi\nHello\n", encoding="utf-8")
    calls = public_calls(chat_model_dir, task_file, prompts_file)
    assert set(calls) == set(liandan.__all__) - {"__version__"}, "a public name without a call here"
    first = {name: call() for name, call in calls.items()}
    for module in pkgutil.iter_modules(liandan.__path__):  # what a notebook does between two cells
        importlib.import_module(f"liandan.{module.name}")
    second = {name: call() for name, call in calls.items()}
    assert [g.text for g in second["generate"]] == [g.text for g in first["generate"]]
    assert second["evaluate"]["metrics"] == first["evaluate"]["metrics"]
    assert [p.text for p in second["read_prompts"]] == ["Hi", "Hello"]


def test_a_comparison_shows_itself_in_jupyter(chat_model_dir):
    result = liandan.compare([str(chat_model_dir)], ["Hi <there>"], modes=["chat", "raw"],
                             config=liandan.SamplingConfig(max_new_tokens=4))  # fmt: skip
    page = result._repr_html_()
    assert "Hi &lt;there&gt;" in page and "Hi <there>" not in page  # the prompt, escaped
    assert page.count("class='col'") == 2  # one column per mode
    for g in result.generations:
        assert f"{g.new_tokens} token" in page


def test_an_evaluation_shows_itself_in_jupyter(chat_model_dir, task_file):
    config = liandan.EvalConfig(models=[str(chat_model_dir)], task=str(task_file), probes="none", drift="none",
                                max_new_tokens=4, device="cpu", dtype="float32")  # fmt: skip
    result = liandan.evaluate(config)
    page = result._repr_html_()
    assert "Task: all checks pass" in page and "Say fine" in page
    assert isinstance(result, dict) and result["models"] == [str(chat_model_dir)]  # still plain JSON-ready data


def readme_python_section() -> str:
    section = README.read_text(encoding="utf-8").split("### From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_readme_python_section_calls_generate_twice():
    assert readme_python_section().count("liandan.generate(") >= 2


@pytest.mark.model
def test_the_readme_python_section_runs_as_written():
    namespace: dict = {}
    exec(compile(readme_python_section(), "README.md: From Python", "exec"), namespace)
    assert namespace["outputs"] and namespace["again"]
    assert namespace["again"][0].text == namespace["outputs"][0].text  # greedy: the same answer the second time
    assert len(namespace["again"]) == 2
    assert "Why is the sky blue?" in namespace["result"]._repr_html_()
