"""Tool calls in `liandan serve`'s chat completions: a reply read back into OpenAI's
``tool_calls`` (`CallReader`), and a streamed reply held back from where a call may begin and
sent as ``tool_calls`` deltas (`CallStream`). The call format is the model's own template's
(`liandan.tools.CallFormat`)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from .openai_api import TokenLogprob, chat_chunk, chat_logprobs
from .tools import CallFormat, parse_reply


@dataclass(frozen=True)
class CallReader:
    """How the replies to a chat request with tools are read: the template's `CallFormat`, the
    text put after the prompt to force a call (a reply is read as if the model had written it),
    and whether a reply may make more than one call (``parallel_tool_calls``)."""

    fmt: CallFormat
    forced: str = ""
    parallel: bool = True

    @classmethod
    def for_request(cls, fmt: CallFormat, forced_call: str | None, parallel: bool | None) -> CallReader:
        """``forced_call`` as `ChatRequest.forced_call` gives it: None (the model may answer in
        text), "" (any call) or a function's name."""
        forced = "" if forced_call is None else fmt.forced_text(forced_call or None)
        if forced_call == "" and not forced and fmt.opening:  # bare JSON has no prefix: begin the call object
            forced = fmt.opening.split("\x00")[0]
        return cls(fmt, forced, parallel is not False)

    def message(self, generated: str, finish_reason: str) -> tuple[dict, str]:
        """The assistant message and finish reason for a generated reply: its calls as
        ``tool_calls`` (``finish_reason: "tool_calls"``) and the text before them as ``content``
        (null when there is none); a reply with a call that cannot be read is all text, as written."""
        text = self.forced + generated
        reply = parse_reply(text, self.fmt)
        if not reply.calls or reply.problem:
            return {"role": "assistant", "content": text}, finish_reason
        calls = reply.calls if self.parallel else reply.calls[:1]
        return {"role": "assistant", "content": reply.content or None, "tool_calls": [_wire_call(c) for c in calls]}, "tool_calls"

    def open_length(self, text: str) -> int:
        """How much of ``text`` (forced text and the reply so far) is content whatever comes next:
        up to where a call begins or may begin, less trailing space (which `parse_reply` drops
        before a call)."""
        head = self.fmt.prefix.strip()
        if head:
            at = text.find(head)
            end = at if at >= 0 else len(text) - _partial_suffix(text, head)
        else:  # bare JSON: the whole reply is a call when it begins with "{"
            rest = text.lstrip()
            end = 0 if not rest or rest.startswith("{") else len(text)
        return len(text[:end].rstrip())


def _partial_suffix(text: str, head: str) -> int:
    """The length of the longest end of ``text`` that ``head`` begins with."""
    for n in range(min(len(head) - 1, len(text)), 0, -1):
        if head.startswith(text[-n:]):
            return n
    return 0


def _wire_call(call: dict) -> dict:
    """A parsed call in OpenAI's shape: a fresh id, and the arguments as a JSON string."""
    function = call["function"]
    arguments = json.dumps(function["arguments"], ensure_ascii=False)
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }


class CallStream:
    """One streamed choice of a request with tools. Its text goes out as content deltas while it
    cannot be the start of a call; from where a call may begin it is held back, and at the end it
    goes out as ``tool_calls`` deltas (and ``finish_reason: "tool_calls"``) or, when it was no call
    after all, as content. The content deltas join to the message the same reply gets unstreamed."""

    def __init__(self, reader: CallReader, index: int) -> None:
        self.reader, self.index = reader, index
        self.text = reader.forced
        self.sent = 0
        """Characters of ``text`` sent as content."""
        self.held: list[tuple[int, TokenLogprob]] = []
        """Tokens not sent yet, each with where its text starts in ``text``."""
        self.logprobs = False

    def feed(self, piece: str, tokens: list[TokenLogprob] | None) -> tuple[str, list[TokenLogprob] | None]:
        """The content (and its tokens) that can go out once ``piece`` is added."""
        at = len(self.text)
        for token in tokens or ():
            self.held.append((at, token))
            at += len(token.token)
        self.logprobs = self.logprobs or tokens is not None
        self.text += piece
        end = max(self.reader.open_length(self.text), self.sent)
        content, self.sent = self.text[self.sent : end], end
        return content, self._release(lambda start: start < end)

    def _release(self, sent: Callable[[int], bool]) -> list[TokenLogprob] | None:
        out = [token for start, token in self.held if sent(start)]
        self.held = [(start, token) for start, token in self.held if not sent(start)]
        return out if self.logprobs else None

    def finish(self, finish_reason: str) -> list[dict]:
        """The last chunks: the rest of the content, the calls, and the finishing chunk."""
        message, reason = self.reader.message(self.text[len(self.reader.forced) :], finish_reason)
        rest = (message["content"] or "")[self.sent :]  # what was sent is always the start of the content
        tokens, chunks = self._release(lambda start: True), []
        if rest or (tokens and "tool_calls" not in message):
            chunks.append(chat_chunk(self.index, rest, None, tokens))
            tokens = None
        for i, call in enumerate(message.get("tool_calls", ())):
            logprobs = chat_logprobs(tokens) if tokens and i == 0 else None  # the tokens that wrote the calls
            chunks.append({"choices": [{"index": self.index, "delta": {"tool_calls": [{"index": i, **call}]},
                                        "logprobs": logprobs, "finish_reason": None}]})  # fmt: skip
        chunks.append(chat_chunk(self.index, None, reason))
        return chunks
