"""Micro-batches from encoded examples (`liandan.batching`): the exact tensors of packed and
padded batches, the positions that need logits, and the plan that groups examples."""

import pytest
import torch

from liandan.assistant_masks import encode_chat
from liandan.batching import collate, plan_batches, trained_positions
from liandan.models import load_model

# two tiny examples written out by hand: the prompt is not trained, the reply is
FIRST = {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]}
SECOND = {"input_ids": [21, 22], "labels": [-100, 22]}


def examples(tok):
    pairs = [("hi", "Hello there."), ("What is the capital of France?", "Paris."), ("ok", "Fine, thank you. Let me help.")]
    return [encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in pairs]


# ---------------------------------------------------------------------------------------------
# collate


def test_packed_collate_by_hand():
    batch = collate([FIRST, SECOND], packing=True, pad_id=99)
    assert set(batch) == {"input_ids", "position_ids", "targets", "cu_seq_lens_q"}
    assert torch.equal(batch["input_ids"], torch.tensor([[11, 12, 13, 21, 22]]))
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2, 0, 1]]))
    # each example's last token predicts nothing: 13 must not be asked to predict 21
    assert torch.equal(batch["targets"], torch.tensor([[12, 13, -100, 22, -100]]))
    assert torch.equal(batch["cu_seq_lens_q"], torch.tensor([0, 3, 5], dtype=torch.int32))
    assert batch["cu_seq_lens_q"].dtype == torch.int32  # what flash attention's varlen kernels take


def test_packed_collate_of_one_example_is_that_example():
    batch = collate([SECOND], packing=True, pad_id=0)
    assert batch["input_ids"].tolist() == [[21, 22]]
    assert batch["position_ids"].tolist() == [[0, 1]]
    assert batch["targets"].tolist() == [[22, -100]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 2]


def test_padded_collate_by_hand():
    batch = collate([FIRST, SECOND], packing=False, pad_id=99)
    assert set(batch) == {"input_ids", "attention_mask", "targets"}
    assert torch.equal(batch["input_ids"], torch.tensor([[11, 12, 13], [21, 22, 99]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(batch["targets"], torch.tensor([[12, 13, -100], [22, -100, -100]]))


def test_padded_collate_pads_to_the_longest_row_whatever_its_place():
    batch = collate([SECOND, FIRST], packing=False, pad_id=0)
    assert batch["input_ids"].tolist() == [[21, 22, 0], [11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["targets"].tolist() == [[22, -100, -100], [12, 13, -100]]


def test_packed_collate_marks_where_each_example_starts(chat_model_dir):
    _, tok = load_model(str(chat_model_dir), dtype="float32")
    items = examples(tok)
    batch = collate(items, packing=True, pad_id=0)
    lengths = [len(e["input_ids"]) for e in items]
    assert batch["cu_seq_lens_q"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["position_ids"][0, lengths[0]].item() == 0


# ---------------------------------------------------------------------------------------------
# trained_positions


def test_trained_positions_are_where_any_row_trains():
    targets = torch.tensor([
        [-100, 5, -100, -100, -100],
        [-100, -100, -100, 7, -100],
    ])  # fmt: skip
    assert trained_positions(targets).tolist() == [1, 3]


def test_trained_positions_of_the_packed_batch_by_hand():
    # targets [[12, 13, -100, 22, -100]] from test_packed_collate_by_hand
    assert trained_positions(collate([FIRST, SECOND], packing=True, pad_id=0)["targets"]).tolist() == [0, 1, 3]


def test_trained_positions_of_nothing_trained_are_empty():
    positions = trained_positions(torch.full((2, 4), -100))
    assert positions.shape == (0,) and positions.dtype == torch.long


# ---------------------------------------------------------------------------------------------
# plan_batches


def test_batch_size_caps_examples_per_micro_batch():
    plan = plan_batches([5] * 10, batch_tokens=1000, packing=True, seed=0, batch_size=4)
    assert [len(b) for b in plan] == [4, 4, 2]
    assert sorted(i for b in plan for i in b) == list(range(10))


def test_padding_counts_against_the_budget_and_packing_does_not():
    # lengths 2 and 8 in a budget of 12: packed they take 2 + 8 = 10 tokens; padded, 2 rows x 8 = 16
    for seed in range(4):
        assert sorted(map(sorted, plan_batches([2, 8], 12, packing=True, seed=seed))) == [[0, 1]]
        assert sorted(map(sorted, plan_batches([2, 8], 12, packing=False, seed=seed))) == [[0], [1]]
    # 2 rows x 8 = 16 fits a budget of 16 exactly
    assert sorted(map(sorted, plan_batches([2, 8], 16, packing=False, seed=0))) == [[0, 1]]


def test_padded_plan_keeps_rows_times_longest_within_the_budget():
    lengths = [10, 3, 7, 4, 9, 2, 8, 5, 6, 1]
    for seed in range(5):
        plan = plan_batches(lengths, batch_tokens=20, packing=False, seed=seed)
        assert sorted(i for b in plan for i in b) == list(range(10))  # every example exactly once
        for batch in plan:
            assert len(batch) * max(lengths[i] for i in batch) <= 20
        # greedy: a batch closes only when the next example would not fit in it
        for batch, following in zip(plan, plan[1:]):
            assert (len(batch) + 1) * max(lengths[i] for i in batch + following[:1]) > 20


def test_an_example_over_the_budget_gets_a_micro_batch_of_its_own():
    plan = plan_batches([50, 3, 4], batch_tokens=10, packing=True, seed=0)
    assert [50] in [[[50, 3, 4][i] for i in b] for b in plan]
    assert sorted(i for b in plan for i in b) == [0, 1, 2]


@pytest.mark.parametrize("packing", [True, False])
def test_plan_is_seeded(packing):
    lengths = list(range(1, 31))
    assert plan_batches(lengths, 40, packing, seed=7) == plan_batches(lengths, 40, packing, seed=7)
    assert plan_batches(lengths, 40, packing, seed=7) != plan_batches(lengths, 40, packing, seed=8)
    flat = [i for b in plan_batches(lengths, 40, packing, seed=7) for i in b]
    assert sorted(flat) == list(range(30)) and flat != list(range(30))  # shuffled, none lost


def test_plan_of_no_examples_is_empty():
    assert plan_batches([], 100, packing=True, seed=0) == []
