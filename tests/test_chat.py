from conftest import CHATML, build_tokenizer

from liandan.chat import chat_stop_ids, end_of_turn_ids, render_chat, stop_token_ids

LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
INST_STYLE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def test_chatml_end_of_turn_is_im_end():
    tok = build_tokenizer(CHATML, "<|im_end|>")
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_llama3_style_end_of_turn_differs_from_eos():
    tok = build_tokenizer(LLAMA3_STYLE, "<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_ids(tok) == [eot]
    # Both the eos of the tokenizer and the template's end-of-turn stop generation.
    assert stop_token_ids(tok) == sorted({eot, tok.eos_token_id})


def test_inst_style_end_of_turn_is_eos():
    tok = build_tokenizer(INST_STYLE, "<|endoftext|>")
    assert end_of_turn_ids(tok) == [tok.eos_token_id]


def test_no_template_means_no_end_of_turn_but_eos_still_stops():
    tok = build_tokenizer(None, "<|endoftext|>")
    assert end_of_turn_ids(tok) == []
    assert stop_token_ids(tok) == [tok.eos_token_id]


def test_generation_config_eos_list_is_included():
    class Config:
        eos_token_id = [5, 7]

    tok = build_tokenizer(CHATML, "<|im_end|>")
    assert stop_token_ids(tok, Config()) == sorted({5, 7, tok.eos_token_id})


def test_render_chat_uses_the_models_template_or_chatml():
    messages = [{"role": "user", "content": "Hi"}]
    llama = build_tokenizer(LLAMA3_STYLE, "<|endoftext|>")
    assert render_chat(llama, messages).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    base = build_tokenizer(None, "<|endoftext|>")
    assert render_chat(base, messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_stops_add_chatml_end_only_for_a_model_rendered_as_chatml():
    with_template = build_tokenizer(CHATML, "<|im_end|>")
    assert chat_stop_ids(with_template) == stop_token_ids(with_template)
    base = build_tokenizer(None, "<|endoftext|>")
    eos, im_end = base.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert stop_token_ids(base) == [eos]
    assert chat_stop_ids(base) == sorted([eos, im_end])
    bare = build_tokenizer(None, "<|endoftext|>", special=["<|endoftext|>"], bos="<|endoftext|>")
    assert chat_stop_ids(bare) == stop_token_ids(bare)  # no <|im_end|> token to stop at
