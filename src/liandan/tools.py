"""Tool calling: definitions and calls rendered by the model's own chat template, and the calls a
model writes read back into structured form.

The chat template stays the only source of truth. How a template writes a call is found by
rendering an assistant turn that holds sentinel calls and cutting the JSON objects out of it:
the text around them (``<tool_call>\\n`` ... ``\\n</tool_call>`` for Qwen and Hermes-style
templates, ``[TOOL_CALLS][`` ... ``]`` for Mistral's, nothing for Llama 3.1's bare JSON) is the
model's `CallFormat`, and `parse_reply` reads a generated reply with it.

    from liandan.tools import call_format, parse_reply
    fmt = call_format(tokenizer)                       # raises when the template cannot render tools
    reply = parse_reply('<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\\n</tool_call>', fmt)
    reply.calls    # [{'type': 'function', 'function': {'name': 'get_weather', 'arguments': {'city': 'Oslo'}}}]

A model whose template has no tool support (the default SmolLM2's is plain ChatML) can be given
liandan's own ChatML tools template with ``tools_template: chatml`` (`with_tools_template`): the
same ChatML turns, the model's own default system prompt, tool definitions in the system turn,
calls as ``<tool_call>`` JSON and results as ``tool`` turns. A run trained with it saves it with
its tokenizer, so chat, serve, eval and export use it from then on. A ``.jinja`` file can be given
instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat import stop_token_ids
from .chat_pieces import chat_pieces
from .errors import LiandanError

BUILTIN_TEMPLATES = ("chatml",)
"""Names ``tools_template`` accepts besides a ``.jinja`` file."""

_NAME_A, _NAME_B = "liandan_probe_alpha", "liandan_probe_beta"
_ARG_KEY = "liandan_probe_arg"
_VALUE_A, _VALUE_B = "Liandan7ValueA", "Liandan7ValueB"
_DESCRIPTION = "Liandan7Describes"
_RESULT = "Liandan7Result"
_USER = "Liandan7Asks"
_ANSWER = "Liandan7Answers"
_IDS = ("call00001", "call00002")  # 9 letters and digits: Mistral's templates insist


def _probe_tools() -> list[dict]:
    parameters = {"type": "object", "properties": {_ARG_KEY: {"type": "string"}}, "required": [_ARG_KEY]}
    return [{"type": "function", "function": {"name": name, "description": _DESCRIPTION, "parameters": parameters}}
            for name in (_NAME_A, _NAME_B)]  # fmt: skip


def _probe_call(n: int) -> dict:
    name, value = ((_NAME_A, _VALUE_A), (_NAME_B, _VALUE_B))[n]
    return {"id": _IDS[n], "type": "function", "function": {"name": name, "arguments": {_ARG_KEY: value}}}


def _render(tokenizer: Any, messages: list[dict], tools: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def tools_problem(tokenizer: Any) -> str | None:
    """Why the tokenizer's chat template cannot be trained or served with tools (what it leaves
    out of a conversation with a tool definition, a call and its result), or None when it can."""
    if not getattr(tokenizer, "chat_template", None):
        return "the model has no chat template"
    user = {"role": "user", "content": _USER}
    messages = [user, {"role": "assistant", "content": "", "tool_calls": [_probe_call(0)]},
                {"role": "tool", "tool_call_id": _IDS[0], "name": _NAME_A, "content": _RESULT},
                {"role": "assistant", "content": _ANSWER}]  # fmt: skip
    try:
        rendered = _render(tokenizer, messages, _probe_tools())
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"its chat template rejects a conversation with tools: {reason}"
    missing = [what for what, mark in (("the tool definitions", _DESCRIPTION), ("the assistant's call", _VALUE_A),
                                       ("the tool's result", _RESULT), ("the final answer", _ANSWER)) if mark not in rendered]  # fmt: skip
    if missing:
        return f"its chat template leaves out {' and '.join(missing)}"
    return None


def require_tools(tokenizer: Any, where: str = "") -> None:
    """Raise a `LiandanError` naming ``where`` when the template cannot render tools."""
    problem = tools_problem(tokenizer)
    if problem:
        raise LiandanError(
            f"{where + ': ' if where else ''}this record has tools or tool calls, but {problem}; set tools_template: chatml "
            "(liandan's ChatML tools template, for ChatML models such as the default) or give a .jinja template that renders tools"
        )


# ---------------------------------------------------------------------------------------------
# The call format, cut out of the template's own render


@dataclass(frozen=True)
class CallFormat:
    """How a template writes tool calls: the literal text around the JSON call objects, and where
    in each object the function name and its arguments are."""

    prefix: str
    """Text before the first call, after the assistant header (``<tool_call>\\n``; "" for bare JSON)."""
    separator: str | None
    """Text between two calls in one turn; None when the template allows one call per turn."""
    suffix: str
    """Text after the last call, before the end-of-turn token."""
    name_path: tuple[str, ...]
    arguments_path: tuple[str, ...]
    arguments_as_string: bool
    """Whether the template writes the arguments as a JSON string inside the call object."""
    opening: str | None = field(default=None)
    """A call object's text up to its arguments, with ``\\x00`` where the name goes (for forcing a
    named call); None when the arguments do not follow the name."""

    def forced_text(self, name: str | None = None) -> str:
        """What to put after the generation prompt so that the model must write a call (to
        ``name`` when given and the format allows it)."""
        if name is not None and self.opening is not None:
            return self.prefix + self.opening.replace("\x00", json.dumps(name, ensure_ascii=False))
        return self.prefix


_FORMATS: dict[tuple, CallFormat] = {}


def call_format(tokenizer: Any) -> CallFormat:
    """The template's `CallFormat` (computed once per template); raises `LiandanError` when the
    template cannot render tools or its calls cannot be cut out of the render."""
    key = (getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token)
    if key not in _FORMATS:
        require_tools(tokenizer)
        _FORMATS[key] = _derive_format(tokenizer)
    return _FORMATS[key]


def _derive_format(tokenizer: Any) -> CallFormat:
    tools, user = _probe_tools(), {"role": "user", "content": _USER}

    def turn(calls: list[dict]) -> str:
        prompt = _render(tokenizer, [user], tools, generation_prompt=True)
        full = _render(tokenizer, [user, {"role": "assistant", "content": "", "tool_calls": calls}], tools)
        if not full.startswith(prompt):
            raise _unreadable("the rendered call turn does not extend the generation prompt")
        return full[len(prompt) :]

    one = turn([_probe_call(0)])
    start, end, call = _call_object(one, _NAME_A, 0)
    name_path = _path_to(call, _NAME_A)
    arguments_path, as_string = _arguments_path(call)
    if name_path is None or arguments_path is None:
        raise _unreadable("the call's name or arguments are not found in the JSON the template writes")
    prefix, rest = one[:start], one[end:]
    suffix = rest[: _end_of_turn(tokenizer, rest)]
    separator = None
    try:
        two = turn([_probe_call(0), _probe_call(1)])
    except Exception:  # a template that allows one call per turn (Llama 3.1's raises)
        two = None
    if two is not None and two.startswith(prefix):
        first_end = _call_object(two, _NAME_A, len(prefix))[1]
        second_start, second_end, _ = _call_object(two, _NAME_B, first_end)
        if two[second_end:] == rest:
            separator = two[first_end:second_start]
    return CallFormat(prefix=prefix, separator=separator, suffix=suffix, name_path=name_path, arguments_path=arguments_path,
                      arguments_as_string=as_string, opening=_opening(one[start:end], name_path, arguments_path))  # fmt: skip


def _unreadable(reason: str) -> LiandanError:
    return LiandanError(f"cannot read tool calls back with this chat template: {reason}")


def _call_object(text: str, name: str, at: int) -> tuple[int, int, dict]:
    """(start, end, object) of the outermost JSON object after ``at`` that holds ``name``."""
    decoder = json.JSONDecoder()
    where = text.find(json.dumps(name), at)
    if where < 0:
        raise _unreadable(f"the call's name is not written as a JSON string ({name!r})")
    best = None
    for start in (i for i in range(where, at - 1, -1) if text[i] == "{"):
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if end > where and isinstance(value, dict) and _path_to(value, name) is not None:
            best = (start, end, value)
    if best is None:
        raise _unreadable("the call is not written as a JSON object")
    return best


def _path_to(value: Any, target: str) -> tuple[str, ...] | None:
    if value == target:
        return ()
    if isinstance(value, dict):
        for key, inner in value.items():
            found = _path_to(inner, target)
            if found is not None:
                return (key, *found)
    return None


def _arguments_path(call: dict) -> tuple[tuple[str, ...] | None, bool]:
    wanted = {_ARG_KEY: _VALUE_A}

    def search(value: Any, path: tuple[str, ...]) -> tuple[tuple[str, ...], bool] | None:
        if value == wanted:
            return path, False
        if isinstance(value, str) and _loads_object(value) == wanted:
            return path, True
        if isinstance(value, dict):
            for key, inner in value.items():
                found = search(inner, (*path, key))
                if found:
                    return found
        return None

    found = search(call, ())
    return found if found else (None, False)


def _opening(text: str, name_path: tuple[str, ...], arguments_path: tuple[str, ...]) -> str | None:
    name_at, args_at = text.find(json.dumps(_NAME_A)), text.find(_ARG_KEY)
    if name_at < 0 or args_at < name_at or len(name_path) != 1 or len(arguments_path) != 1:
        return None
    args_start = text.rfind("{", 0, args_at)
    key = text.rfind(json.dumps(arguments_path[0]), 0, args_start)
    if key < name_at:
        return None
    return text[:name_at] + "\x00" + text[name_at + len(json.dumps(_NAME_A)) : args_start]


def _end_of_turn(tokenizer: Any, rest: str) -> int:
    """Where the first stop-token text sits in ``rest`` (its length when none does)."""
    texts = [t for t in tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer)) if t]
    found = [rest.find(t) for t in texts if t in rest]
    return min(found) if found else len(rest)


# ---------------------------------------------------------------------------------------------
# Reading a reply


@dataclass
class Reply:
    """A generated reply split into its text and its calls (internal shape: arguments as dicts)."""

    content: str
    calls: list[dict]
    problem: str | None = None
    """Why a call the model began could not be read (bad JSON, no name), or None."""


def parse_reply(text: str, fmt: CallFormat) -> Reply:
    """Split a generated reply (without its stop token) into text and calls. Text before the
    first call is the content; a reply that starts no call is all content. A call that starts but
    cannot be read gives `Reply.problem` (and keeps the calls read before it)."""
    head = fmt.prefix.strip()
    if head:
        at = text.find(head)
        if at < 0:
            return Reply(text, [])
        content, pos = text[:at], at + len(head)
    else:  # bare JSON: a reply is a call when it is one JSON object with the call's keys
        pos = len(text) - len(text.lstrip())
        if not text.startswith("{", pos):
            return Reply(text, [])
        content = ""
    decoder, calls = json.JSONDecoder(), []
    while True:
        pos = _skip_space(text, pos)
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            return _broken(text, content, calls, head, f"call {len(calls) + 1} is not valid JSON: {exc.msg}")
        call = _as_call(value, fmt)
        if isinstance(call, str):
            return _broken(text, content, calls, head, f"call {len(calls) + 1}: {call}")
        calls.append(call)
        after = _literal(text, pos, fmt.separator) if fmt.separator is not None else None
        if after is None or not text.startswith("{", _skip_space(text, after)):
            break
        pos = after
    end = _literal(text, pos, fmt.suffix)
    tail = text[end if end is not None else pos :].strip()
    return Reply((content.rstrip() + ("\n" + tail if tail else "")).strip() if tail else content.rstrip(), calls)


def _broken(text: str, content: str, calls: list[dict], head: str, problem: str) -> Reply:
    if not head and not calls:  # plain JSON that is not a call: an ordinary answer
        return Reply(text, [])
    return Reply(content.rstrip(), calls, problem)


def _as_call(value: Any, fmt: CallFormat) -> dict | str:
    name = _get(value, fmt.name_path)
    if not isinstance(name, str) or not name:
        return f"no function name at {'.'.join(fmt.name_path)}"
    arguments = _get(value, fmt.arguments_path)
    if arguments is None and not fmt.prefix.strip():  # bare JSON without the arguments' key: an answer, not a call
        return f"no arguments at {'.'.join(fmt.arguments_path)}"
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        arguments = _loads_object(arguments)
    if not isinstance(arguments, dict):
        return f"the arguments of {name!r} are not a JSON object"
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _get(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _loads_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _literal(text: str, pos: int, literal: str) -> int | None:
    """Where ``literal`` ends when it follows ``pos`` (whitespace between its words free), else None."""
    for word in literal.split():
        pos = _skip_space(text, pos)
        if not text.startswith(word, pos):
            return None
        pos += len(word)
    return pos


def call_matches(call: dict, expected: dict) -> bool:
    """Same function name and arguments equal as JSON values (so 2 == 2.0, key order free)."""
    return call["function"]["name"] == expected["function"]["name"] and _canonical(call["function"]["arguments"]) == _canonical(
        expected["function"]["arguments"])  # fmt: skip


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------
# A tools template for models whose own template has none


def chatml_tools_template(default_system: str | None = None) -> str:
    """liandan's ChatML template with tools: the tool definitions (one JSON object a line) and how
    to call them in the system turn, after the system prompt (``default_system`` when the
    conversation has none); each call a ``<tool_call>`` block holding ``{"name", "arguments"}``;
    each result a ``tool`` turn. Without tools it renders exactly what plain ChatML does (with the
    same default system turn)."""
    default = "none" if default_system is None else json.dumps(default_system, ensure_ascii=True)
    return (
        "{%- if messages and messages[0].role == 'system' -%}"
        "{%- set system = messages[0].content -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}"
        "{%- set system = " + default + " -%}{%- set turns = messages -%}"
        "{%- endif -%}"
        "{%- if tools -%}"
        "{%- set listing = namespace(text='') -%}"
        "{%- for tool in tools -%}{%- set listing.text = listing.text + '\\n' + (tool | tojson) -%}{%- endfor -%}"
        "{%- set system = (system + '\\n\\n' if system else '') + '# Tools\\n\\nYou can call these functions:\\n<tools>'"
        " + listing.text + '\\n</tools>\\n\\nTo call one, write a JSON object with its name and arguments inside"
        " <tool_call></tool_call> tags, one block per call:\\n<tool_call>\\n{\"name\": <function name>, \"arguments\":"
        " <arguments object>}\\n</tool_call>' -%}"
        "{%- endif -%}"
        "{%- if system is not none -%}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message.role == 'assistant' and message.tool_calls -%}"
        "{{ '<|im_start|>assistant\\n' + (message.content or '') }}"
        "{%- for call in message.tool_calls -%}"
        "{%- set function = call.function if call.function is defined else call -%}"
        "{%- if message.content or not loop.first -%}{{ '\\n' }}{%- endif -%}"
        "{{ '<tool_call>\\n{\"name\": ' + (function.name | tojson) + ', \"arguments\": ' }}"
        "{%- if function.arguments is string -%}{{ function.arguments }}{%- else -%}{{ function.arguments | tojson }}{%- endif -%}"
        "{{ '}\\n</tool_call>' }}"
        "{%- endfor -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- else -%}"
        "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def with_tools_template(tokenizer: Any, spec: str | None, where: str = "tools_template") -> str | None:
    """Give ``tokenizer`` a template that renders tools when its own cannot, as ``spec`` says
    (``chatml`` or a ``.jinja`` file; None leaves it as it is). Returns a note of what was done,
    or None when nothing changed (no spec, or the model's own template already renders tools)."""
    if not spec or tools_problem(tokenizer) is None:
        return None
    if spec == "chatml":
        template = chatml_tools_template(_chatml_default_system(tokenizer, where))
        what = "liandan's ChatML tools template"
    else:
        path = Path(spec)
        if path.suffix != ".jinja" or not path.is_file():
            raise LiandanError(f"{where}: expected {', '.join(BUILTIN_TEMPLATES)} or a .jinja file; got {spec!r}")
        template, what = path.read_text(encoding="utf-8"), f"the template in {spec}"
    tokenizer.chat_template = template
    problem = tools_problem(tokenizer)
    if problem:
        raise LiandanError(f"{where}: {what} cannot render tools: {problem}")
    return f"the model's chat template renders no tools, so it now uses {what}"


def prepare_tools(tokenizer: Any, tools_template: str | None, examples: list) -> str | None:
    """Give the tokenizer ``tools_template`` when its own renders no tools (see
    `with_tools_template`), and refuse tool-calling examples that the template in use cannot
    render, naming the first such record. Returns the note of what changed, or None."""
    note = with_tools_template(tokenizer, tools_template)
    uses_tools = (e for e in examples if e.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in e.messages))
    first = next(uses_tools, None)
    if first is not None:
        require_tools(tokenizer, first.source)
    return note


def _chatml_default_system(tokenizer: Any, where: str) -> str | None:
    """The model's default system prompt when its template is ChatML (None when it adds none);
    raises for a template that is not ChatML, whose turns the ChatML tools template would change."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    pieces = chat_pieces(tokenizer, add_bos=False)
    if pieces is None or not pieces.is_chatml:
        raise LiandanError(
            f"{where}: 'chatml' is for models whose chat template is ChatML (<|im_start|>role ... <|im_end|>); this "
            "model's template is not, so give a .jinja template in its own format that renders tools"
        )
    return pieces.default_system
