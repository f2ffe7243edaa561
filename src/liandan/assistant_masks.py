"""The assistant-only loss mask: a conversation as training tokens, trained only on the assistant's
replies and the stop token that ends each one.

    from liandan.assistant_masks import encode_chat
    example = encode_chat(tokenizer, [{"role": "user", "content": "Capital of France?"},
                                      {"role": "assistant", "content": "Paris."}])
    example["labels"]   # -100 everywhere except the tokens of "Paris.<|im_end|>"

The conversation is rendered by the model's own chat template (`liandan.chat`), never by a
re-implementation of it; `explain_mask` shows which text is trained, for ``liandan inspect-data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .chat import (
    SENTINEL,
    check_rendered,
    check_tool_text,
    has_chat_template,
    no_mask,
    plain_ranges,
    render_template,
    special_texts,
    split_at_marks,
    stop_token_ids,
    tokenize_segments,
)
from .errors import LiandanError
from .losses import IGNORE_INDEX
from .tool_records import read_arguments

SPECIAL_TEXT_MODES = ("error", "plain")
"""What to do with special-token text (``<|im_start|>``) inside a message's content: ``error``
refuses it (it would become a real control token and let the data forge turns); ``plain``
encodes it as the ordinary characters it is."""


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
    check_tool_text(clean, tools, specials)
    full = render_template(tokenizer, clean, tools=tools)
    if render_template(tokenizer, clean, tools=tools) != full:
        raise no_mask("rendering the same conversation twice gave different text")
    check_rendered(tokenizer, clean, tools=tools)
    if tools or any(m.get("tool_calls") for m in clean):
        spans = _reply_spans_by_prefix(tokenizer, clean, trained, full, tools, specials, plain=special_text == "plain")
    else:
        spans = _reply_spans(tokenizer, clean, trained, full, plain=special_text == "plain")
    plain = plain_ranges(tokenizer, clean, full, specials, tools=tools) if special_text == "plain" else []
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


def _reply_spans(
    tokenizer: Any, clean: list[dict], trained: list[int], full: str, plain: bool = False
) -> list[tuple[int, int]]:
    """The character span of each trained reply's text in the full render."""
    if not trained:
        return []
    # Letters and digits only, so no template's strip/trim changes them; the trailing Z keeps
    # sentinel 1 from being a prefix of sentinel 10.
    marks = [f"{SENTINEL}{n}Z" for n in range(len(trained))]
    if any(SENTINEL in message["content"] for message in clean):
        raise LiandanError(f"a message contains liandan's internal marker {SENTINEL!r}; remove it from the data")
    marked = [dict(message) for message in clean]
    for mark, index in zip(marks, trained):
        marked[index]["content"] = mark
    pieces = split_at_marks(render_template(tokenizer, marked), marks, trained)
    specials = special_texts(tokenizer)
    spans, at = [], 0
    for n, index in enumerate(trained):
        piece_start, reply_start = _find_piece(tokenizer, clean, index, full, at, pieces[n], anchored=n == 0)
        if n > 0:
            spans.append(_checked_span(full, (at, piece_start), clean, trained[n - 1], specials, plain))
        at = reply_start
    tail = pieces[-1]
    if not full.endswith(tail) or len(full) - len(tail) < at:
        raise no_mask(f"the template text after messages[{trained[-1]}] does not end the full render")
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
        prompt = render_template(tokenizer, clean[:index], True, tools=tools)
        upto = render_template(tokenizer, clean[: index + 1], tools=tools)
        if not upto.startswith(prompt) or not full.startswith(upto):
            raise no_mask(f"the render up to messages[{index}] is not the start of the full render")
        turn = upto[len(prompt) :]
        ends = [turn.rfind(t) for t in stop_texts if t in turn]
        if not ends:
            raise no_mask(f"no stop token (eos or the template's end-of-turn) after the reply in messages[{index}]")
        span = (len(prompt), len(prompt) + max(ends))
        if not clean[index].get("tool_calls"):
            span = _checked_span(full, span, clean, index, specials, plain)
        elif any(t in full[span[0] : span[1]] for t in stop_texts):
            raise no_mask(f"the reply in messages[{index}] holds a stop token before its end")
        spans.append(span)
    return spans


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
    raise no_mask(f"the template text before messages[{index}] is not found in the full render")


def _find(text: str, piece: str, at: int, anchored: bool) -> int:
    if anchored:
        return at if text.startswith(piece, at) else -1
    return text.find(piece, at)


def _generation_prompt(tokenizer: Any, before: list[dict]) -> str:
    """The text ``add_generation_prompt`` appends after these messages ("" if that is unclear)."""
    if not before:
        return ""
    try:
        plain, prompted = render_template(tokenizer, before), render_template(tokenizer, before, generation_prompt=True)
    except LiandanError:
        return ""
    return prompted[len(plain) :] if prompted.startswith(plain) else ""


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
        raise no_mask(f"the span found for messages[{index}] contains template tokens ({leaked[0]!r})")
    if content.strip() and not text.strip():
        raise no_mask(f"the template renders the reply in messages[{index}] as empty text; mark it \"train\": false")
    return span


def _tokenize_with_offsets(
    tokenizer: Any, text: str, plain: list[tuple[int, int]] = ()
) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise LiandanError(
            "assistant-only masks need a fast tokenizer (one with character offsets); load it with use_fast=True"
        )
    return tokenize_segments(tokenizer, text, plain)


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
        raise no_mask(f"the first token of messages[{index}] also holds header text {full[offsets[first][0]:start]!r}")
    stop = first
    while stop < count and offsets[stop][0] < end:
        stop += 1
    # Whitespace the template writes between a reply and its stop token (Llama 2's " </s>") is
    # part of what the model must write.
    while stop < count and ids[stop] not in stop_ids and not full[offsets[stop][0] : offsets[stop][1]].strip():
        stop += 1
    if stop == count or ids[stop] not in stop_ids or full[end : offsets[stop][0]].strip():
        raise no_mask(
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
