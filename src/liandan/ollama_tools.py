"""Tool calling in an Ollama TEMPLATE: a chat template's tool parts cut into pieces, and the
TEMPLATE that handles Ollama's ``.Tools``, each message's ``.ToolCalls`` and role ``tool``.

    from liandan.chat_pieces import chat_pieces
    from liandan.ollama_tools import ollama_tools
    tools = ollama_tools(tokenizer, chat_pieces(tokenizer, add_bos=False), add_bos=False)  # None: renders no tools
    tools.pieces, tools.checked, tools.json_exact, tools.note

A template that renders tools is cut as its turns are (`liandan.chat_pieces`), with sentinel tools,
calls and results (see `tool_pieces`): the text before, between and after the tool definitions
(tojson) at the end of the system turn, around the calls (JSON with the name, then the arguments)
in an assistant turn, and around each result and a run of results. liandan's ChatML tools template
cuts so, and so does Qwen2.5's (its results in a row share one user turn); a template of another
shape keeps a plain chat TEMPLATE, with a note saying what did not fit. Ollama writes the tools'
JSON itself, as Go does (compact, its own key order, ``<`` escaped...; `ollama_tool` and
`go_json`, after Ollama's source of August 2026), so tool definitions and call arguments are the
one part that cannot match the chat template's ``tojson``: `ollama_tools` checks everything else
exactly and says what differs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .chat_pieces import SYSTEM_SENTINEL, USER_SENTINEL, ChatPieces, cut_at, go_text, text_after

# ---------------------------------------------------------------------------------------------
# Tools: the template cut at sentinel tool definitions, calls and results

_ARG, _TOOL_TEXT, _THINKS = "liandan_arg", "Liandan7Describes", "Liandan7Thinks"
_RESULT, _RESULT2 = "Liandan7Result", "Liandan7Later"
_TOOL_NAMES = ("liandan_tool_alpha", "liandan_tool_beta")
_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Oslo"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}  # fmt: skip
_SEARCH = {"type": "function", "function": {
    "name": "search_notes", "description": "Search notes for <text> & tags",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}}, "required": ["query"]}}}  # fmt: skip


def _call(name: str, arguments: dict, n: int = 1) -> dict:
    return {"id": f"call{n:05d}", "type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CHECKS: list[tuple[list[dict], list[dict]]] = [
    (  # the conversation: tools, a call, its result, the answer
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is the weather in Oslo?"},
         {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Oslo"})]},
         {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temperature": 12, "sky": "cloudy"}'},
         {"role": "assistant", "content": "It is 12 °C and cloudy in Oslo."}],
        [_WEATHER, _SEARCH],
    ),
    (  # no system prompt, text before two calls, two results, another question
        [{"role": "user", "content": "Find my notes on GGUF, then the weather in Paris."},
         {"role": "assistant", "content": "Let me look.", "tool_calls": [
             _call("search_notes", {"query": "GGUF", "limit": 3}),
             _call("get_weather", {"unit": "celsius", "city": "Paris"}, 2)]},
         {"role": "tool", "tool_call_id": "call00001", "name": "search_notes", "content": "GGUF: one file, weights and tokenizer."},
         {"role": "tool", "tool_call_id": "call00002", "name": "get_weather", "content": "18 °C"},
         {"role": "assistant", "content": "GGUF keeps weights and tokenizer in one file; Paris is at 18 °C."},
         {"role": "user", "content": "Thanks!"}],
        [_WEATHER, _SEARCH],
    ),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}], [_WEATHER]),  # an empty system prompt
    ([{"role": "user", "content": "Hello there!\nHow are you?"}], [_SEARCH]),  # tools offered, none called
]  # fmt: skip
"""Tool conversations (messages, tools) the export renders with every copy of the template."""


@dataclass(frozen=True)
class ToolPieces:
    """A tools template cut into the literal text it writes around tool definitions (at the end of
    the system turn), around calls (in the assistant turn) and around a result (a ``tool`` turn)."""

    join: str
    """Between a non-empty system prompt and the tool definitions."""
    tools_start: str
    tools_separator: str
    tools_end: str
    whole_tool: bool
    """Whether each definition is written as the tool's JSON (else as its ``function``'s)."""
    content_separator: str
    """Between an assistant's text and its first call."""
    calls_start: str
    call_separator: str
    calls_end: str
    call: tuple[str, str, str]
    """A call's text before its name (JSON), between the name and the arguments (JSON), and after."""
    tool_prefix: str
    tool_suffix: str
    results_start: str
    """Before a run of results in a row ("" when each is a turn of its own; Qwen2.5 opens one user turn)."""
    results_end: str
    """After a run of results in a row."""


def _sentinel_tool(name: str) -> dict:
    parameters = {"type": "object", "properties": {_ARG: {"type": "string"}}, "required": [_ARG]}
    return {"type": "function", "function": {"name": name, "description": _TOOL_TEXT, "parameters": parameters}}


def _sentinel_call(n: int) -> dict:
    return _call(_TOOL_NAMES[n], {_ARG: f"Liandan7Value{n}"}, n + 1)


def _between(text: str, before: str, after: str, why: str) -> str:
    """``text`` less ``before`` and ``after``; ValueError(``why``) when it does not hold them."""
    if len(text) < len(before) + len(after) or not text.startswith(before) or not text.endswith(after):
        raise ValueError(why)
    return text[len(before) : len(text) - len(after)]


def _json_at(text: str, name: str, at: int = 0) -> tuple[int, int, Any]:
    """(start, end, value) of the outermost JSON object after ``at`` that holds ``name`` (as a JSON string)."""
    where, found = text.find(json.dumps(name), at), None
    for start in (i for i in range(where, at - 1, -1) if text[i] == "{") if where >= 0 else ():
        try:
            value, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if end > where:
            found = (start, end, value)
    if found is None:
        raise ValueError(f"{name!r} is not inside a JSON object")
    return found


def renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template writes a conversation's tool definitions, call and result (the
    test of `liandan.tools.tools_problem`)."""
    call = _sentinel_call(0)
    messages = [{"role": "user", "content": USER_SENTINEL}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "name": _TOOL_NAMES[0], "content": _RESULT}]  # fmt: skip
    try:
        rendered = tokenizer.apply_chat_template(messages, tools=[_sentinel_tool(_TOOL_NAMES[0])], tokenize=False)
    except Exception:  # a template that fails on tools renders none
        return False
    return all(mark in rendered for mark in (_TOOL_TEXT, call["function"]["arguments"][_ARG], _RESULT))


def tool_pieces(tokenizer: Any, pieces: ChatPieces) -> ToolPieces:
    """Cut the tokenizer's tools template into `ToolPieces`; raises ValueError, saying what does
    not fit, for a template whose tools the cut cannot follow (or that writes none)."""
    tools = [_sentinel_tool(n) for n in _TOOL_NAMES]

    def render(messages: list[dict], with_tools: bool = True) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tools=tools if with_tools else None, tokenize=False)
        except Exception as exc:  # a template that refuses a conversation: say what it raised
            raise ValueError(f"the template raises on it ({(str(exc).strip().splitlines() or [type(exc).__name__])[0]})")

    if not renders_tools(tokenizer):
        raise ValueError("the template renders no tools")
    join, tools_start, tools_separator, tools_end, whole = _definitions(render, tools)
    content_separator, calls_start, call_separator, calls_end, call = _calls(render, pieces)
    tool_prefix, tool_suffix, results_start, results_end = _results(render)
    return ToolPieces(join=join, tools_start=tools_start, tools_separator=tools_separator, tools_end=tools_end,
                      whole_tool=whole, content_separator=content_separator, calls_start=calls_start,
                      call_separator=call_separator, calls_end=calls_end, call=call, tool_prefix=tool_prefix,
                      tool_suffix=tool_suffix, results_start=results_start, results_end=results_end)  # fmt: skip


def _definitions(render: Any, tools: list[dict]) -> tuple[str, str, str, str, bool]:
    """(join, start, separator, end, whole tool?) of the definitions at the end of the system turn."""
    user, system, empty = ({"role": "user", "content": USER_SENTINEL}, {"role": "system", "content": SYSTEM_SENTINEL},
                           {"role": "system", "content": ""})  # fmt: skip
    plain = render([system, user], with_tools=False)
    head = plain[: plain.index(SYSTEM_SENTINEL) + len(SYSTEM_SENTINEL)]
    where = "the tool definitions are not at the end of the system turn"
    block = _between(render([system, user]), head, plain[len(head) :], where)
    s1, e1, first = _json_at(block, _TOOL_NAMES[0])
    s2, e2, second = _json_at(block, _TOOL_NAMES[1], e1)
    whole = first == tools[0]
    if not whole and first != tools[0]["function"]:
        raise ValueError("the template writes a tool definition as other JSON than the tool or its function")
    if block[s1:e1] != json.dumps(first, ensure_ascii=False) or block[s2:e2] != json.dumps(second, ensure_ascii=False):
        raise ValueError("the template writes tool definitions as other JSON text than tojson's")
    lead, listing = block[:s1], block[s1:]
    # What comes before the definitions with an empty system prompt is the start; the rest of the lead, the join.
    empty_plain, empty_tools = render([empty, user], with_tools=False), render([empty, user])
    at = empty_tools.find(listing)
    rest = empty_tools[at + len(listing) :]
    if at < 0 or not empty_plain.endswith(rest) or not empty_tools.startswith(empty_plain[: len(empty_plain) - len(rest)]):
        raise ValueError("with an empty system prompt, the tool definitions are not where they are with one")
    start = empty_tools[len(empty_plain) - len(rest) : at]
    if not lead.endswith(start):
        raise ValueError("the text before the tool definitions depends on the system prompt")
    return lead[: len(lead) - len(start)], start, block[e1:s2], block[e2:], whole


def _results(render: Any) -> tuple[str, str, str, str]:
    """(prefix, suffix, start, end) of results: one result is start + prefix + result + suffix + end,
    two in a row start + prefix + result + suffix + prefix + result + suffix + end."""
    user, calls = {"role": "user", "content": USER_SENTINEL}, [_sentinel_call(0), _sentinel_call(1)]
    called = [user, {"role": "assistant", "content": "", "tool_calls": calls}]
    results = [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": text}
               for c, text in zip(calls, (_RESULT, _RESULT2))]  # fmt: skip
    before, rest = cut_at(text_after(render(called + results[:1]), render(called)), _RESULT)
    between = _between(text_after(render(called + results), render(called)), before + _RESULT, _RESULT2 + rest,
                       "two results in a row are not written as one")  # fmt: skip
    shared = next(n for n in range(min(len(before), len(between)), -1, -1) if before.endswith(between[len(between) - n :]))
    prefix, suffix = before[len(before) - shared :], between[: len(between) - shared]
    if not rest.startswith(suffix):
        raise ValueError("the text after a result depends on what follows it")
    return prefix, suffix, before[: len(before) - shared], rest[len(suffix) :]


def _calls(render: Any, pieces: ChatPieces) -> tuple[str, str, str, str, tuple[str, str, str]]:
    """(content separator, start, separator, end, call) of the calls in an assistant turn."""
    user, calls = {"role": "user", "content": USER_SENTINEL}, [_sentinel_call(0), _sentinel_call(1)]
    asked = render([user]) + pieces.prefix["assistant"]

    def turn(content: str, n: int) -> str:
        text = render([user, {"role": "assistant", "content": content, "tool_calls": calls[:n]}])
        return _between(text, asked, pieces.suffix["assistant"], "an assistant turn with calls is not written as one without")

    one = turn("", 1)
    start, end, _ = _json_at(one, _TOOL_NAMES[0])
    texts = [(json.dumps(c["function"]["name"]), json.dumps(c["function"]["arguments"], ensure_ascii=False)) for c in calls]
    (name, arguments), call = texts[0], one[start:end]
    if call.count(name) != 1 or call.count(arguments) != 1 or call.index(name) > call.index(arguments):
        raise ValueError("the template writes a call as other than JSON with the name (tojson) before the arguments (tojson)")
    before, _, rest = call.partition(name)
    between, _, after = rest.partition(arguments)
    calls_start, calls_end = one[:start], one[end:]
    second = before + texts[1][0] + between + texts[1][1] + after
    separator = _between(turn("", 2), calls_start + call, second + calls_end, "two calls in one turn are not written as one")
    content_separator = _between(turn(_THINKS, 1), _THINKS, calls_start + call + calls_end,
                                 "an assistant's text before its calls is not written as without them")  # fmt: skip
    return content_separator, calls_start, separator, calls_end, (before, between, after)


# ---------------------------------------------------------------------------------------------
# What Ollama renders: the TEMPLATE's tool branches in Go and in Python, and Ollama's JSON (as Go writes it)


def go_json(value: Any) -> str:
    """``value`` as Go's encoding/json writes it, which is how Ollama prints tools and arguments:
    no spaces, ``<``, ``>``, ``&`` and U+2028/9 escaped, every number a float64 (``2.0`` as ``2``),
    dict keys in the order given (`go_map` sorts them as Go does a map's)."""
    if isinstance(value, dict):
        return "{" + ",".join(go_json(str(k)) + ":" + go_json(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(go_json(v) for v in value) + "]"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        for char in "<>&\u2028\u2029":
            text = text.replace(char, f"\\u{ord(char):04x}")
        return text
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    number = float(value)
    if number == int(number) and abs(number) < 1e21:
        return str(int(number))
    if 1e-6 <= abs(number) < 1e21:
        return format(Decimal(repr(number)), "f")  # Go's 'f' format, shortest digits
    return re.sub(r"e-0(\d)$", r"e-\1", repr(number))  # Go's 'e' format: 1e-07 -> 1e-7


def go_map(value: Any) -> Any:
    """A JSON value as Ollama holds it in a Go ``map[string]any``: object keys sorted, at every depth."""
    if isinstance(value, dict):
        return {k: go_map(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [go_map(v) for v in value]
    return value


def _ollama_property(schema: dict) -> dict:
    """A parameter's schema as Ollama keeps it (api.ToolProperty): the keys it knows, in its order."""
    kept: dict[str, Any] = {}
    if schema.get("anyOf"):
        kept["anyOf"] = [_ollama_property(s) for s in schema["anyOf"]]
    types = [schema["type"]] if isinstance(schema.get("type"), str) else list(schema.get("type") or [])
    if types:
        kept["type"] = types[0] if len(types) == 1 else types
    for key in ("items", "description", "enum"):
        if schema.get(key) not in (None, "", []):
            kept[key] = go_map(schema[key])
    if schema.get("properties") is not None:  # an ordered map in Ollama: the order given
        kept["properties"] = {k: _ollama_property(v) for k, v in schema["properties"].items()}
    if schema.get("required"):
        kept["required"] = list(schema["required"])
    return kept


def ollama_tool(tool: dict) -> dict:
    """A tool as Ollama hands it to a template (template.templateTool in its source of August 2026): ``type``,
    ``function`` with ``name``, ``description`` and ``parameters`` (``type``, ``required``,
    ``properties`` with the names sorted), and of each parameter only the schema keys it knows."""
    function = tool.get("function") or {}
    parameters = function.get("parameters") or {}
    kept: dict[str, Any] = {"type": parameters.get("type", "")}
    for key in ("$defs", "items"):
        if parameters.get(key) is not None:
            kept[key] = go_map(parameters[key])
    if parameters.get("required"):
        kept["required"] = list(parameters["required"])
    properties = parameters.get("properties")
    kept["properties"] = None if properties is None else {k: _ollama_property(properties[k]) for k in sorted(properties)}
    described = {"name": function.get("name", ""), "description": function.get("description", ""), "parameters": kept}
    return {"type": tool.get("type", ""), **({"items": go_map(tool["items"])} if tool.get("items") is not None else {}),
            "function": described}  # fmt: skip


def ollama_tools_template(pieces: ChatPieces, t: ToolPieces) -> str:
    """The Go template of these pieces that also handles Ollama's tools (what
    `liandan.modelfile.ollama_template` writes when given ``tools``; `render_ollama` is it in Python)."""
    prefix, suffix = {r: go_text(p) for r, p in pieces.prefix.items()}, {r: go_text(s) for r, s in pieces.suffix.items()}
    item = "{{ . }}" if t.whole_tool else "{{ json .Function }}"  # Ollama prints a tool as its JSON
    if t.tools_separator and t.tools_start.endswith(t.tools_separator):  # "<tools>" then "\n" + tool, per tool
        listing = go_text(t.tools_start[: -len(t.tools_separator)]) + "{{ range $.Tools }}" + go_text(t.tools_separator)
    else:
        listing = go_text(t.tools_start) + "{{ range $k, $t := $.Tools }}{{ if $k }}" + go_text(t.tools_separator) + "{{ end }}"
    block = listing + item + "{{ end }}" + go_text(t.tools_end)
    join = "{{ if .Content }}" + go_text(t.join) + "{{ end }}" if t.join else ""
    # Ollama takes a reply's calls to start at the first text inside the first {{ if }} on .ToolCalls
    # (tools/template.go, parseTag), cut before any "{": so that text must be calls_start, and the
    # separator after an assistant's text goes under {{ with .ToolCalls }}, which it does not search.
    # Calls that start with their JSON get calls_start as an action: the tag is then "{".
    calls_start = go_text(t.calls_start) if t.calls_start.strip() else "{{ " + json.dumps(t.calls_start) + " }}"
    text_then_calls = "{{ if .Content }}{{ with .ToolCalls }}" + go_text(t.content_separator) + "{{ end }}{{ end }}"
    name, arguments = "{{ json .Function.Name }}", "{{ .Function.Arguments }}"
    call = go_text(t.call[0]) + name + go_text(t.call[1]) + arguments + go_text(t.call[2])
    # Results in a row that share one turn (Qwen2.5): its start after a message that is no result,
    # its end before one (Go templates have no arithmetic: the next message is index (slice ...) 1).
    grouped = bool(t.results_start or t.results_end)
    last = '{{ if or (eq (len (slice $.Messages $i)) 1) (ne (index (slice $.Messages $i) 1).Role "tool") }}'
    results = ('{{ if ne $prev "tool" }}' + go_text(t.results_start) + "{{ end }}", last + go_text(t.results_end) + "{{ end }}")
    results = results if grouped else ("", "")
    parts = [go_text(pieces.start) + ('{{ $prev := "" }}' if grouped else ""), "{{ range $i, $_ := .Messages }}"]
    if pieces.default_system is None:  # (with one, Ollama puts SYSTEM first: there is a system turn)
        no_system = '{{ if and $.Tools (eq $i 0) (ne .Role "system") }}'
        parts.append(no_system + prefix["system"] + block + suffix["system"] + "{{ end }}")
    parts += [
        '{{ if eq .Role "system" }}' + prefix["system"] + "{{ .Content }}",
        "{{ if and $.Tools (eq $i 0) }}" + join + block + "{{ end }}" + suffix["system"],
        '{{ else if eq .Role "user" }}' + prefix["user"] + "{{ .Content }}" + suffix["user"],
        '{{ else if eq .Role "assistant" }}' + prefix["assistant"] + "{{ .Content }}" + (text_then_calls if t.content_separator else ""),
        "{{ if .ToolCalls }}" + calls_start + "{{ range $j, $c := .ToolCalls }}{{ if $j }}" + go_text(t.call_separator) + "{{ end }}",
        call + "{{ end }}" + go_text(t.calls_end) + "{{ end }}" + suffix["assistant"],
        '{{ else if eq .Role "tool" }}' + results[0] + go_text(t.tool_prefix) + "{{ .Content }}" + go_text(t.tool_suffix) + results[1],
        "{{ end }}" + ("{{ $prev = .Role }}" if grouped else "") + "{{ end }}" + go_text(pieces.generation),
    ]  # fmt: skip
    return "".join(parts)


def render_ollama(pieces: ChatPieces, tools_pieces: ToolPieces, messages: list[dict], tools: list[dict] | None,
                  ollama_json: bool = True) -> str:  # fmt: skip
    """What Ollama renders with ``ollama_template(pieces, tools_pieces)`` (and SYSTEM), branch by
    branch. ``ollama_json`` False writes the JSON as the chat template's ``tojson`` does instead, to
    check everything else exactly."""
    t, prefix, suffix = tools_pieces, pieces.prefix, pieces.suffix

    def dumps(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    def definition(tool: dict) -> str:
        if ollama_json:
            kept = ollama_tool(tool)
            return go_json(kept if t.whole_tool else kept["function"])
        return dumps(tool if t.whole_tool else tool["function"])

    def call(c: dict) -> str:
        name, arguments = c["function"]["name"], c["function"].get("arguments") or {}
        name, arguments = (go_json(name), go_json(go_map(arguments))) if ollama_json else (dumps(name), dumps(arguments))
        return t.call[0] + name + t.call[1] + arguments + t.call[2]

    block = t.tools_start + t.tools_separator.join(definition(tool) for tool in tools or []) + t.tools_end
    if pieces.default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": pieces.default_system}, *messages]
    out = [pieces.start]
    for i, message in enumerate(messages):
        role, content, calls = message["role"], message.get("content") or "", message.get("tool_calls") or []
        if tools and i == 0 and role != "system" and pieces.default_system is None:
            out += [prefix["system"], block, suffix["system"]]
        if role == "system":
            listing = (t.join if content else "") + block if tools and i == 0 else ""
            out += [prefix["system"], content, listing, suffix["system"]]
        elif role == "user":
            out += [prefix["user"], content, suffix["user"]]
        elif role == "assistant":
            out += [prefix["assistant"], content, t.content_separator if content and calls else ""]
            if calls:
                out += [t.calls_start, t.call_separator.join(call(c) for c in calls), t.calls_end]
            out.append(suffix["assistant"])
        elif role == "tool":
            first, last = i == 0 or messages[i - 1]["role"] != "tool", i + 1 == len(messages) or messages[i + 1]["role"] != "tool"
            out += [t.results_start if first else "", t.tool_prefix, content, t.tool_suffix, t.results_end if last else ""]
    return "".join(out) + pieces.generation


def ollama_tool_tag(tools_pieces: ToolPieces) -> str:
    """Where Ollama takes a reply's tool calls to start: the text its parser finds first inside the
    TEMPLATE's {{ if .ToolCalls }} (tools/template.go), cut before any "{"; "{" for bare JSON."""
    return tools_pieces.calls_start.split("{")[0].strip() or "{"


@dataclass(frozen=True)
class OllamaTools:
    """What the Modelfile TEMPLATE does with tool calling, checked on `TOOL_CHECKS`."""

    pieces: ToolPieces | None
    """The template's tool pieces; None when the TEMPLATE handles plain chat only (see ``note``)."""
    checked: int
    """Tool conversations rendered both ways."""
    json_exact: bool
    """Whether Ollama's own JSON equals the chat template's on them too (else only the JSON differs)."""
    note: str | None
    """What differs, or why the TEMPLATE has no tools; None when it is exact."""


JSON_DIFFERS = (
    "Ollama writes the tool definitions and call arguments in the JSON of Go's encoding/json, not as the chat "
    'template\'s tojson: without spaces ({"city":"Oslo"} for {"city": "Oslo"}), in its own key order '
    "(parameters as type, required, properties; property names and arguments sorted), with <, > and & as "
    "\\u003c, \\u003e, \\u0026, and of a parameter's schema only type, description, enum, items, properties, "
    "required and anyOf; every other part of a tool conversation is rendered exactly as the chat template does"
)


def ollama_tools(tokenizer: Any, pieces: ChatPieces | None, add_bos: bool) -> OllamaTools | None:
    """How an Ollama TEMPLATE can follow the tokenizer's tools template, or None when the template
    renders no tools (then there is nothing to follow)."""
    if not renders_tools(tokenizer):
        return None
    if pieces is None:
        return OllamaTools(None, 0, False, no_tools("its turns do not cut into pieces"))
    try:
        found = tool_pieces(tokenizer, pieces)
    except ValueError as exc:
        return OllamaTools(None, 0, False, no_tools(str(exc)))
    bos = (tokenizer.bos_token or "") if add_bos else ""
    checked, exact = 0, True
    for n, (messages, tools) in enumerate(TOOL_CHECKS, 1):
        try:
            want = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that refuses this conversation (one call per turn, ...)
            continue
        got = bos + render_ollama(pieces, found, messages, tools, ollama_json=False)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            why = f"its pieces render tool conversation {n} otherwise, from {want[at : at + 30]!r} on"
            return OllamaTools(None, 0, False, no_tools(why))
        exact = exact and bos + render_ollama(pieces, found, messages, tools) == want
        checked += 1
    if not checked:
        return OllamaTools(None, 0, False, no_tools("the template refuses every tool conversation it was checked on"))
    return OllamaTools(found, checked, exact, None if exact else JSON_DIFFERS)


def no_tools(problem: str) -> str:
    """The note for a TEMPLATE that handles plain chat only although the chat template renders tools."""
    return (f"the chat template renders tools, but the Modelfile TEMPLATE handles plain chat only ({problem}): "
            "it gives the model no tools; write the tool parts of the TEMPLATE by hand, or use llama.cpp with "
            "--jinja, which runs the GGUF's own chat template")  # fmt: skip
