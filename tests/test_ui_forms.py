"""`liandan ui` without a browser: the training forms come from the config dataclasses (every
setting, its docstring as help) and round-trip to them; the strings exist in both languages and
every label on the page is one of them; the pieces each tab adds to the library (the errors table,
the stop-token marks, the saved conversation) hold to what the CLI reads.

The tests that need gradio skip without it, except under CI (env CI set), which installs the ui extra."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string

import pytest
from typer.testing import CliRunner

from conftest import chat_row, write_jsonl
from liandan.cli import app
from liandan.config import STAGES, LoraConfig, TrainConfig
from liandan.errors import LiandanError
from liandan.ui import forms
from liandan.ui.forms import build_config, field_docs, form_fields, recipe_from_values, values_from_recipe
from liandan.ui.i18n import EN, STRINGS, ZH, t


def needs_gradio():
    if os.environ.get("CI"):
        import gradio  # noqa: F401  (CI installs the ui extra: a missing gradio must fail there)
    else:
        pytest.importorskip("gradio", reason="the ui extra is not installed (pip install -e '.[ui]'); CI runs this test")


def settings_of(cls: type, prefix: str = "") -> list[str]:
    """Every setting of a config dataclass, nested ones dotted: what a form must offer."""
    names = []
    for f in dataclasses.fields(cls):
        names += settings_of(LoraConfig, f"{f.name}.") if f.name == "lora" else [prefix + f.name]
    return names


# ---------------------------------------------------------------------------------------------
# Forms from the dataclasses


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_setting_of_the_stage_is_in_its_form_with_its_docstring(stage):
    fields = {f.name: f for f in form_fields(stage)}
    assert sorted(fields) == sorted(settings_of(STAGES[stage]))
    assert all(f.help for f in fields.values()), [name for name, f in fields.items() if not f.help]
    # The help is the docstring under the field, the stage's own where it redefines one.
    assert fields["lora.rank"].help == "LoRA rank r: the width of the low-rank update."
    assert fields["max_steps"].help == "Optimizer steps to run; 0 means derive from epochs."
    own_lr = {"sft": "Peak learning rate (AdamW).", "pretrain": "Peak learning rate (AdamW).",
              "dpo": "Peak learning rate (AdamW); DPO wants a gentler one than SFT.", "grpo": "Peak learning rate (AdamW)."}  # fmt: skip
    assert fields["lr"].help == own_lr[stage]
    assert fields["lr"].default == STAGES[stage]().lr  # the stage's own default, not TrainConfig's


def test_a_docstring_spread_over_lines_becomes_one_line_and_fields_without_one_are_left_empty():
    assert field_docs(TrainConfig)["save_every_minutes"] == (
        "Also write one when this many minutes have passed since the last (0 = not by time). With "
        "both at 0 there are no checkpoints: a crash loses the whole run."
    )

    @dataclasses.dataclass
    class Bare:
        documented: int = 1
        """Has one."""
        plain: int = 2

    assert field_docs(Bare) == {"documented": "Has one."}


def test_kinds_choices_and_unset_values():
    fields = {f.name: f for f in form_fields("dpo")}
    assert (fields["beta"].kind, fields["beta"].optional, fields["beta"].default) == ("float", True, None)  # unset until the loss picks it
    assert fields["loss"].choices == ("sigmoid", "ipo", "orpo", "simpo", "kto")
    assert fields["data"].kind == "list[str]" and fields["data"].widget_default == ""
    grpo = {f.name: f for f in form_fields("grpo")}
    assert grpo["reward_weights"].kind == "list[float]" and grpo["rewards"].widget_default == "checks"
    assert [f.group for f in form_fields("sft")][:8] == ["first"] * 8


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_default_form_is_the_default_config_and_names_model_data_and_run_directory(stage):
    fields = form_fields(stage)
    recipe = recipe_from_values(stage, {f.name: f.widget_default for f in fields})
    assert recipe == {"model": "default", "data": [], "output_dir": STAGES[stage]().output_dir}
    assert build_config(stage, recipe) == STAGES[stage]()


EDITS = {
    "sft": {"data": "a.jsonl\nb.jsonl", "lr": 1e-3, "lora.rank": 8, "packing": False, "format": "alpaca", "replay": "self"},
    "dpo": {"data": "pairs.jsonl", "loss": "simpo", "beta": 2.5, "lora.target_modules": "q_proj\nv_proj"},
    "pretrain": {"data": "corpus.txt", "max_length": 256, "batch_tokens": 512, "full": True},
    "grpo": {"data": "prompts.jsonl", "rewards": "checks\nstop", "reward_weights": "1, 0.5", "beta": 0.04, "loss_type": "grpo"},
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_filled_in_form_round_trips_through_the_recipe_to_the_dataclass(stage):
    fields = form_fields(stage)
    values = {f.name: f.widget_default for f in fields} | EDITS[stage]
    recipe = recipe_from_values(stage, values)
    config = build_config(stage, recipe)
    for name, value in EDITS[stage].items():
        field = next(f for f in fields if f.name == name)
        got = config
        for part in name.split("."):
            got = getattr(got, part)
        assert got == forms.from_widget(field, value), name
    # only what was changed, nested settings nested
    assert set(recipe) - {"model", "data", "output_dir"} == {name.split(".")[0] for name in EDITS[stage]} - {"data"}
    assert values_from_recipe(stage, recipe) == {f.name: forms.to_widget(f, forms.from_widget(f, values[f.name])) for f in fields}
    assert recipe_from_values(stage, values_from_recipe(stage, recipe)) == recipe


def test_examples_recipes_fill_their_forms():
    from liandan.config import read_yaml
    from liandan.prompts import shipped_example

    for name, stage in [("sft-pirate.yaml", "sft"), ("dpo-onesent.yaml", "dpo"), ("pretrain-veloria.yaml", "pretrain"), ("grpo-onesent.yaml", "grpo")]:
        recipe = read_yaml(shipped_example(name))
        again = recipe_from_values(stage, values_from_recipe(stage, recipe))
        assert build_config(stage, again) == build_config(stage, recipe), name


def test_a_bad_value_is_refused_in_the_words_of_the_command_line():
    values = {f.name: f.widget_default for f in form_fields("sft")}
    with pytest.raises(LiandanError, match=r"lr must be a finite number above 0 \(got 0.0\)"):
        build_config("sft", recipe_from_values("sft", values | {"lr": 0}))
    with pytest.raises(LiandanError, match=r"setting 'max_steps': expected a whole number, got 2.5"):
        recipe_from_values("sft", values | {"max_steps": 2.5})
    with pytest.raises(LiandanError, match=r"setting 'reward_weights': expected numbers separated by commas"):
        recipe_from_values("grpo", {"reward_weights": "1, x"})


# ---------------------------------------------------------------------------------------------
# Strings


def placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_both_languages_have_every_key_with_the_same_placeholders():
    assert EN.keys() == ZH.keys()
    for key in EN:
        assert placeholders(EN[key]) == placeholders(ZH[key]), key
        assert ZH[key].strip(), key
    untranslated = [k for k in EN if EN[k] == ZH[k] and re.search(r"[a-z]{4,}", EN[k]) and k not in ("app.language",)]
    assert untranslated == [], untranslated
    assert t("zh", "look.done", stopped=3, total=4) == "4 条输出中有 3 条自己停下。"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The whole page, built as `liandan ui` builds it (not served)."""
    needs_gradio()
    from liandan.jobs import Jobs
    from liandan.ui.app import build_app
    from liandan.ui.context import UIContext

    state = tmp_path_factory.mktemp("ui-state")
    return build_app(UIContext(jobs=Jobs(state), state_dir=state), "en")


def test_every_label_on_the_page_is_a_string_of_the_language_or_a_setting_name(page):
    import gradio as gr

    settings = {f.name for stage in STAGES for f in form_fields(stage)}
    helps = {f.help for stage in STAGES for f in form_fields(stage)}
    english = set(EN.values())
    switched = {id(component) for component in page.liandan_labels.components}
    missing, unswitched = [], []
    for block in page.blocks.values():
        texts = [getattr(block, "label", None), getattr(block, "info", None), getattr(block, "placeholder", None)]
        if isinstance(block, (gr.Button, gr.Markdown)):
            texts.append(block.value)
        for text in texts:
            if isinstance(text, str) and text and text not in english and text not in settings | helps:
                missing.append((type(block).__name__, text))
            elif isinstance(text, str) and text and id(block) not in switched:  # the language switch would leave it in English
                unswitched.append((type(block).__name__, text))
    assert missing == [] and unswitched == []
    assert sum(isinstance(b, gr.Tab) for b in page.blocks.values()) == 6


def test_switching_the_language_relabels_every_translated_component(page):
    from liandan.ui.context import Key

    labels = page.liandan_labels
    for lang in STRINGS:
        for (component, keys), update in zip(labels.entries, labels.updates(lang), strict=True):
            expected = {prop: STRINGS[lang][key] if isinstance(key, Key) else key.by_lang[lang] for prop, key in keys.items()}
            assert update == {"__type__": "update", **expected}
    tabs = [update["label"] for (component, _), update in zip(labels.entries, labels.updates("zh")) if type(component).__name__ == "Tab"]
    assert tabs == ["看模型", "数据", "训练", "评测", "对话", "导出"]


def test_each_stage_has_a_widget_per_setting_labelled_with_it_and_helped_by_its_docstring(page):
    from liandan.ui.i18n_settings import ZH_HELP, ZH_LABELS, entry

    labels = page.liandan_labels
    switched = {id(component): i for i, component in enumerate(labels.components)}
    english, chinese = labels.updates("en"), labels.updates("zh")
    for stage in STAGES:
        for field in form_fields(stage):
            widget = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == f"{stage}-{field.name.replace('.', '-')}")
            assert (widget.label, widget.info) == (field.name, field.help)
            # The language switch gives it its Chinese help and a gloss after its name, and gives the English back.
            i = switched.get(id(widget))
            assert i is not None, f"{widget.elem_id}: the language switch leaves it as it is"
            zh_label = f"{field.name} · {ZH_LABELS[entry(ZH_LABELS, stage, field.name)]}"
            assert (chinese[i]["label"], chinese[i]["info"]) == (zh_label, ZH_HELP[entry(ZH_HELP, stage, field.name)])
            assert (english[i]["label"], english[i]["info"]) == (field.name, field.help)
    i = switched[id(next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "dpo-lr"))]
    assert chinese[i]["info"] == "峰值学习率（AdamW）；DPO 宜用比 SFT 更小的学习率。" and chinese[i]["label"] == "lr · 学习率"


def test_progress_and_the_data_summary_speak_the_page_language():
    needs_gradio()
    from liandan.data_inspection import DataInspection
    from liandan.ui.train import data_summary, duration, progress_html

    assert (duration(3725, "en"), duration(3725, "zh")) == ("1 h 02 min", "1 小时 02 分")
    assert (duration(65, "zh"), duration(5, "zh"), duration(None, "zh")) == ("1 分 05 秒", "5 秒", "—")
    line = progress_html({"step": 3, "steps": 10, "seconds": 65, "eta_seconds": 130, "status": "running"}, "zh")
    assert "第 3 / 10 步 · 已用 1 分 05 秒 · 约剩 2 分 10 秒 · 运行中" in line
    stats = {"tokens": 40, "trained_tokens": 12, "truncated": 1, "no_trained_tokens": ["d.jsonl:2"], "stop_cut_off": 0}
    report = DataInspection(format="messages", records=2, stats=stats, shown=[])
    assert data_summary(report, "zh") == "2 条记录（messages），共 40 个 token，其中 12 个参与训练（绿色）；1 条被截断，1 条没有参与训练的 token。"
    assert data_summary(report, "en") == report.summary() + "."  # the words of liandan inspect-data


# ---------------------------------------------------------------------------------------------
# What the tabs add


def test_invalid_records_become_rows_of_file_line_field_and_problem(tmp_path):
    needs_gradio()
    from liandan.ui.train import validation_rows

    path = write_jsonl(tmp_path / "d.jsonl", [chat_row("Hi?", "Hello."), {"messages": [{"role": "user", "content": "x"}]},
                                              {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 5}]}])  # fmt: skip
    (tmp_path / "d.jsonl").write_text(path.read_text() + "{not json\n")
    rows = validation_rows([str(path)], None)
    assert [r[0] for r in rows] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert rows[1][1:] == ["messages[1].content", "expected a non-empty string; got 5"]
    assert rows[2][1] == "" and rows[2][2].startswith("not valid JSON")
    assert validation_rows([str(write_jsonl(tmp_path / "ok.jsonl", [chat_row("a", "b")]))], None) == []


def test_stop_tokens_inside_trained_text_are_marked_on_their_own():
    needs_gradio()
    from liandan.data_inspection import DataInspection, ShownExample
    from liandan.ui.train import marked_pieces

    report = DataInspection(format="messages", records=1, stats={}, shown=[ShownExample(
        source="d.jsonl:1", pieces=[("<|im_start|>assistant\n", False), ("Arr.<|im_end|>", True), ("\n", False)])])  # fmt: skip
    assert marked_pieces(report, ["<|im_end|>"], "trained", "stop") == [
        ("── d.jsonl:1 ──\n", None), ("<|im_start|>assistant\n", None), ("Arr.", "trained"), ("<|im_end|>", "stop"),
        ("\n", None), ("\n\n", None),
    ]  # fmt: skip


def test_a_saved_conversation_is_training_data_the_reader_accepts(tmp_path):
    needs_gradio()
    from liandan.data import read_examples
    from liandan.terminal_chat import Conversation
    from liandan.ui.use import append_conversation

    first = Conversation("Be brief.", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    cut = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1 2 3", "train": False}]
    second = Conversation(None, first.turns + cut)  # a reply cut at the length limit is kept, not trained
    path = tmp_path / "chats.jsonl"
    assert append_conversation(path, first) == 1
    assert append_conversation(path, second) == 2
    assert json.loads(path.read_text().splitlines()[0]) == {"messages": first.messages}
    examples = read_examples([str(path)]).examples
    assert [e.messages for e in examples] == [first.messages, second.messages]
    # what the reader would refuse is not written
    with pytest.raises(LiandanError, match="nothing to train on: every reply was cut short"):
        append_conversation(path, Conversation(None, cut))
    with pytest.raises(LiandanError, match="saved as .jsonl"):
        append_conversation(tmp_path / "chats.json", first)
    with pytest.raises(LiandanError, match="the conversation is empty"):
        append_conversation(path, Conversation())
    assert len(read_examples([str(path)]).examples) == 2


def test_work_in_the_background_reports_progress_then_its_result_or_its_error():
    needs_gradio()
    from liandan.ui.context import in_background

    def work(report):
        report("half")
        return 42

    assert list(in_background(None, work)) == [("progress", "half"), ("done", 42)]

    def failing(report):
        raise LiandanError("no such file")

    with pytest.raises(LiandanError, match="no such file"):
        list(in_background(None, failing))


# ---------------------------------------------------------------------------------------------
# The command


def test_ui_help_works_without_starting_anything():
    result = CliRunner().invoke(app, ["ui", "--help"])
    assert result.exit_code == 0
    assert "--share" in result.output and "--state-dir" in result.output and "127.0.0.1" in result.output


def test_without_gradio_the_command_names_what_installs_it(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version

    def version(name):
        if name == "gradio":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    result = CliRunner().invoke(app, ["ui"])
    assert result.exit_code == 2
    assert "needs gradio, which is not installed; install it with: pip install 'liandan[ui]'" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_a_gradio_that_does_not_import_or_of_another_version_is_one_line(monkeypatch):
    import importlib.metadata
    import sys

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.44.1" if name == "gradio" else real(name))
    result = CliRunner().invoke(app, ["ui"])
    assert result.exit_code == 2 and "needs gradio>=6.0,<7, but gradio 4.44.1 is installed" in " ".join(result.output.split())

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "6.1.0" if name == "gradio" else real(name))
    monkeypatch.setitem(sys.modules, "gradio", None)  # importing it fails, as a broken dependency makes it fail
    result = CliRunner().invoke(app, ["ui"])
    assert result.exit_code == 2 and "gradio 6.1.0 is installed but does not import (ModuleNotFoundError: import of gradio halted" in " ".join(result.output.split())


def test_a_bad_language_is_refused_before_anything_loads():
    result = CliRunner().invoke(app, ["ui", "--lang", "fr"])
    assert result.exit_code == 2 and "--lang fr: expected one of en, zh" in result.output
