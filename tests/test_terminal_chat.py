"""`liandan chat`: scripted sessions against the tiny models of conftest.py.

Input comes from a list of lines (an exception in the list is raised, as Ctrl-C would be; the
end of the list is Ctrl-D), output is collected, and ``model.generate`` is wrapped to see exactly
what the model was given and whether text was written while it was still generating.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from liandan.chat import render_chat
from liandan.data import read_examples
from liandan.errors import LiandanError
from liandan.generation import SamplingConfig
from liandan.models import load_model
from liandan.terminal_chat import NO_TEMPLATE_NOTE, PROMPT, chat_session, chat_stop_ids, run_chat

Q1 = {"role": "user", "content": "Question 1?"}
Q2 = {"role": "user", "content": "Question 2?"}
FINE = {"role": "assistant", "content": "Fine."}
GREEDY = SamplingConfig(max_new_tokens=16)


class Script:
    """``read_line``: returns the lines in order (raises an exception instance), then EOFError."""

    def __init__(self, *lines):
        self.lines, self.prompts = list(lines), []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line


class Recorder:
    """Wraps ``model.generate``: the prompt text of each call, its number of new tokens, and the
    output written (each piece with whether generation was still running)."""

    def __init__(self, monkeypatch, model, tokenizer):
        self.prompts, self.new_tokens, self.pieces = [], [], []
        self.generating = False
        original = model.generate

        def generate(*args, **kwargs):
            self.prompts.append(tokenizer.decode(kwargs["input_ids"][0]))
            self.generating = True
            try:
                output = original(*args, **kwargs)
            finally:
                self.generating = False
            self.new_tokens.append(output.shape[1] - kwargs["input_ids"].shape[1])
            return output

        monkeypatch.setattr(model, "generate", generate)

    def write(self, text: str) -> None:
        self.pieces.append((text, self.generating))

    @property
    def output(self) -> str:
        return "".join(text for text, _ in self.pieces)

    @property
    def streamed(self) -> str:
        return "".join(text for text, generating in self.pieces if generating)


@pytest.fixture(scope="module")
def stopping(stopping_model_dir):
    return load_model(str(stopping_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def random_chat(chat_model_dir):
    return load_model(str(chat_model_dir), device="cpu", dtype="float32")


def session(model, tokenizer, recorder, *lines, sampling=GREEDY, system=None):
    script = Script(*lines)
    messages = chat_session(model, tokenizer, sampling=sampling, system=system, read_line=script,
                            write=recorder.write)  # fmt: skip
    return messages, script


def test_two_turns_streamed_with_history_and_saved(stopping, tmp_path, monkeypatch):
    model, tokenizer = stopping
    rec = Recorder(monkeypatch, model, tokenizer)
    path = tmp_path / "chat.json"
    messages, script = session(model, tokenizer, rec, "Question 1?", "Question 2?", f"/save {path}")
    assert messages == [Q1, FINE, Q2, FINE]
    assert json.loads(path.read_text()) == {"messages": [Q1, FINE, Q2, FINE]}
    assert f"(saved 4 messages to {path})" in rec.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temporary file left
    # Both replies reached the output while the model was still generating, a piece per token.
    assert rec.streamed == "Fine.Fine."
    tokens = len(tokenizer("Fine.", add_special_tokens=False)["input_ids"])
    assert tokens > 1 and len([text for text, generating in rec.pieces if generating]) == 2 * tokens
    assert "[cut" not in rec.output  # the model stopped by itself, at its trained <|im_end|>
    # The second turn's prompt is the whole conversation so far, rendered by the model's template.
    assert rec.prompts == [render_chat(tokenizer, [Q1]), render_chat(tokenizer, [Q1, FINE, Q2])]
    assert "<|im_start|>assistant\nFine.<|im_end|>" in rec.prompts[1]
    assert script.prompts == [PROMPT] * 4  # three lines, then EOF


def test_saved_jsonl_is_sft_data(stopping, tmp_path, monkeypatch):
    model, tokenizer = stopping
    rec = Recorder(monkeypatch, model, tokenizer)
    path = tmp_path / "chat.jsonl"
    path.write_text("old content\n")
    session(model, tokenizer, rec, "Question 1?", f"/save {path}", system="Be brief.")
    assert path.read_text().count("\n") == 1  # one record on one line
    examples = read_examples(str(path)).examples
    assert [e.messages for e in examples] == [[{"role": "system", "content": "Be brief."}, Q1, FINE]]


def test_system_sets_the_system_prompt_and_starts_over(stopping, tmp_path, monkeypatch):
    model, tokenizer = stopping
    rec = Recorder(monkeypatch, model, tokenizer)
    path = tmp_path / "chat.json"
    messages, _ = session(model, tokenizer, rec, "Question 1?", "/system You are terse.", "Question 2?", f"/save {path}")
    system = {"role": "system", "content": "You are terse."}
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[:2] == [system, Q2]
    assert json.loads(path.read_text())["messages"] == messages
    assert rec.prompts[1] == render_chat(tokenizer, [system, Q2])  # the first exchange is gone
    assert rec.prompts[1].startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")


def test_system_alone_removes_it(stopping, monkeypatch):
    model, tokenizer = stopping
    rec = Recorder(monkeypatch, model, tokenizer)
    messages, _ = session(model, tokenizer, rec, "/system", "Question 1?", system="Be brief.")
    assert messages == [Q1, FINE]
    assert "(system prompt removed; new conversation)" in rec.output
    assert rec.prompts == [render_chat(tokenizer, [Q1])]


def test_reset_forgets_the_conversation_but_keeps_the_system_prompt(stopping, monkeypatch):
    model, tokenizer = stopping
    rec = Recorder(monkeypatch, model, tokenizer)
    messages, _ = session(model, tokenizer, rec, "Question 1?", "/reset", "Question 2?", system="Be brief.")
    system = {"role": "system", "content": "Be brief."}
    assert messages[:2] == [system, Q2] and len(messages) == 3
    assert rec.prompts[1] == render_chat(tokenizer, [system, Q2])
    assert "Question 1?" not in rec.prompts[1]
    assert "(conversation cleared; the system prompt stays)" in rec.output


def test_help_unknown_command_and_quit(stopping, monkeypatch):
    model, tokenizer = stopping
    rec = Recorder(monkeypatch, model, tokenizer)
    messages, script = session(model, tokenizer, rec, "/help", "/frobnicate now", "", "/quit", "Question 1?")
    assert messages == []
    assert rec.prompts == []  # nothing was generated: not for commands, not for an empty line
    assert "/save FILE" in rec.output and "/system TEXT" in rec.output
    assert "unknown command /frobnicate; commands: /reset, /system TEXT, /save FILE, /help, /quit" in rec.output
    assert script.lines == ["Question 1?"]  # /quit ended the session before reading it


def test_exit_and_eof_end_cleanly(stopping, monkeypatch):
    model, tokenizer = stopping
    rec = Recorder(monkeypatch, model, tokenizer)
    messages, script = session(model, tokenizer, rec, "/exit", "Question 1?")
    assert messages == [] and script.lines == ["Question 1?"]
    messages, script = session(model, tokenizer, rec, "Question 1?")  # then EOF (Ctrl-D)
    assert messages == [Q1, FINE]
    assert rec.output.endswith("Fine.\n\n")


def test_double_slash_sends_a_message_starting_with_slash(stopping, monkeypatch):
    model, tokenizer = stopping
    rec = Recorder(monkeypatch, model, tokenizer)
    messages, _ = session(model, tokenizer, rec, "//usr is a folder?")
    assert messages[0] == {"role": "user", "content": "/usr is a folder?"}
    assert len(rec.prompts) == 1


def test_save_problems_are_reported_and_the_chat_goes_on(stopping, tmp_path, monkeypatch):
    model, tokenizer = stopping
    rec = Recorder(monkeypatch, model, tokenizer)
    messages, _ = session(model, tokenizer, rec, "/save", f"/save {tmp_path}/a.json", "Question 1?",
                          f"/save {tmp_path}/missing/a.json", "Question 2?")  # fmt: skip
    assert "usage: /save FILE" in rec.output
    assert "nothing to save yet" in rec.output
    assert f"cannot save: directory '{tmp_path}/missing' does not exist" in rec.output
    assert list(tmp_path.iterdir()) == []
    assert messages == [Q1, FINE, Q2, FINE]


def test_max_new_tokens_cut_is_reported_and_not_trained(random_chat, tmp_path, monkeypatch):
    model, tokenizer = random_chat
    rec = Recorder(monkeypatch, model, tokenizer)
    path = tmp_path / "chat.json"
    messages, _ = session(model, tokenizer, rec, "hello", f"/save {path}", sampling=SamplingConfig(max_new_tokens=3))
    assert rec.new_tokens == [3]
    assert "[cut at max_new_tokens (3)]" in rec.output
    reply = messages[1]
    assert reply["role"] == "assistant" and reply["train"] is False
    assert reply["content"] and rec.streamed == reply["content"]
    assert json.loads(path.read_text())["messages"][1] == reply


def test_ctrl_c_stops_the_reply_not_the_session(stopping, monkeypatch):
    model, tokenizer = stopping
    rec = Recorder(monkeypatch, model, tokenizer)
    wrapped, calls = model.generate, []
    partial = tokenizer("Hello world", add_special_tokens=False)["input_ids"]

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            return wrapped(*args, **kwargs)
        kwargs["streamer"].put(kwargs["input_ids"])
        for token in partial:
            kwargs["streamer"].put(torch.tensor([token]))
        raise KeyboardInterrupt  # what Ctrl-C does in the middle of generate

    monkeypatch.setattr(model, "generate", interrupted_once)
    messages, _ = session(model, tokenizer, rec, "Question 1?", "Question 2?")
    assert messages[1] == {"role": "assistant", "content": "Hello world", "train": False}
    assert "Hello world [stopped by Ctrl-C]\n" in rec.output
    assert messages[2:] == [Q2, FINE]  # the session went on
    assert "Hello world<|im_end|>" in rec.prompts[-1]  # and the model saw what the user saw


def test_ctrl_c_at_the_prompt_does_not_end_the_session(stopping, monkeypatch):
    model, tokenizer = stopping
    rec = Recorder(monkeypatch, model, tokenizer)
    messages, _ = session(model, tokenizer, rec, KeyboardInterrupt(), "Question 1?")
    assert "to leave, type /quit or press Ctrl-D" in rec.output
    assert messages == [Q1, FINE]


def test_conversation_longer_than_the_context_is_refused(random_chat, monkeypatch):
    model, tokenizer = random_chat
    rec = Recorder(monkeypatch, model, tokenizer)
    long = "hello " * 300  # over the tiny model's 256 positions
    messages, _ = session(model, tokenizer, rec, long, "hi", sampling=SamplingConfig(max_new_tokens=2))
    assert rec.prompts == [render_chat(tokenizer, [{"role": "user", "content": "hi"}])]
    assert "the model's context is 256" in rec.output
    assert messages[0] == {"role": "user", "content": "hi"} and len(messages) == 2


def test_model_without_chat_template_gets_chatml_and_a_note(base_model_dir, monkeypatch):
    model, tokenizer = load_model(str(base_model_dir), device="cpu", dtype="float32")
    rec = Recorder(monkeypatch, model, tokenizer)
    messages, _ = session(model, tokenizer, rec, "hi", sampling=SamplingConfig(max_new_tokens=2))
    assert rec.output.startswith(NO_TEMPLATE_NOTE)
    assert rec.prompts == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in chat_stop_ids(tokenizer, model)
    assert len(messages) == 2


def test_sampling_is_reproducible_with_a_seed(random_chat, monkeypatch):
    model, tokenizer = random_chat
    rec = Recorder(monkeypatch, model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3)
    first, _ = session(model, tokenizer, rec, "hello", "hi", sampling=sampling)
    again, _ = session(model, tokenizer, rec, "hello", "hi", sampling=sampling)
    greedy, _ = session(model, tokenizer, rec, "hello", "hi", sampling=SamplingConfig(max_new_tokens=8))
    assert first == again
    assert first != greedy


def test_more_than_one_sample_is_refused(random_chat):
    model, tokenizer = random_chat
    with pytest.raises(LiandanError, match="one reply per turn"):
        chat_session(model, tokenizer, sampling=SamplingConfig(temperature=0.7, num_samples=2), read_line=Script())


def test_run_chat_loads_a_run_directory(stopping_model_dir):
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=False)
    messages = run_chat(str(stopping_model_dir), sampling=GREEDY, system="Be brief.", device="cpu",
                        dtype="float32", console=console, read_line=Script("Question 1?"))  # fmt: skip
    assert messages[1:] == [Q1, FINE]
    shown = buffer.getvalue()
    assert "its own chat template; stops at <|im_end|>" in shown
    assert "greedy; at most 16 new tokens per reply" in shown
    assert "system prompt: Be brief." in shown
    assert "Fine.\n" in shown
