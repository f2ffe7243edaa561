"""The loss functions of `liandan.losses`, with expected numbers worked out by hand (or by plain
PyTorch written out here): next-token targets, DPO / IPO / conservative DPO, and the chunked
output-head loss `token_nll`."""

import math

import pytest
import torch
import torch.nn.functional as F

from liandan.losses import CPU_PIECE_ROWS, IGNORE_INDEX, dpo_loss, next_token_targets, token_nll

# ---------------------------------------------------------------------------------------------
# next_token_targets


def test_ignore_index_is_what_cross_entropy_skips():
    assert IGNORE_INDEX == -100 == torch.nn.CrossEntropyLoss().ignore_index


def test_next_token_targets_shift_left_and_end_untrained():
    # position t predicts token t + 1; the last position has nothing to predict
    assert next_token_targets([-100, -100, 7, 8]) == [-100, 7, 8, -100]
    assert next_token_targets([3, -100, 5, -100, 9]) == [-100, 5, -100, 9, -100]


def test_next_token_targets_of_a_single_token_trains_nothing():
    # a lone token has no next token inside its own example (never the next example's first)
    assert next_token_targets([42]) == [-100]


def test_next_token_targets_all_ignored_stay_ignored():
    assert next_token_targets([-100, -100, -100]) == [-100, -100, -100]


def test_next_token_targets_leave_the_labels_alone():
    labels = [-100, 7, 8]
    next_token_targets(labels)
    assert labels == [-100, 7, 8]


# ---------------------------------------------------------------------------------------------
# dpo_loss


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


# three pairs whose log-ratio margins are worked out by hand:
#   h_0 = (-1.0 + 1.5) - (-2.0 + 1.5) =  0.5 - (-0.5) =  1.0
#   h_1 = (-3.0 + 2.0) - (-1.0 + 2.0) = -1.0 -   1.0  = -2.0
#   h_2 = (-2.0 + 2.0) - (-2.5 + 3.0) =  0.0 -   0.5  = -0.5
PAIRS = dict(
    policy_chosen=torch.tensor([-1.0, -3.0, -2.0]), policy_rejected=torch.tensor([-2.0, -1.0, -2.5]),
    ref_chosen=torch.tensor([-1.5, -2.0, -2.0]), ref_rejected=torch.tensor([-1.5, -2.0, -3.0]),
)  # fmt: skip
MARGINS = [1.0, -2.0, -0.5]


def test_dpo_loss_with_label_smoothing_per_pair():
    beta, eps = 0.5, 0.2
    loss, _, _ = dpo_loss(**PAIRS, beta=beta, label_smoothing=eps)
    # -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), with -log sigma(x) = log(1 + e^-x)
    expected = [(1 - eps) * math.log(1 + math.exp(-beta * h)) + eps * math.log(1 + math.exp(beta * h)) for h in MARGINS]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    # pair 1 by hand: beta h = -1: 0.8 log(1 + e) + 0.2 log(1 + 1/e) = 0.8 * 1.313262 + 0.2 * 0.313262
    assert loss[1].item() == pytest.approx(1.113262, abs=1e-6)


def test_dpo_loss_with_half_smoothing_ignores_which_reply_won():
    # eps = 1/2: L = (log(1 + e^-x) + log(1 + e^x)) / 2, the same for h and -h
    loss, _, _ = dpo_loss(**PAIRS, beta=0.5, label_smoothing=0.5)
    swapped, _, _ = dpo_loss(PAIRS["policy_rejected"], PAIRS["policy_chosen"], PAIRS["ref_rejected"], PAIRS["ref_chosen"],
                             beta=0.5, label_smoothing=0.5)  # fmt: skip
    torch.testing.assert_close(loss, swapped)
    # h = -0.5, beta h = -0.25: (log(1 + e^0.25) + log(1 + e^-0.25)) / 2 = (0.825939 + 0.575939) / 2
    assert loss[2].item() == pytest.approx(0.700939, abs=1e-6)


def test_ipo_loss_per_pair():
    # beta = 0.5: 1 / (2 beta) = 1, so (h - 1)^2 = (1 - 1)^2, (-2 - 1)^2, (-0.5 - 1)^2
    loss, chosen, rejected = dpo_loss(**PAIRS, beta=0.5, kind="ipo")
    assert loss.tolist() == pytest.approx([0.0, 9.0, 2.25])
    assert loss.tolist() == pytest.approx([(h - 1 / (2 * 0.5)) ** 2 for h in MARGINS])
    # rewards beta (pi - ref): 0.5 * [0.5, -1.0, 0.0] and 0.5 * [-0.5, 1.0, 0.5], whatever the loss kind
    assert chosen.tolist() == pytest.approx([0.25, -0.5, 0.0])
    assert rejected.tolist() == pytest.approx([-0.25, 0.5, 0.25])


def test_dpo_loss_gradient_by_hand():
    # dL/d pi_w = -beta (1 - sigma(beta h)) = -beta / (1 + e^(beta h)); h = 1, beta = 0.1: -0.1 / (1 + e^0.1)
    inputs = [torch.tensor([v], requires_grad=True) for v in (-1.0, -2.0, -1.5, -1.5)]
    loss, chosen, rejected = dpo_loss(*inputs, beta=0.1)
    loss.sum().backward()
    g = -0.1 / (1 + math.exp(0.1))
    assert g == pytest.approx(-0.0475021, abs=1e-7)
    assert [t.grad.item() for t in inputs] == pytest.approx([g, -g, -g, g], abs=1e-7)
    assert not chosen.requires_grad and not rejected.requires_grad  # rewards are for logging only
    # IPO: dL/d pi_w = 2 (h - 1 / (2 beta)) = 2 (1 - 5) = -8
    for t in inputs:
        t.grad = None
    dpo_loss(*inputs, beta=0.1, kind="ipo")[0].sum().backward()
    assert [t.grad.item() for t in inputs] == pytest.approx([-8.0, 8.0, 8.0, -8.0])


def test_dpo_loss_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown DPO loss 'hinge'; expected sigmoid or ipo"):
        dpo_loss(**PAIRS, beta=0.1, kind="hinge")


# ---------------------------------------------------------------------------------------------
# token_nll


def test_reply_logp_by_hand():
    # a reply's log-prob is minus the sum of its tokens' losses. Hidden states e1, e2 through the
    # head W give logits [0, ln 3] -> p(1) = 3/4, and [0, 0] -> p(0) = 1/2
    hidden = torch.eye(2)
    weight = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    nll = token_nll(hidden, weight, torch.tensor([1, 0]))
    assert (-nll.sum()).item() == pytest.approx(math.log(0.75 * 0.5))


def test_token_nll_by_hand():
    # logits [ln 3, 0] for target 0: p = 3/4, nll = ln(4/3); gradient (p - onehot) W = (-1/4, 1/4) W
    hidden = torch.tensor([[1.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[torch.log(torch.tensor(3.0)).item(), 0.0], [0.0, 0.0]])
    nll = token_nll(hidden, weight, torch.tensor([0]))
    nll.sum().backward()
    assert nll.item() == pytest.approx(0.287682, abs=1e-6)  # ln(4/3)
    torch.testing.assert_close(hidden.grad, torch.tensor([[-0.25 * 1.098612, 0.0]]))


def test_token_nll_trained_head_gradient_by_hand():
    # the same token with the head trained too (the recompute-in-backward path), one row per chunk:
    # row 0: logits [ln 3, 0], target 0 -> dlogits = (3/4 - 1, 1/4) = (-1/4, 1/4)
    # row 1: logits [0, 0],    target 1 -> dlogits = (1/2, 1/2 - 1) = (1/2, -1/2)
    # dW = dlogits^T @ hidden = (-1/4, 1/4)^T (1, 0) + (1/2, -1/2)^T (0, 1)
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]], requires_grad=True)
    nll = token_nll(hidden, weight, torch.tensor([0, 1]), chunk=1)
    nll.sum().backward()
    assert nll.tolist() == pytest.approx([math.log(4 / 3), math.log(2)], abs=1e-6)
    torch.testing.assert_close(weight.grad, torch.tensor([[-0.25, 0.5], [0.25, -0.5]]))
    # dh = dlogits @ W: row 0 (-1/4 ln 3, 0), row 1 (1/2 ln 3, 0)
    torch.testing.assert_close(hidden.grad, torch.tensor([[-0.25 * math.log(3), 0.0], [0.5 * math.log(3), 0.0]]))


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_token_nll_equals_cross_entropy_with_a_frozen_head(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    targets = torch.randint(0, 50, (10,))
    scale = torch.rand(10)  # a per-token upstream gradient, as DPO's per-row sums give
    (token_nll(hidden, weight, targets, chunk) * scale).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    expected = F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    (expected * scale).sum().backward()
    torch.testing.assert_close(token_nll(hidden, weight, targets, chunk), expected.detach())
    torch.testing.assert_close(got, hidden.grad)


def test_token_nll_gives_the_trained_head_its_gradient():
    torch.manual_seed(1)
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(0, 40, (9,))
    token_nll(hidden, weight, targets, 4).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    F.cross_entropy(hidden @ weight.t(), targets, reduction="sum").backward()
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], weight.grad)


@pytest.mark.parametrize("trained_head", [False, True], ids=["frozen-head", "trained-head"])
def test_token_nll_with_final_logit_softcapping_is_the_capped_cross_entropy(trained_head):
    """Gemma 2: logits = c * tanh(hidden @ W.T / c). Values and gradients (hidden and, when
    trained, W) equal autograd through the capped logits, across chunk borders."""
    torch.manual_seed(2)
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=trained_head)
    targets = torch.randint(0, 40, (9,))
    scale = torch.rand(9)
    got = token_nll(hidden, weight, targets, 4, softcap=2.0)
    (got * scale).sum().backward()
    got_grads = hidden.grad.clone(), weight.grad.clone() if trained_head else None
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(2.0 * torch.tanh(hidden @ weight.t() / 2.0), targets, reduction="none")
    (expected * scale).sum().backward()
    torch.testing.assert_close(got, expected.detach())
    torch.testing.assert_close(got_grads[0], hidden.grad)
    if trained_head:
        torch.testing.assert_close(got_grads[1], weight.grad)
    # the cap changes the loss here: a lost cap would not pass
    assert not torch.allclose(token_nll(hidden, weight, targets, 4), got)


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("trained_head", [False, True], ids=["frozen-head", "trained-head"])
def test_token_nll_across_piece_borders_equals_cross_entropy(trained_head, softcap):
    """On a CPU each chunk's soft-max runs `CPU_PIECE_ROWS` rows at a time: 45 rows in chunks of
    40 give pieces of 16, 16, 8 and then a chunk of 5, so every row of every piece (and the
    upstream gradient's rows) must line up with its own target."""
    assert CPU_PIECE_ROWS < 40
    torch.manual_seed(3)
    hidden = torch.randn(45, 8, requires_grad=True)
    weight = torch.randn(60, 8, requires_grad=trained_head)
    targets = torch.randint(0, 60, (45,))
    scale = torch.rand(45)
    got = token_nll(hidden, weight, targets, 40, softcap=softcap)
    (got * scale).sum().backward()
    got_grads = hidden.grad.clone(), weight.grad.clone() if trained_head else None
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    expected = F.cross_entropy(logits, targets, reduction="none")
    (expected * scale).sum().backward()
    torch.testing.assert_close(got, expected.detach())
    torch.testing.assert_close(got_grads[0], hidden.grad)
    if trained_head:
        torch.testing.assert_close(got_grads[1], weight.grad)


def test_token_nll_in_bf16_is_the_same_whatever_the_chunk():
    """The pieces change only where the fp32 soft-max work is done, never what it computes: in
    bf16 (the head's usual dtype on a CPU) the losses and gradients are bit for bit the same with
    one row per chunk, pieces of a chunk, and one chunk for all rows."""
    torch.manual_seed(4)
    hidden = torch.randn(70, 16).bfloat16()
    weight = torch.randn(500, 16).bfloat16()
    targets = torch.randint(0, 500, (70,))
    results = []
    for chunk in (1, 40, 70):
        h = hidden.clone().requires_grad_()
        nll = token_nll(h, weight, targets, chunk)
        nll.sum().backward()
        results.append((nll, h.grad))
    for nll, grad in results[1:]:
        assert torch.equal(nll, results[0][0])
        assert torch.equal(grad, results[0][1])


def test_token_nll_under_autocast_runs_the_head_in_the_autocast_dtype():
    """accelerate hands back fp32 hidden states; under bf16 autocast the head must still run in
    bf16 (as ``hidden @ weight.T`` would), not cast the whole frozen head up to fp32."""
    torch.manual_seed(2)
    hidden = torch.randn(12, 16, requires_grad=True)
    weight = torch.randn(300, 16).bfloat16()
    targets = torch.randint(0, 300, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = token_nll(hidden, weight, targets, 5)
    nll.sum().backward()
    in_bf16 = token_nll(hidden.detach().bfloat16(), weight, targets, 5)
    assert torch.equal(nll, in_bf16)
    assert hidden.grad.dtype == torch.float32
    in_fp32 = token_nll(hidden.detach(), weight.float(), targets, 5)
    assert not torch.equal(nll, in_fp32)
    torch.testing.assert_close(nll, in_fp32, rtol=0.05, atol=0.1)
