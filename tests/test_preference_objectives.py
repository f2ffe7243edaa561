"""ORPO, SimPO and KTO: the losses against numbers worked out by hand, the objectives against
log-probs computed here from the tiny model's full logits, no reference pass for the
reference-free losses, KTO's unpaired data and its errors, and short training runs."""

import json
import math

import pytest
import torch

from conftest import write_jsonl
from liandan.config import DPOConfig, load_config
from liandan.encoding import add_mismatched_rows, encode_pair, encode_unpaired
from liandan.errors import LiandanError
from liandan.losses import kto_loss, kto_reference_point, log1mexp, orpo_loss, simpo_loss
from liandan.models import load_model
from liandan.objectives import collate_unpaired, kto_objective, reference_free_objective
from liandan.preference import PreferencePair, UnpairedExample, read_unpaired
from liandan.prepare import attach_trainable, prepare_dpo
from liandan.train import train_dpo

T = torch.tensor

# ---------------------------------------------------------------------------------------------
# the losses, by hand


def test_log1mexp_by_hand():
    # log(1 - e^-0.1) = log(0.0951626) = -2.352168; log(1 - e^-2) = log(0.8646647) = -0.145413
    got = log1mexp(T([-0.1, -2.0, -1e-10, -50.0], dtype=torch.float64))
    assert got[:2].tolist() == pytest.approx([-2.352168, -0.145413], abs=1e-6)
    # near 0: 1 - e^-1e-10 = 1e-10, log = -23.025851 (1 - exp() alone would round to 0 and give -inf)
    assert got[2].item() == pytest.approx(-23.025851, abs=1e-5)
    # far below 0: log(1 - e^-50) = -e^-50, which is 0 to double precision
    assert got[3].item() == pytest.approx(0.0, abs=1e-20)


def test_orpo_loss_by_hand():
    # pair 1: P(y_w) = 0.5, odds 0.5 / 0.5 = 1, log odds 0; P(y_l) = 0.2, odds 0.2 / 0.8 = 0.25, log odds -1.386294
    #   log odds ratio 1.386294, sigma = 1 / (1 + 0.25) = 0.8, log 0.8 = -0.223144
    #   L = -log 0.5 - 0.1 * (-0.223144) = 0.693147 + 0.0223144 = 0.715461
    # pair 2: P(y_w) = 0.25, odds 1/3, log odds -1.098612; P(y_l) = 0.5, log odds 0
    #   log odds ratio -1.098612, sigma = 1 / (1 + 3) = 0.25, log 0.25 = -1.386294
    #   L = -log 0.25 + 0.1 * 1.386294 = 1.386294 + 0.138629 = 1.524924
    chosen, rejected = T([math.log(0.5), math.log(0.25)]), T([math.log(0.2), math.log(0.5)])
    loss, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, beta=0.1)
    assert loss.tolist() == pytest.approx([0.715461, 1.524924], abs=1e-5)
    # rewards: beta * average log-prob
    assert chosen_rewards.tolist() == pytest.approx([0.1 * -0.693147, 0.1 * -1.386294], abs=1e-6)
    assert rejected_rewards.tolist() == pytest.approx([0.1 * -1.609438, 0.1 * -0.693147], abs=1e-6)


def test_orpo_loss_stays_finite_at_probability_one():
    chosen = T([0.0, -0.5], requires_grad=True)
    loss, _, _ = orpo_loss(chosen, T([-1.0, -1.0]), beta=0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(chosen.grad).all()


def test_simpo_loss_by_hand():
    # average log-probs -0.5 (chosen) and -1.0 (rejected), beta 2: rewards -1.0 and -2.0
    chosen, rejected = T([-0.5]), T([-1.0])
    # gamma 1: m = -1 - (-2) - 1 = 0, L = -log sigma(0) = log 2 = 0.693147
    loss, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(0.693147, abs=1e-6)
    assert (chosen_rewards.item(), rejected_rewards.item()) == (-1.0, -2.0)
    # gamma 0.5: m = 0.5, L = log(1 + e^-0.5) = log(1.606531) = 0.474077
    assert simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)[0].item() == pytest.approx(0.474077, abs=1e-6)
    # with label smoothing 0.1: 0.9 * 0.474077 + 0.1 * log(1 + e^0.5) = 0.426669 + 0.1 * 0.974077 = 0.524077
    smoothed = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5, label_smoothing=0.1)[0]
    assert smoothed.item() == pytest.approx(0.524077, abs=1e-6)


def test_kto_loss_by_hand():
    # beta 1: rewards r = log pi - log ref = -1.0 + 1.5 = 0.5 (desirable) and -2.0 + 1.5 = -0.5 (undesirable); z0 = 0.5
    policy, ref, desirable, kl = T([-1.0, -2.0]), T([-1.5, -1.5]), T([True, False]), T(0.5)
    loss, rewards = kto_loss(policy, ref, desirable, kl, beta=1.0)
    # desirable: 1 - sigma(0.5 - 0.5) = 0.5; undesirable: 1 - sigma(0.5 - (-0.5)) = 1 - sigma(1) = 1 - 0.731059 = 0.268941
    assert loss.tolist() == pytest.approx([0.5, 0.268941], abs=1e-6)
    assert rewards.tolist() == [0.5, -0.5]
    # weights w_D = 2, w_U = 0.5: 1.0 and 0.134471
    weighted, _ = kto_loss(policy, ref, desirable, kl, beta=1.0, desirable_weight=2.0, undesirable_weight=0.5)
    assert weighted.tolist() == pytest.approx([1.0, 0.134471], abs=1e-6)
    # beta 0.5 scales both the reward and z0: desirable 1 - sigma(0.25 - 0.25) = 0.5,
    # undesirable 1 - sigma(0.25 + 0.25) = 1 - 0.622459 = 0.377541
    assert kto_loss(policy, ref, desirable, kl, beta=0.5)[0].tolist() == pytest.approx([0.5, 0.377541], abs=1e-6)


def test_kto_reference_point_by_hand():
    # log-ratios of the mismatched rows: -3 + 2.5 = -0.5 and -1 + 2 = 1.0; mean 0.25
    policy = T([-3.0, -1.0], requires_grad=True)
    z0 = kto_reference_point(policy, T([-2.5, -2.0]))
    assert z0.item() == pytest.approx(0.25) and not z0.requires_grad  # no gradient through z0
    # a negative estimate (mean -1) is clamped at 0
    assert kto_reference_point(T([-3.0, -3.0]), T([-2.0, -2.0])).item() == 0.0


# ---------------------------------------------------------------------------------------------
# the objectives on the tiny model

PAIRS = [
    PreferencePair([{"role": "user", "content": "Is 1 a number?"}], "Yes, it is.", "I am fine, thank you.", "t:1"),
    PreferencePair([{"role": "user", "content": "What is the capital of France?"}], "Paris.", "The quick brown fox.", "t:2"),
]
UNPAIRED = [
    UnpairedExample([{"role": "user", "content": "Is 1 a number?"}], "Yes, it is.", True, "u:1"),
    UnpairedExample([{"role": "user", "content": "What is the capital of France?"}], "The quick brown fox.", False, "u:2"),
    UnpairedExample([{"role": "user", "content": "hi"}], "Hello world!", True, "u:3"),
]


@pytest.fixture
def policy(chat_model_dir):
    """LoRA with lora_B moved off its zero start, so the policy differs from the reference."""
    model, tok = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    model = attach_trainable(model, DPOConfig(), [])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.3)
    return model, tok


def row_logp(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed log-prob of the labelled tokens and their count, from the full logits of one
    unpadded sequence (token j is predicted at position j - 1)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=T([ids])).logits[0].float(), dim=-1)  # (T, V)
    scored = [j for j in range(1, len(ids)) if labels[j] != -100]
    return float(sum(logp[j - 1, ids[j]] for j in scored)), len(scored)


def mean_logps(model, pairs: list[dict], side: str) -> torch.Tensor:
    return T([s / n for s, n in (row_logp(model, p[side]["input_ids"], p[side]["labels"]) for p in pairs)])


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_reference_free_loss_from_the_policys_own_log_probs(policy, kind):
    model, tok = policy
    pairs = [encode_pair(tok, p, 256) for p in PAIRS]
    beta, gamma = 0.5, 0.3
    objective = reference_free_objective(tok.pad_token_id, kind, beta, gamma, label_smoothing=0.0, sft_weight=0.0)
    assert (objective.name, objective.packing) == (kind, False)
    with torch.no_grad():
        loss, stats = objective.loss(model, objective.collate(pairs))
    w, l = mean_logps(model, pairs, "chosen"), mean_logps(model, pairs, "rejected")
    if kind == "orpo":  # written out from the paper, not through liandan.losses
        odds = lambda p: p - torch.log(1 - torch.exp(p))
        expected = -w - beta * torch.nn.functional.logsigmoid(odds(w) - odds(l))
    else:
        expected = -torch.nn.functional.logsigmoid(beta * w - beta * l - gamma)
    torch.testing.assert_close(loss, expected.sum(), rtol=1e-4, atol=1e-5)
    assert stats["reward_chosen"].item() == pytest.approx(float(beta * w.sum()), rel=1e-4)
    # the same numbers from the base model (what a reference would give) are different
    with model.disable_adapter():
        base_w = mean_logps(model, pairs, "chosen")
    assert (base_w - w).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_reference_free_losses_run_one_forward_and_no_reference(policy, kind, monkeypatch):
    model, tok = policy
    objective = reference_free_objective(tok.pad_token_id, kind, 0.5, 0.3, label_smoothing=0.0, sft_weight=0.0)
    batch = objective.collate([encode_pair(tok, p, 256) for p in PAIRS])
    calls = []
    model.get_base_model().model.register_forward_pre_hook(lambda *_: calls.append(1))

    def no_reference():
        raise AssertionError("a reference-free loss switched the adapters off")

    monkeypatch.setattr(model, "disable_adapter", no_reference)
    loss, _ = objective.loss(model, batch)
    loss.backward()
    assert len(calls) == 1  # chosen and rejected rows in one pass, nothing else


def test_add_mismatched_rows_by_hand():
    items = [
        {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4], "desirable": True},
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "desirable": False},
        {"input_ids": [1, 2, 9], "labels": [-100, -100, 9], "desirable": True},
    ]
    add_mismatched_rows(items, max_length=3)
    # 0: its completion [3, 4] after the next prompt, [5]
    assert (items[0]["kl_input_ids"], items[0]["kl_labels"]) == ([5, 3, 4], [-100, 3, 4])
    # 1: [6, 7] after [1, 2], cut to max_length 3
    assert (items[1]["kl_input_ids"], items[1]["kl_labels"]) == ([1, 2, 6], [-100, -100, 6])
    # 2: the next prompt (item 0's) is its own, so the one after: [9] after [5]
    assert (items[2]["kl_input_ids"], items[2]["kl_labels"]) == ([5, 9], [-100, 9])
    assert [item["length"] for item in items] == [8, 6, 6]  # twice the longer of the two rows


def test_kto_loss_from_independent_log_probs(policy, chat_model_dir):
    model, tok = policy
    items = add_mismatched_rows([encode_unpaired(tok, e, 256) for e in UNPAIRED], 256)
    beta = 0.5
    objective = kto_objective(tok.pad_token_id, beta, desirable_weight=1.5, undesirable_weight=1.0)
    batch = objective.collate(items)
    assert objective.count(batch) == 3 and batch["input_ids"].shape[0] == 6
    loss, stats = objective.loss(model, batch)

    base, _ = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    own = lambda m: T([row_logp(m, e["input_ids"], e["labels"])[0] for e in items])
    mismatched = lambda m: T([row_logp(m, e["kl_input_ids"], e["kl_labels"])[0] for e in items])
    z0 = max(float((mismatched(model) - mismatched(base)).mean()), 0.0)
    r = beta * (own(model) - own(base))
    sigma = torch.sigmoid
    expected = T([1.5 * (1 - sigma(r[0] - beta * z0)), 1 - sigma(beta * z0 - r[1]), 1.5 * (1 - sigma(r[2] - beta * z0))])
    torch.testing.assert_close(loss, expected.sum(), rtol=1e-4, atol=1e-5)
    assert stats["kl"].item() == pytest.approx(3 * z0, abs=1e-4)
    assert stats["reward_desirable"].item() == pytest.approx(float(r[0] + r[2]), abs=1e-4)
    assert stats["reward_undesirable"].item() == pytest.approx(float(r[1]), abs=1e-4)
    assert stats["desirable"].item() == 2.0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)


def test_collate_unpaired_puts_own_rows_first():
    items = [{"input_ids": [1, 2], "labels": [-100, 2], "kl_input_ids": [3, 2], "kl_labels": [-100, 2], "desirable": True,
              "ref_logps": (-1.0, -2.0)},
             {"input_ids": [4, 5, 6], "labels": [-100, 5, 6], "kl_input_ids": [1, 5, 6], "kl_labels": [-100, 5, 6],
              "desirable": False, "ref_logps": (-3.0, -4.0)}]  # fmt: skip
    batch = collate_unpaired(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [4, 5, 6], [3, 2, 0], [1, 5, 6]]
    assert batch["desirable"].tolist() == [True, False]
    assert batch["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]


# ---------------------------------------------------------------------------------------------
# KTO data


def test_read_unpaired_takes_unpaired_and_paired_records(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [
        {"prompt": "hi", "completion": "Hello!", "label": True},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "Go away."}], "label": False},
        {"prompt": "Is 1 a number?", "chosen": "Yes.", "rejected": "No."},
    ])  # fmt: skip
    got = [(e.prompt[-1]["content"], e.completion, e.desirable, e.source) for e in read_unpaired(path)]
    assert got == [("hi", "Hello!", True, f"{path}:1"), ("hi", "Go away.", False, f"{path}:2"),
                   ("Is 1 a number?", "Yes.", True, f"{path}:3"), ("Is 1 a number?", "No.", False, f"{path}:3")]  # fmt: skip


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "hi", "completion": "Hello!"}, "k.jsonl:2: field 'label': missing"),
        ({"prompt": "hi", "completion": "Hello!", "label": "yes"}, "k.jsonl:2: field 'label': expected true (desirable) or false (undesirable); got 'yes'"),
        ({"prompt": "hi", "completion": "Hello!", "label": 1}, "k.jsonl:2: field 'label': expected true (desirable) or false (undesirable); got 1"),
        ({"prompt": "hi", "completion": " ", "label": True}, "k.jsonl:2: field 'completion': expected a non-empty reply; got ' '"),
        ({"completion": "Hello!", "label": True}, "k.jsonl:2: field 'prompt': missing"),
    ],
    ids=["no-label", "label-string", "label-number", "empty-completion", "no-prompt"],
)
def test_kto_data_errors_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "ok", "completion": "Fine.", "label": True}, record])
    with pytest.raises(LiandanError) as info:
        read_unpaired(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


# ---------------------------------------------------------------------------------------------
# settings


def test_new_losses_settings_are_checked():
    assert (DPOConfig().beta, DPOConfig(loss="simpo").beta, DPOConfig(loss="orpo").beta, DPOConfig(loss="kto").beta) == (0.1, 2.0, 0.1, 0.1)
    assert DPOConfig(loss="simpo", beta=2.5).beta == 2.5  # a beta given is kept
    refused = [
        (dict(loss="hinge"), "loss must be sigmoid, ipo, orpo, simpo or kto (got 'hinge')"),
        (dict(loss="orpo", sft_weight=0.5), "sft_weight is not used with loss=orpo (its loss already trains the chosen reply's NLL)"),
        (dict(loss="kto", sft_weight=0.5), "sft_weight is not used with loss=kto"),
        (dict(loss="ipo", label_smoothing=0.1), "label_smoothing is used by loss sigmoid and simpo only (got loss=ipo)"),
        (dict(loss="orpo", label_smoothing=0.1), "label_smoothing is used by loss sigmoid and simpo only (got loss=orpo)"),
        (dict(loss="simpo", simpo_gamma=-1.0), "simpo_gamma must be a finite number, 0 or more (got -1.0)"),
        (dict(loss="sigmoid", simpo_gamma=0.5), "simpo_gamma is used by loss simpo only (got loss=sigmoid)"),
        (dict(loss="kto", desirable_weight=0.0), "desirable_weight and undesirable_weight must be above 0 (got 0.0 and 1.0)"),
        (dict(loss="simpo", undesirable_weight=2.0), "desirable_weight and undesirable_weight are used by loss kto only (got loss=simpo)"),
    ]
    for values, message in refused:
        with pytest.raises(LiandanError) as info:
            DPOConfig(**values)
        assert str(info.value) == message
    config = load_config(DPOConfig, None, ["loss=kto", "desirable_weight=1.33", "undesirable_weight=1"])
    assert (config.desirable_weight, config.undesirable_weight) == (1.33, 1.0)


# ---------------------------------------------------------------------------------------------
# training


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Is {i} a number?", "chosen": "Yes, it is.", "rejected": "I am fine, thank you."} for i in range(8)
    ])  # fmt: skip


@pytest.fixture
def held_out(tmp_path):
    return write_jsonl(tmp_path / "held.jsonl", [
        {"prompt": f"Is {i} a number?", "chosen": "Yes, it is.", "rejected": "I am fine, thank you."} for i in range(20, 24)
    ])  # fmt: skip


def run_config(model, data, out, **kw):
    values = dict(model=str(model), data=[str(data)], output_dir=str(out), max_steps=10, lr=5e-3, batch_tokens=2048,
                  max_length=64, mixed_precision="no", warmup_ratio=0.0, seed=1, eval_every=1)  # fmt: skip
    values.update(kw)
    return DPOConfig(**values)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_reference_free_training_raises_held_out_margin(tmp_path, chat_model_dir, pairs_file, held_out, kind):
    out = tmp_path / kind
    result = train_dpo(run_config(chat_model_dir, pairs_file, out, loss=kind, eval_data=[str(held_out)]))
    records = metrics(out)
    assert result.losses[-1] < result.losses[0]
    # the tiny random model already prefers the chosen reply a little: the margin must grow
    assert records[-1]["eval_margin"] > 2 * records[0]["eval_margin"] > 0 and records[-1]["eval_accuracy"] == 1.0
    assert records[-1]["eval_reward_chosen"] > records[0]["eval_reward_chosen"]  # the chosen reply more likely
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dpo"]["loss"] == kind and manifest["dpo"]["reference"] == "none (reference-free)"
    if kind == "simpo":
        assert (manifest["dpo"]["beta"], manifest["dpo"]["simpo_gamma"]) == (2.0, 1.0)


def test_full_fine_tuning_with_orpo_precomputes_nothing(tmp_path, chat_model_dir, pairs_file):
    config = run_config(chat_model_dir, pairs_file, tmp_path / "r", loss="orpo", full=True)
    run = prepare_dpo(config, tmp_path / "r", main_process=True, resume=False)
    assert run.train and not any("ref_logps" in pair for pair in run.train)
    assert run.manifest["dpo"]["reference"] == "none (reference-free)"


def test_kto_training_separates_desirable_from_undesirable(tmp_path, chat_model_dir):
    rows = [{"prompt": f"Is {i} a number?", "completion": "Yes, it is." if i % 2 else "I am fine, thank you.", "label": bool(i % 2)}
            for i in range(8)]  # fmt: skip
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"Is {i} a number?", "chosen": "Yes, it is.", "rejected": "I am fine, thank you."} for i in range(20, 23)])
    out = tmp_path / "kto"
    result = train_dpo(run_config(chat_model_dir, data, out, loss="kto", eval_data=[str(held)]))
    records = metrics(out)
    assert {"reward_desirable", "reward_undesirable", "desirable", "kl", "accuracy", "examples"} <= set(records[0])
    assert records[0]["examples"] == 8 and records[0]["desirable"] == 0.5 and records[0]["undesirable"] == 0.5
    assert result.losses[-1] < result.losses[0]
    evals = [r for r in records if "eval_loss" in r]
    # each kind's mean reward (over its own examples: 3 of the 6 held out)
    margin = lambda r: r["eval_reward_desirable"] - r["eval_reward_undesirable"]
    assert margin(evals[-1]) > margin(evals[0]) and margin(evals[-1]) > 0 and evals[-1]["eval_accuracy"] > 0.5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["train_examples"] == 8 and manifest["data"]["eval_examples"] == 6
    assert manifest["dpo"]["reference"] == "the policy with adapters disabled" and manifest["dpo"]["desirable_weight"] == 1.0


def test_full_kto_precomputes_both_rows(tmp_path, chat_model_dir, pairs_file):
    config = run_config(chat_model_dir, pairs_file, tmp_path / "r", loss="kto", full=True)
    run = prepare_dpo(config, tmp_path / "r", main_process=True, resume=False)
    assert len(run.train) == 16  # 8 pairs: a desirable and an undesirable example each
    base, _ = load_model(str(chat_model_dir), dtype="float32")
    item = run.train[0]
    expected = (row_logp(base, item["input_ids"], item["labels"])[0], row_logp(base, item["kl_input_ids"], item["kl_labels"])[0])
    assert item["ref_logps"] == pytest.approx(expected, rel=1e-5)
    assert item["kl_input_ids"] != item["input_ids"]  # another pair's prompt, not its own
