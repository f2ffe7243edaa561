"""`sample_groups` computes for every row what transformers' ``generate`` computes for it.

For each family of `families.FAMILIES` (sliding windows of 8 tokens, soft-caps, q/k norms,
fused projections, experts): greedy rows of three prompts of different lengths (so the left
padding matters) equal ``generate`` on each prompt alone, with a stop token chosen at test time
so that some rows stop early and the batch narrows while the others run on; every row of a group
equals its prompt's greedy output; top-k 1 sampling is greedy; a seed repeats its samples; a
LoRA model (adapters on) matches ``generate`` on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from peft import LoraConfig, get_peft_model

from families import FAMILIES, build_family_dir
from liandan import group_sampling
from liandan.attention import own_model
from liandan.generation import SamplingConfig, _generate_batch, count_until_stop, prompt_ids
from liandan.group_sampling import sample_groups
from liandan.models import load_model
from liandan.prompts import prompts_from_strings

NEW = 12
# Raw text, so that the prompts end differently: tiny random Qwen and Gemma 2 models continue every
# chat prompt alike (it ends "assistant\n"), and no stop token could then end one row but not another.
TEXTS = ["Paris is the capital of", "请将这段话翻译成英文。我想",
         "The quick brown fox jumps over the lazy dog, does it not? Is this a tiny test?"]  # fmt: skip
GREEDY = SamplingConfig(max_new_tokens=NEW, temperature=0)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model, tokenizer = load_model(str(build_family_dir(tmp_path_factory.mktemp(request.param), request.param)), dtype="float32")
    prompts = [prompt_ids(tokenizer, p, "raw", None) for p in prompts_from_strings(TEXTS)]
    assert len({len(p) for p in prompts}) == 3
    return model, tokenizer, prompts


def generate_alone(model, tokenizer, prompt: list[int], stops: list[int], config: SamplingConfig = GREEDY) -> list[int]:
    """``generate`` on one prompt (no padding), cut after its first stop token."""
    new_ids = _generate_batch(model, tokenizer, [prompt], config, stops)[0][0]
    return new_ids[: count_until_stop(new_ids, stops)[0]]


def early_stop(model, tokenizer, prompts) -> list[int]:
    """A stop token that greedy decoding produces early in one prompt's output (midway if it can)
    and never in another's, so with it one row stops early while another runs to ``NEW`` tokens."""
    free = [generate_alone(model, tokenizer, p, []) for p in prompts]
    candidates = [(out.index(token) == 0, token) for out in free for token in set(out[: NEW - 1])
                  if any(token not in other for other in free)]  # fmt: skip
    if not candidates:
        pytest.fail(f"no token stops one greedy output early but not another: {free}")
    return [min(candidates)[1], tokenizer.eos_token_id]


@contextmanager
def batch_sizes(model) -> Iterator[list[int]]:
    """The batch size of every forward of ``model`` inside the block (prefill first)."""
    sizes: list[int] = []
    hook = own_model(model).register_forward_pre_hook(lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                                      with_kwargs=True)  # fmt: skip
    try:
        yield sizes
    finally:
        hook.remove()


class _Stub:
    """Only what `unsupported_reason` reads of a model: its config and forward's arguments."""

    def __init__(self, config):
        self.config = config

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None): ...


def test_greedy_rows_are_what_generate_gives_each_prompt(family):
    model, tokenizer, prompts = family
    stops = early_stop(model, tokenizer, prompts)
    expected = [generate_alone(model, tokenizer, p, stops) for p in prompts]
    lengths = [len(e) for e in expected]
    assert min(lengths) < NEW and max(lengths) == NEW, lengths  # the batch must narrow, and keep going
    pad = tokenizer.pad_token_id

    for group in (1, 3):
        with batch_sizes(model) as sizes:
            assert sample_groups(model, prompts, group, GREEDY, stops, pad) == [e for e in expected for _ in range(group)]
        # One prefill of the 3 prompts; then decode step k runs only the rows not yet stopped.
        live = [group * sum(n > k for n in lengths) for k in range(1, NEW)]
        assert sizes == [3] + live, group

    penalised = SamplingConfig(max_new_tokens=NEW, temperature=0, repetition_penalty=1.5)
    expected = [generate_alone(model, tokenizer, p, stops, penalised) for p in prompts]
    assert sample_groups(model, prompts, 2, penalised, stops, pad) == [e for e in expected for _ in range(2)]


def test_sampling_is_seeded_and_top_k_one_is_greedy(family):
    model, tokenizer, prompts = family
    stops, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    greedy = sample_groups(model, prompts, 2, GREEDY, stops, pad)
    assert sample_groups(model, prompts, 2, SamplingConfig(max_new_tokens=NEW, temperature=1.0, top_k=1), stops, pad) == greedy

    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0)
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(sample_groups(model, prompts, 3, sampling, stops, pad))
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]
    assert len(draws[0]) == 9 and len({tuple(row) for row in draws[0]}) > 3  # a group's samples differ


def test_lora_model_samples_with_its_adapters(family):
    model, tokenizer, prompts = family
    stops, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    try:
        with torch.no_grad():
            for name, parameter in lora.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.5)
            ids = torch.tensor([prompts[0]])
            adapted = lora(input_ids=ids).logits
            with lora.disable_adapter():
                assert not torch.allclose(adapted, lora(input_ids=ids).logits)  # the adapters change the model
        assert sample_groups(lora, prompts, 1, GREEDY, stops, pad) == [generate_alone(lora, tokenizer, p, stops) for p in prompts]
    finally:
        lora.unload()  # the module-scoped model goes back to its own weights


def test_a_cache_it_cannot_regroup_falls_back_to_generate(family, monkeypatch):
    model, tokenizer, prompts = family
    stops, pad = early_stop(model, tokenizer, prompts), tokenizer.pad_token_id
    expected = sample_groups(model, prompts, 2, GREEDY, stops, pad)
    monkeypatch.setattr(group_sampling, "unsupported_reason", lambda *args: "a test")
    assert sample_groups(model, prompts, 2, GREEDY, stops, pad) == expected
    with batch_sizes(model) as sizes:
        top_1 = sample_groups(model, prompts, 2, SamplingConfig(max_new_tokens=NEW, temperature=1.0, top_k=1), stops, pad)
    assert top_1 == expected
    assert sizes[0] == 6 and sizes[-1] == 6  # generate: every prompt prefilled twice, no row dropped


def test_only_layers_of_keys_and_values_are_regrouped():
    from transformers import AutoConfig

    hybrid = AutoConfig.for_model(
        "qwen3_next", hidden_size=64, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]
    )
    reason = group_sampling.unsupported_reason(_Stub(hybrid), [[1, 2]], GREEDY)
    assert reason is not None and "LinearAttention" in reason
