"""A multi-turn chat with a model in the terminal, replies streamed token by token.

    from liandan.generation import SamplingConfig
    from liandan.terminal_chat import run_chat
    messages = run_chat("runs/my-sft", sampling=SamplingConfig(max_new_tokens=256), system="Be brief.")

or, with a model already loaded and the input scripted (what the tests do):

    from liandan.terminal_chat import chat_session
    lines = iter(["Hello!", "/save chat.jsonl", "/quit"])
    messages = chat_session(model, tokenizer, sampling=SamplingConfig(max_new_tokens=64),
                            read_line=lambda prompt: next(lines))

``read_line(prompt)`` returns the next line and raises ``EOFError`` when input ends (as
``input`` does at Ctrl-D); ``write(text)`` shows text as it is (no newline added).

How it behaves, and why:

- Every turn renders the whole conversation with the model's own chat template (a run directory's
  tokenizer carries the template it was trained with) and stops at the model's stop tokens
  (`liandan.chat.chat_stop_ids`). A model without a template is told so and gets ChatML text, as
  ``liandan generate`` does; its stops then include ``<|im_end|>`` where the vocabulary has it.
- A reply that ended without a stop token is marked: ``[cut at max_new_tokens (N)]``, ``[cut at
  the model's context length]`` or ``[stopped by Ctrl-C]``. Ctrl-C stops the reply, not the
  session. Such a reply stays in the conversation (the model sees what you saw) but is saved with
  ``"train": false``, so a saved chat never teaches a model to stop mid-sentence.
- ``/system TEXT`` starts a new conversation: replies written under another system prompt would
  otherwise be saved as if this one had produced them. ``/reset`` keeps the system prompt.
- ``/save FILE`` writes ``{"messages": [...]}``, the record shape of liandan's SFT data, atomically:
  a ``.jsonl`` file gets it on one line, ready for ``liandan sft --data FILE``; any other name
  gets indented JSON, for reading (a ``.json`` data file must hold a list, so train from .jsonl).
- Each turn re-reads the whole conversation (no cache is kept between turns): simple, exact, and
  quick enough for small models. A conversation longer than the model's context is refused.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from .chat import chat_stop_ids, encode_generation_prompt, has_chat_template
from .errors import LiandanError
from .files import write_atomic
from .generation import SamplingConfig, generation_config, streamable_length
from .models import context_length, load_model, release_model

PROMPT = "you> "
HELP = """commands:
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt and start a new conversation; /system alone removes it
  /save FILE     write the conversation as {"messages": [...]} (FILE.jsonl: one line, ready for liandan sft)
  /help          this list
  /quit, /exit   leave (Ctrl-D too); Ctrl-C stops a reply
  //text         send a message that starts with "/"
"""
NO_TEMPLATE_NOTE = (
    "note: this model has no chat template (a base model?); the conversation is rendered as "
    "ChatML text, which it was probably not trained on\n"
)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@dataclass
class Conversation:
    """The system prompt and the exchanges so far."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)

    @property
    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.turns]


@dataclass
class Reply:
    """One streamed assistant reply."""

    text: str
    """The reply without its stop token."""
    new_tokens: int
    """Tokens generated, the stop token included."""
    ending: str
    """``stop`` (the model ended it), ``max_new_tokens``, ``context`` or ``interrupted`` (Ctrl-C)."""


def chat_session(
    model: Any,
    tokenizer: Any,
    *,
    sampling: SamplingConfig,
    system: str | None = None,
    read_line: Callable[[str], str] = input,
    write: Callable[[str], None] = _write_stdout,
) -> list[dict]:
    """Chat until ``/quit``, ``/exit`` or end of input; returns the final messages (system
    prompt first, if any), as ``/save`` would write them."""
    if sampling.num_samples != 1:
        raise LiandanError(f"--num-samples {sampling.num_samples}: chat writes one reply per turn")
    if not has_chat_template(tokenizer):
        write(NO_TEMPLATE_NOTE)
    stops = chat_stop_ids(tokenizer, getattr(model, "generation_config", None))
    conversation = Conversation(system or None)
    torch.manual_seed(sampling.seed)
    while True:
        try:
            line = read_line(PROMPT)
        except EOFError:
            write("\n")
            break
        except KeyboardInterrupt:
            write("\n(Ctrl-C stops a reply; to leave, type /quit or press Ctrl-D)\n")
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not run_command(conversation, line.strip(), write):
                break
        elif line.strip():
            chat_turn(model, tokenizer, conversation, line.removeprefix("/"), sampling, stops, write)
    return conversation.messages


# ---------------------------------------------------------------------------------------------
# Commands


def run_command(conversation: Conversation, line: str, write: Callable[[str], None]) -> bool:
    """Carry out one ``/command`` line; returns False when the session should end."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        write(HELP)
    elif name == "/reset":
        conversation.turns.clear()
        write("(conversation cleared" + ("; the system prompt stays)\n" if conversation.system else ")\n"))
    elif name == "/system":
        conversation.system = argument or None
        conversation.turns.clear()
        write("(system prompt set; new conversation)\n" if argument else "(system prompt removed; new conversation)\n")
    elif name == "/save":
        write(save_conversation(conversation, argument) + "\n")
    else:
        write(f"unknown command {name}; commands: /reset, /system TEXT, /save FILE, /help, /quit\n")
    return True


def save_conversation(conversation: Conversation, path: str) -> str:
    """Write the conversation to ``path`` atomically; returns the line to show (an error is
    shown, not raised: a typo in a file name must not end the chat)."""
    if not path:
        return "usage: /save FILE (for example /save chat.jsonl)"
    if not conversation.turns:
        return "nothing to save yet: the conversation is empty"
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        return f"cannot save: directory '{target.parent}' does not exist"
    record = {"messages": conversation.messages}
    one_line = target.suffix.lower() == ".jsonl"
    text = json.dumps(record, ensure_ascii=False, indent=None if one_line else 2) + "\n"
    try:
        write_atomic(target, text)
    except OSError as exc:
        return f"cannot save to '{target}': {exc.strerror or exc}"
    return f"(saved {len(record['messages'])} messages to {target})"


# ---------------------------------------------------------------------------------------------
# One turn


def chat_turn(model, tokenizer, conversation: Conversation, text: str, sampling: SamplingConfig,
              stops: list[int], write: Callable[[str], None]) -> Reply | None:  # fmt: skip
    """Answer one user message, streaming the reply; the exchange joins the conversation.
    Returns None (and changes nothing) when the conversation no longer fits the model."""
    user = {"role": "user", "content": text}
    prompt_ids = encode_prompt(tokenizer, conversation.messages + [user])
    context = context_length(model)
    room = sampling.max_new_tokens if context is None else min(sampling.max_new_tokens, context - len(prompt_ids))
    if room < 1:
        write(f"the conversation is {len(prompt_ids)} tokens, the model's context is {context}: "
              "/save it if you want it, then /reset\n")  # fmt: skip
        return None
    reply = stream_reply(model, tokenizer, prompt_ids, sampling, stops, room, write)
    if reply.ending == "max_new_tokens" and room < sampling.max_new_tokens:
        reply.ending = "context"
    assistant = {"role": "assistant", "content": reply.text}
    if reply.ending != "stop":
        assistant["train"] = False  # see the module docstring
    conversation.turns += [user, assistant]
    write(ending_note(reply, sampling.max_new_tokens) + "\n")
    return reply


def ending_note(reply: Reply, max_new_tokens: int) -> str:
    return {
        "stop": "",
        "max_new_tokens": f" [cut at max_new_tokens ({max_new_tokens})]",
        "context": " [cut at the model's context length]",
        "interrupted": " [stopped by Ctrl-C]",
    }[reply.ending]


def encode_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The conversation plus the assistant header, as token ids. The render already holds the
    template's special tokens (BOS included), so none are added; special-token text typed in a
    message stays plain text (`liandan.chat.encode_generation_prompt`)."""
    return encode_generation_prompt(tokenizer, messages)


def stream_reply(model, tokenizer, prompt_ids: list[int], sampling: SamplingConfig, stops: list[int],
                 max_new_tokens: int, write: Callable[[str], None]) -> Reply:  # fmt: skip
    """Generate one reply, writing its text as it comes. Ctrl-C ends the reply early and keeps
    what was written so far."""
    config = generation_config(sampling, stops, tokenizer.pad_token_id, max_new_tokens=max_new_tokens)
    input_ids = torch.tensor([prompt_ids], device=model.device)  # (1, T)
    streamer = ReplyStreamer(tokenizer, stops, write)
    interrupted = False
    try:
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           generation_config=config, streamer=streamer)  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
    streamer.flush()
    ending = "stop" if streamer.stopped else "interrupted" if interrupted else "max_new_tokens"
    return Reply(text=streamer.text(), new_tokens=len(streamer.ids), ending=ending)


class ReplyStreamer:
    """A `generate` streamer that writes the new text as tokens arrive.

    The whole reply is decoded at each step and only the new characters are written, so tokens
    that decode differently together than apart come out right; text ending in an incomplete
    UTF-8 character (U+FFFD) waits for the token that completes it.
    """

    def __init__(self, tokenizer: Any, stops: list[int], write: Callable[[str], None]) -> None:
        self.tokenizer, self.stops, self.write = tokenizer, set(stops), write
        self.ids: list[int] = []
        self.stopped = False
        self.shown = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.stopped:
                return
            self.ids.append(token)
            self.stopped = token in self.stops
        self._show(final=False)

    def end(self) -> None:
        self.flush()

    def flush(self) -> None:
        self._show(final=True)

    def text(self) -> str:
        ids = self.ids[:-1] if self.stopped else self.ids
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _show(self, final: bool) -> None:
        text = self.text()
        end = len(text) if final else streamable_length(text, [])
        if end > self.shown:
            self.write(text[self.shown : end])
            self.shown = end


# ---------------------------------------------------------------------------------------------
# From the command line


def run_chat(
    spec: str,
    *,
    sampling: SamplingConfig,
    system: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    console: Any = None,
    read_line: Callable[[str], str] | None = None,
) -> list[dict]:
    """Load a model (anything `liandan.models.load_model` takes: default, a model or merged
    directory, a run directory, a .gguf file, a hub id) and chat with it on a Rich console."""
    console = console or Console()
    if read_line is None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        read_line = lambda prompt: console.input(Text(prompt, style="bold cyan"))
    # A plain line, not a spinner: the default model's first-time conversion prints its own progress.
    console.print(f"loading {spec}...", style="dim", highlight=False)
    model, tokenizer = load_model(spec, device=device, dtype=dtype,
                                  trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)  # fmt: skip
    try:
        console.print(session_header(model, tokenizer, sampling, system), highlight=False, markup=False)
        return chat_session(model, tokenizer, sampling=sampling, system=system, read_line=read_line,
                            write=lambda text: console.out(text, end="", highlight=False))  # fmt: skip
    finally:
        release_model(model)


def session_header(model: Any, tokenizer: Any, sampling: SamplingConfig, system: str | None) -> str:
    source = getattr(model, "liandan_source", None)
    name = source.name if source is not None else type(model).__name__
    template = "its own chat template" if has_chat_template(tokenizer) else "no chat template (ChatML text)"
    decoding = "greedy" if sampling.is_greedy else (
        f"temperature {sampling.temperature}, top-p {sampling.top_p}, top-k {sampling.top_k or 'off'}, seed {sampling.seed}"
    )  # fmt: skip
    stop_ids = chat_stop_ids(tokenizer, getattr(model, "generation_config", None))
    stops = ", ".join(tokenizer.convert_ids_to_tokens(stop_ids)) or "none"
    lines = [
        f"chatting with {name}: {template}; stops at {stops}",
        f"{decoding}; at most {sampling.max_new_tokens} new tokens per reply",
    ]
    if system:
        lines.append(f"system prompt: {system}")
    lines.append("/help for commands; Ctrl-C stops a reply; /quit or Ctrl-D leaves")
    return "\n".join(lines)
