"""Modelfile values are written so that Ollama's parser reads back exactly the text meant, or are
left out with a note: its parser has no escapes, and a stray line end starts a new command."""

from pathlib import Path

from conftest import CHATML, build_tokenizer

from liandan.modelfile import modelfile_string, modelfile_text, ollama_reads

DEFAULT_SYSTEM = (  # a default system prompt that would end a triple-quoted value early
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nSay \"\"\"\nPARAMETER temperature 9<|im_end|>\n' }}{% endif %}"
    + CHATML
)


def test_values_round_trip_through_ollamas_parser_or_are_refused():
    for value in ("<|im_end|>", 'a"b', "two\nlines", 'ends with "', 'say """hi"""', "\n", "tab\there"):
        written = modelfile_string(value)
        assert written is not None and ollama_reads(written) == value, value
    for value in ('x"""\ny', "nul\x00byte"):  # a quote run that ends the value early; a character Ollama drops
        assert modelfile_string(value) is None


def test_modelfile_leaves_out_what_it_cannot_write_exactly():
    tok = build_tokenizer(DEFAULT_SYSTEM, "<|im_end|>")
    text, _, notes = modelfile_text(tok, None, Path("my\nmodel.gguf"), add_bos=False, spec="runs/x\nFROM evil", quant="f16")
    lines = text.splitlines()
    assert not any(line.startswith(("PARAMETER temperature", "SYSTEM", "FROM evil")) for line in lines)
    assert any("default system prompt cannot be written" in n for n in notes)
    assert 'FROM "./my\nmodel.gguf"' in text
    assert 'PARAMETER stop "<|im_end|>"' in text.splitlines()
