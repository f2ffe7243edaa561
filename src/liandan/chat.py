"""Chat templates: rendering and encoding prompts, and finding the tokens that end an assistant turn.

The model's own chat template (shipped with its tokenizer) is the only source of truth: liandan
never re-implements a template in Python. A model without one (a base model) is given ChatML.

    from liandan.chat import encode_generation_prompt, render_chat, stop_token_ids
    messages = [{"role": "user", "content": "Hi"}]
    text = render_chat(tokenizer, messages)                     # ends with the assistant header
    ids = encode_generation_prompt(tokenizer, messages)         # the same prompt as token ids, for generation
    stops = stop_token_ids(tokenizer, model.generation_config)  # e.g. [2] for <|im_end|>

The assistant-only loss mask for fine-tuning, built on these, is in `liandan.assistant_masks`.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import LiandanError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SENTINEL = "Liandan7Sentinel3Reply"
"""Message content unlikely to be changed by any template (no spaces to strip, no markup)."""


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
        {"role": "assistant", "content": SENTINEL},
    ]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # templates may reject unusual conversations; then we know nothing extra
        return []
    at = rendered.rfind(SENTINEL)
    if at < 0:
        return []
    tail = rendered[at + len(SENTINEL):]
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


def special_texts(tokenizer: Any) -> set[str]:
    """Every special token's text, including special added tokens the tokenizer does not list by
    role (Llama 3's header tokens, for example)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_tokens) | {str(t) for t in added.values() if getattr(t, "special", False)}


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
    check_tool_text(clean, tools, specials)
    text = render_template(tokenizer, clean, True, template, tools)
    if check_roles or tools or any(m.get("tool_calls") for m in clean):
        check_rendered(tokenizer, clean, True, template, tools)
    plain = plain_ranges(tokenizer, clean, text, specials, True, template, tools)
    return tokenize_segments(tokenizer, text, plain)[0]


def render_template(
    tokenizer: Any, messages: list[dict], generation_prompt: bool = False, template: str | None = None,
    tools: list[dict] | None = None,
) -> str:
    """The template's text for these messages (``template`` overrides the tokenizer's own); a
    template that rejects the conversation raises one LiandanError line."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt, tools=tools or None
        )
    except Exception as exc:  # templates reject conversations with raise_exception(); say so on one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LiandanError(f"the chat template rejected this conversation: {reason}") from exc


def no_mask(reason: str) -> LiandanError:
    """The error for a template on which no correct assistant-only loss mask can be derived."""
    return LiandanError(f"cannot derive a correct assistant-only loss mask for this chat template: {reason}")


def check_tool_text(clean: list[dict], tools: list[dict] | None, specials: set[str]) -> None:
    """Special-token text inside a tool definition or a call is refused in every mode: it is
    written into the prompt by the template, where it would become a control token."""
    parts = [(f"messages[{i}].tool_calls", m["tool_calls"]) for i, m in enumerate(clean) if m.get("tool_calls")]
    parts += [(f"tools[{k}]", tool) for k, tool in enumerate(tools or [])]
    for where, value in parts:
        text = json.dumps(value, ensure_ascii=False)
        found = sorted(s for s in specials if s and s in text)
        if found:
            raise LiandanError(f"{where}: contains the special token {found[0]!r} as text, which would become a control token")


def check_rendered(
    tokenizer: Any, clean: list[dict], generation_prompt: bool = False, template: str | None = None,
    tools: list[dict] | None = None,
) -> None:
    """Every message must appear in the render: a template that silently drops a system or tool
    turn would train (or answer) on a different conversation than the data holds. So must every
    tool definition and every call (its name and its arguments)."""
    marks = [f"{SENTINEL}{n}Z" if isinstance(m.get("content"), str) and (m.get("content") or not m.get("tool_calls")) else None
             for n, m in enumerate(clean)]  # fmt: skip
    marked = [{**message, "content": mark} if mark else message for message, mark in zip(clean, marks)]
    calls = []  # (message index, call index, name mark, argument mark)
    for i, message in enumerate(marked):
        if message.get("tool_calls"):
            marked_calls = []
            for j, call in enumerate(message["tool_calls"]):
                name, value = f"{SENTINEL}Call{i}x{j}Z", f"{SENTINEL}Arg{i}x{j}Z"
                function = {**call["function"], "name": name, "arguments": {"liandan_argument": value}}
                marked_calls.append({**call, "function": function})
                calls.append((i, j, name, value))
            marked[i] = {**message, "tool_calls": marked_calls}
    marked_tools = None
    if tools:
        marked_tools = [{**tool, "function": {**tool["function"], "description": f"{SENTINEL}Tool{k}Z"}}
                        for k, tool in enumerate(tools)]  # fmt: skip
    rendered = render_template(tokenizer, marked, generation_prompt, template, marked_tools)
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


def plain_ranges(
    tokenizer: Any, clean: list[dict], full: str, specials: set[str], generation_prompt: bool = False,
    template: str | None = None, tools: list[dict] | None = None,
) -> list[tuple[int, int]]:
    """The character ranges of the full render that are special-token text inside a message's
    content, to be tokenized as plain characters. The template text around those messages must
    match the render exactly, or the content cannot be told from the template's own tokens."""
    dirty = [i for i, m in enumerate(clean) if isinstance(m.get("content"), str) and any(s and s in m["content"] for s in specials)]
    if not dirty:
        return []
    marks = [f"{SENTINEL}{n}Z" for n in range(len(dirty))]
    marked = [dict(message) for message in clean]
    for mark, index in zip(marks, dirty):
        marked[index]["content"] = mark
    pieces = split_at_marks(render_template(tokenizer, marked, generation_prompt, template, tools), marks, dirty)
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


def split_at_marks(marked: str, marks: list[str], trained: list[int]) -> list[str]:
    """The template's own text around the sentinels: one more piece than there are sentinels."""
    pieces, at = [], 0
    for mark, index in zip(marks, trained):
        found = marked.find(mark, at)
        if found < 0 or marked.count(mark) != 1:
            raise no_mask(f"the reply in messages[{index}] does not appear exactly once in the render")
        pieces.append(marked[at:found])
        at = found + len(mark)
    pieces.append(marked[at:])
    return pieces


def tokenize_segments(
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
