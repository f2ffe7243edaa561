import json

import pytest
from rich.console import Console

from liandan.errors import LiandanError
from liandan.comparison import CompareResult
from liandan.generation import Generation, SamplingConfig
from liandan.prompts import Prompt
from liandan.comparison import print_comparison, to_html, to_markdown, write_comparison


def make_result():
    prompts = [Prompt(text="Translate <this> & that", source="--prompt 1")]
    result = CompareResult(models=["base", "tuned"], modes=["chat", "raw"], prompts=prompts, config=SamplingConfig())
    texts = {("base", "chat"): "ramble ramble", ("base", "raw"): "and so on",
             ("tuned", "chat"): "<b>Done</b>", ("tuned", "raw"): "ok"}  # fmt: skip
    for (model, mode), text in texts.items():
        stopped = model == "tuned"
        result.generations.append(Generation(
            model=model, mode=mode, prompt_index=0, sample=0, prompt=f"[{mode}] prompt", text=text,
            new_tokens=4 if stopped else 256, stopped=stopped, seconds=2.0,
        ))  # fmt: skip
    return result


def test_html_has_one_column_per_model_and_mode_escaped():
    page = to_html(make_result())
    assert page.count("<div class='col'>") == 4
    for header in ("base <span class='mode'>[chat]</span>", "base <span class='mode'>[raw]</span>",
                   "tuned <span class='mode'>[chat]</span>", "tuned <span class='mode'>[raw]</span>"):  # fmt: skip
        assert header in page
    assert "&lt;b&gt;Done&lt;/b&gt;" in page and "<b>Done</b>" not in page
    assert "Translate &lt;this&gt; &amp; that" in page
    assert "256 tokens · hit the length limit · 127.5 tok/s" in page  # (256 - 1) / (2.0 - 0.0)
    assert "4 tokens · stopped · 1.5 tok/s" in page
    assert "<script" not in page and "http" not in page  # self-contained


def test_markdown_and_jsonl(tmp_path):
    md = to_markdown(make_result())
    assert "### tuned [chat]" in md and "*4 tokens · stopped" in md
    path = write_comparison(make_result(), tmp_path / "out.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["model"], r["mode"], r["stopped"]) for r in records] == [
        ("base", "chat", False), ("base", "raw", False), ("tuned", "chat", True), ("tuned", "raw", True),
    ]  # fmt: skip
    assert records[0]["prompt_source"] == "--prompt 1" and records[0]["new_tokens"] == 256


def test_write_refuses_unknown_extension_and_leaves_no_temp_files(tmp_path):
    with pytest.raises(LiandanError, match="--out .*out.pdf: expected a file ending in .html, .md, .jsonl"):
        write_comparison(make_result(), tmp_path / "out.pdf")
    write_comparison(make_result(), tmp_path / "a.html")
    assert [p.name for p in tmp_path.iterdir()] == ["a.html"]


def test_terminal_table_shows_columns_and_stop_status():
    console = Console(record=True, width=160)
    print_comparison(make_result(), console)
    text = console.export_text()
    assert "[chat]" in text and "[raw]" in text
    assert "hit the length limit" in text and "2 of 4 outputs stopped by themselves." in text


def test_one_token_output_has_no_speed_and_files_are_not_private(tmp_path):
    g = Generation(model="m", mode="raw", prompt_index=0, sample=0, prompt="p", text="", new_tokens=1,
                   stopped=True, seconds=0.5, first_token_seconds=0.5)  # fmt: skip
    assert g.tokens_per_second is None
    from liandan.comparison import status_line

    assert status_line(g) == "1 token · stopped · — tok/s"
    path = write_comparison(make_result(), tmp_path / "a.md")
    assert path.stat().st_mode & 0o044  # readable by others, like any file the user writes
