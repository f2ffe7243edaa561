"""Prompts to generate from: given on the command line or read from a file.

A prompts file is either ``.txt`` (one prompt per non-empty line) or ``.jsonl`` (one JSON object
per line with ``prompt``: a string, or ``messages``: a list of ``{"role", "content"}``).

    from liandan.prompts import read_prompts
    prompts = read_prompts("examples/prompts.jsonl")
    prompts[0].source      # 'examples/prompts.jsonl:1'

Every problem is reported as ``FILE:LINE: field: what is wrong``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .data import ROLES
from .errors import LiandanError
from .tool_records import read_tool_calls, read_tools

BUILTIN = {"probes": "general/probes.jsonl", "drift": "general/drift_prompts.jsonl", "general": "general/general_prompts.jsonl"}
"""Prompt sets shipped with liandan (in its examples), by the name settings use."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: plain text, or a conversation to continue as the assistant."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None
    source: str = "--prompt"
    """Where it came from (``FILE:LINE`` or ``--prompt``), for error messages and reports."""
    meta: dict = field(default_factory=dict, compare=False)
    """Other fields of the JSONL record, kept for reports."""
    tools: tuple[dict, ...] | None = None
    """Function definitions offered to the model (``{"type": "function", "function": {...}}``),
    rendered by its chat template; None when the record has none."""

    def chat_messages(self, system: str | None = None) -> list[dict]:
        """The conversation for chat mode; ``system`` is added unless the prompt has its own."""
        messages = list(self.messages) if self.messages else [{"role": "user", "content": self.text}]
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def raw_text(self) -> str:
        """The text for raw continuation: the prompt itself, or the messages' contents without
        roles (a base model sees plain text)."""
        if self.text is not None:
            return self.text
        return "\n\n".join(m["content"] for m in self.messages or ())

    @property
    def display(self) -> str:
        """A short human-readable form for tables: the text, or the last user message."""
        if self.text is not None:
            return self.text
        users = [m["content"] for m in self.messages or () if m["role"] == "user"]
        return users[-1] if users else self.messages[-1]["content"]


def prompts_from_strings(texts: list[str]) -> list[Prompt]:
    prompts = []
    for i, text in enumerate(texts, 1):
        if not text.strip():
            raise LiandanError(f"--prompt number {i} is empty")
        prompts.append(Prompt(text=text, source=f"--prompt {i}"))
    return prompts


def collect_prompts(texts: list[str], path: str | Path | None = None) -> list[Prompt]:
    """Prompts given as text (``--prompt``, repeatable) followed by those of a file (``--prompts``)."""
    collected = prompts_from_strings(texts)
    if path is not None:
        collected += read_prompts(path)
    if not collected:
        raise LiandanError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return collected


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read a ``.txt`` or ``.jsonl`` prompts file; raises `LiandanError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise LiandanError(f"prompts file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise LiandanError(f"prompts file '{path}': expected a .txt or .jsonl file, got '{suffix or path.name}'")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LiandanError(f"prompts file '{path}' is not UTF-8 text: {exc}") from exc
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if suffix == ".txt":
            prompts.append(Prompt(text=line, source=where))
        else:
            prompts.append(parse_prompt_record(line, where))
    if not prompts:
        raise LiandanError(f"prompts file '{path}' has no prompts")
    return prompts


def parse_prompt_record(line: str, where: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LiandanError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict):
        raise LiandanError(f"{where}: expected a JSON object, got {type(record).__name__}")
    meta = {k: v for k, v in record.items() if k not in ("prompt", "messages", "tools")}
    tools = read_tools(record.get("tools"), where)
    tools = tuple(tools) if tools else None
    if "messages" in record:
        return Prompt(messages=tuple(check_messages(record["messages"], where)), source=where, meta=meta, tools=tools)
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str):
            raise LiandanError(f"{where}: field 'prompt': expected a string, got {type(text).__name__}")
        if not text.strip():
            raise LiandanError(f"{where}: field 'prompt': is empty")
        return Prompt(text=text, source=where, meta=meta, tools=tools)
    raise LiandanError(f"{where}: expected a field 'prompt' (a string) or 'messages' (a list), found {sorted(record) or 'none'}")


def check_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise LiandanError(f"{where}: field 'messages': expected a non-empty list of {{role, content}} objects")
    checked = []
    for i, message in enumerate(messages):
        field_name = f"messages[{i}]"
        if not isinstance(message, dict):
            raise LiandanError(f"{where}: field '{field_name}': expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise LiandanError(f"{where}: field '{field_name}.role': expected one of {', '.join(ROLES)}, got {role!r}")
        calls = message.get("tool_calls")
        if content is None and role == "assistant" and calls:
            content = ""
        if not isinstance(content, str):
            raise LiandanError(f"{where}: field '{field_name}.content': expected a string, got {type(content).__name__}")
        checked_message = {"role": role, "content": content}
        if calls is not None:
            if role != "assistant":
                raise LiandanError(f"{where}: field '{field_name}.tool_calls': only assistant messages make calls, not {role!r}")
            checked_message["tool_calls"] = read_tool_calls(calls, f"{field_name}.tool_calls", where)[0]
        for key in ("tool_call_id", "name"):
            if role == "tool" and isinstance(message.get(key), str):
                checked_message[key] = message[key]
        checked.append(checked_message)
    return checked


# ---------------------------------------------------------------------------------------------
# Sets shipped with liandan


def shipped_example(relative: str) -> Path:
    """A file of the examples shipped inside the package (``examples/`` in the repository), so
    ``liandan quickstart`` and the README's recipes work from any directory after a plain install:
    ``shipped_example("extract/train.jsonl")``."""
    return Path(str(resources.files("liandan"))) / "examples" / relative


def builtin_path(name: str) -> Path:
    """The path of a set shipped with liandan (probes, drift or general prompts)."""
    return shipped_example(BUILTIN[name])


def read_general_prompts(spec: str, name: str = "drift") -> list[Prompt] | None:
    """A prompts setting: ``"none"`` -> None, ``"default"`` -> the shipped set ``name``, else a file."""
    if spec == "none":
        return None
    return read_prompts(builtin_path(name) if spec == "default" else spec)


def copy_examples(out: Path) -> int:
    """Copy the shipped examples (data, recipes, task sets) into ``out``, a new or empty directory,
    so the README's commands run there as written. Returns the number of files copied. Written
    to a temporary directory beside ``out`` and renamed: a failure leaves nothing half-copied."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LiandanError(f"'{out}' already exists and is not an empty directory; choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / "examples"
        shutil.copytree(shipped_example(""), staged, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if out.exists():
            out.rmdir()
        os.replace(staged, out)
    return sum(1 for p in out.rglob("*") if p.is_file())
