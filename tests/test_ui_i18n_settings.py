"""The training forms of `liandan ui` in Chinese: every setting of every stage has a Chinese help
(its docstring translated) and a short Chinese name, a stage whose docstring says something else
has its own, the code names, numbers and option values of the English are kept in the Chinese,
and the language decides which one a widget gets. No gradio needed: the page-level switch is
tested in test_ui_forms.py."""

from __future__ import annotations

import itertools
import re

import pytest

from liandan.config import STAGES
from liandan.ui.forms import form_fields
from liandan.ui.i18n_settings import ZH_HELP, ZH_LABELS, entry, setting_help, setting_label

SETTINGS = [(stage, field) for stage in STAGES for field in form_fields(stage)]
HAN = re.compile(r"[\u4e00-\u9fff]")


@pytest.mark.parametrize("table", [ZH_HELP, ZH_LABELS], ids=["help", "label"])
def test_every_setting_of_every_stage_has_its_chinese(table):
    missing = []
    for stage, field in SETTINGS:
        try:
            entry(table, stage, field.name)
        except KeyError:
            missing.append(f"{stage}: {field.name}")
    assert missing == [], f"add these settings to liandan/ui/i18n_settings.py: {missing}"


@pytest.mark.parametrize("table", [ZH_HELP, ZH_LABELS], ids=["help", "label"])
def test_no_entry_is_left_over_from_a_setting_that_is_gone(table):
    used = {entry(table, stage, field.name) for stage, field in SETTINGS}
    assert sorted(set(table) - used) == []


def test_each_translation_is_chinese_and_not_the_english():
    bad = []
    for stage, field in SETTINGS:
        zh, label = setting_help("zh", stage, field.name, field.help), setting_label("zh", stage, field.name)
        if not zh.strip() or zh == field.help or not HAN.search(zh):
            bad.append(f"{stage}: {field.name} help {zh!r}")
        if not label.startswith(f"{field.name} · ") or not HAN.search(label.removeprefix(field.name)):
            bad.append(f"{stage}: {field.name} label {label!r}")
    assert bad == []


def test_the_same_docstring_has_one_translation_and_a_different_one_its_own():
    """A stage that redefines a setting with other words (DPO's lr, pretrain's max_length) needs its
    own entry (``dpo:lr``): without it, it would show the translation of another stage's words."""
    wrong = []
    for (stage_a, a), (stage_b, b) in itertools.combinations(SETTINGS, 2):
        if a.name != b.name:
            continue
        same_english = a.help == b.help
        same_chinese = setting_help("zh", stage_a, a.name, a.help) == setting_help("zh", stage_b, b.name, b.help)
        if same_english != same_chinese:
            wrong.append(f"{a.name}: {stage_a} and {stage_b} " + ("share a docstring but not its translation" if same_english
                                                                 else f"differ, give '{stage_b}:{b.name}' its own"))  # fmt: skip
    assert wrong == []
    assert entry(ZH_HELP, "dpo", "lr") == "dpo:lr" and entry(ZH_HELP, "sft", "lr") == entry(ZH_HELP, "grpo", "lr") == "lr"


def kept_as_they_are(english: str, choices: tuple[str, ...] | None) -> set[str]:
    """What a translation must keep: numbers, setting and code names (with an underscore or a
    dot), command-line flags, file suffixes, quoted values and the option words of the setting."""
    found = set(re.findall(r"(?<![\w.])\d+(?:\.\d+)?%?", english))
    found |= set(re.findall(r"\b[A-Za-z]\w*_\w+|\b[a-z]\w+\.[a-z_]\w+|--[a-z][a-z-]+|(?<!\w)\.[a-z]{3,5}\b", english))
    quoted = re.findall(r"\"([^\"]+)\"|(?<!\w)'([^']+)'(?!\w)|`([^`]+)`", english)  # not the 's of "the loss's"
    found |= {text for group in quoted for text in group if text}
    found |= {word for word in choices or () if re.search(rf"\b{re.escape(word)}\b", english)}
    return found


def test_code_names_numbers_and_option_values_are_kept_in_the_chinese():
    """Also a tripwire for a docstring that changed under its translation: a new number, setting
    name or option in the English that the Chinese lacks."""
    lost = []
    for stage, field in SETTINGS:
        zh = setting_help("zh", stage, field.name, field.help)
        missing = sorted(token for token in kept_as_they_are(field.help, field.choices) if token not in zh)
        if missing:
            lost.append(f"{stage}: {field.name} lacks {missing}")
    assert lost == []
    assert kept_as_they_are("Replay ratio (at most 1) for \"self\" or a .jsonl file; see max_steps and --resume.", None) == {
        "1", "self", ".jsonl", "max_steps", "--resume"}  # fmt: skip


def test_the_language_chooses_the_help_and_the_label():
    lr = next(f for f in form_fields("dpo") if f.name == "lr")
    assert setting_help("en", "dpo", "lr", lr.help) == lr.help == "Peak learning rate (AdamW); DPO wants a gentler one than SFT."
    assert setting_help("zh", "dpo", "lr", lr.help) == "峰值学习率（AdamW）；DPO 宜用比 SFT 更小的学习率。"
    assert setting_help("zh", "sft", "lr", "Peak learning rate (AdamW).") == "峰值学习率（AdamW）。"
    assert (setting_label("en", "pretrain", "max_length"), setting_label("zh", "pretrain", "max_length")) == (
        "max_length",
        "max_length · 块大小",
    )
    assert setting_label("zh", "sft", "lora.rank") == "lora.rank · 秩"
    with pytest.raises(KeyError, match="no Chinese for setting 'new_knob' of sft"):
        setting_help("zh", "sft", "new_knob", "A setting added without its translation.")
