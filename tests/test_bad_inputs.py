"""The bad-input corpus: each file in tests/bad_inputs/ is a record that must not become wrong
training silently. cases.json gives, per file, the reader it goes through and the exact one-line
error it must raise (``{file}`` stands for its path), or null where it must read cleanly."""

import json
from pathlib import Path

import pytest
from conftest import CHATML, build_tokenizer

from liandan.data import read_examples, read_texts
from liandan.encoding import encode_all, encode_pair, text_blocks
from liandan.errors import LiandanError
from liandan.preference import read_pairs

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = json.loads((CORPUS / "cases.json").read_text(encoding="utf-8"))


def read(reader: str, path: str):
    """Run a file through one reader, and with ``+encode`` through the encoder that follows it
    (the chat template and special tokens are only known there)."""
    tokenizer = build_tokenizer(CHATML, "<|im_end|>") if reader.endswith("+encode") else None
    kind = reader.removesuffix("+encode")
    if kind == "sft":
        examples = read_examples(path).examples
        return encode_all(tokenizer, examples, max_length=256) if tokenizer else examples
    if kind == "dpo":
        pairs = read_pairs(path)
        return [encode_pair(tokenizer, pair, max_length=256) for pair in pairs] if tokenizer else pairs
    documents = read_texts([path])
    return text_blocks(tokenizer, documents, block=16) if tokenizer else documents


def test_every_corpus_file_has_a_case():
    files = {p.name for p in CORPUS.iterdir() if p.name != "cases.json"}
    assert files == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_its_one_line_error(name):
    case, path = CASES[name], str(CORPUS / name)
    if case["error"] is None:
        assert read(case["reader"], path)
        return
    with pytest.raises(LiandanError) as raised:
        read(case["reader"], path)
    message = str(raised.value)
    assert "\n" not in message
    assert message == case["error"].replace("{file}", path)
