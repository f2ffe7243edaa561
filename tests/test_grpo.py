"""GRPO: the algorithm's numbers by hand, the rewards, the loop on a tiny model, resume, errors."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_jsonl

from liandan.attention import use_training_attention
from liandan.batching import collate_shared_prefixes
from liandan.checks import allowing_code
from liandan.cli import app
from liandan.config import GRPOConfig
from liandan.errors import LiandanError
from liandan.grpo import clipped_token_loss, count_units, group_advantages, reduce_tokens
from liandan.prompts import Prompt
from liandan.rewards import Completion, parse_rewards, score_completions
from liandan.train import train_grpo

# ---------------------------------------------------------------------------------------------
# The algorithm, against numbers worked out by hand


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    # group 1: mean 0.5, deviations +-0.5, sample std sqrt(4 * 0.25 / 3) = 0.577350
    # group 2: every reward equal: deviation 0, so 0 / (0 + 1e-4) = 0 (no signal)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert group_advantages(rewards, 4, "group").tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], abs=1e-6)
    # none (Dr. GRPO): only centred
    assert group_advantages(rewards, 4, "none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # batch: std of all 8 rewards: mean 0.5, four deviations of 0.5 -> sqrt(4 * 0.25 / 7) = 0.377964
    b = 0.5 / (math.sqrt(1 / 7) + 1e-4)
    assert group_advantages(rewards, 4, "batch").tolist() == pytest.approx([b, -b, -b, b, 0, 0, 0, 0], abs=1e-6)


def test_clipped_loss_on_both_sides_of_the_clip():
    # ratios 1.5, 0.5, 1.5, 0.5 (log-prob differences log 1.5, log 0.5), advantages +1, -1, -1, +1
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    out = clipped_token_loss(logp, old, adv, epsilon=0.2, epsilon_high=0.3)
    # 1: A > 0, ratio above 1 + 0.3: min(1.5 * 1, 1.3 * 1) = 1.3 -> loss -1.3, clipped high
    # 2: A < 0, ratio below 1 - 0.2: min(0.5 * -1, 0.8 * -1) = -0.8 -> loss 0.8, clipped low
    # 3: A < 0, ratio 1.5: min(-1.5, -1.3) = -1.5 -> loss 1.5, not clipped (the pessimistic side)
    # 4: A > 0, ratio 0.5: min(0.5, 0.8) = 0.5 -> loss -0.5, not clipped
    assert out["loss"].tolist() == pytest.approx([-1.3, 0.8, 1.5, -0.5], abs=1e-6)
    assert out["clip_high"].tolist() == [1, 0, 0, 0]
    assert out["clip_low"].tolist() == [0, 1, 0, 0]
    out["loss"].sum().backward()
    # d loss / d logp = -ratio * A where unclipped, 0 where clipped
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, 1.5, -0.5], abs=1e-6)


def test_kl_is_the_k3_estimator():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -2.0])
    out = clipped_token_loss(logp, logp, torch.zeros(2), 0.2, 0.2, ref_logp=ref, beta=0.1)
    # d = ref - logp = 0.5: e^0.5 - 0.5 - 1 = 0.148721; d = 0: 0
    assert out["kl"].tolist() == pytest.approx([math.exp(0.5) - 1.5, 0.0], abs=1e-6)
    assert out["loss"].tolist() == pytest.approx([0.1 * (math.exp(0.5) - 1.5), 0.0], abs=1e-6)


def test_each_loss_type_normalises_as_its_paper():
    values, rows = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1])
    ones = torch.ones(3)
    # grpo: per completion mean, summed over completions (the loop divides by 2 completions): 1.5 + 3
    assert float(reduce_tokens(values, rows, ones, 2, "grpo", 4)) == pytest.approx(4.5)
    # dr_grpo: token sum / max_completion_length (then / completions)
    assert float(reduce_tokens(values, rows, ones, 2, "dr_grpo", 4)) == pytest.approx(6 / 4)
    # dapo: token sum (then / tokens)
    assert float(reduce_tokens(values, rows, ones, 2, "dapo", 4)) == pytest.approx(6.0)
    # a masked (truncated) completion adds nothing, and its tokens leave dapo's count
    masked = torch.tensor([1.0, 1.0, 0.0])
    assert float(reduce_tokens(values, rows, masked, 2, "grpo", 4)) == pytest.approx(1.5)
    assert float(reduce_tokens(values, rows, masked, 2, "dapo", 4)) == pytest.approx(3.0)
    batch = {"completion_of": torch.tensor([0, 0, 1]), "keep": torch.tensor([1.0, 0.0])}  # 2 tokens of a kept completion
    assert count_units(batch, "dapo") == 2 and count_units(batch, "grpo") == 2 and count_units(batch, "dr_grpo") == 2


def test_one_iteration_without_clipping_is_the_plain_policy_gradient(chat_model_dir):
    """With pi_old = pi (one iteration) the ratio is 1, so the gradient is -sum_t A grad log pi(y_t)
    / tokens (dapo): computed here from the model's full logits, not through liandan's code."""
    from liandan.grpo import Rollouts, grpo_objective
    from liandan.models import load_model

    model, tok = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    config = GRPOConfig(model=str(chat_model_dir), data=["x.jsonl"], rewards=["stop"], max_length=64, max_completion_length=8)
    objective = grpo_objective(config, Rollouts(config, tok, [], 0, chat_model_dir))
    prompt, completions = [5, 6, 7], [[20, 21, 22], [30, 31]]
    rows = [prompt + c for c in completions]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    targets = torch.full_like(input_ids, -100)
    for i, c in enumerate(completions):
        targets[i, len(prompt) - 1 : len(prompt) - 1 + len(c)] = torch.tensor(c)  # position t predicts token t + 1
    attention = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    adv = torch.tensor([0.7, -1.3])
    batch = {"input_ids": input_ids, "attention_mask": attention, "targets": targets, "advantages": adv, "keep": torch.ones(2),
             "completion_of": torch.tensor([0, 0, 0, 1, 1])}  # fmt: skip
    loss, _ = objective.loss(model, batch)
    (loss / count_units(batch, "dapo")).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # the same with the prompt shared by both completions in one row (liandan's packed attention)
    original = use_training_attention(model, "auto", True, torch.device("cpu"))
    shared = {**collate_shared_prefixes([(prompt, completions)]), "advantages": adv, "keep": torch.ones(2)}
    loss, _ = objective.loss(model, shared)
    (loss / count_units(shared, "dapo")).backward()
    model.set_attn_implementation(original)
    ours_shared = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), -1)  # (B, T, V)
    trained = targets != -100
    token_logp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0][trained]
    row_adv = adv[:, None].expand_as(targets)[trained]
    (-(row_adv * token_logp).sum() / trained.sum()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(ours_shared[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------
# Rewards


def completion(text: str, ids=(1, 2), stopped=True, meta=None, reference=None, checks=None):
    return Completion(prompt=Prompt(text="q", source="p.jsonl:1", meta=meta or {}), text=text, ids=list(ids),
                      stopped=stopped, reference=reference, checks=checks)  # fmt: skip


def test_built_in_rewards(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "required": ["a"]}))
    rewards = parse_rewards([f"schema={schema}", "stop", "max_tokens=2", "regex=^arr", "json"], [1.0, 0.5, 1.0, 1.0, 1.0])
    done = [completion('{"a": 1}', ids=[1, 2]), completion('{"b": 1}', ids=[1, 2, 3], stopped=False), completion("Arr no", ids=[1, 2, 3, 4])]
    total, per = score_completions(rewards, done)
    assert per["schema"] == [1.0, 0.5, 0.0]  # schema-valid, JSON only, not JSON
    assert per["stop"] == [1.0, 0.0, 1.0]
    assert per["max_tokens"] == [1.0, 0.5, 0.0]  # up to 2 tokens: 1; 3 tokens: 2 - 3/2; 4 (= 2N): 0
    assert per["regex"] == [0.0, 0.0, 1.0]
    assert per["json"] == [1.0, 1.0, 0.0]
    assert total == pytest.approx([1 + 0.5 + 1 + 0 + 1, 0.5 + 0 + 0.5 + 0 + 1, 0 + 0.5 + 0 + 1 + 0])


def test_checks_reward_is_the_share_of_the_records_checks_passed(tmp_path):
    from liandan.checks import parse_checks

    checks = parse_checks({"contains": "Paris", "regex": "^The"}, where="p.jsonl:1")
    rewards = parse_rewards(["checks"])
    _, per = score_completions(rewards, [completion("The capital is Paris", checks=checks), completion("Paris", checks=checks),
                                         completion("Rome", checks=checks)])  # fmt: skip
    assert per["checks"] == [1.0, 0.5, 0.0]


def test_python_rewards_get_trl_arguments_and_need_allow_code():
    with pytest.raises(LiandanError, match="--allow-code"):
        parse_rewards(["python=grpo_rewards:echo_columns"])
    with allowing_code():
        rewards = parse_rewards(["python=grpo_rewards:echo_columns"])
    _, per = score_completions(rewards, [completion("it is 42", meta={"answer": 42}), completion("no", meta={"answer": 7})])
    assert per["python:echo_columns"] == [1.0, 0.0]


@pytest.mark.parametrize("specs, weights, message", [
    (["bogus=1"], None, "unknown reward 'bogus'"),
    (["stop", "json"], [1.0], "2 rewards"),
    (["max_tokens=abc"], None, "max_tokens=N"),
    (["schema=missing.json"], None, "does not exist"),
    (["regex=("], None, "not a valid regular expression"),
    (["python=nomodule_here:f"], None, "no module named"),
])  # fmt: skip
def test_bad_reward_specs_are_one_line_errors(specs, weights, message):
    with pytest.raises(LiandanError, match=message) as err:
        parse_rewards(specs, weights)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# The loop on a tiny model


def grpo_config(model, data, out, **kw):
    values = dict(model=str(model), data=[str(data)], output_dir=str(out), max_steps=6, lr=1e-2, max_length=64,
                  max_completion_length=8, mixed_precision="no", warmup_ratio=0.0, num_generations=4, batch_size=4, seed=3)  # fmt: skip
    values.update(kw)
    return GRPOConfig(**values)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say hello {i}"} for i in range(8)])


def test_reward_rises_on_a_toy_task(tmp_path, chat_model_dir, prompts_file):
    """The reward is the share of tokens among 40 of the 400 ids: a random model samples them a
    tenth of the time; full fine-tuning on that reward alone raises it within 20 steps (measured,
    sampling from the whole vocabulary: 0.10 -> 0.72 at lr 3e-2; at lr 1e-2 only 0.10 -> 0.23,
    where top-k 50 had reached 0.55)."""
    with allowing_code():
        train_grpo(grpo_config(chat_model_dir, prompts_file, tmp_path / "run", full=True, max_steps=20, lr=3e-2,
                               rewards=["python=grpo_rewards:target_share"]))  # fmt: skip
    rewards = [m["reward"] for m in metrics(tmp_path / "run")]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.15, rewards
    for key in ("reward/python:target_share", "reward_std", "no_signal_groups", "completion_tokens", "stop_rate",
                "clip_ratio_low", "clip_ratio_high"):  # fmt: skip
        assert key in metrics(tmp_path / "run")[0]
    logged = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 20 * 4 and {"prompt", "completion", "reward", "rewards", "advantage"} <= set(logged[0])


def test_resumed_run_equals_the_uninterrupted_one(tmp_path, chat_model_dir, prompts_file):
    """Two iterations per round (pi_old kept), a KL to the adapters-off reference: stopped after
    round 2 and resumed, the run samples and scores exactly what the uninterrupted one did."""
    from safetensors.torch import load_file

    kw = dict(rewards=["regex=[aeiou]", "stop"], num_iterations=2, beta=0.1, max_steps=8, save_every=2)
    train_grpo(grpo_config(chat_model_dir, prompts_file, tmp_path / "whole", **kw))
    train_grpo(grpo_config(chat_model_dir, prompts_file, tmp_path / "split", **kw), stop_after=4)
    train_grpo(grpo_config(chat_model_dir, prompts_file, tmp_path / "split", **kw), resume=True)
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [m["step"] for m in split] == list(range(1, 9))
    assert [m["reward"] for m in split] == [m["reward"] for m in whole]
    assert [m["loss"] for m in split] == pytest.approx([m["loss"] for m in whole], abs=1e-6)
    assert all("kl" in m for m in whole) and any(m["kl"] > 0 for m in whole)
    a, b = load_file(tmp_path / "whole" / "adapter_model.safetensors"), load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_shared_prompt_rows_train_as_padded_rows_do(tmp_path, chat_model_dir, prompts_file, full):
    """On a CPU each prompt is in the micro-batch once, shared by its completions (liandan's
    packed attention); with the model's own attention (``attention: sdpa``) the rows are padded.
    Both runs sample the same completions and follow the same losses and KL, with the reference
    as the adapters-off policy (LoRA) or a frozen copy (full)."""
    kw = dict(rewards=["regex=[aeiou]", "stop"], beta=0.1, num_iterations=2, max_steps=4, full=full, lr=1e-3)
    one = train_grpo(grpo_config(chat_model_dir, prompts_file, tmp_path / "shared", **kw))
    other = train_grpo(grpo_config(chat_model_dir, prompts_file, tmp_path / "padded", attention="sdpa", **kw))
    shared, padded = metrics(tmp_path / "shared"), metrics(tmp_path / "padded")
    assert [m["reward"] for m in shared] == [m["reward"] for m in padded]
    assert [m["completion_tokens"] for m in shared] == [m["completion_tokens"] for m in padded]
    for key in ("loss", "kl", "grad_norm"):
        assert [m[key] for m in shared] == pytest.approx([m[key] for m in padded], rel=1e-4, abs=1e-7), key
    assert any(m["kl"] > 0 for m in shared)
    # the shared rows hold fewer tokens: each prompt once instead of once per completion
    assert one.tokens < other.tokens


def test_second_iteration_is_clipped_against_the_sampling_policy(tmp_path, chat_model_dir, prompts_file):
    """With num_iterations 2 the first step of a round has ratio 1 (no clip); the second has moved
    away from pi_old, and with a tiny epsilon its tokens are clipped."""
    with allowing_code():
        train_grpo(grpo_config(chat_model_dir, prompts_file, tmp_path / "run", rewards=["python=grpo_rewards:target_share"],
                               num_iterations=2, max_steps=4, epsilon=1e-4, epsilon_high=1e-4, lr=5e-2))  # fmt: skip
    m = metrics(tmp_path / "run")
    assert m[0]["clip_ratio_low"] == 0 and m[0]["clip_ratio_high"] == 0
    assert m[1]["clip_ratio_low"] + m[1]["clip_ratio_high"] > 0
    assert "rollout_seconds" in m[0] and "rollout_seconds" not in m[1]  # step 2 reuses step 1's samples
    assert m[1]["reward"] == m[0]["reward"]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_prompt_records_are_checked_before_training(tmp_path, chat_model_dir):
    no_checks = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "checks": {"contains": "x"}}, {"prompt": "ho"}])
    with pytest.raises(LiandanError, match=r"a.jsonl:2: field 'checks'"):
        train_grpo(grpo_config(chat_model_dir, no_checks, tmp_path / "r1", rewards=["checks"]))
    no_ref = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "hi"}])
    with pytest.raises(LiandanError, match=r"b.jsonl:1: field 'reference'"):
        train_grpo(grpo_config(chat_model_dir, no_ref, tmp_path / "r2", rewards=["reference=exact"]))
    long = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "hello " * 80}])
    with pytest.raises(LiandanError, match=r"c.jsonl:1: field 'prompt': \d+ tokens, more than max_length"):
        train_grpo(grpo_config(chat_model_dir, long, tmp_path / "r3", rewards=["stop"]))
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"prompt": 3}\n')
    with pytest.raises(LiandanError, match=r"d.jsonl:2: field 'prompt'"):
        train_grpo(grpo_config(chat_model_dir, bad, tmp_path / "r4", rewards=["stop"]))


@pytest.mark.parametrize("setting, message", [
    ({"num_generations": 1}, "num_generations must be at least 2"),
    ({"temperature": 0.0}, "temperature must be above 0"),
    ({"loss_type": "ppo"}, "loss_type must be grpo, dr_grpo, dapo"),
    ({"scale_rewards": "std"}, "scale_rewards must be group, batch, none"),
    ({"max_completion_length": 64}, "must be below max_length"),
    ({"eval_fraction": 0.1}, "liandan eval --task"),
])  # fmt: skip
def test_grpo_settings_are_checked(setting, message):
    with pytest.raises(LiandanError, match=message):
        GRPOConfig(**{"max_length": 64 if "max_completion_length" in setting else 256, **setting})


def test_cli_grpo_runs_and_refuses_code_without_the_flag(tmp_path, chat_model_dir, prompts_file):
    runner = CliRunner()
    base = ["grpo", "--model", str(chat_model_dir), "--data", str(prompts_file), "--set", "max_steps=2",
            "--set", "max_length=64", "--set", "max_completion_length=6", "--set", "mixed_precision=no"]  # fmt: skip
    refused = runner.invoke(app, [*base, "--reward", "python=grpo_rewards:target_share", "-o", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "--allow-code" in refused.output
    assert not (tmp_path / "a").exists()
    done = runner.invoke(app, [*base, "--reward", "regex=[aeiou]", "--reward", "stop", "-o", str(tmp_path / "b")])
    assert done.exit_code == 0, done.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [r["name"] for r in manifest["grpo"]["rewards"]] == ["regex", "stop"]


def test_the_shipped_example_reads(chat_model_dir):
    """examples/grpo-onesent.yaml: its 190 prompts each carry the one-sentence check its rewards read."""
    from liandan.config import load_config
    from liandan.grpo import read_grpo_prompts
    from liandan.models import load_model
    from liandan.prompts import shipped_example

    config = load_config(GRPOConfig, shipped_example("grpo-onesent.yaml"))
    config.data = [str(shipped_example("prefs/train_prompts.jsonl"))]
    _, tok = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    rewards = parse_rewards(config.rewards, config.reward_weights)
    items = read_grpo_prompts(config.data, tok, config, rewards)
    assert len(items) == 190 and all(item["record"].checks for item in items)
    _, per = score_completions(rewards, [completion("Ice floats because it is less dense than water.", checks=items[0]["record"].checks)])
    assert per == {"checks": [1.0], "stop": [1.0], "max_tokens": [1.0]}


def test_a_tool_call_check_is_refused_as_a_reward_before_any_step(tmp_path, chat_model_dir):
    """GRPO does not read calls back from completions yet: a record checked by tool_call is refused
    when the prompts are read, and tool_call is no reward name."""
    from liandan.grpo import read_grpo_prompts
    from liandan.models import load_model

    record = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "checks": {"tool_call": "exact"},
              "tools": [{"type": "function", "function": {"name": "get_weather"}}]}  # fmt: skip
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n")
    _, tok = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    config = GRPOConfig(model=str(chat_model_dir), data=[str(path)], rewards=["checks"], max_length=256, max_completion_length=8)
    with pytest.raises(LiandanError, match=r"p\.jsonl:1: field 'checks': tool_call is an evaluation check"):
        read_grpo_prompts(config.data, tok, config, parse_rewards(config.rewards))
    with pytest.raises(LiandanError):
        parse_rewards(["tool_call=exact"])


def test_full_grpo_keeps_its_frozen_reference_on_the_runs_device(tmp_path, chat_model_dir, prompts_file, monkeypatch):
    """Full fine-tuning with beta > 0 copies the starting model as the reference: the copy goes
    where the run trains ('meta' stands for a GPU here), not left on the CPU it loaded on, where
    its log-probs would meet the batches of another device."""
    from liandan import prepare

    kept = {}

    class Capture(prepare.Rollouts):
        def __init__(self, *args, reference=None, **kwargs):
            kept["reference"] = reference
            super().__init__(*args, reference=reference, **kwargs)

    monkeypatch.setattr(prepare, "Rollouts", Capture)
    config = grpo_config(chat_model_dir, prompts_file, tmp_path / "run", full=True, beta=0.1, rewards=["stop"])
    prepare.prepare_grpo(config, tmp_path / "run", main_process=True, resume=False, device=torch.device("meta"))
    assert {p.device.type for p in kept["reference"].parameters()} == {"meta"}
