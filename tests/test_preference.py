import math

import pytest
import torch

from conftest import write_jsonl

from liandan.errors import LiandanError
from liandan.losses import dpo_loss, token_nll
from liandan.preference import read_pairs


def test_reply_logp_by_hand():
    # a reply's log-prob is minus the sum of its tokens' losses. Hidden states e1, e2 through the
    # head W give logits [0, ln 3] -> p(1) = 3/4, and [0, 0] -> p(0) = 1/2
    hidden = torch.eye(2)
    weight = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    nll = token_nll(hidden, weight, torch.tensor([1, 0]))
    assert (-nll.sum()).item() == pytest.approx(math.log(0.75 * 0.5))


def test_dpo_loss_by_hand():
    # h = (pi_w - ref_w) - (pi_l - ref_l) = (-1.0 + 1.5) - (-2.0 + 1.5) = 0.5 + 0.5 = 1.0; beta = 0.1
    args = [torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])]
    loss, chosen, rejected = dpo_loss(*args, beta=0.1)
    # -log sigmoid(0.1) = log(1 + e^-0.1) = log(1.904837) = 0.644397
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
    assert chosen.item() == pytest.approx(0.05) and rejected.item() == pytest.approx(-0.05)
    # conservative DPO, eps = 0.1: 0.9 * 0.644397 + 0.1 * log(1 + e^0.1) = 0.579957 + 0.0744397 = 0.654397
    smoothed, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.654397, abs=1e-6)
    # IPO: (h - 1 / (2 beta))^2 = (1 - 5)^2 = 16
    ipo, _, _ = dpo_loss(*args, beta=0.1, kind="ipo")
    assert ipo.item() == pytest.approx(16.0)


def test_dpo_loss_falls_as_the_margin_grows():
    ref = torch.zeros(3)
    loss, _, _ = dpo_loss(torch.tensor([0.0, 1.0, 5.0]), torch.zeros(3), ref, ref, beta=1.0)
    assert loss[0] > loss[1] > loss[2] and loss[0].item() == pytest.approx(math.log(2))


def test_every_preference_shape_is_read(tmp_path):
    rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": {"role": "assistant", "content": "No."}},
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye."}]},
    ]  # fmt: skip
    pairs = read_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.prompt[-1] for p in pairs] == [{"role": "user", "content": "Hi"}] * 3
    assert pairs[1].prompt[0]["role"] == "system"
    assert [(p.chosen, p.rejected) for p in pairs] == [("Hello!", "Go away."), ("Hello!", "No."), ("Hello!", "Bye.")]
    assert pairs[2].source.endswith("p.jsonl:3")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "Hi", "chosen": "Hello"}, "p.jsonl:1: field 'rejected': missing"),
        ({"prompt": "Hi", "chosen": "Hello", "rejected": " Hello "}, "field 'rejected': is the same as 'chosen'"),
        ({"prompt": "Hi", "chosen": "", "rejected": "No"}, "field 'chosen': expected a non-empty reply"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt': expected a non-empty string"),
        ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
         "field 'chosen.role': expected 'assistant'"),
        ({"prompt": [{"role": "assistant", "content": "Hi"}], "chosen": "a", "rejected": "b"}, "expected the prompt to end with a user turn"),
        ({"chosen": "a", "rejected": "b"}, "field 'prompt': missing"),
        ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
          "rejected": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "b"}]}, "must share every turn"),
    ],
)  # fmt: skip
def test_bad_preference_records(tmp_path, record, message):
    with pytest.raises(LiandanError) as error:
        read_pairs(write_jsonl(tmp_path / "p.jsonl", [record]))
    assert message in str(error.value)
