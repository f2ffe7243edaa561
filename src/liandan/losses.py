"""Loss functions as pure tensor code.

    from liandan.losses import next_token_targets, token_nll
    targets = next_token_targets([-100, -100, 7, 8])     # [-100, 7, 8, -100]
    nll = token_nll(hidden, head_weight, tokens)         # per-token loss at trained positions

The SFT objective is the mean negative log-likelihood of the trained tokens:

    L = -(1 / N) * sum_{t : y_t != -100} log p(y_t | x_<t)

where N counts trained tokens over the *whole* optimizer step (all micro-batches and processes),
so that gradient accumulation gives the same gradient as one big batch. That is why the
objectives return sums, and the training loop divides.

`token_nll` computes the same token losses straight from the last hidden states and the output
head, in chunks of rows, so the (tokens x vocabulary) logits never exist in full: for a 49k
vocabulary the logits of a 2k-token micro-batch are 400 MB in fp32, and filling, casting and
soft-maxing them cost a fifth of a CPU training step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""The label (and target) value that marks a token as not trained: the value cross-entropy skips,
as in PyTorch and transformers. The one name for it everywhere in liandan."""


def next_token_targets(labels: list[int]) -> list[int]:
    """Shift aligned labels (label t = token t, or -100) to next-token targets (target t = the
    token the model should predict at position t). Done per example, so packed examples never
    ask the last token of one example to predict the first of the next."""
    return labels[1:] + [IGNORE_INDEX]


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    kind: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards of the chosen and rejected replies.

    With log-ratios h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)):

    - ``sigmoid`` (DPO, Rafailov et al. 2023), with label smoothing eps (conservative DPO, the
      share of pairs assumed flipped): L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    - ``ipo`` (IPO, Azar et al. 2023): L = (h - 1 / (2 beta))^2

    Rewards are beta (log pi(y|x) - log ref(y|x)) for each reply. All inputs are (B,).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; expected sigmoid or ipo")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return loss, chosen_rewards, rejected_rewards


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends: expm1 near 0, log1p for x below -log 2
    (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO loss (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model") and the rewards logged for each reply.

    Inputs are per-token *average* reply log-probs, log P(y|x) = (1/|y|) sum_t log p(y_t|x, y_<t),
    (B,) each. With the odds odds(y|x) = P / (1 - P), so log odds = log P - log(1 - exp(log P)):

        L = -log P(y_w|x) - beta * log sigma(log odds(y_w|x) - log odds(y_l|x))

    (beta is the paper's lambda). No reference model. Rewards are beta * log P(y|x) (as in TRL).
    """
    # a reply predicted with probability 1 has infinite odds (and a NaN gradient): stay just below it
    w, l = chosen.clamp(max=-1e-6), rejected.clamp(max=-1e-6)
    log_odds = (w - log1mexp(w)) - (l - log1mexp(l))
    loss = -chosen - beta * F.logsigmoid(log_odds)
    return loss, beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-pair SimPO loss (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward") and the implicit rewards of each reply.

    Inputs are per-token *average* reply log-probs (1/|y|) log pi(y|x), (B,) each; the reward is
    r(y) = beta / |y| * log pi(y|x), and with the target reward margin gamma and label smoothing
    eps (as conservative DPO; 0 in the paper), with m = r(y_w) - r(y_l) - gamma:

        L = -(1 - eps) log sigma(m) - eps log sigma(-m)

    No reference model.
    """
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    m = chosen_rewards - rejected_rewards - gamma
    loss = -(1 - label_smoothing) * F.logsigmoid(m) - label_smoothing * F.logsigmoid(-m)
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-example KTO loss (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization") and each example's implicit reward.

    policy, ref: summed reply log-probs log pi(y|x), log ref(y|x), (B,); desirable: (B,) bool.
    kl: the reference point z0, a scalar estimate of KL(pi || ref) (see `kto_reference_point`).
    With the reward r = beta * (log pi(y|x) - log ref(y|x)):

        desirable:    L = w_D * (1 - sigma(r - beta * z0))
        undesirable:  L = w_U * (1 - sigma(beta * z0 - r))
    """
    rewards = beta * (policy - ref)
    z = beta * kl.detach()
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(rewards - z)),
                       undesirable_weight * (1 - torch.sigmoid(z - rewards)))  # fmt: skip
    return loss, rewards.detach()


def kto_reference_point(policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's z0: the mean log-ratio log pi(y|x') - log ref(y|x') over mismatched pairs (a
    completion y under another example's prompt x'), clamped at 0 and detached: a batch estimate
    of KL(pi || ref) that the loss does not back-propagate through (as in the paper and TRL)."""
    return (policy_mismatched - ref_mismatched).detach().mean().clamp(min=0)


class _TokenNLL(torch.autograd.Function):
    """-log softmax(h W^T)[target] per row, chunk by chunk.

    When W is frozen (LoRA), the gradient with respect to h, (softmax - onehot) W, is computed in
    the forward pass while each chunk's logits are at hand, and only that (N, H) tensor is kept:
    backward merely scales it. When W is trained (full fine-tuning) each chunk's logits are
    recomputed in backward, which also gives W's gradient.

    Each chunk's logits come from one matmul; the soft-max work on them then runs a few rows at a
    time (`_ChunkBuffers`), so that its fp32 copies stay in the CPU's caches.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, softcap):
        weight_c = weight.to(hidden.dtype)
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        keep_grad = hidden.requires_grad and not weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if keep_grad else None
        buffers = _ChunkBuffers(min(chunk, hidden.shape[0]), weight.shape[0], hidden.dtype, hidden.device, softcap)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            grad_logits = buffers.nll_and_grad(hidden[rows], weight_c, targets[rows], nll[rows], keep_grad)
            if keep_grad:
                torch.mm(grad_logits, weight_c, out=grad_hidden[rows])  # (C, H)
        ctx.chunk, ctx.kept, ctx.softcap = chunk, keep_grad, softcap
        ctx.save_for_backward(*((grad_hidden,) if keep_grad else (hidden, weight, targets)))
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        if ctx.kept:
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad_nll.unsqueeze(-1).to(grad_hidden.dtype), None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        weight_c = weight.to(hidden.dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        buffers = _ChunkBuffers(min(ctx.chunk, hidden.shape[0]), weight.shape[0], hidden.dtype, hidden.device, ctx.softcap)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            grad_logits = buffers.nll_and_grad(hidden[rows], weight_c, targets[rows], None, True, grad_nll[rows])
            if grad_h is not None:
                torch.mm(grad_logits, weight_c, out=grad_h[rows])
            if grad_w is not None:
                grad_w += (grad_logits.t() @ hidden[rows]).float()  # (V, H)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


class _ChunkBuffers:
    """One chunk's logits (compute dtype), and fp32 work space for a piece of its rows, allocated
    once per call and reused by every chunk.

    Reused because a fresh (chunk x vocabulary) tensor is larger than what the C allocator keeps
    for reuse: each one would be mapped from the kernel and page-faulted in anew. Pieces because
    the soft-max is half a dozen passes over fp32 rows (cast, log-softmax, exp, one-hot, cast back):
    on a CPU a piece of `CPU_PIECE_ROWS` rows of a 49k vocabulary (3 MB) stays in cache through all
    of them, where a whole chunk's fp32 logits would go to memory and back at each pass.

    With ``softcap`` c (Gemma 2's final logit soft-capping) the scores are c * tanh(logits / c),
    computed in fp32, and the gradient with respect to the logits carries the factor
    1 - tanh^2."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device, softcap: float | None = None):
        self.softcap = softcap
        self.piece = min(rows, CPU_PIECE_ROWS) if device.type == "cpu" else rows
        self.logits = torch.empty(rows, vocab, dtype=dtype, device=device)
        separate = dtype != torch.float32 or softcap is not None
        self.scores = torch.empty(self.piece, vocab, dtype=torch.float32, device=device) if separate else None
        self.tanh = torch.empty(self.piece, vocab, dtype=torch.float32, device=device) if softcap is not None else None
        self.logp = torch.empty(self.piece, vocab, dtype=torch.float32, device=device)
        self.minus_one = torch.full((self.piece, 1), -1.0, dtype=torch.float32, device=device)

    def nll_and_grad(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, nll: torch.Tensor | None,
                     want_grad: bool, grad_nll: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
        """For ``hidden`` (C, H): write -log p[target] of each row into ``nll`` (unless None),
        and return d(-log p[target]) / d logits, times ``grad_nll`` if given, in the compute
        dtype (a view of the buffer, valid until the next call), or None without ``want_grad``."""
        logits = self.logits[: hidden.shape[0]]
        torch.mm(hidden, weight.t(), out=logits)
        for start in range(0, hidden.shape[0], self.piece):
            rows = slice(start, start + self.piece)
            part, target = logits[rows], targets[rows].unsqueeze(-1)
            n = part.shape[0]
            scores = part if self.scores is None else self.scores[:n].copy_(part)
            if self.softcap is not None:
                tanh = torch.tanh(scores.div_(self.softcap), out=self.tanh[:n])
                scores = torch.mul(tanh, self.softcap, out=scores)
            logp = torch.log_softmax(scores, dim=-1, out=self.logp[:n])
            if nll is not None:
                nll[rows] = -logp.gather(-1, target).squeeze(-1)
            if not want_grad:
                continue
            grad = logp.exp_().scatter_add_(-1, target, self.minus_one[:n])  # softmax - onehot
            if self.softcap is not None:
                grad.mul_(tanh.square_().neg_().add_(1.0))  # 1 - tanh^2
            if grad_nll is not None:
                grad.mul_(grad_nll[rows].unsqueeze(-1))
            part.copy_(grad)
        return logits if want_grad else None


CPU_PIECE_ROWS = 16
"""Rows of a chunk's logits soft-maxed at a time on a CPU: at 16, the fp32 work of a 49k
vocabulary is 3 MB per buffer. Measured on the default model's head (2,048 rows, bf16, 2 cores):
the head's forward and backward took 361 ms in pieces of 16 rows, 364 in pieces of 32, 371 in
pieces of 64, and 410 with the whole 256-row chunk at once; its two matmuls alone took 298."""


def token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None,
              softcap: float | None = None) -> torch.Tensor:  # fmt: skip
    """Per-token negative log-likelihood of ``targets`` under logits ``hidden @ weight.T``,
    computed ``chunk`` rows at a time (default: 256 on a CPU, enough rows for the head's matmuls
    to run near the peak, their soft-max then done in pieces that stay in cache; 2048 elsewhere),
    log-softmax in fp32. The head's matmuls run in autocast's
    dtype when autocast is on (as ``hidden @ weight.T`` would; the custom autograd function and
    its ``out=`` matmuls are not autocast by themselves), else in ``hidden``'s dtype.

    hidden: (N, H) final hidden states at trained positions; weight: (V, H) output head;
    targets: (N,) token ids (no -100 here: select trained positions first). Returns (N,) fp32.
    Equal to ``F.cross_entropy(hidden @ weight.T, targets, reduction="none")`` up to rounding;
    with ``softcap`` c, to the cross-entropy of ``c * tanh(hidden @ weight.T / c)``.
    """
    device = hidden.device.type
    if chunk is None:
        chunk = 256 if device == "cpu" else 2048
    if torch.is_autocast_enabled(device):
        # e.g. hidden states that accelerate converted back to fp32: the head matmul in bf16
        hidden = hidden.to(torch.get_autocast_dtype(device))
    return _TokenNLL.apply(hidden, weight, targets, chunk, softcap)
