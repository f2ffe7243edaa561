"""The training forms of `liandan ui`, generated from the config dataclasses: every setting is
defined once, in `liandan.config` (its name, type, default and the docstring under it), and this
module turns that into form fields and the filled-in form back into a recipe.

    from liandan.ui.forms import form_fields, recipe_from_values, build_config
    fields = form_fields("sft")   # [FormField(name="model", kind="str", default="default", help="Base model: ..."), ...]
    values = {f.name: f.widget_default for f in fields} | {"data": "examples/pirate.jsonl", "lora.rank": 8}
    recipe = recipe_from_values("sft", values)   # {"model": "default", "data": [...], "output_dir": "runs/sft", "lora": {"rank": 8}}
    build_config("sft", recipe)                  # SFTConfig(...), or a LiandanError worded as the CLI words it

A recipe holds the run's model, data and run directory and every setting that differs from its
default: the YAML a user would write by hand (`examples/*.yaml`). Nothing here imports gradio.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import itertools
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from ..config import (
    ATTENTION_KERNELS,
    DPO_LOSSES,
    GRPO_LOSS_TYPES,
    GRPO_SCALE_REWARDS,
    MIXED_PRECISIONS,
    QUANTIZE_MODES,
    SPECIAL_TEXT_MODES,
    STAGES,
    TrainConfig,
    build,
)
from ..data import CONVERSATION_FORMATS
from ..errors import LiandanError

CHOICES: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_KERNELS,
    "mixed_precision": MIXED_PRECISIONS,
    "quantize": QUANTIZE_MODES,
    "special_text": SPECIAL_TEXT_MODES,
    "loss": DPO_LOSSES,
    "loss_type": GRPO_LOSS_TYPES,
    "scale_rewards": GRPO_SCALE_REWARDS,
    "format": CONVERSATION_FORMATS,
}
"""The settings that take one of a few words: a list to pick from instead of a text box."""

ALWAYS = ("model", "data", "output_dir")
"""Written into every recipe, default or not: a recipe names its model, data and run directory."""

FIRST = ("model", "data", "eval_data", "output_dir", "full", "lr", "epochs", "max_steps")
"""Shown at the top of every form; the stage's own settings come next, then LoRA, then the rest."""


@dataclass
class FormField:
    """One setting as a form shows it."""

    name: str
    """The setting's key; nested ones dotted (``lora.rank``), as ``--set`` takes them."""
    kind: str
    """bool, int, float, str, list[str] or list[float]."""
    default: Any
    """The dataclass default (a fresh copy for lists)."""
    help: str
    """The field's docstring in `liandan.config`, on one line."""
    optional: bool = False
    """The setting may be unset (None): an empty box means unset."""
    choices: tuple[str, ...] | None = None
    group: str = "advanced"
    """first, stage, lora or advanced: where the form puts it."""

    @property
    def widget_default(self) -> Any:
        return to_widget(self, self.default)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body), read from the
    source of the class and its bases; a subclass's own docstring wins."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        docs.update(_class_docs(klass))
    return docs


@cache
def _class_docs(klass: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    body = tree.body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):  # fmt: skip
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def form_fields(stage: str) -> list[FormField]:
    """Every setting of ``stage`` (sft, dpo, pretrain, grpo), nested groups flattened, in the
    order a form shows them."""
    if stage not in STAGES:
        raise LiandanError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    cls = STAGES[stage]
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = _fields(cls, "", lambda name: "first" if name in FIRST else "advanced" if name in shared else "stage")
    order = {"first": 0, "stage": 1, "lora": 2, "advanced": 3}
    firsts = {name: i for i, name in enumerate(FIRST)}
    return sorted(fields, key=lambda f: (order[f.group], firsts.get(f.name, 0)))  # stable: class order within a group


def _fields(cls: type, prefix: str, group_of) -> list[FormField]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    found = []
    for f in dataclasses.fields(cls):
        hint, optional = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(hint):  # a group of settings: lora.rank, lora.alpha, ...
            found += _fields(hint, f"{prefix}{f.name}.", lambda name, group=f.name: group)
            continue
        kind = _kind(hint, f"{cls.__name__}.{f.name}")
        # The declared default, not an instance's: __post_init__ may fill an unset one in (DPO's beta).
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        found.append(FormField(name=prefix + f.name, kind=kind, default=default,
                               help=docs.get(f.name, ""), optional=optional, choices=CHOICES.get(f.name),
                               group=group_of(f.name)))  # fmt: skip
    return found


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _kind(hint: Any, where: str) -> str:
    if hint in (bool, int, float, str):
        return hint.__name__
    if typing.get_origin(hint) is list and typing.get_args(hint)[0] in (str, float):
        return f"list[{typing.get_args(hint)[0].__name__}]"
    raise TypeError(f"{where}: the form has no widget for {hint!r}; add one in liandan.ui.forms")


# ---------------------------------------------------------------------------------------------
# Widget values <-> setting values


def to_widget(field: FormField, value: Any) -> Any:
    """A setting's value as its widget holds it: lists of paths one per line, lists of numbers
    comma-separated, an unset value as an empty box."""
    if value is None:
        return "" if field.kind in ("str", "list[str]", "list[float]") else None
    if field.kind == "list[str]":
        return "\n".join(value)
    if field.kind == "list[float]":
        return ", ".join(f"{v:g}" for v in value)
    return value


def from_widget(field: FormField, raw: Any) -> Any:
    """A widget's value as the setting's value; raises `LiandanError` naming the setting."""
    if field.kind == "list[str]":
        return [line.strip() for line in str(raw or "").splitlines() if line.strip()]
    if field.kind == "list[float]":
        parts = [p.strip() for p in re.split(r"[,\s]+", str(raw or "")) if p.strip()]
        try:
            return [float(p) for p in parts]
        except ValueError:
            raise LiandanError(f"setting '{field.name}': expected numbers separated by commas, got {raw!r}") from None
    if raw is None or (isinstance(raw, str) and not raw.strip() and field.kind != "bool"):
        if field.optional:
            return None
        if field.kind == "str":
            return ""
        raise LiandanError(f"setting '{field.name}': expected a number, got an empty box")
    if field.kind == "int":
        if isinstance(raw, float) and not (math.isfinite(raw) and raw == int(raw)):
            raise LiandanError(f"setting '{field.name}': expected a whole number, got {raw}")
        return int(raw)
    if field.kind == "float":
        return float(raw)
    if field.kind == "bool":
        return bool(raw)
    return str(raw).strip()


def recipe_from_values(stage: str, values: dict[str, Any]) -> dict:
    """The recipe a filled-in form stands for: the model, data and run directory, and every
    setting whose value differs from its default (nested settings as nested mappings)."""
    recipe: dict = {}
    for field in form_fields(stage):
        if field.name not in values:
            continue
        value = from_widget(field, values[field.name])
        if value == field.default and field.name not in ALWAYS:
            continue
        *parents, last = field.name.split(".")
        target = recipe
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return recipe


def build_config(stage: str, recipe: dict):
    """The stage's config built from ``recipe``, checked as ``liandan STAGE --config`` checks it."""
    return build(STAGES[stage], copy.deepcopy(recipe), "")


def values_from_recipe(stage: str, recipe: dict) -> dict[str, Any]:
    """Widget values for every field of the form, filled from ``recipe`` (a run's config.yaml or a
    YAML recipe); settings it lacks keep their defaults."""
    config = build_config(stage, recipe)  # checks it, and brings each value to its field's type
    values = {}
    for field in form_fields(stage):
        given: Any = recipe
        for part in field.name.split("."):
            given = given.get(part, dataclasses.MISSING) if isinstance(given, dict) else dataclasses.MISSING
        if given is dataclasses.MISSING:
            values[field.name] = field.widget_default
            continue
        value: Any = config
        for part in field.name.split("."):
            value = getattr(value, part)
        values[field.name] = to_widget(field, value)
    return values


def recipe_yaml(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
