import json
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from liandan import eval_report, files
from liandan.errors import LiandanError
from liandan.eval_report import print_metrics, render_html, render_markdown, write_eval_report
from liandan.eval_values import format_change, format_delta, format_interval
from liandan.plots import PALETTE
from liandan.quickstart import QuickstartConfig, build_summary

from browser import colour_pixels, render

BEFORE, AFTER = "default", "runs/extract"
XSS = "<script>alert(1)</script>"


def output(text, passed, checks, new_tokens=31, stopped=True):
    return {"text": text, "stopped": stopped, "new_tokens": new_tokens, "passed": passed, "checks": checks}


def make_result():
    """What `liandan eval` produces for a base model and one extraction fine-tune."""
    curve = [{"step": s, "loss": 2.4 - 0.2 * s} for s in range(1, 9)]
    curve[3]["eval_loss"], curve[7]["eval_loss"] = 2.0, 1.3
    curve[5]["loss"] = float("nan")  # a diverged step is skipped, not drawn
    return {
        "title": "liandan eval: extract",
        "models": [BEFORE, AFTER],
        "labels": {BEFORE: "before", AFTER: "after"},
        "metrics": [
            {"key": "task.schema", "label": "Task: schema-valid", "better": "higher", "format": "percent",
             "values": {BEFORE: 0.0, AFTER: 0.95}},
            {"key": "retention.facts", "label": "Retention: facts", "better": "higher", "format": "percent",
             "values": {BEFORE: 0.6, AFTER: 0.55}},
            {"key": "task.perplexity", "label": "Task perplexity", "better": "lower", "format": "number",
             "values": {BEFORE: 2.73, AFTER: 2.31}},
            {"key": "task.tokens", "label": "Mean new tokens", "better": "neutral", "format": "number",
             "values": {BEFORE: None, AFTER: 41.5}},
        ],  # fmt: skip
        "sets": [
            {"name": "task", "title": "Task set: examples/extract/test.jsonl", "metric_names": ["schema", "json"],
             "examples": [
                 {"id": "test:1", "prompt": "Extract the event as JSON: Tea at 5pm.", "reference": '{"event": "tea"}',
                  "category": None, "outputs": {
                      BEFORE: output("Sure! Here is " + XSS, False, {"schema": False, "json": False}, 128, False),
                      AFTER: output('{"event": "tea", "time": "17:00"}', True, {"schema": True, "json": True})}},
                 {"id": "test:2", "prompt": "抽取事件：明天下午三点开会。", "reference": '{"event": "开会"}',
                  "category": None, "outputs": {
                      BEFORE: output("好的，会议在明天。", False, {"schema": False, "json": False}, 9),
                      AFTER: output('{"event": "开会", "time": "15:00"}', True, {"schema": True, "json": True}, 17)}},
             ]},
            {"name": "retention", "title": "Retention set", "metric_names": ["contains"],
             "examples": [
                 {"id": "facts:1", "prompt": "What is the capital of France?", "reference": None, "category": "facts",
                  "outputs": {BEFORE: output("Paris.", True, {"contains": True}, 3),
                              AFTER: output("Lyon.", False, {"contains": False}, 1)}},
             ]},
        ],  # fmt: skip
        "curves": {AFTER: curve},
        "bars": [{"title": "Retention by category", "format": "percent",
                  "groups": {"facts": {BEFORE: 0.6, AFTER: 0.55}, "arithmetic": {BEFORE: 0.4, AFTER: 0.45}}}],
        "notes": ["greedy decoding, chat mode"],
        "settings": {"max_new_tokens": 128, "batch_size": 8},
    }  # fmt: skip


def metric_row(page, label):
    return re.search(rf"<tr><td>{re.escape(label)}<br>.*?</tr>", page).group(0)


def test_html_escapes_model_text_everywhere():
    page = render_html(make_result())
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "抽取事件：明天下午三点开会。" in page and "http" not in page  # Chinese kept; nothing fetched
    result = make_result()
    result["curves"] = {"<b>run</b>": result["curves"][AFTER]}
    result["bars"][0]["groups"]["<i>cat</i>"] = {BEFORE: 0.5}
    page = render_html(result)
    assert "<b>run" not in page and "<i>cat" not in page  # labels drawn into SVG text are escaped too
    assert "&lt;b&gt;run&lt;/b&gt;" in page and "&lt;i&gt;cat&lt;/i&gt;" in page


def test_html_metrics_show_deltas_coloured_by_direction_and_dash_for_null():
    page = render_html(make_result())
    assert '<table class="metrics">' in page
    assert '95.0% <span class="delta better">(+95.0)</span>' in metric_row(page, "Task: schema-valid")
    assert '55.0% <span class="delta worse">(−5.0)</span>' in metric_row(page, "Retention: facts")
    assert '2.31 <span class="delta better">(−0.420)</span>' in metric_row(page, "Task perplexity")  # lower is better
    tokens = metric_row(page, "Mean new tokens")
    assert '<td class="num">—</td>' in tokens and "41.5</td>" in tokens and "delta" not in tokens


def test_delta_sign_and_colour_follow_what_is_shown():
    assert format_delta(0.5, 0.5004, "percent", "higher") == ("±0.0", "same")  # +0.04 points shows as 0.0
    assert format_delta(0.9, 0.8, "percent", "lower") == ("−10.0", "better")
    assert format_delta(10, 12, "number", "neutral") == ("+2.00", "same")
    assert format_delta(None, 12, "number", "higher") is None


def test_html_status_lines_and_check_badges():
    page = render_html(make_result())
    assert "128 tokens · hit the length limit" in page and "31 tokens · stopped" in page
    assert "1 token · stopped" in page
    assert '<span class="badge pass">✓ schema</span>' in page and '<span class="badge fail">✗ json</span>' in page
    assert page.count("<details") == 2 and page.count("<details open>") == 1
    assert "before: 0/2 passed · after: 2/2 passed" in page  # counted per set, not pooled
    assert "before: 1/1 passed · after: 0/1 passed" in page and "1/3" not in page


def test_html_has_one_svg_per_plot_and_a_point_per_logged_step():
    result = make_result()
    page = render_html(result)
    assert page.count("<svg") == 3  # headline percent metrics, one `bars` entry, one loss curve
    for colour in PALETTE[:2]:
        assert page.count(f'fill="{colour}"') >= 4  # two bars per chart in both bar charts
    loss = re.search(r'<polyline class="loss" points="([^"]+)"', page).group(1).split()
    assert len(loss) == 7  # 8 steps, one of them NaN
    eval_loss = re.search(r'<polyline class="eval_loss" points="([^"]+)"', page).group(1).split()
    assert len(eval_loss) == 2
    assert [float(p.split(",")[0]) for p in loss] == sorted(float(p.split(",")[0]) for p in loss)


def test_html_survives_missing_and_degenerate_parts():
    page = render_html({"models": ["m"], "curves": {"m": [{"step": 3, "loss": 1.0}]}})
    assert page.count("<svg") == 1 and "<circle" in page  # a lone point is drawn as a dot
    flat = render_html({"models": ["m"], "curves": {"m": [{"step": s, "loss": 0.5} for s in range(4)]}})
    assert "nan" not in flat.lower() and len(re.search(r'class="loss" points="([^"]+)"', flat).group(1).split()) == 4
    empty = render_html({})
    assert "<h1>liandan eval</h1>" in empty and "<svg" not in empty and "<table" not in empty
    nothing = render_html({"models": ["a", "b"], "metrics": [{"key": "k", "format": "percent", "values": {"a": None}}],
                           "curves": {"a": [{"step": None, "loss": None}]}, "sets": [{"name": "s"}]})  # fmt: skip
    assert "<svg" not in nothing and "—" in nothing


def test_markdown_has_header_deltas_and_pass_rates():
    md = render_markdown(make_result())
    assert "| metric | before (default) | after (runs/extract) |" in md
    assert "| Task: schema-valid ↑ | 0.0% | 95.0% (+95.0) |" in md
    assert "| Task perplexity ↓ | 2.73 | 2.31 (−0.420) |" in md
    assert "| Mean new tokens | — | 41.5 |" in md
    assert "| passed | 0.0% (0/2) | 100.0% (2/2) |" in md and "| contains | 100.0% (1/1) | 0.0% (0/1) |" in md
    assert "<script" not in md and "&lt;script&gt;" in md


def test_markdown_shows_only_the_first_ten_examples_per_set():
    result = make_result()
    example = result["sets"][1]["examples"][0]
    result["sets"][1]["examples"] = [{**example, "id": f"facts:{i}"} for i in range(1, 14)]
    md = render_markdown(result)
    assert "The first 10 of 13 examples" in md and "| facts:10 |" in md and "facts:11" not in md
    assert "| passed | 100.0% (13/13) | 0.0% (0/13) |" in md  # rates still count every example


def test_write_each_suffix_creating_directories(tmp_path):
    result = make_result()
    page = write_eval_report(result, tmp_path / "a" / "b" / "eval.html")
    assert page.read_text(encoding="utf-8") == render_html(result)
    assert write_eval_report(result, tmp_path / "eval.md").read_text(encoding="utf-8") == render_markdown(result)
    text = write_eval_report(result, tmp_path / "eval.json").read_text(encoding="utf-8")
    assert "抽取事件" in text and json.loads(text)["models"] == [BEFORE, AFTER]


def test_write_refuses_unknown_suffix(tmp_path):
    with pytest.raises(LiandanError, match=r"--out .*eval\.pdf: expected a file ending in \.html, \.md or \.json"):
        write_eval_report(make_result(), tmp_path / "eval.pdf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fail_in", ["render_html", "replace"])
def test_write_failure_keeps_the_old_file_and_leaves_no_temp_files(tmp_path, monkeypatch, fail_in):
    target = tmp_path / "eval.html"
    target.write_text("old report")

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    if fail_in == "render_html":
        monkeypatch.setattr(eval_report, "render_html", boom)
    else:  # the text is fully written to the temporary file; the rename fails
        monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(RuntimeError, match="boom"):
        write_eval_report(make_result(), target)
    assert target.read_text() == "old report" and [p.name for p in tmp_path.iterdir()] == ["eval.html"]
    missing = tmp_path / "new.html"
    with pytest.raises(RuntimeError, match="boom"):
        write_eval_report(make_result(), missing)
    assert not missing.exists() and [p.name for p in tmp_path.iterdir()] == ["eval.html"]


def test_page_renders_in_headless_chromium(tmp_path):
    page = write_eval_report(make_result(), tmp_path / "eval.html")
    dom, image = render(page, tmp_path)

    assert dom.count("<svg") == 3 and '<polyline class="loss"' in dom
    assert dom.count("<rect") == 12  # two bar charts: 4 bars and 2 legend keys each
    assert '<table class="metrics">' in dom and dom.count('<table class="examples"') == 2
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script" not in dom
    assert image.size == (1280, 2000)
    colours = image.getcolors(maxcolors=1 << 24)  # [(pixel count, (r, g, b))]
    for colour in PALETTE[:2]:
        count = colour_pixels(image, colour)
        # The colour swatches next to model names add up to under 1,000 pixels; the bars are
        # several thousand, so this fails when the plots are missing or drawn too small to see.
        assert count > 2500, f"only {count} pixels of {colour} in the screenshot"
    ink = sum(n for n, rgb in colours if sum(rgb) < 600) / (1280 * 2000)  # bars, lines, text: not a blank page
    text = sum(n for n, rgb in colours if sum(rgb) < 300) / (1280 * 2000)  # dark glyphs
    assert ink > 0.01 and text > 0.003, (ink, text)
    assert len(colours) > 200  # anti-aliased text and plots, not a few flat fills


def with_intervals(result):
    """make_result's metrics with the paired intervals `liandan eval` adds: a clear gain, a change
    within noise, and a clear drop in perplexity."""
    def interval(diff, low, high, significant, method="mcnemar-exact"):
        return {AFTER: {"diff": diff, "low": low, "high": high, "p": None if method == "bootstrap" else 0.01,
                        "method": method, "n": 40, "significant": significant}}  # fmt: skip

    result["metrics"][0]["intervals"] = interval(0.95, 0.801, 0.99, True)
    result["metrics"][1]["intervals"] = interval(-0.05, -0.141, 0.04, False)
    result["metrics"][2]["intervals"] = interval(-0.42, -0.6, -0.2, True, "bootstrap")
    return result


def test_format_change_adds_the_interval_and_marks_noise():
    metrics, models = with_intervals(make_result())["metrics"], [BEFORE, AFTER]
    assert format_change(metrics[0], AFTER, models) == ("+95.0 [+80.1, +99.0]", "better")
    assert format_change(metrics[1], AFTER, models) == ("−5.0 [−14.1, +4.0], noise", "noise")
    assert format_change(metrics[2], AFTER, models) == ("−0.420 [−0.600, −0.200]", "better")
    assert format_change(metrics[3], AFTER, models) is None  # no before value: no change to show
    assert format_change(make_result()["metrics"][0], AFTER, models) == ("+95.0", "better")  # no interval: as before
    assert format_interval({"low": -0.0004, "high": 0.2}, "percent") == "[±0.0, +20.0]"
    assert format_interval({"low": None, "high": 0.2}, "percent") is None


def test_every_report_shows_the_intervals():
    result = with_intervals(make_result())
    page = render_html(result)
    assert '95.0% <span class="delta better">(+95.0 [+80.1, +99.0])</span>' in metric_row(page, "Task: schema-valid")
    assert '55.0% <span class="delta noise">(−5.0 [−14.1, +4.0], noise)</span>' in metric_row(page, "Retention: facts")
    assert "95% interval over the same items" in page
    # the headline bar chart: a whisker on each "after" bar that has an interval (the two percent metrics)
    assert page.count('class="whisker"') == 2
    md = render_markdown(result)
    assert "| Task: schema-valid ↑ | 0.0% | 95.0% (+95.0 [+80.1, +99.0]) |" in md
    assert "| Retention: facts ↑ | 60.0% | 55.0% (−5.0 [−14.1, +4.0], noise) |" in md and "*noise* marks" in md
    assert json.loads(eval_report._render_json(result))["metrics"][1]["intervals"][AFTER]["significant"] is False
    console = Console(record=True, width=200)
    print_metrics(result, console)
    text = console.export_text()
    assert "95.0% (+95.0 [+80.1, +99.0])" in text and "55.0% (−5.0 [−14.1, +4.0], noise)" in text
    assert "percentages [its 95%" in text  # the caption's brackets are text, not console markup
    plain = Console(record=True, width=200)
    print_metrics(make_result(), plain)
    assert "95.0% (+95.0)" in plain.export_text() and "interval" not in plain.export_text()
    assert "whisker" not in render_html(make_result()) and "interval" not in render_markdown(make_result())


def test_quickstart_summary_carries_each_change_with_its_interval(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"data": {"train_examples": 12}}))
    trained = SimpleNamespace(steps=3, losses=[2.0, 1.5, 1.2])
    summary = build_summary(QuickstartConfig(), with_intervals(make_result()), trained, {"train": 1.0}, tmp_path)
    schema, facts, tokens = (summary["metrics"][k] for k in ("task.schema", "retention.facts", "task.tokens"))
    assert schema["delta"] == pytest.approx(0.95) and schema["interval"]["low"] == 0.801 and schema["interval"]["significant"]
    assert facts["interval"]["significant"] is False and tokens["interval"] is None
    json.dumps(summary)
