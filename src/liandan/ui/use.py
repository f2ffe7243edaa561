"""The tabs that use the result, as ``liandan chat``, ``liandan merge`` and ``liandan export`` do:

- Chat: a multi-turn chat with any model or run directory, replies streamed
  (`liandan.terminal_chat.chat_turn`): each turn rendered with the model's own chat template and
  stopped at its stop tokens, a reply cut short marked and kept out of training. "Save as
  training data" appends the conversation to a JSONL file as one ``{"messages": [...]}`` record,
  the shape ``liandan sft --data FILE`` reads.
- Export: merge a LoRA run into a standalone model (`liandan.merge`), and write a GGUF file with
  its Ollama Modelfile (`liandan.export`), shown with the verification that decided it was kept:
  the verifier that ran, each probe's largest logit difference and greedy agreement, llama.cpp's
  result when it is installed, and the Modelfile.

    append_conversation(Path("chats.jsonl"), conversation)   # the records the file now holds
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from ..chat import chat_stop_ids, has_chat_template
from ..errors import LiandanError
from ..export import export
from ..files import write_atomic
from ..generation import SamplingConfig
from ..merge import merge
from ..models import check_models, load_model, release_model
from ..terminal_chat import Conversation, chat_turn
from .context import K, Labels, UIContext, error_text, in_background, model_choices, status_text
from .i18n import t


class LoadedModel:
    """The chat's one model in memory, shared by every page; another model replaces it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # one reply at a time: the model is not shared mid-generation
        self.spec: str | None = None
        self.model: Any = None
        self.tokenizer: Any = None

    def get(self, spec: str) -> tuple[Any, Any]:
        """Call with ``lock`` held."""
        if spec != self.spec:
            if self.model is not None:
                release_model(self.model)
                self.model = self.tokenizer = self.spec = None
            self.model, self.tokenizer = load_model(spec)
            self.spec = spec
        return self.model, self.tokenizer


def append_conversation(path: Path, conversation: Conversation) -> int:
    """Append the conversation to a .jsonl file as one ``{"messages": [...]}`` record, rewriting
    the file atomically (a crash leaves the old file whole); returns the records it now holds."""
    if path.suffix.lower() != ".jsonl":
        raise LiandanError(f"'{path}': training data is saved as .jsonl (one conversation per line)")
    if not conversation.turns:
        raise LiandanError("nothing to save yet: the conversation is empty")
    if not trainable(conversation):
        raise LiandanError("nothing to train on: every reply was cut short (train: false), and liandan sft refuses such a record")
    if not path.parent.is_dir():
        raise LiandanError(f"cannot save: directory '{path.parent}' does not exist")
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_atomic(path, old + json.dumps({"messages": conversation.messages}, ensure_ascii=False) + "\n")
    return len([line for line in old.splitlines() if line.strip()]) + 1


def trainable(conversation: Conversation) -> bool:
    """Whether a reply of the conversation stopped by itself: the data reader refuses a record
    whose every assistant turn has ``train: false``."""
    return any(m["role"] == "assistant" and m.get("train", True) for m in conversation.turns)


def shown(conversation: Conversation | None) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in conversation.turns] if conversation else []


def chat_tab(ctx: UIContext, labels: Labels, lang: gr.Radio) -> None:
    loaded = LoadedModel()
    with labels(gr.Tab, label=K("tab.chat")):
        labels(gr.Markdown, value=K("chat.intro"))
        with gr.Row():
            model = labels(gr.Dropdown, label=K("common.model"), choices=model_choices(ctx), value=ctx.models[0],
                           allow_custom_value=True, scale=2)  # fmt: skip
            system = labels(gr.Textbox, label=K("common.system"), info=K("chat.system_info"), scale=3)
        with labels(gr.Accordion, label=K("chat.sampling"), open=False):
            with gr.Row():
                temperature = labels(gr.Number, label=K("common.temperature"), info=K("common.temperature_info"), value=0.0, minimum=0)
                top_p = labels(gr.Number, label=K("chat.top_p"), value=0.95, minimum=0.01, maximum=1)
                top_k = labels(gr.Number, label=K("chat.top_k"), value=0, precision=0, minimum=0)
                max_new = labels(gr.Number, label=K("common.max_new_tokens"), value=256, precision=0, minimum=1)
                seed = labels(gr.Number, label=K("common.seed"), value=0, precision=0)
        chatbot = labels(gr.Chatbot, label=K("chat.conversation"), height=380, elem_id="chatbot", buttons=["copy", "copy_all"])
        with gr.Row():
            message = labels(gr.Textbox, label=K("chat.message"), placeholder=K("chat.placeholder"), scale=4, elem_id="chat-input")
            send = labels(gr.Button, value=K("chat.send"), variant="primary", scale=1)
        with gr.Row():
            new = labels(gr.Button, value=K("chat.new"))
            save_path = labels(gr.Textbox, label=K("chat.save_path"), value="chats.jsonl", scale=2)
            save = labels(gr.Button, value=K("chat.save"))
        status = gr.Markdown(elem_id="chat-status")
    state = gr.State(None)  # (model spec, Conversation) of this page
    model.focus(lambda: gr.update(choices=model_choices(ctx)), None, model)

    def reply(lang_value, text, held, spec, system_value, temperature_value, top_p_value, top_k_value, max_new_value,
              seed_value) -> Iterator[tuple]:  # fmt: skip
        if not (text or "").strip():
            yield gr.update(), held, gr.update(), gr.update()
            return
        try:
            sampling = SamplingConfig(max_new_tokens=int(max_new_value or 1), temperature=float(temperature_value or 0),
                                      top_p=float(top_p_value or 1), top_k=int(top_k_value or 0), seed=int(seed_value or 0))  # fmt: skip
            check_models([spec])
            same = held is not None and held[0] == spec and held[1].system == (system_value or None)
            conversation = held[1] if same else Conversation(system_value or None)
            history = shown(conversation) + [{"role": "user", "content": text}]
            yield history + [{"role": "assistant", "content": ""}], (spec, conversation), "", t(lang_value, "chat.loading", model=spec)

            notes = []

            def work(write):
                with loaded.lock:
                    model_, tokenizer = loaded.get(spec)
                    if not has_chat_template(tokenizer):
                        notes.append(t(lang_value, "chat.no_template"))
                    stops = chat_stop_ids(tokenizer, getattr(model_, "generation_config", None))
                    return chat_turn(model_, tokenizer, conversation, text, sampling, stops, write)

            streamed = ""
            for kind, payload in in_background(None, work):
                if kind == "progress" and payload:
                    streamed += payload
                    yield history + [{"role": "assistant", "content": streamed}], gr.update(), gr.update(), gr.update()
                elif kind == "done":
                    if payload is None:  # the conversation no longer fits the model: chat_turn said why
                        yield shown(conversation), (spec, conversation), text, f"**{streamed.strip()}**"
                        return
                    ending = t(lang_value, f"chat.ending_{payload.ending}", max_new_tokens=sampling.max_new_tokens)
                    status = t(lang_value, "chat.reply", tokens=payload.new_tokens, ending=ending)
                    yield shown(conversation), (spec, conversation), "", " ".join([status, *notes])
        except Exception as exc:
            yield gr.update(), held, gr.update(), error_text(lang_value, exc)

    def start_over(lang_value):
        return [], None, t(lang_value, "chat.cleared")

    def save_chat(lang_value, held, path_value):
        try:
            if held is None or not held[1].turns:
                raise LiandanError(t(lang_value, "chat.empty"))
            if not trainable(held[1]):
                raise LiandanError(t(lang_value, "chat.nothing_to_train"))
            path = Path((path_value or "").strip() or "chats.jsonl").expanduser()
            if path.suffix.lower() != ".jsonl":
                raise LiandanError(t(lang_value, "chat.not_jsonl", path=path))
            if not path.parent.is_dir():
                raise LiandanError(t(lang_value, "chat.no_dir", dir=path.parent))
            records = append_conversation(path, held[1])
            return t(lang_value, "chat.saved", n=len(held[1].messages), path=path, records=records)
        except Exception as exc:
            return error_text(lang_value, exc)

    inputs = [lang, message, state, model, system, temperature, top_p, top_k, max_new, seed]
    outputs = [chatbot, state, message, status]
    send.click(reply, inputs, outputs, concurrency_limit=4)
    message.submit(reply, inputs, outputs, concurrency_limit=4)
    new.click(start_over, [lang], [chatbot, state, status])
    chatbot.clear(start_over, [lang], [chatbot, state, status])  # its own trash button
    save.click(save_chat, [lang, state, save_path], status)


def export_tab(ctx: UIContext, labels: Labels, lang: gr.Radio) -> None:
    with labels(gr.Tab, label=K("tab.export")):
        labels(gr.Markdown, value=K("export.intro"))
        labels(gr.Markdown, value=K("export.merge_title"))
        with gr.Row():
            run_dir = labels(gr.Dropdown, label=K("export.run_dir"), info=K("export.run_dir_info"), choices=model_choices(ctx),
                             value=None, allow_custom_value=True)  # fmt: skip
            merged_dir = labels(gr.Textbox, label=K("export.merged_dir"), value="models/merged")
        merge_button = labels(gr.Button, value=K("export.merge"))
        merge_status = gr.Markdown(elem_id="merge-status")
        labels(gr.Markdown, value=K("export.gguf_title"))
        with gr.Row():
            source = labels(gr.Dropdown, label=K("common.model"), info=K("export.source_info"), choices=model_choices(ctx),
                            value=ctx.models[0], allow_custom_value=True)  # fmt: skip
            out = labels(gr.Textbox, label=K("export.out"), value="models/model.gguf")
            quant = labels(gr.Radio, label=K("export.quant"), info=K("export.quant_info"), choices=["f16", "q8_0"], value="f16")
            force = labels(gr.Checkbox, label=K("export.force"), value=False)
        export_button = labels(gr.Button, value=K("export.run"), variant="primary")
        export_status = gr.Markdown(elem_id="export-status")
        verification = labels(gr.Textbox, label=K("export.verification"), lines=8, interactive=False, visible=False)
        modelfile = labels(gr.Code, label=K("export.modelfile"), interactive=False, visible=False)
    for picker in (run_dir, source):
        picker.focus(lambda: gr.update(choices=model_choices(ctx)), None, picker)

    def run_merge(lang_value, run_value, out_value) -> Iterator[str]:
        try:
            if not run_value:
                yield t(lang_value, "export.no_run")
                return

            def work(report):
                report(t(lang_value, "export.merging"))
                return merge(run_value, (out_value or "").strip() or "models/merged")

            for kind, payload in in_background(ctx, work):
                yield status_text(lang_value, payload) if kind == "progress" else t(lang_value, "export.merged", path=payload)
        except Exception as exc:
            yield error_text(lang_value, exc)

    def run_export(lang_value, source_value, out_value, quant_value, force_value) -> Iterator[tuple]:
        hidden = gr.update(visible=False)
        try:
            check_models([source_value])
            path = Path((out_value or "").strip() or "model.gguf")

            def work(report):
                report(t(lang_value, "export.exporting"))
                return export(source_value, path, quant=quant_value, force=bool(force_value))

            for kind, payload in in_background(ctx, work):
                if kind == "progress":
                    yield status_text(lang_value, payload), hidden, hidden
                else:
                    text = payload.modelfile.read_text(encoding="utf-8")
                    yield (t(lang_value, "export.done", path=payload.path, modelfile=payload.modelfile),
                           gr.update(value="\n".join(payload.summary()), visible=True), gr.update(value=text, visible=True))  # fmt: skip
        except Exception as exc:
            yield error_text(lang_value, exc), hidden, hidden

    merge_button.click(run_merge, [lang, run_dir, merged_dir], merge_status)
    export_button.click(run_export, [lang, source, out, quant, force], [export_status, verification, modelfile])
