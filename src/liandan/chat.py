"""Chat templates: rendering prompts, and finding the tokens that end an assistant turn.

The model's own chat template (shipped with its tokenizer) is the only source of truth: liandan
never re-implements a template in Python. A model without one (a base model) is given ChatML.

    from liandan.chat import render_chat, stop_token_ids
    text = render_chat(tokenizer, [{"role": "user", "content": "Hi"}])   # ends with the assistant header
    stops = stop_token_ids(tokenizer, model.generation_config)          # e.g. [2] for <|im_end|>

For supervised fine-tuning, `encode_chat` tokenizes a conversation with the same template and
trains only the assistant's replies and the stop token that ends each one:

    from liandan.chat import encode_chat
    example = encode_chat(tokenizer, [{"role": "user", "content": "Capital of France?"},
                                      {"role": "assistant", "content": "Paris."}])
    example["labels"]   # -100 everywhere except the tokens of "Paris.<|im_end|>"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import LiandanError
from .losses import IGNORE_INDEX
from .tool_records import read_arguments

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Content unlikely to be changed by any template (no spaces to strip, no markup).
_SENTINEL = "Liandan7Sentinel3Reply"

SPECIAL_TEXT_MODES = ("error", "plain")
"""What to do with special-token text (``<|im_start|>``) inside a message's content: ``error``
refuses it (it would become a real control token and let the data forge turns); ``plain``
encodes it as the ordinary characters it is."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: list[dict]) -> str:
    """The prompt text for chat mode: the conversation plus the assistant header, as the model's
    template renders it (ChatML for a model that has no template)."""
    template = None if has_chat_template(tokenizer) else CHATML_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token(s) the chat template writes right after an assistant reply.

    Found by rendering a conversation whose reply is a sentinel string and tokenizing what comes
    after it: ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, ``</s>`` for ``[INST]``
    templates, ``<end_of_turn>`` for Gemma. Returns ``[]`` when there is no template or the token
    after the reply is ordinary text.
    """
    if not has_chat_template(tokenizer):
        return []
    conversation = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": _SENTINEL},
    ]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # templates may reject unusual conversations; then we know nothing extra
        return []
    at = rendered.rfind(_SENTINEL)
    if at < 0:
        return []
    tail = rendered[at + len(_SENTINEL):]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [ids[0]] if ids and ids[0] in special else []


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every token that means "the model chose to stop": the generation config's eos id(s), the
    tokenizer's eos, and the template's end-of-turn token. Sorted, without duplicates."""
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    ids.update(end_of_turn_ids(tokenizer))
    return sorted(ids)


def chat_stop_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The stop tokens of a chat-mode reply: `stop_token_ids`, and for a model without a chat
    template, whose conversations `render_chat` renders as ChatML, also ChatML's ``<|im_end|>``
    where the vocabulary has it as one token."""
    stops = set(stop_token_ids(tokenizer, generation_config))
    if not has_chat_template(tokenizer):
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            stops.add(im_end)
    return sorted(stops)


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning: the conversation as tokens, trained only on the assistant's replies.
#
# How the mask is found, on any template and without re-implementing it:
# 1. Render the conversation once as it is (the "full" render; its tokens are the input ids)
#    and once with every trained reply replaced by a unique sentinel (the "marked" render).
# 2. Cutting the marked render at the sentinels leaves the template's own text: the pieces
#    between replies (headers, user turns, end-of-turn tokens). Walking the full render piece by
#    piece, in order, finds where each reply sits in it, even when the template strips or
#    rewrites a reply (what is trained is what the full render actually shows).
# 3. A reply's trained tokens are its text plus the stop token that closes it (<|im_end|>,
#    <|eot_id|>, </s>, <end_of_turn>), so the model learns to stop.
# Any step that does not check out raises LiandanError: a wrong mask trains silently and badly.
# ---------------------------------------------------------------------------------------------

@dataclass
class EncodedChat:
    """One conversation as training tokens, with what a data report needs to know about it."""

    input_ids: list[int]
    """The template's full render, tokenized exactly as ``apply_chat_template(tokenize=True)`` would."""
    labels: list[int]
    """Aligned with ``input_ids``: the token id where it is trained, -100 elsewhere."""
    truncated: bool
    """Whether ``max_length`` cut tokens off the end."""
    original_length: int
    """Number of tokens before truncation."""
    trained_tokens: int
    """Number of labels that are not -100 (after truncation)."""
    ends_with_stop: bool
    """Whether every trained reply still ends in its trained stop token (false when truncation cut one off)."""


def encode_chat(
    tokenizer: Any, messages: list[dict], max_length: int | None = None, special_text: str = "error",
    tools: list[dict] | None = None,
) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for supervised fine-tuning; see `encode_chat_example`."""
    encoded = encode_chat_example(tokenizer, messages, max_length, special_text, tools)
    return {"input_ids": encoded.input_ids, "labels": encoded.labels}


def encode_chat_example(
    tokenizer: Any, messages: list[dict], max_length: int | None = None, special_text: str = "error",
    tools: list[dict] | None = None,
) -> EncodedChat:
    """Tokenize a conversation with the tokenizer's chat template and mask everything but the
    trained assistant replies and their stop tokens. An assistant message with ``"train": False``
    is kept as context but not trained. ``max_length`` keeps the first that many tokens.

    Special-token text in a message's content raises (``special_text="error"``) or is encoded as
    plain characters (``"plain"``); it never becomes a control token. A message the template does
    not render (a dropped system or tool turn) raises.

    ``tools`` (function definitions) are rendered by the template as it renders them; an
    assistant message's ``tool_calls`` are trained with its reply (the calls as the template
    writes them, and the stop token), tool results and definitions never are. A template that
    leaves out the definitions, a call or a result raises."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise LiandanError(f"max_length: expected a positive integer or None, got {max_length!r}")
    if not has_chat_template(tokenizer):
        raise LiandanError(
            "the tokenizer has no chat template; call liandan.chat.ensure_chat_template(tokenizer, model) first"
        )
    clean, trained = _check_messages(messages)
    specials = special_texts(tokenizer)
    _check_special_text(clean, specials, special_text)
    _check_tool_text(clean, tools, specials)
    full = _render(tokenizer, clean, tools=tools)
    if _render(tokenizer, clean, tools=tools) != full:
        raise _no_mask("rendering the same conversation twice gave different text")
    _check_rendered(tokenizer, clean, tools=tools)
    if tools or any(m.get("tool_calls") for m in clean):
        spans = _reply_spans_by_prefix(tokenizer, clean, trained, full, tools, specials, plain=special_text == "plain")
    else:
        spans = _reply_spans(tokenizer, clean, trained, full, plain=special_text == "plain")
    plain = _plain_ranges(tokenizer, clean, full, specials, tools=tools) if special_text == "plain" else []
    input_ids, offsets = _tokenize_with_offsets(tokenizer, full, plain)
    labels = [IGNORE_INDEX] * len(input_ids)
    stop_ids, stops, begin = set(stop_token_ids(tokenizer)), [], 0
    for index, (start, end) in zip(trained, spans):
        first, stop = _trained_tokens(full, input_ids, offsets, (start, end), stop_ids, index, begin)
        labels[first : stop + 1] = input_ids[first : stop + 1]
        stops.append(stop)
        begin = stop + 1
    limit = len(input_ids) if max_length is None else min(max_length, len(input_ids))
    return EncodedChat(
        input_ids=input_ids[:limit],
        labels=labels[:limit],
        truncated=limit < len(input_ids),
        original_length=len(input_ids),
        trained_tokens=sum(label != IGNORE_INDEX for label in labels[:limit]),
        ends_with_stop=all(stop < limit for stop in stops),
    )


def _check_messages(messages: Any) -> tuple[list[dict], list[int]]:
    """The messages without their ``train`` keys, and the indices of the replies to train."""
    if not isinstance(messages, list) or not messages:
        raise LiandanError(f"messages: expected a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.60}")
    clean, trained = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise LiandanError(f"messages[{i}]: expected a dict with 'role' and 'content', got {kind}")
        role, content, train = message.get("role"), message.get("content"), message.get("train", True)
        if not isinstance(role, str) or not role:
            raise LiandanError(f"messages[{i}]: field 'role': expected a non-empty string, got {role!r}")
        if not isinstance(content, str):
            raise LiandanError(f"messages[{i}]: field 'content': expected a string, got {type(content).__name__}")
        if "train" in message and role != "assistant":
            raise LiandanError(f"messages[{i}]: field 'train': only assistant messages are trained, not '{role}'")
        if not isinstance(train, bool):
            raise LiandanError(f"messages[{i}]: field 'train': expected true or false, got {train!r}")
        clean.append(_with_object_arguments({key: value for key, value in message.items() if key != "train"}, i))
        if role == "assistant" and train:
            trained.append(i)
    return clean, trained


def _with_object_arguments(message: dict, index: int) -> dict:
    """The message with each call's arguments as an object: templates write them with ``tojson``,
    so a JSON string (as OpenAI's API and data files give them) would be written quoted."""
    calls = message.get("tool_calls")
    if calls is None:
        return message
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
        raise LiandanError(f"messages[{index}]: field 'tool_calls': expected a list of {{'function': {{'name', 'arguments'}}}} objects")
    fixed = []
    for j, call in enumerate(calls):
        function = call["function"]
        name, arguments = function.get("name"), function.get("arguments", {})
        if not isinstance(name, str) or not name:
            raise LiandanError(f"messages[{index}].tool_calls[{j}].function.name: expected a non-empty string, got {name!r}")
        arguments = read_arguments(arguments, "function.arguments", f"messages[{index}].tool_calls[{j}]")
        fixed.append({**call, "function": {**function, "arguments": arguments}})
    return {**message, "tool_calls": fixed}


def _check_tool_text(clean: list[dict], tools: list[dict] | None, specials: set[str]) -> None:
    """Special-token text inside a tool definition or a call is refused in every mode: it is
    written into the prompt by the template, where it would become a control token."""
    parts = [(f"messages[{i}].tool_calls", m["tool_calls"]) for i, m in enumerate(clean) if m.get("tool_calls")]
    parts += [(f"tools[{k}]", tool) for k, tool in enumerate(tools or [])]
    for where, value in parts:
        text = json.dumps(value, ensure_ascii=False)
        found = sorted(s for s in specials if s and s in text)
        if found:
            raise LiandanError(f"{where}: contains the special token {found[0]!r} as text, which would become a control token")


def _check_special_text(clean: list[dict], specials: set[str], special_text: str) -> None:
    if special_text not in SPECIAL_TEXT_MODES:
        raise LiandanError(f"special_text {special_text!r}: expected one of {', '.join(SPECIAL_TEXT_MODES)}")
    if special_text == "plain":
        return
    for i, message in enumerate(clean):
        found = sorted(s for s in specials if s and s in message["content"])
        if found:
            raise LiandanError(
                f"messages[{i}]: field 'content': contains the special token {found[0]!r} as text, which would "
                "become a control token; remove it, or set special_text: plain to encode it as plain text"
            )


def _check_rendered(
    tokenizer: Any, clean: list[dict], generation_prompt: bool = False, template: str | None = None,
    tools: list[dict] | None = None,
) -> None:
    """Every message must appear in the render: a template that silently drops a system or tool
    turn would train (or answer) on a different conversation than the data holds. So must every
    tool definition and every call (its name and its arguments)."""
    marks = [f"{_SENTINEL}{n}Z" if isinstance(m.get("content"), str) and (m.get("content") or not m.get("tool_calls")) else None
             for n, m in enumerate(clean)]  # fmt: skip
    marked = [{**message, "content": mark} if mark else message for message, mark in zip(clean, marks)]
    calls = []  # (message index, call index, name mark, argument mark)
    for i, message in enumerate(marked):
        if message.get("tool_calls"):
            marked_calls = []
            for j, call in enumerate(message["tool_calls"]):
                name, value = f"{_SENTINEL}Call{i}x{j}Z", f"{_SENTINEL}Arg{i}x{j}Z"
                function = {**call["function"], "name": name, "arguments": {"liandan_argument": value}}
                marked_calls.append({**call, "function": function})
                calls.append((i, j, name, value))
            marked[i] = {**message, "tool_calls": marked_calls}
    marked_tools = None
    if tools:
        marked_tools = [{**tool, "function": {**tool["function"], "description": f"{_SENTINEL}Tool{k}Z"}}
                        for k, tool in enumerate(tools)]  # fmt: skip
    rendered = _render(tokenizer, marked, generation_prompt, template, marked_tools)
    hint = "; set tools_template: chatml or use a template that renders tools" if tools or calls else ""
    for i, (message, mark) in enumerate(zip(clean, marks)):
        if mark and mark not in rendered:
            raise LiandanError(
                f"messages[{i}]: the chat template does not render this {message['role']!r} message, so it would "
                f"be dropped silently; remove it or use a template that supports it{hint}"
            )
    for i, j, name, value in calls:
        if name not in rendered or value not in rendered:
            what = "the function name" if name not in rendered else "the arguments"
            raise LiandanError(f"messages[{i}].tool_calls[{j}]: the chat template leaves out {what} of this call{hint}")
    for k, tool in enumerate(marked_tools or []):
        if tool["function"]["description"] not in rendered:
            raise LiandanError(f"tools[{k}]: the chat template does not render the tool definitions{hint}")


def _plain_ranges(
    tokenizer: Any, clean: list[dict], full: str, specials: set[str], generation_prompt: bool = False,
    template: str | None = None, tools: list[dict] | None = None,
) -> list[tuple[int, int]]:
    """The character ranges of the full render that are special-token text inside a message's
    content, to be tokenized as plain characters. The template text around those messages must
    match the render exactly, or the content cannot be told from the template's own tokens."""
    dirty = [i for i, m in enumerate(clean) if isinstance(m.get("content"), str) and any(s and s in m["content"] for s in specials)]
    if not dirty:
        return []
    marks = [f"{_SENTINEL}{n}Z" for n in range(len(dirty))]
    marked = [dict(message) for message in clean]
    for mark, index in zip(marks, dirty):
        marked[index]["content"] = mark
    pieces = _split_at_marks(_render(tokenizer, marked, generation_prompt, template, tools), marks, dirty)
    ranges, at = [], 0
    for piece, index in zip(pieces, dirty):
        content = clean[index]["content"]
        start = at + len(piece)
        shown = next((c for c in (content, content.strip()) if full.startswith(piece, at) and full.startswith(c, start)), None)
        if shown is None:
            raise LiandanError(
                f"messages[{index}]: field 'content': holds special-token text, and the chat template changes this "
                "message, so its text cannot be encoded as plain text safely"
            )
        for special in specials:
            found = shown.find(special) if special else -1
            while found >= 0:
                ranges.append((start + found, start + found + len(special)))
                found = shown.find(special, found + 1)
        at = start + len(shown)
    if full[at:] != pieces[-1]:
        raise LiandanError(f"messages[{dirty[-1]}]: the template text after this message does not match the render")
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):  # overlapping special texts (<s> inside <s>x) become one range
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def encode_generation_prompt(
    tokenizer: Any, messages: list[dict], check_roles: bool = True, tools: list[dict] | None = None
) -> list[int]:
    """The conversation plus the assistant header as token ids, for generation (chat, serve,
    compare, eval): the model's template (ChatML when it has none), and special-token text that a
    user typed in a message encoded as the plain characters it is, so no one can forge a turn or a
    stop. Raises when the template drops a message, unless ``check_roles`` is False (comparing
    models shows what each template does). Keys other than ``train`` (``name``, ``tool_calls``)
    are passed to the template as they are; ``tools`` are rendered as the template renders them
    (special-token text in them is refused: they come from the request, not from a person)."""
    clean = [{key: value for key, value in m.items() if key != "train"} for m in messages]
    template = None if has_chat_template(tokenizer) else CHATML_TEMPLATE
    specials = special_texts(tokenizer)
    _check_tool_text(clean, tools, specials)
    text = _render(tokenizer, clean, True, template, tools)
    if check_roles or tools or any(m.get("tool_calls") for m in clean):
        _check_rendered(tokenizer, clean, True, template, tools)
    plain = _plain_ranges(tokenizer, clean, text, specials, True, template, tools)
    return _tokenize_segments(tokenizer, text, plain)[0]


def _render(
    tokenizer: Any, messages: list[dict], generation_prompt: bool = False, template: str | None = None,
    tools: list[dict] | None = None,
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt, tools=tools or None
        )
    except Exception as exc:  # templates reject conversations with raise_exception(); say so on one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LiandanError(f"the chat template rejected this conversation: {reason}") from exc


def _no_mask(reason: str) -> LiandanError:
    return LiandanError(f"cannot derive a correct assistant-only loss mask for this chat template: {reason}")


def _reply_spans(
    tokenizer: Any, clean: list[dict], trained: list[int], full: str, plain: bool = False
) -> list[tuple[int, int]]:
    """The character span of each trained reply's text in the full render."""
    if not trained:
        return []
    # Letters and digits only, so no template's strip/trim changes them; the trailing Z keeps
    # sentinel 1 from being a prefix of sentinel 10.
    marks = [f"{_SENTINEL}{n}Z" for n in range(len(trained))]
    if any(_SENTINEL in message["content"] for message in clean):
        raise LiandanError(f"a message contains liandan's internal marker {_SENTINEL!r}; remove it from the data")
    marked = [dict(message) for message in clean]
    for mark, index in zip(marks, trained):
        marked[index]["content"] = mark
    pieces = _split_at_marks(_render(tokenizer, marked), marks, trained)
    specials = special_texts(tokenizer)
    spans, at = [], 0
    for n, index in enumerate(trained):
        piece_start, reply_start = _find_piece(tokenizer, clean, index, full, at, pieces[n], anchored=n == 0)
        if n > 0:
            spans.append(_checked_span(full, (at, piece_start), clean, trained[n - 1], specials, plain))
        at = reply_start
    tail = pieces[-1]
    if not full.endswith(tail) or len(full) - len(tail) < at:
        raise _no_mask(f"the template text after messages[{trained[-1]}] does not end the full render")
    spans.append(_checked_span(full, (at, len(full) - len(tail)), clean, trained[-1], specials, plain))
    return spans


def _reply_spans_by_prefix(
    tokenizer: Any, clean: list[dict], trained: list[int], full: str, tools: list[dict] | None, specials: set[str],
    plain: bool = False,
) -> list[tuple[int, int]]:
    """The span of each trained reply, found by rendering the conversation up to it: the text the
    reply adds after the generation prompt, up to its end-of-turn token. Used for conversations
    with tools, where a reply's calls are written by the template and so cannot be marked. Each
    shorter render must be a prefix of the full one, or the mask cannot be trusted."""
    stop_texts = [t for t in tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer)) if t]
    spans = []
    for index in trained:
        prompt = _render(tokenizer, clean[:index], True, tools=tools)
        upto = _render(tokenizer, clean[: index + 1], tools=tools)
        if not upto.startswith(prompt) or not full.startswith(upto):
            raise _no_mask(f"the render up to messages[{index}] is not the start of the full render")
        turn = upto[len(prompt) :]
        ends = [turn.rfind(t) for t in stop_texts if t in turn]
        if not ends:
            raise _no_mask(f"no stop token (eos or the template's end-of-turn) after the reply in messages[{index}]")
        span = (len(prompt), len(prompt) + max(ends))
        if not clean[index].get("tool_calls"):
            span = _checked_span(full, span, clean, index, specials, plain)
        elif any(t in full[span[0] : span[1]] for t in stop_texts):
            raise _no_mask(f"the reply in messages[{index}] holds a stop token before its end")
        spans.append(span)
    return spans


def _split_at_marks(marked: str, marks: list[str], trained: list[int]) -> list[str]:
    """The template's own text around the sentinels: one more piece than there are sentinels."""
    pieces, at = [], 0
    for mark, index in zip(marks, trained):
        found = marked.find(mark, at)
        if found < 0 or marked.count(mark) != 1:
            raise _no_mask(f"the reply in messages[{index}] does not appear exactly once in the render")
        pieces.append(marked[at:found])
        at = found + len(mark)
    pieces.append(marked[at:])
    return pieces


def _find_piece(
    tokenizer: Any, clean: list[dict], index: int, full: str, at: int, piece: str, anchored: bool
) -> tuple[int, int]:
    """Where the template text before reply ``index`` sits in the full render, at or after ``at``:
    (where that text starts, where the reply starts)."""
    found = _find(full, piece, at, anchored)
    if found >= 0:
        return found, found + len(piece)
    # Some templates write text after the header that depends on the reply itself (Qwen3 rebuilds
    # the <think> block of the final reply). Match only up to the end of the generation prompt:
    # what follows it is exactly what the model writes at inference, so it is all trained.
    header = _generation_prompt(tokenizer, clean[:index])
    cut = piece.rfind(header) if header else -1
    if cut >= 0:
        head = piece[: cut + len(header)]
        found = _find(full, head, at, anchored)
        if found >= 0:
            return found, found + len(head)
    raise _no_mask(f"the template text before messages[{index}] is not found in the full render")


def _find(text: str, piece: str, at: int, anchored: bool) -> int:
    if anchored:
        return at if text.startswith(piece, at) else -1
    return text.find(piece, at)


def _generation_prompt(tokenizer: Any, before: list[dict]) -> str:
    """The text ``add_generation_prompt`` appends after these messages ("" if that is unclear)."""
    if not before:
        return ""
    try:
        plain, prompted = _render(tokenizer, before), _render(tokenizer, before, generation_prompt=True)
    except LiandanError:
        return ""
    return prompted[len(plain) :] if prompted.startswith(plain) else ""


def special_texts(tokenizer: Any) -> set[str]:
    """Every special token's text, including special added tokens the tokenizer does not list by
    role (Llama 3's header tokens, for example)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_tokens) | {str(t) for t in added.values() if getattr(t, "special", False)}


def _checked_span(
    full: str, span: tuple[int, int], clean: list[dict], index: int, specials: set[str], plain: bool = False
) -> tuple[int, int]:
    """The span, once sure it holds only the reply: no special token, and not emptied. With
    ``plain``, special-token text that is the reply's own content is allowed (it is encoded as text)."""
    text, content = full[span[0] : span[1]], clean[index]["content"]
    if plain and text.strip() and text.strip() in content:
        return span
    leaked = sorted(s for s in specials if s and s in text)
    in_data = [s for s in leaked if s in content]
    if in_data:
        raise LiandanError(f"messages[{index}]: field 'content': contains the special token {in_data[0]!r} as text")
    if leaked:
        raise _no_mask(f"the span found for messages[{index}] contains template tokens ({leaked[0]!r})")
    if content.strip() and not text.strip():
        raise _no_mask(f"the template renders the reply in messages[{index}] as empty text; mark it \"train\": false")
    return span


def _tokenize_with_offsets(
    tokenizer: Any, text: str, plain: list[tuple[int, int]] = ()
) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise LiandanError(
            "assistant-only masks need a fast tokenizer (one with character offsets); load it with use_fast=True"
        )
    return _tokenize_segments(tokenizer, text, plain)


def _tokenize_segments(
    tokenizer: Any, text: str, plain: list[tuple[int, int]] = ()
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``; the ``plain`` ranges (special-token text from
    message content) are tokenized as ordinary characters. Without them this is exactly
    ``tokenizer(text)``; with them, the text between is tokenized as the tokenizer itself would,
    since it splits at special tokens first."""
    if not plain:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(offset) for offset in encoded["offset_mapping"]]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    at = 0
    for start, end in [*plain, (len(text), len(text))]:
        for begin, stop, split in ((at, start, False), (start, end, True)):
            if stop <= begin:
                continue
            encoded = tokenizer(
                text[begin:stop], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=split
            )
            ids += encoded["input_ids"]
            offsets += [(a + begin, b + begin) for a, b in encoded["offset_mapping"]]
        at = end
    return ids, offsets


def _trained_tokens(
    full: str, ids: list[int], offsets: list[tuple[int, int]], span: tuple[int, int], stop_ids: set[int],
    index: int, begin: int,
) -> tuple[int, int]:
    """(first, stop): the token range to train for the reply at character ``span``, from its first
    token to the stop token that closes it."""
    start, end = span
    count = len(ids)
    first = next((i for i in range(begin, count) if offsets[i][1] > start), count)
    if first < count and offsets[first][0] < start and full[offsets[first][0] : start].strip():
        # A token that starts in the header and runs into the reply cannot be split in two.
        raise _no_mask(f"the first token of messages[{index}] also holds header text {full[offsets[first][0]:start]!r}")
    stop = first
    while stop < count and offsets[stop][0] < end:
        stop += 1
    # Whitespace the template writes between a reply and its stop token (Llama 2's " </s>") is
    # part of what the model must write.
    while stop < count and ids[stop] not in stop_ids and not full[offsets[stop][0] : offsets[stop][1]].strip():
        stop += 1
    if stop == count or ids[stop] not in stop_ids or full[end : offsets[stop][0]].strip():
        raise _no_mask(
            f"no stop token (eos or the template's end-of-turn) right after the reply in messages[{index}], "
            "so the model could not learn to stop"
        )
    return first, stop


def explain_mask(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The tokens as readable runs of text, each marked trained or not, for ``liandan inspect-data``.
    Runs rather than single tokens, so a character split over byte-level tokens decodes whole."""
    if len(input_ids) != len(labels):
        raise LiandanError(f"input_ids has {len(input_ids)} tokens but labels has {len(labels)}; they must align")
    runs, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            runs.append((text, labels[start] != IGNORE_INDEX))
            start = i
    return runs


def ensure_chat_template(tokenizer: Any, model: Any = None) -> bool:
    """Make a base model chat-ready: a tokenizer without a template gets ChatML and its
    ``<|im_start|>``/``<|im_end|>`` special tokens, and the model's embeddings grow to fit the
    tokenizer. Returns whether anything changed. A tokenizer that has a template keeps it."""
    changed = False
    if not has_chat_template(tokenizer):
        tokenizer.chat_template = CHATML_TEMPLATE
        special = special_texts(tokenizer)
        missing = [token for token in ("<|im_start|>", "<|im_end|>") if token not in special]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        changed = True
    # Only ever grow: many models pad their embedding matrix past the vocabulary on purpose.
    if model is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
        changed = True
    return changed
