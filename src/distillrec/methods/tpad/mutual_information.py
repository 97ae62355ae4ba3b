"""Mutual-information estimators used by TPAD's transitional pattern alignment.

TPAD minimises an *upper* bound (CLUB) between knowledge-specific features and
transition features (disentanglement) and maximises a *lower* bound (MINE)
between knowledge features and transition features (distillation).  This module
holds those estimators plus InfoNCE, following the official CLUB repository
(``Linear95/CLUB``, ``mi_estimators.py``; Cheng et al., ICML 2020) and MINE
(Belghazi et al., ICML 2018).  See ``shared/reference/papers.md`` §1.6.

Conventions shared by every estimator here:

* inputs are batches ``x`` of shape ``[N, x_dim]`` and ``y`` of shape
  ``[N, y_dim]`` whose rows are *paired* samples from the joint p(x, y);
* ``forward(x, y)`` returns the MI estimate in nats (a scalar tensor);
* ``learning_loss(x, y)`` is what the estimator's *own* parameters minimise.
  Callers that use the estimate as a training signal for an encoder should
  update the estimator on detached features and the encoder on ``forward``
  in alternating steps (the schedule of the CLUB README).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLUB", "CLUBSample", "MINE", "InfoNCE", "info_nce", "gaussian_mi"]


def gaussian_mi(rho: float, d: int) -> float:
    """True MI of x, y in R^d with independent dimensions correlated by ``rho``.

    For one standard bivariate Gaussian pair I = -1/2 log(1 - rho^2); the d
    dimensions are independent so the MI adds up.  Used as ground truth in tests.
    """
    return -0.5 * d * math.log(1.0 - rho * rho)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


# --------------------------------------------------------------------------- CLUB
class CLUB(nn.Module):
    """vCLUB: contrastive log-ratio upper bound with a Gaussian q(y|x).

    I(x; y) <= E_p(x,y)[log q(y|x)] - E_p(x)E_p(y)[log q(y|x)] holds when q is a
    good fit of p(y|x), so q is trained by maximum likelihood (``learning_loss``)
    and the bound is read off with ``forward``.  The normalising constant of the
    Gaussian and the log-variance term cancel between the two expectations, which
    is why only the squared-error terms appear in the estimate.
    """

    def __init__(self, x_dim: int, y_dim: int, hidden_size: int = 64) -> None:
        super().__init__()
        # Same shapes as the reference: hidden/2 units; Tanh keeps logvar in
        # (-1, 1), which stops q collapsing to a spike early in training.
        h = max(hidden_size // 2, 1)
        self.p_mu = _mlp(x_dim, h, y_dim)
        self.p_logvar = nn.Sequential(_mlp(x_dim, h, y_dim), nn.Tanh())

    def get_mu_logvar(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.p_mu(x), self.p_logvar(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.get_mu_logvar(x)
        inv_var = torch.exp(-logvar)
        # log q(y_i | x_i) up to the terms that cancel: [N, y_dim]
        positive = -0.5 * (mu - y) ** 2 * inv_var
        # mean_j log q(y_j | x_i) over all pairs (j ranges over the batch,
        # i = j included as in the reference): [N, N, y_dim] -> mean over j.
        diff = y.unsqueeze(0) - mu.unsqueeze(1)  # [i, j, d]
        negative = -0.5 * (diff**2).mean(dim=1) * inv_var
        return (positive.sum(-1) - negative.sum(-1)).mean()

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Unnormalised mean log q(y|x) (constant 1/2 log 2*pi dropped)."""
        mu, logvar = self.get_mu_logvar(x)
        return (-0.5 * (mu - y) ** 2 * torch.exp(-logvar) - 0.5 * logvar).sum(-1).mean()

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of q; minimise it on *detached* features."""
        return -self.log_likelihood(x, y)


class CLUBSample(CLUB):
    """Sampled vCLUB: one random permutation of y gives the negatives.

    O(N) instead of O(N^2) memory; unbiased for the same quantity as ``CLUB``
    but noisier.  The reference divides an un-halved difference by 2; we keep
    the 1/2 inside the Gaussian term instead, which is the same number.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.get_mu_logvar(x)
        inv_var = torch.exp(-logvar)
        perm = torch.randperm(y.shape[0], device=y.device)
        positive = -0.5 * (mu - y) ** 2 * inv_var
        negative = -0.5 * (mu - y[perm]) ** 2 * inv_var
        return (positive.sum(-1) - negative.sum(-1)).mean()


# --------------------------------------------------------------------------- MINE
class MINE(nn.Module):
    """MINE: Donsker-Varadhan lower bound with a statistics network T(x, y).

    I(x; y) >= E_p(x,y)[T] - log E_p(x)p(y)[exp T].  The marginal samples are
    the batch's y shuffled by a random permutation.

    The minibatch gradient of the log term is biased (log of a sample mean).
    With ``ma_rate`` set, ``learning_loss`` uses Belghazi et al.'s correction:
    the denominator E[exp T] of that gradient is replaced by an exponential
    moving average across steps.  ``forward`` always returns the plain estimate.
    """

    def __init__(self, x_dim: int, y_dim: int, hidden_size: int = 64, ma_rate: float | None = None) -> None:
        super().__init__()
        self.T = _mlp(x_dim + y_dim, hidden_size, 1)
        self.ma_rate = ma_rate
        # Running E[exp T] on marginal samples; a buffer so it follows .to(device)
        # and is saved in checkpoints.  NaN means "not initialised yet".
        self.register_buffer("ma_et", torch.tensor(float("nan")))

    def _scores(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(y.shape[0], device=y.device)
        t_joint = self.T(torch.cat([x, y], dim=-1)).squeeze(-1)
        t_marg = self.T(torch.cat([x, y[perm]], dim=-1)).squeeze(-1)
        return t_joint, t_marg

    @staticmethod
    def _dv(t_joint: torch.Tensor, t_marg: torch.Tensor) -> torch.Tensor:
        # log mean exp via logsumexp for numerical stability.
        return t_joint.mean() - (torch.logsumexp(t_marg, dim=0) - math.log(t_marg.shape[0]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._dv(*self._scores(x, y))

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t_joint, t_marg = self._scores(x, y)
        if self.ma_rate is None:
            return -self._dv(t_joint, t_marg)
        # Bias-corrected gradient: d/dθ log E[e^T] = E[e^T ∇T] / E[e^T]; use the
        # moving average for the denominator.  The surrogate below has exactly
        # that gradient; its value is not the estimate (use forward for that).
        mean_et = torch.exp(t_marg).mean()
        with torch.no_grad():
            if torch.isnan(self.ma_et):
                self.ma_et.copy_(mean_et.detach())
            else:
                self.ma_et.mul_(1.0 - self.ma_rate).add_(self.ma_rate * mean_et.detach())
        return -(t_joint.mean() - mean_et / self.ma_et)


# ------------------------------------------------------------------------ InfoNCE
def info_nce(
    x: torch.Tensor,
    y: torch.Tensor,
    critic: nn.Module | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """InfoNCE lower bound: log N - CE(scores, diagonal).

    ``critic(x, y)`` must return an ``[N, N]`` score matrix (row i = x_i against
    every y_j).  Without a critic, x and y are taken as ready-made embeddings and
    the scores are ``x @ y.T / temperature``.  The bound can never exceed log N.
    """
    scores = critic(x, y) if critic is not None else x @ y.t() / temperature
    n = scores.shape[0]
    labels = torch.arange(n, device=scores.device)
    return math.log(n) - F.cross_entropy(scores, labels)


class InfoNCE(nn.Module):
    """InfoNCE with a separable critic f(x)·g(y) / temperature.

    Separable critics cost one matrix product for all N^2 pairs, which is what
    makes in-batch negatives cheap.
    """

    def __init__(
        self, x_dim: int, y_dim: int, hidden_size: int = 64, embed_dim: int = 32, temperature: float = 1.0
    ) -> None:
        super().__init__()
        self.f = _mlp(x_dim, hidden_size, embed_dim)
        self.g = _mlp(y_dim, hidden_size, embed_dim)
        self.temperature = temperature

    def critic(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.f(x) @ self.g(y).t() / self.temperature

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return info_nce(x, y, critic=self.critic)

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.forward(x, y)


# ------------------------------------------------------------- MI of what is exported
def _standardised_pca(x: torch.Tensor, d: int) -> torch.Tensor:
    x = x.double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-9)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    z = u[:, :d] * s[:d]
    return (z / z.std(0).clamp_min(1e-9)).float()


def fitted_mi_estimates(x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, dims: int = 32, steps: int = 400,
                        batch_size: int = 256, heldout: float = 0.2) -> dict[str, float]:
    """MINE lower and vCLUB upper estimates of I(x; y) between two item representations (rows = items), from fresh
    estimators fitted after training, so they measure what an embedding *holds*, not what a projector learnt: both
    sides standardised and reduced to their first ``dims`` principal components; estimators fitted on a random 80% of
    the items, read on the other 20% (``*_heldout``); the same on pairs whose y rows are shuffled (``*_shuffled``:
    what no dependence gives, the number to read the first against)."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    zx, zy = _standardised_pca(x, min(dims, x.shape[1], n - 1)), _standardised_pca(y, min(dims, y.shape[1], n - 1))
    perm = torch.randperm(n, generator=g)
    n_test = max(2, int(round(heldout * n)))
    test, train = perm[:n_test], perm[n_test:]
    out: dict[str, float] = {"n_fit": int(len(train)), "n_heldout": int(n_test), "dims": int(zx.shape[1])}
    for tag, ys in (("", zy), ("_shuffled", zy[torch.randperm(n, generator=g)])):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mine, club = MINE(zx.shape[1], zy.shape[1], 64, ma_rate=0.01), CLUB(zx.shape[1], zy.shape[1], 64)
            opt = torch.optim.Adam([*mine.parameters(), *club.parameters()], lr=1e-3)
            for _ in range(steps):
                b = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=g)]
                opt.zero_grad()
                (mine.learning_loss(zx[b], ys[b]) + club.learning_loss(zx[b], ys[b])).backward()
                opt.step()
            with torch.no_grad():  # the DV bound's permutation is random: average a few
                out[f"mine{tag}_heldout"] = float(torch.stack([mine(zx[test], ys[test]) for _ in range(8)]).mean())
                out[f"club{tag}_heldout"] = float(club(zx[test], ys[test]))
    return out
