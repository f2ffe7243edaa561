"""Export of a model that calls tools: the GGUF keeps its tools template byte for byte and renders
tool conversations as the model does, and the Modelfile TEMPLATE handles Ollama's tools, calls and
tool results. The TEMPLATE's text is run by `go_render`, a small interpreter of the part of Go's
text/template it uses, fed as Ollama feeds it (template/template.go), so that the Go text itself is
checked, not only the Python mimic of it (`render_ollama`)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import CHATML, build_model_dir, build_tokenizer
from liandan import ollama_tools as ollama_tools_module
from liandan.chat_pieces import chat_pieces
from liandan.errors import LiandanError
from liandan.export import check_tool_template, export_gguf, tool_chats
from liandan.llama_cpp_check import llama_cpp_version
from liandan.modelfile import build_modelfile, ollama_reads, ollama_template
from liandan.ollama_tools import (
    JSON_DIFFERS,
    TOOL_CHECKS,
    go_json,
    go_map,
    ollama_tool,
    ollama_tool_tag,
    render_ollama,
    tool_pieces,
)
from liandan.tools import call_format, chatml_tools_template, tools_problem, with_tools_template
from test_export import CHATML_GO, SMOL_SYSTEM, SMOL_TEMPLATE


def tools_tokenizer(template: str = CHATML):
    tokenizer = build_tokenizer(template, "<|im_end|>")
    with_tools_template(tokenizer, "chatml")
    return tokenizer


def hf_render(tokenizer, messages, tools) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def tools_model_dir(tmp_path_factory):
    """The tiny chat model given liandan's ChatML tools template, as a run with tools_template: chatml saves it."""
    path = build_model_dir(tmp_path_factory.mktemp("tools-model"), CHATML, "<|im_end|>")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    with_tools_template(tokenizer, "chatml")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tools_export(tools_model_dir, tmp_path_factory):
    return export_gguf(str(tools_model_dir), tmp_path_factory.mktemp("tools-export") / "tools.gguf")


def gguf_template(path: Path) -> str:
    from gguf import GGUFReader

    return GGUFReader(path).fields["tokenizer.chat_template"].contents()


# ---------------------------------------------------------------------------------------------
# The GGUF


def test_export_keeps_the_tools_template_byte_for_byte(tools_export, tools_model_dir):
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(tools_model_dir).chat_template
    assert template == chatml_tools_template(None)
    assert gguf_template(tools_export.path).encode() == template.encode()
    assert tools_export.tools.conversations == len(TOOL_CHECKS)
    summary = "\n".join(tools_export.summary())
    assert f"the GGUF's chat template renders {len(TOOL_CHECKS)} tool conversations" in summary


def test_the_ggufs_template_renders_a_tool_conversation_as_the_model(tools_export, tools_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tools_model_dir)
    messages, tools = TOOL_CHECKS[0]  # tools, a call, its result, the answer
    want = hf_render(tokenizer, messages, tools)
    got = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                        chat_template=gguf_template(tools_export.path))  # fmt: skip
    assert got == want
    for part in ('<tools>\n{"type": "function", "function": {"name": "get_weather", ',
                 '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n',
                 '<|im_start|>tool\n{"temperature": 12, "sky": "cloudy"}<|im_end|>\n',
                 "<|im_start|>assistant\nIt is 12 °C and cloudy in Oslo.<|im_end|>\n"):  # fmt: skip
        assert part in got  # a real tool render, not two renders that both left the tools out


def test_a_gguf_whose_template_renders_tools_otherwise_fails_verification(tools_export, tools_model_dir):
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(tools_model_dir)
    chats = tool_chats(source)
    plain = build_tokenizer(CHATML, "<|im_end|>")  # reads the file back, renders no tools
    with pytest.raises(LiandanError, match="renders tool conversation 1 differently .* nothing was written"):
        check_tool_template(source, plain, tools_export.path, chats)
    source.chat_template = chatml_tools_template("Be brief.")
    with pytest.raises(LiandanError, match="does not hold the model's chat template byte for byte"):
        check_tool_template(source, source, tools_export.path, chats)


@pytest.mark.llamacpp
def test_llama_cpp_python_renders_the_tools_template_from_the_file(tools_export):
    if llama_cpp_version() is None:  # as in test_export_families: CI installs it, so there a skip would hide the check
        reason = "llama-cpp-python is not installed (pip install -e '.[llamacpp]')"
        if os.environ.get("LIANDAN_REQUIRE_LLAMACPP"):
            pytest.fail(reason + " but LIANDAN_REQUIRE_LLAMACPP is set")
        pytest.skip(reason)
    from llama_cpp import Llama

    from liandan.llama_cpp_check import render_chats

    assert tools_export.tools.llama_cpp is True
    chats_check = tools_export.runtime.chats
    assert chats_check.chat_format == "chat_template.default" and chats_check.same_template
    assert chats_check.differs == [] and chats_check.error is None
    # The same renderer, in this process (vocabulary and metadata only), told a wrong expectation:
    template = gguf_template(tools_export.path)
    chats = tool_chats(tools_tokenizer())
    llm = Llama(model_path=str(tools_export.path), vocab_only=True, verbose=False)
    try:
        assert render_chats(llm, chats, template).exact
        chats[1].text = chats[1].text.replace('{"query": "GGUF", "limit": 3}', '{"query":"GGUF","limit":3}')
        broken = render_chats(llm, chats, template + " ")
        assert broken.differs == [2] and not broken.same_template and not broken.exact
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------------
# Ollama's JSON


def test_go_json_writes_what_gos_encoding_json_writes():
    assert go_json({"b": [1, 2.0, 0.5, True, None], "a": "x"}) == '{"b":[1,2,0.5,true,null],"a":"x"}'  # order kept
    assert go_json(go_map({"b": {"d": 1, "c": 2}, "a": 3})) == '{"a":3,"b":{"c":2,"d":1}}'  # a Go map's order
    assert go_json('<b> & \u2028 é\n"') == '"\\u003cb\\u003e \\u0026 \\u2028 é\\n\\""'
    assert [go_json(x) for x in (1e-7, 1.5e-5, 1e21, 123456789.0, 1e20, -2.5)] == [
        "1e-7", "0.000015", "1e+21", "123456789", "100000000000000000000", "-2.5"]  # fmt: skip


def test_ollama_keeps_a_tool_in_its_own_shape():
    tool = TOOL_CHECKS[0][1][1]  # search_notes: a "minimum" Ollama does not know, <text> & in its description
    assert go_json(ollama_tool(tool)) == (
        '{"type":"function","function":{"name":"search_notes","description":"Search notes for \\u003ctext\\u003e '
        '\\u0026 tags","parameters":{"type":"object","required":["query"],"properties":{"limit":{"type":"integer"},'
        '"query":{"type":"string"}}}}}'
    )  # fmt: skip
    bare = {"type": "function", "function": {"name": "now"}}
    assert (
        go_json(ollama_tool(bare))
        == '{"type":"function","function":{"name":"now","description":"","parameters":{"type":"","properties":null}}}'
    )


# ---------------------------------------------------------------------------------------------
# A Go text/template interpreter for the TEMPLATE's own text


_ACTION = re.compile(r'\{\{((?:[^"}]|"(?:\\.|[^"\\])*"|\}(?!\}))*)\}\}')
_WORD = re.compile(r'"(?:\\.|[^"\\])*"|\(|\)|[^\s()]+')


def _parse(text: str):
    """Go template text -> nested nodes: str, ("print", expr), ("set", variable, expr),
    ("if", [(cond, body)], else), ("range" or "with", variables, expr, body)."""
    tokens, at = [], 0
    for match in _ACTION.finditer(text):
        tokens += [text[at : match.start()], ("action", match.group(1).strip())]
        at = match.end()
    tokens.append(text[at:])
    stream = iter(t for t in tokens if t != "")

    def block(stops):
        nodes = []
        for token in stream:
            if isinstance(token, str):
                nodes.append(token)
                continue
            action = token[1]
            word = action.split()[0]
            if word in stops:
                return nodes, action
            if word == "if":
                branches, otherwise, cond = [], [], action[3:]
                while True:
                    body, stop = block({"else", "end"})
                    branches.append((cond, body))
                    if stop.startswith("else if"):
                        cond = stop[8:]
                        continue
                    if stop == "else":
                        otherwise, stop = block({"end"})
                    break
                nodes.append(("if", branches, otherwise))
            elif word in ("range", "with"):
                head = action[len(word) + 1 :]
                names, _, expr = head.rpartition(":=") if ":=" in head else ("", "", head)
                body, _ = block({"end"})
                nodes.append((word, [n.strip() for n in names.split(",") if n.strip()], expr.strip(), body))
            elif setting := re.fullmatch(r"(\$\w+)\s*:?=\s*(.+)", action):
                nodes.append(("set", setting.group(1), setting.group(2)))
            else:
                nodes.append(("print", action))
        return nodes, None

    return block(set())[0]


class _Stringer:
    """A Go value with a String() method: the template prints ``text``; ``json`` marshals ``value``."""

    def __init__(self, text: str, value, fields: dict | None = None):
        self.text, self.value, self.fields = text, value, fields or {}


def _truth(value) -> bool:
    return bool(value.value if isinstance(value, _Stringer) else value)


def _field(base, path: list[str]):
    for name in (p for p in path if p):
        base = (base.fields if isinstance(base, _Stringer) else base)[name]
    return base


def _eval(expr: str, dot, scope: dict):
    words = _WORD.findall(expr)

    def operand(i: int):
        word = words[i]
        if word == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(words[j], 0)
                j += 1
            value = _eval(" ".join(words[i + 1 : j - 1]), dot, scope)
            if j < len(words) and words[j].startswith("."):  # (pipeline).Field
                return _field(value, words[j].split(".")), j + 1
            return value, j
        if word.startswith('"'):
            return json.loads(word), i + 1
        if word.isdigit():
            return int(word), i + 1
        base = dot if word.startswith(".") else scope[word.split(".")[0]]
        return _field(base, word.split(".")[1:]), i + 1

    def dumps(value) -> str:
        value = value.value if isinstance(value, _Stringer) else value
        return go_json(value) if scope["$json"] else json.dumps(value, ensure_ascii=False)

    if words[0] in ("and", "or"):  # Go stops at the first argument that decides
        i, value = 1, None
        while i < len(words):
            value, i = operand(i)
            if _truth(value) == (words[0] == "or"):
                break
        return value
    functions = {"eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
                 "len": len, "slice": lambda a, i: a[i:], "index": lambda a, i: a[i], "json": dumps}  # fmt: skip
    if words[0] in functions:
        args, i = [], 1
        while i < len(words):
            value, i = operand(i)
            args.append(value)
        return functions[words[0]](*args)
    return operand(0)[0]


def _run(nodes, dot, scope: dict, out: list[str]) -> None:
    """Run ``nodes``; ``scope`` holds the variables, changed in place (Go assigns to the declared one)."""
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "print":
            value = _eval(node[1], dot, scope)
            out.append(value.text if isinstance(value, _Stringer) else str(value))
        elif node[0] == "set":
            scope[node[1]] = _eval(node[2], dot, scope)
        elif node[0] == "if":
            body = next((b for cond, b in node[1] if _truth(_eval(cond, dot, scope))), node[2])
            _run(body, dot, scope, out)
        elif node[0] == "with":
            value = _eval(node[2], dot, scope)
            if _truth(value):
                _run(node[3], value, scope, out)
        else:  # range
            for i, item in enumerate(_eval(node[2], dot, scope) or []):
                scope.update(zip(node[1], (i, item) if len(node[1]) == 2 else (item,)))
                _run(node[3], item, scope, out)


def go_render(template: str, system: str | None, messages: list[dict], tools: list[dict], ollama_json: bool = True) -> str:
    """Run ``template`` as Ollama's chat does: SYSTEM first unless the messages start with a system
    one (server/routes.go), tools and calls as its template types, whose String() is their JSON."""
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]

    def dumps(value) -> str:
        return go_json(value) if ollama_json else json.dumps(value, ensure_ascii=False)

    def tool(t: dict) -> _Stringer:
        kept = ollama_tool(t) if ollama_json else t
        return _Stringer(dumps(kept), kept, {"Function": _Stringer("", kept["function"])})

    def call(c: dict) -> dict:
        arguments = go_map(c["function"]["arguments"]) if ollama_json else c["function"]["arguments"]
        return {"Function": {"Name": c["function"]["name"], "Arguments": _Stringer(dumps(arguments), arguments)}}

    values = {"Messages": [{"Role": m["role"], "Content": m.get("content") or "",
                            "ToolCalls": [call(c) for c in m.get("tool_calls") or []]} for m in messages],
              "Tools": [tool(t) for t in tools] or None}  # fmt: skip
    out: list[str] = []
    _run(_parse(template), values, {"$": values, "$json": ollama_json}, out)
    return "".join(out)


def modelfile_parts(text: str) -> tuple[str, str | None]:
    """(TEMPLATE, SYSTEM or None) as Ollama's Modelfile parser reads them."""
    template = ollama_reads(text[text.index('TEMPLATE """') + 9 : text.index('"""\n', text.index('TEMPLATE """') + 12) + 3])
    system = [line for line in text.splitlines() if line.startswith("SYSTEM ")]
    return template, ollama_reads(system[0][7:]) if system else None


# ---------------------------------------------------------------------------------------------
# The Modelfile


def test_modelfile_template_handles_ollamas_tools_calls_and_results(tools_export):
    text = tools_export.modelfile.read_text()
    template, system = modelfile_parts(text)
    assert system is None
    for part in ("{{ if and $.Tools (eq $i 0) }}", "<tools>{{ range $.Tools }}\n{{ . }}{{ end }}\n</tools>",
                 '{{ if .ToolCalls }}<tool_call>\n{{ range $j, $c := .ToolCalls }}',
                 '{"name": {{ json .Function.Name }}, "arguments": {{ .Function.Arguments }}}',
                 '{{ else if eq .Role "tool" }}<|im_start|>tool\n{{ .Content }}<|im_end|>\n'):  # fmt: skip
        assert part in template
    ollama = tools_export.tools.ollama
    assert ollama.checked == len(TOOL_CHECKS) and not ollama.json_exact
    assert ollama_tool_tag(ollama.pieces) == call_format(tools_tokenizer()).prefix.strip() == "<tool_call>"
    assert JSON_DIFFERS in tools_export.notes and tools_export.template_exact  # plain chat: exact


def test_the_template_renders_tool_conversations_as_the_chat_template_but_for_ollamas_json(tools_export):
    tokenizer = tools_tokenizer()
    template, system = modelfile_parts(tools_export.modelfile.read_text())
    pieces = chat_pieces(tokenizer, add_bos=False)
    found = tool_pieces(tokenizer, pieces)
    for messages, tools in TOOL_CHECKS:
        want = hf_render(tokenizer, messages, tools)
        # JSON written as tojson writes it: the Go text renders the chat template's text exactly.
        assert go_render(template, system, messages, tools, ollama_json=False) == want
        # Ollama's own JSON: the Go text and the Python mimic agree, and differ from the chat template.
        got = go_render(template, system, messages, tools)
        assert got == render_ollama(pieces, found, messages, tools) != want
    got = go_render(template, system, *TOOL_CHECKS[1])
    assert (
        '<|im_start|>assistant\nLet me look.\n<tool_call>\n{"name": "search_notes", "arguments": {"limit":3,"query":"GGUF"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris","unit":"celsius"}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>tool\nGGUF: one file, weights and tokenizer.<|im_end|>\n<|im_start|>tool\n18 °C<|im_end|>\n"
    ) in got
    assert ('<tools>\n{"type":"function","function":{"name":"get_weather","description":"Current weather in a city",'
            '"parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string","description":'
            '"City name, e.g. Oslo"},"unit":{"type":"string","enum":["celsius","fahrenheit"]}}}}}\n') in got  # fmt: skip


def test_a_default_system_prompt_goes_before_the_tools_through_ollamas_system(tmp_path):
    tokenizer = tools_tokenizer(SMOL_TEMPLATE)
    assert tokenizer.chat_template == chatml_tools_template(SMOL_SYSTEM)
    built = build_modelfile(tokenizer, None, tmp_path / "smol.gguf", False, "smol", "f16")
    template, system = modelfile_parts(built.text)
    assert system == SMOL_SYSTEM and built.exact and built.tools.pieces is not None
    assert '(ne .Role "system")' not in template  # Ollama's SYSTEM makes the first message a system one
    for messages, tools in TOOL_CHECKS:
        assert go_render(template, system, messages, tools, ollama_json=False) == hf_render(tokenizer, messages, tools)
    plain = [{"role": "user", "content": "Hi"}]
    assert go_render(template, system, plain, []) == hf_render(tokenizer, plain, None)  # no tools: plain ChatML


def test_the_template_text_and_the_mimic_agree_on_every_shape_of_pieces():
    """Shapes the two templates above do not have: definitions that are functions, listed without a
    shared start, no join; calls written as bare JSON (Ollama's tag is then "{")."""
    tokenizer = tools_tokenizer()
    pieces = chat_pieces(tokenizer, add_bos=False)
    found = tool_pieces(tokenizer, pieces)
    shapes = [replace(found, tools_start="[", tools_separator=", ", tools_end="]", whole_tool=False, join=""),
              replace(found, calls_start="", call_separator=" ", calls_end="", content_separator="")]  # fmt: skip
    for shape in shapes:
        template = ollama_template(pieces, shape)
        for messages, tools in TOOL_CHECKS:
            for ollama_json in (True, False):
                want = render_ollama(pieces, shape, messages, tools, ollama_json)
                assert go_render(template, None, messages, tools, ollama_json) == want
    assert "{{ range $k, $t := $.Tools }}{{ if $k }}, {{ end }}{{ json .Function }}{{ end }}" in ollama_template(
        pieces, shapes[0]
    )
    assert '{{ if .ToolCalls }}{{ "" }}{{ range' in ollama_template(pieces, shapes[1])
    assert ollama_tool_tag(shapes[1]) == "{"


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
"""Qwen2.5-Instruct's chat template: definitions at the end of the system turn after its default
system prompt, and results in a row sharing one user turn, each in <tool_response> tags."""


def test_results_in_a_row_share_one_turn_as_in_qwen25(tmp_path):
    tokenizer = build_tokenizer(QWEN25_TOOLS, "<|im_end|>")
    built = build_modelfile(tokenizer, None, tmp_path / "qwen.gguf", False, "qwen", "f16")
    found = built.tools.pieces
    assert (found.results_start, found.tool_prefix, found.tool_suffix, found.results_end) == (
        "<|im_start|>user", "\n<tool_response>\n", "\n</tool_response>", "<|im_end|>\n")  # fmt: skip
    template, system = modelfile_parts(built.text)
    assert system == QWEN_SYSTEM and built.tools.checked == len(TOOL_CHECKS)
    assert '{{ if ne $prev "tool" }}<|im_start|>user{{ end }}' in template
    for messages, tools in TOOL_CHECKS:
        assert go_render(template, system, messages, tools, ollama_json=False) == hf_render(tokenizer, messages, tools)
    results = ("<|im_start|>user\n<tool_response>\nGGUF: one file, weights and tokenizer.\n</tool_response>\n"
               "<tool_response>\n18 °C\n</tool_response><|im_end|>\n<|im_start|>assistant\nGGUF keeps")  # fmt: skip
    assert results in go_render(template, system, *TOOL_CHECKS[1])


def test_a_tools_template_the_cut_cannot_follow_leaves_plain_chat_and_says_why(tmp_path):
    tokenizer = build_tokenizer(chatml_tools_template(None).replace("(tool | tojson)", "(tool | tojson(indent=2))"), "<|im_end|>")
    assert tools_problem(tokenizer) is None  # it does render tools
    built = build_modelfile(tokenizer, None, tmp_path / "m.gguf", False, "m", "f16")
    assert f'TEMPLATE """{CHATML_GO}"""' in built.text and built.exact
    assert built.tools.pieces is None
    assert any("handles plain chat only (the template writes tool definitions as other JSON text than tojson's)" in n
               for n in built.notes)  # fmt: skip


def test_pieces_that_do_not_render_the_tool_conversations_are_not_used(tmp_path, monkeypatch):
    tokenizer = tools_tokenizer()
    real = ollama_tools_module.render_ollama

    def drops_a_newline(pieces, found, messages, tools, ollama_json=True):
        return real(pieces, found, messages, tools, ollama_json).replace("</tools>\n", "</tools>", 1)

    monkeypatch.setattr(ollama_tools_module, "render_ollama", drops_a_newline)
    built = build_modelfile(tokenizer, None, tmp_path / "m.gguf", False, "m", "f16")
    assert built.tools.pieces is None and "{{ range $.Tools }}" not in built.text
    assert any("its pieces render tool conversation 1 otherwise, from '\\nTo call one" in n for n in built.notes)


# ---------------------------------------------------------------------------------------------
# No tools: as before


def test_a_model_without_tools_exports_as_before(chat_model_dir, tmp_path):
    result = export_gguf(str(chat_model_dir), tmp_path / "plain.gguf")
    assert result.tools is None and (result.runtime is None or result.runtime.chats is None)
    assert f'TEMPLATE """{CHATML_GO}"""' in result.modelfile.read_text()
    assert result.template_exact and result.notes == []
    assert not any(line.startswith(("Tools:", "Ollama:")) for line in result.summary())
