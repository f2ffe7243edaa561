"""Chat templates: rendering prompts, and finding the tokens that end an assistant turn.

The model's own chat template (shipped with its tokenizer) is the only source of truth: liandan
never re-implements a template in Python. A model without one (a base model) is given ChatML.

    from liandan.chat import render_chat, stop_token_ids
    text = render_chat(tokenizer, [{"role": "user", "content": "Hi"}])   # ends with the assistant header
    stops = stop_token_ids(tokenizer, model.generation_config)          # e.g. [2] for <|im_end|>
"""

from __future__ import annotations

from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Content unlikely to be changed by any template (no spaces to strip, no markup).
_SENTINEL = "Liandan7Sentinel3Reply"


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
