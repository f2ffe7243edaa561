import json
import math

import pytest
import torch

from conftest import chat_row, write_jsonl

from liandan.batching import collate, plan_batches
from liandan.config import SFTConfig
from liandan.errors import LiandanError
from liandan.generation import SamplingConfig, generate
from liandan.merge import merge
from liandan.models import load_adapter_model, load_model
from liandan.objectives import micro_batch_loss
from liandan.train import StepStream, train_sft


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(10)])


def config(model_dir, data, out, **overrides):
    values = dict(model=str(model_dir), data=[str(data)], output_dir=str(out), max_steps=6, lr=5e-3,
                  batch_tokens=96, max_length=64, mixed_precision="no", warmup_ratio=0.0, seed=3)  # fmt: skip
    values.update(overrides)
    return SFTConfig(**values)


def test_packed_and_padded_batches_give_the_same_loss(chat_model_dir):
    from liandan.assistant_masks import encode_chat

    model, tok = load_model(str(chat_model_dir), dtype="float32")
    examples = [encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                for q, a in [("hi", "Hello there."), ("What is the capital of France?", "Paris."), ("ok", "Fine, thank you. Let me help.")]]  # fmt: skip
    with torch.no_grad():
        packed_sum, packed_n = micro_batch_loss(model, collate(examples, packing=True, pad_id=tok.pad_token_id))
        padded_sum, padded_n = micro_batch_loss(model, collate(examples, packing=False, pad_id=tok.pad_token_id))
        single = [micro_batch_loss(model, collate([e], packing=True, pad_id=0)) for e in examples]
    assert packed_n == padded_n == sum(n for _, n in single) > 0
    torch.testing.assert_close(packed_sum, padded_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_sum, sum(s for s, _ in single), rtol=1e-5, atol=1e-5)


def test_plan_batches_respects_the_token_budget():
    lengths = [10, 20, 30, 40, 50]
    for packing in (True, False):
        plan = plan_batches(lengths, 60, packing, seed=1)
        assert sorted(i for b in plan for i in b) == [0, 1, 2, 3, 4]
        for batch in plan:
            cost = sum(lengths[i] for i in batch) if packing else len(batch) * max(lengths[i] for i in batch)
            assert cost <= 60 or len(batch) == 1


def test_one_process_with_accumulation_sees_what_two_processes_see():
    cfg = SFTConfig(data=["x"], batch_tokens=64, max_length=32, grad_accum=2)
    one = StepStream([20] * 12, cfg, processes=1, rank=0, packing=cfg.packing)
    cfg2 = SFTConfig(data=["x"], batch_tokens=64, max_length=32, grad_accum=1)
    two = [StepStream([20] * 12, cfg2, processes=2, rank=r, packing=cfg2.packing) for r in (0, 1)]
    for step in range(3):
        assert one.step(step) == two[0].step(step) + two[1].step(step)


@pytest.fixture
def watched(monkeypatch):
    """What `train_sft` prepares, seen from outside: its model, and a copy of every parameter as
    it was before the first step (and whether it was trainable), to compare after training."""
    import liandan.train

    seen = {}
    real_prepare = liandan.train.prepare_sft

    def prepare_and_snapshot(*args, **kwargs):
        run = real_prepare(*args, **kwargs)
        seen["model"] = run.model
        seen["before"] = {name: p.detach().clone() for name, p in run.model.named_parameters()}
        seen["trainable"] = {name for name, p in run.model.named_parameters() if p.requires_grad}
        return run

    monkeypatch.setattr(liandan.train, "prepare_sft", prepare_and_snapshot)
    return seen


def test_loss_falls_and_only_lora_weights_change(tmp_path, chat_model_dir, sft_data, watched):
    result = train_sft(config(chat_model_dir, sft_data, tmp_path / "run", max_steps=25, lr=1e-2, sample_prompts=["What is 3 plus 3?"]))
    assert result.losses[-1] < result.losses[0] * 0.92
    run = tmp_path / "run"
    assert (run / "adapter_model.safetensors").is_file() and (run / "chat_template.jinja").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["method"] == "lora" and manifest["data"]["train_examples"] == 10
    assert manifest["special_tokens"]["stop"] == [2]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 26))
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["What is 3 plus 3?"] and isinstance(samples[0]["stopped"], bool)
    # The model in memory after training against the snapshot taken before its first step
    # (mixed_precision "no": frozen weights are not cast to bf16, so they must be bit-identical).
    before, after = watched["before"], dict(watched["model"].named_parameters())
    assert after.keys() == before.keys()
    lora = {name for name in before if "lora_" in name}
    assert watched["trainable"] == lora and len(lora) == 2 * 7 * 2  # A and B of 7 linear layers, 2 blocks
    frozen = sorted(before.keys() - lora)
    assert "base_model.model.model.embed_tokens.weight" in frozen and "base_model.model.lm_head.weight" in frozen
    for name in frozen:
        assert after[name].dtype == before[name].dtype, name
        assert torch.equal(after[name], before[name]), f"frozen weight changed: {name}"
    for name in sorted(lora):
        assert not torch.equal(after[name], before[name]), f"LoRA weight did not train: {name}"
    # The saved adapter is exactly what trained.
    tuned = load_adapter_model(run)
    saved = {name: p for name, p in tuned.named_parameters() if "lora_" in name}
    assert saved.keys() == lora
    for name, param in saved.items():
        assert torch.equal(param, after[name]), name
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())


def test_accumulation_matches_one_big_batch(tmp_path, chat_model_dir, sft_data):
    from liandan.assistant_masks import encode_chat
    from liandan.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(str(chat_model_dir)))
    lengths = [len(encode_chat(tok, json.loads(line)["messages"])["input_ids"]) for line in sft_data.read_text().splitlines()]
    n_micro = len(plan_batches(lengths, 96, True, seed=3))
    assert n_micro > 1
    # Accumulating every micro-batch of an epoch makes each step the same full-data step as one
    # big batch; dropout off so both runs compute exactly the same thing.
    no_dropout = {"rank": 16, "alpha": 32, "dropout": 0.0}
    accumulated = train_sft(config(chat_model_dir, sft_data, tmp_path / "a", grad_accum=n_micro, max_steps=3, lora=no_dropout)).losses
    one_batch = train_sft(config(chat_model_dir, sft_data, tmp_path / "b", batch_tokens=4096, max_steps=3, lora=no_dropout)).losses
    assert accumulated == pytest.approx(one_batch, rel=1e-4)


def test_a_finished_run_leaves_no_attention_masks_behind(tmp_path, chat_model_dir, sft_data, monkeypatch):
    """The packed attention caches its causal masks while training (a long example's blocks take
    tens of MB each); the process that trained (a notebook, the UI) gets that memory back after."""
    from liandan import attention

    monkeypatch.setattr(attention, "EAGER_MAX", 8)  # long examples, in blocks
    monkeypatch.setattr(attention, "BLOCK_ROWS", 4)
    seen, original = [], attention.causal_attention

    def counting(*args, **kwargs):
        seen.append(attention.causal_bias.cache_info().currsize)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "causal_attention", counting)
    train_sft(config(chat_model_dir, sft_data, tmp_path / "run", max_steps=1))
    assert max(seen) > 0  # masks were cached during the run
    assert attention.causal_bias.cache_info().currsize == 0


def test_resume_reproduces_the_uninterrupted_run(tmp_path, chat_model_dir, sft_data):
    full = train_sft(config(chat_model_dir, sft_data, tmp_path / "full", max_steps=6)).losses
    out = tmp_path / "resumed"
    first = train_sft(config(chat_model_dir, sft_data, out, max_steps=6), stop_after=3).losses
    assert not (out / "adapter_model.safetensors").exists() and (out / "checkpoints").is_dir()
    rest = train_sft(config(chat_model_dir, sft_data, out, max_steps=6), resume=True).losses
    assert first + rest == pytest.approx(full, rel=1e-5)
    with pytest.raises(LiandanError, match="not empty; pass --resume"):
        train_sft(config(chat_model_dir, sft_data, out, max_steps=6))


def test_merged_model_matches_the_adapter(tmp_path, chat_model_dir, sft_data):
    from transformers import AutoModelForCausalLM

    train_sft(config(chat_model_dir, sft_data, tmp_path / "run", max_steps=4))
    merged_dir = merge(tmp_path / "run", tmp_path / "merged")
    adapter = load_adapter_model(tmp_path / "run").eval()  # PEFT, adapters not merged
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)
    tok = load_model(str(tmp_path / "run"), dtype="float32")[1]
    ids = tok("What is 3 plus 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        with adapter.disable_adapter():
            assert not torch.allclose(adapter(ids).logits, plain(ids).logits, atol=1e-3)  # it trained
        torch.testing.assert_close(adapter(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
    greedy = SamplingConfig(max_new_tokens=8)
    for dtype in ("float32", "bfloat16"):  # the run directory and its merge agree at any dtype
        run_model, run_tok = load_model(str(tmp_path / "run"), dtype=dtype)
        merged_model, merged_tok = load_model(str(merged_dir), dtype=dtype)
        with torch.no_grad():
            assert torch.equal(run_model(ids).logits, merged_model(ids).logits)
        assert generate(run_model, run_tok, ["What is 3 plus 3?"], config=greedy)[0].text == generate(merged_model, merged_tok, ["What is 3 plus 3?"], config=greedy)[0].text


def test_base_model_gets_chatml_and_learns_to_stop(tmp_path, base_model_dir, sft_data):
    out = tmp_path / "run"
    train_sft(config(base_model_dir, sft_data, out, max_steps=40, lr=2e-2, full=True, batch_tokens=4096))
    model, tok = load_model(str(out), dtype="float32")
    assert "<|im_start|>" in tok.chat_template
    output = generate(model, tok, ["What is 3 plus 3?"], config=SamplingConfig(max_new_tokens=20))[0]
    assert output.stopped, output.text


def test_two_processes_match_one_with_twice_the_accumulation(tmp_path, chat_model_dir, sft_data):
    """accelerate launch with the shipped examples/accelerate/ddp-cpu.yaml (2 CPU processes, gloo)
    gives the same losses as 1 process, accum 2."""
    import subprocess
    import sys
    from pathlib import Path

    import liandan

    common = ["--model", str(chat_model_dir), "--data", str(sft_data), "--set", "max_steps=3", "--set", "batch_tokens=96",
              "--set", "max_length=64", "--set", "mixed_precision=no", "--set", "lora.dropout=0", "--set", "seed=3"]  # fmt: skip
    recipe = Path(liandan.__file__).parent / "examples" / "accelerate" / "ddp-cpu.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipe), "--main_process_port", "0",
              "-m", "liandan.cli", "sft"]  # fmt: skip
    subprocess.run([*launch, *common, "--output-dir", str(tmp_path / "two")], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "liandan.cli", "sft", *common, "--set", "grad_accum=2", "--output-dir", str(tmp_path / "one")],
                   check=True, capture_output=True, timeout=300)  # fmt: skip

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("two")) == 3
    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)


def test_step_means_divide_by_the_units_or_by_their_subset():
    from liandan.train import step_means

    # 'reward' is a mean over the 3 examples 'kind' counts: 6 / 3; the others per unit of the step (8)
    means = step_means({"reward": 6.0, "kind": 3.0, "kl": 4.0, "other": 1.0, "none": 0.0}, 8,
                       {"reward": "kind", "other": "none"})  # fmt: skip
    assert means["reward"] == 2.0 and means["kind"] == 3 / 8 and means["kl"] == 0.5
    assert math.isnan(means["other"])  # a subset the step does not have: no mean, not a division by zero
