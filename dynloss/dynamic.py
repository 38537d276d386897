"""Dynamic Loss: a meta-learned label corrector and margin generator.

Source: "Dynamic Loss For Robust Learning" (Jiang et al., TPAMI 2023) and the authors' released code;
DESIGN.md section 3 writes out what that code does. Deliberate, documented additions:

* ``margin_prior="log_prior"`` adds ``tau * log(class prior)`` to the generated margins (logit adjustment,
  Menon et al. 2021) so the generator starts exactly where logit adjustment is (its last layer starts at zero)
  and meta-learns a residual; DESIGN.md section 8 saw the plain generator learn the opposite sign.
  ``margin_prior="none"`` is the authors' version. ``set_class_counts`` moves the prior (``prior_from: trusted``).
* ``corrector="oracle"`` (experiments only) trusts exactly the right labels: the upper bound of label correction.
* ``mix="argmax"`` takes the classifier's best guess as p~ instead of a Gumbel sample.
* ``rank_init="smooth"`` (opt-in; the default ``"xavier"`` is the authors' i.i.d. init) starts the rank
  embedding as low-frequency cosine codes of the bucket position, so the meta-gradient of the noisy tail moves
  its neighbours too. Seen here: trust separated about one epoch earlier on a 4K-image subset, no difference on
  the 15K-image Fashion-MNIST-LT set.
* ``LabelCorrector.trust`` is exposed on its own so the pipelines can log mean trust of clean vs noisy
  samples every epoch (the straightforward reading never moved it off 1.0).

Quick check::

    python -c "import torch; from dynloss.dynamic import DynamicLoss; d = DynamicLoss(10); \
z = torch.randn(4, 10); y = torch.tensor([0, 1, 2, 3]); r = torch.tensor([0, 50, 99, 10]); \
print(d(z, y, r).loss)"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TRUST_INIT_BIAS = 3.98  # sigmoid(3.98) ~= 0.982: trust the given label at first (authors' init)
MARGIN_INIT_BIAS = 1.0  # authors' init; a constant shift, so softmax is unaffected


def _mlp(inp: int, hidden: int, out: int, last_bias: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, out))
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    nn.init.constant_(net[-1].bias, last_bias)
    return net


class LabelCorrector(nn.Module):
    """Rank bucket -> per-class trust curve. ``trust(ranks, labels)`` is w = sigmoid(MLP(emb(r)))[y]."""

    RANK_INITS = ("xavier", "smooth")

    def __init__(self, num_classes: int, rank_buckets: int = 100, hidden: int = 64, rank_init: str = "xavier"):
        super().__init__()
        if num_classes < 2 or rank_buckets < 1 or hidden < 1:
            raise ValueError(f"LabelCorrector needs num_classes >= 2, rank_buckets >= 1, hidden >= 1; got "
                             f"{num_classes}, {rank_buckets}, {hidden}")
        if rank_init not in self.RANK_INITS:
            raise ValueError(f"rank_init must be one of {self.RANK_INITS}, got {rank_init!r}")
        self.num_classes, self.rank_buckets = num_classes, rank_buckets
        self.embedding = nn.Embedding(rank_buckets, hidden)
        nn.init.xavier_uniform_(self.embedding.weight)
        if rank_init == "smooth":
            with torch.no_grad():
                self.embedding.weight.copy_(smooth_rank_codes(rank_buckets, hidden, self.embedding.weight.std()))
        self.mlp = _mlp(hidden, hidden, num_classes, TRUST_INIT_BIAS)

    def trust(self, ranks: Tensor, labels: Tensor) -> Tensor:
        out = self.mlp(self.embedding(ranks))
        return torch.sigmoid(out.gather(1, labels[:, None]).squeeze(1))

    def curves(self) -> Tensor:
        """(C, R) trust of every class at every rank bucket: what the pipelines plot."""
        with torch.no_grad():
            r = torch.arange(self.rank_buckets, device=self.embedding.weight.device)
            return torch.sigmoid(self.mlp(self.embedding(r))).T

    def forward(self, ranks: Tensor, labels: Tensor) -> Tensor:
        return self.trust(ranks, labels)


def smooth_rank_codes(buckets: int, dim: int, scale: Tensor | float) -> Tensor:
    """Low-frequency cosine codes of the bucket position, rescaled to the Xavier spread.

    With the authors' i.i.d. Xavier rows every bucket of every class learns on its own from the few
    samples a batch puts in it; neighbouring buckets sharing a code lets the meta-gradient of the noisy
    tail move the whole tail at once (DESIGN.md section 8: the trust never moved).
    """
    pos = (torch.arange(buckets, dtype=torch.float64) + 0.5) / buckets
    freq = torch.arange(1, dim + 1, dtype=torch.float64) / 4  # periods from 4 down to 4/dim of the range
    codes = torch.cos(torch.pi * pos[:, None] * freq[None, :])
    return (codes / codes.std() * float(scale)).float()


class OracleCorrector(nn.Module):
    """The upper bound of label correction, for experiments: trust 1 on a right label, 0 on a wrong one.

    Needs the true labels (synthetic noise). Its rank table holds 1 for a right label and 0 for a wrong one
    (``dynloss.epoch.ranking_pass`` writes it so), and it has nothing to learn; everything else (pseudo-labels,
    margins, meta set, fine-tune) runs as with the learned corrector.
    """

    rank_buckets = 2

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("anchor", torch.zeros(0))  # a device to follow, no parameters

    def trust(self, ranks: Tensor, labels: Tensor) -> Tensor:
        return ranks.float().clamp(0, 1)

    def curves(self) -> Tensor:
        return torch.tensor([[0.0, 1.0]], device=self.anchor.device).expand(self.num_classes, 2)

    def forward(self, ranks: Tensor, labels: Tensor) -> Tensor:
        return self.trust(ranks, labels)


class MarginGenerator(nn.Module):
    """A learnable 1x64 code -> MLP -> per-class additive margins shared by all samples.

    With ``log_prior`` given (a (C,) tensor of tau * log class prior) the output is that plus the learned
    residual, so the generator starts as logit-adjusted CE.
    """

    def __init__(self, num_classes: int, hidden: int = 64, log_prior: Tensor | None = None):
        super().__init__()
        self.code = nn.Parameter(torch.empty(1, hidden))
        nn.init.xavier_uniform_(self.code)
        self.mlp = _mlp(hidden, hidden, num_classes, MARGIN_INIT_BIAS)
        prior = torch.zeros(num_classes) if log_prior is None else torch.as_tensor(log_prior, dtype=torch.float32)
        if log_prior is not None:
            # start exactly at logit adjustment: a zero last layer makes the residual the same constant (the last
            # bias) for every class; the authors' Xavier weights would add a random per-class offset of ~0.3 logit
            nn.init.zeros_(self.mlp[-1].weight)
        if prior.shape != (num_classes,):
            raise ValueError(f"MarginGenerator log_prior must have shape ({num_classes},), got {tuple(prior.shape)}")
        self.register_buffer("log_prior", prior)

    def forward(self, include_prior: bool = True) -> Tensor:
        residual = self.mlp(self.code).squeeze(0)
        return residual + self.log_prior if include_prior else residual


@dataclass
class DynamicOutput:
    loss: Tensor          # scalar L_dyn
    trust: Tensor         # (B,) w
    target: Tensor        # (B, C) corrected soft labels y_hat
    margins: Tensor       # (C,)


class DynamicLoss(nn.Module):
    """``L_dyn = mean_i -sum_k y_hat_ik log softmax(z_i + m)_k``, ``y_hat = w onehot(y) + (1-w) p~``.

    ``p~`` is a hard Gumbel-softmax sample (tau 1) of the detached logits, or their softmax when
    ``mix="softmax"`` (warm-up, and deterministic tests). Margins apply in training only.
    """

    MIXES = ("gumbel", "softmax", "argmax")
    CORRECTORS = ("learned", "oracle")

    def __init__(self, num_classes: int, rank_buckets: int = 100, hidden: int = 64,
                 class_counts=None, margin_prior: str = "none", prior_tau: float = 1.0, rank_init: str = "xavier",
                 corrector: str = "learned"):
        super().__init__()
        if margin_prior not in ("none", "log_prior"):
            raise ValueError(f"margin_prior must be 'none' or 'log_prior', got {margin_prior!r}")
        log_prior = None
        if margin_prior == "log_prior":
            if class_counts is None:
                raise ValueError("margin_prior='log_prior' needs class_counts (training images per class)")
            counts = torch.as_tensor(class_counts, dtype=torch.float64)
            if counts.shape != (num_classes,) or bool((counts <= 0).any()):
                raise ValueError(f"class_counts must be {num_classes} positive counts, got {counts.tolist()}")
            log_prior = (prior_tau * torch.log(counts / counts.sum())).float()
        self.num_classes, self.prior_tau = num_classes, prior_tau
        if corrector not in self.CORRECTORS:
            raise ValueError(f"corrector must be one of {self.CORRECTORS}, got {corrector!r}")
        self.corrector = LabelCorrector(num_classes, rank_buckets, hidden, rank_init) if corrector == "learned" \
            else OracleCorrector(num_classes)
        self.margins = MarginGenerator(num_classes, hidden, log_prior)

    def set_class_counts(self, counts) -> None:
        """Move the margins' log-prior part to ``prior_tau * log(counts / sum)`` (e.g. trust-weighted counts)."""
        counts = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1e-3)
        if counts.shape != (self.num_classes,):
            raise ValueError(f"class_counts must have shape ({self.num_classes},), got {tuple(counts.shape)}")
        prior = self.margins.log_prior
        prior.copy_((self.prior_tau * torch.log(counts / counts.sum())).to(prior))

    def pseudo_labels(self, logits: Tensor, mix: str = "gumbel") -> Tensor:
        """p~: a hard Gumbel-softmax sample (tau 1) of the detached logits (the authors'), their softmax, or
        the one-hot argmax (the classifier's best guess, no sampling noise)."""
        if mix not in self.MIXES:
            raise ValueError(f"mix must be one of {self.MIXES}, got {mix!r}")
        detached = logits.detach().float()
        if mix == "gumbel":
            return F.gumbel_softmax(detached, tau=1.0, hard=True)
        if mix == "argmax":
            return F.one_hot(detached.argmax(1), detached.shape[1]).to(detached.dtype)
        return detached.softmax(1)

    def corrected_target(self, labels: Tensor, ranks: Tensor, pseudo: Tensor) -> tuple[Tensor, Tensor]:
        """(w, y_hat) with y_hat = w onehot(y) + (1 - w) p~."""
        w = self.corrector.trust(ranks, labels)
        onehot = F.one_hot(labels, self.num_classes).to(pseudo.dtype)
        return w, w[:, None] * onehot + (1 - w[:, None]) * pseudo

    def forward(self, logits: Tensor, labels: Tensor, ranks: Tensor, mix: str = "gumbel",
                pseudo: Tensor | None = None) -> DynamicOutput:
        if pseudo is None:
            pseudo = self.pseudo_labels(logits, mix)
        w, target = self.corrected_target(labels, ranks, pseudo)
        m = self.margins()
        loss = soft_cross_entropy(logits.float() + m, target)
        return DynamicOutput(loss, w, target, m)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
