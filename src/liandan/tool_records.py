"""Tool calling in data records: the record's tools, an assistant turn's calls, a tool turn's result.

Read by `liandan.data` while it normalises a conversation, and by prompt files: tools become
``{"type": "function", "function": {"name", "description"?, "parameters"?}}``, calls become
OpenAI's shape with ``arguments`` a dict (OpenAI's JSON string is parsed), and `check_tool_use`
checks that calls name the record's tools and that each result answers a call.

    from liandan.tool_records import read_tools
    read_tools('[{"name": "get_weather"}]', "data.jsonl:3")
    # [{'type': 'function', 'function': {'name': 'get_weather'}}]
"""

from __future__ import annotations

import json

from .records import MISSING, Turn, describe, field_error, parse_json, string_field



def read_tools(value: object, where: str) -> list[dict] | None:
    """The record's ``tools`` as ``{"type": "function", "function": {...}}`` objects; a bare function
    object is wrapped so. A JSON string (LLaMA-Factory) is read; absent, empty or ``[]`` is None."""
    expected = "expected a list of tools or a JSON string of one"
    if isinstance(value, str):
        if not value.strip():  # CSV cells and LLaMA-Factory data say "no tools" so
            return None
        try:
            parsed = parse_json(value)
        except ValueError as exc:
            raise field_error(where, "tools", f"{expected}; got {describe(value)}: {exc}") from None
        if not isinstance(parsed, list):
            raise field_error(where, "tools", f"{expected}; got {describe(value)}, which holds {describe(parsed)}")
        value = parsed
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise field_error(where, "tools", f"{expected}; got {describe(value)}")
    tools, first = [], {}
    for i, item in enumerate(value):
        path = f"tools[{i}]"
        if not isinstance(item, dict):
            expected = "expected a tool object with 'function' (or a bare one with 'name')"
            raise field_error(where, path, f"{expected}; got {describe(item)}")
        function, function_path = function_of(item, path, where)
        name = string_field(function, "name", where, prefix=f"{function_path}.")
        if name in first:
            raise field_error(where, f"{function_path}.name", f"expected each tool once; got {name!r} again (also {first[name]})")
        first[name] = path
        description, parameters = function.get("description"), function.get("parameters")
        if description is not None and not isinstance(description, str):
            raise field_error(where, f"{function_path}.description", f"expected a string; got {describe(description)}")
        if parameters is not None and not isinstance(parameters, dict):
            raise field_error(where, f"{function_path}.parameters", f"expected a JSON Schema object; got {describe(parameters)}")
        kept = {k: v for k, v in function.items() if v is not None and not (function is item and k == "type")}
        tools.append({"type": "function", "function": kept})
    return tools


def function_of(item: dict, path: str, where: str) -> tuple[dict, str]:
    """The function object of a tool or a call, and its field: OpenAI wraps it as ``{"type":
    "function", "function": {...}}``, other data gives it bare."""
    kind = item.get("type")
    if kind is not None and kind != "function":
        raise field_error(where, f"{path}.type", f"expected 'function'; got {describe(kind)}")
    if "function" not in item:
        return item, path
    if not isinstance(item["function"], dict):
        raise field_error(where, f"{path}.function", f"expected an object with 'name'; got {describe(item['function'])}")
    return item["function"], f"{path}.function"


def read_tool_calls(value: object, path: str, where: str) -> tuple[list[dict], list[str]]:
    """An assistant turn's ``tool_calls``: the calls, and the field of each call's name."""
    if not isinstance(value, list) or not value:
        raise field_error(where, path, f"expected a non-empty list of calls; got {describe(value)}")
    return read_calls([(f"{path}[{j}]", item) for j, item in enumerate(value)], where)


def sharegpt_calls(value: object, path: str, where: str) -> tuple[list[dict], list[str]]:
    """A ``function_call`` turn's value: a call object, or a list of them (parallel calls), as JSON text."""
    expected = "expected a call object with 'name' and 'arguments' or a list of them, as JSON"
    parsed = value
    if isinstance(value, str):
        try:
            parsed = parse_json(value)
        except ValueError as exc:
            raise field_error(where, path, f"{expected}; got {describe(value)}: {exc}") from None
    if isinstance(parsed, dict):
        return read_calls([(path, parsed)], where)
    if isinstance(parsed, list) and parsed:
        return read_calls([(f"{path}[{j}]", item) for j, item in enumerate(parsed)], where)
    raise field_error(where, path, f"{expected}; got {describe(value)}")


def read_calls(items: list[tuple[str, object]], where: str) -> tuple[list[dict], list[str]]:
    """``(field, call)`` pairs as OpenAI's calls, ``arguments`` a dict; and the field of each call's name."""
    calls, names, ids = [], [], set()
    for path, item in items:
        if not isinstance(item, dict):
            expected = "expected a call object with 'function' (or a bare one with 'name')"
            raise field_error(where, path, f"{expected}; got {describe(item)}")
        function, function_path = function_of(item, path, where)
        name = string_field(function, "name", where, prefix=f"{function_path}.")
        arguments = read_arguments(function.get("arguments", MISSING), f"{function_path}.arguments", where)
        call = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if item.get("id") is not None:
            call["id"] = string_field(item, "id", where, prefix=f"{path}.")
            if call["id"] in ids:  # a result could not say which of the two it answers
                raise field_error(where, f"{path}.id", f"expected each call's id once; got {call['id']!r} again")
            ids.add(call["id"])
        calls.append(call)
        names.append(f"{function_path}.name")
    return calls, names


def read_arguments(value: object, path: str, where: str) -> dict:
    """A call's arguments as a dict: OpenAI writes them as a JSON string, other data as an object."""
    expected = "expected a JSON object or a JSON string of one"
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise field_error(where, path, f"{expected}; got {describe(value)}")
    try:
        parsed = parse_json(value)
    except ValueError as exc:
        raise field_error(where, path, f"{expected}; got {describe(value)}: {exc}") from None
    if not isinstance(parsed, dict):
        raise field_error(where, path, f"{expected}; got {describe(value)}, which holds {describe(parsed)}")
    return parsed


def call_content(value: object, path: str, where: str) -> str:
    """The text beside an assistant turn's calls: often null or left out, then ``""``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    if not isinstance(value, str):
        raise field_error(where, path, f"expected a string or null beside tool_calls; got {describe(value)}")
    return value


def tool_result(item: dict, content_key: str, prefix: str, where: str) -> dict:
    """A tool turn. Its content is the result as text; a result given as a JSON value (an object, a
    list, a number, true or false) is kept as that value's JSON text, which is what a tool returns to
    a model. A list of OpenAI content parts is refused rather than trained as JSON."""
    value, path = item.get(content_key, MISSING), f"{prefix}.{content_key}"
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        problem = "expected the result as a string; got a list of content parts (join their text into one string)"
        raise field_error(where, path, problem)
    if isinstance(value, (dict, list, int, float)):  # bool is an int
        content = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, str) and value.strip():
        content = value
    else:
        raise field_error(where, path, f"expected a non-empty string or a JSON value; got {describe(value)}")
    message = {"role": "tool", "content": content}
    for key in ("tool_call_id", "name"):
        if item.get(key) is not None:
            message[key] = string_field(item, key, where, prefix=f"{prefix}.")
    return message


def check_tool_use(turns: list[Turn], tools: list[dict] | None, where: str) -> None:
    """Calls name the record's tools (when it lists them), and each tool result answers a call of the
    turn of calls just before it (only other results in between), one result per call at most. A
    result's ``name``, when the record leaves it out, is filled in from the call it answers (by
    ``tool_call_id``, or the turn's only call): templates such as Llama 3.1's and Gemma's write it.

    In a record without structured calls, tool turns answer calls written in the assistant's text
    (Hermes' ``<tool_call>``, sharegpt's ``tool`` turns) and are read as before, unchecked."""
    known = [tool["function"]["name"] for tool in tools or []]
    structured = any("tool_calls" in turn.message for turn in turns)
    calls_turn, answered, previous = None, [], None
    for turn in turns:
        message = turn.message
        if "tool_calls" in message:
            for call, name_field in zip(message["tool_calls"], turn.call_names):
                name = call["function"]["name"]
                if tools and name not in known:
                    raise field_error(where, name_field, f"expected one of the record's tools: {', '.join(known)}; got {name!r}")
            calls_turn, answered = turn, []
        elif message["role"] != "tool":
            calls_turn = None
        elif structured or "tool_call_id" in message:
            if calls_turn is None:
                after = f"after {previous.raw_role!r}" if previous else "at the start"
                expected = "expected a tool result to follow a turn of tool calls (with only tool results in between)"
                raise field_error(where, turn.role_field, f"{expected}; got {turn.raw_role!r} {after}")
            answer_call(turn, calls_turn, answered, where)
        previous = turn


def answer_call(turn: Turn, calls_turn: Turn, answered: list, where: str) -> None:
    """Match one tool result to a call of ``calls_turn``; ``answered`` holds the results so far."""
    message, calls = turn.message, calls_turn.message["tool_calls"]
    if len(answered) == len(calls):
        n = len(calls)
        expected = f"expected at most {n} tool result{'s' if n > 1 else ''}, one per call in {calls_turn.prefix}"
        raise field_error(where, turn.role_field, f"{expected}; got {n + 1}")
    call = calls[0] if len(calls) == 1 else None
    if "tool_call_id" in message:
        ids = [c["id"] for c in calls if "id" in c]
        call_id = message["tool_call_id"]
        if call_id not in ids:
            known = ", ".join(ids) if ids else "none, its calls have no 'id'"
            expected = f"expected the id of a call in {calls_turn.prefix} ({known})"
            raise field_error(where, f"{turn.prefix}.tool_call_id", f"{expected}; got {call_id!r}")
        if call_id in answered:
            raise field_error(where, f"{turn.prefix}.tool_call_id", f"expected each call answered once; got {call_id!r} again")
        call = next(c for c in calls if c.get("id") == call_id)
    answered.append(message.get("tool_call_id"))
    names, name = [c["function"]["name"] for c in calls], message.get("name")
    if name is None:
        if call is not None:
            message["name"] = call["function"]["name"]
    elif call is not None and name != call["function"]["name"]:
        which = f"call {message['tool_call_id']!r}" if "tool_call_id" in message else f"the call in {calls_turn.prefix}"
        expected = f"expected {call['function']['name']!r}, the name of {which}"
        raise field_error(where, f"{turn.prefix}.name", f"{expected}; got {name!r}")
    elif name not in names:
        expected = f"expected one of the functions called in {calls_turn.prefix}: {', '.join(names)}"
        raise field_error(where, f"{turn.prefix}.name", f"{expected}; got {name!r}")
