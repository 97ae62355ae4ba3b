"""MI estimators on correlated Gaussians with known MI = -(d/2) log(1 - rho^2)."""

from __future__ import annotations

import math

import pytest
import torch

from distillrec.methods.tpad.mutual_information import (
    CLUB,
    CLUBSample,
    MINE,
    InfoNCE,
    gaussian_mi,
    info_nce,
)

D = 10


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def sample(n: int, rho: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I); y = rho x + sqrt(1 - rho^2) e, so corr(x_k, y_k) = rho."""
    x = torch.randn(n, D, generator=gen)
    y = rho * x + math.sqrt(1 - rho * rho) * torch.randn(n, D, generator=gen)
    return x, y


def train_and_eval(est, rho, seed, steps, batch, eval_batch, eval_reps=10, lr=3e-3):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(est.parameters(), lr=lr)
    for _ in range(steps):
        x, y = sample(batch, rho, gen)  # fresh samples every step: no overfitting
        opt.zero_grad()
        est.learning_loss(x, y).backward()
        opt.step()
    with torch.no_grad():
        vals = [est(*sample(eval_batch, rho, gen)).item() for _ in range(eval_reps)]
    return sum(vals) / len(vals)


def test_gaussian_mi_formula():
    assert gaussian_mi(0.0, D) == 0.0
    assert gaussian_mi(0.5, 10) == pytest.approx(-5 * math.log(0.75))


def test_info_nce_function_bounds():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
    # perfect critic -> log N: unit vectors, so with temperature->0 the diagonal dominates
    assert info_nce(x, x, temperature=1e-3).item() == pytest.approx(math.log(64), abs=1e-4)
    # constant critic -> exactly 0
    assert info_nce(x, x, critic=lambda a, b: torch.zeros(a.shape[0], b.shape[0])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("rho", [0.2, 0.5, 0.8])
def test_mine_lower_bound(rho):
    truth = gaussian_mi(rho, D)
    est = MINE(D, D, hidden_size=64, ma_rate=0.01)
    val = train_and_eval(est, rho, seed=0, steps=400, batch=256, eval_batch=2048)
    assert val < truth + 0.1, (val, truth)
    if rho <= 0.5:
        assert val > 0.8 * truth, (val, truth)
    else:
        assert val > 0.5 * truth, (val, truth)


@pytest.mark.parametrize("rho", [0.2, 0.5, 0.8])
def test_infonce_lower_bound(rho):
    truth = gaussian_mi(rho, D)
    est = InfoNCE(D, D, hidden_size=64, embed_dim=32)
    val = train_and_eval(est, rho, seed=0, steps=400, batch=512, eval_batch=512)
    assert val < min(truth, math.log(512)) + 0.05, (val, truth)
    if rho <= 0.5:
        assert val > 0.8 * truth, (val, truth)
    else:
        assert val > 0.5 * min(truth, math.log(512)), (val, truth)


@pytest.mark.parametrize("cls", [CLUB, CLUBSample])
@pytest.mark.parametrize("rho", [0.2, 0.5, 0.8])
def test_club_upper_bound(cls, rho):
    truth = gaussian_mi(rho, D)
    est = cls(D, D, hidden_size=64)
    val = train_and_eval(est, rho, seed=0, steps=300, batch=256, eval_batch=512, eval_reps=20)
    assert val > truth - 0.05, (val, truth)


def test_mine_moving_average_gradient_matches_plain_at_init():
    """First corrected step: ma_et = batch mean, so the gradient equals the DV gradient."""
    torch.manual_seed(0)
    x, y = sample(128, 0.5, torch.Generator().manual_seed(0))
    a = MINE(D, D, ma_rate=0.01)
    b = MINE(D, D)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    a.learning_loss(x, y).backward()
    torch.manual_seed(1)
    b.learning_loss(x, y).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6)


def _linear_gaussian_mi(f: torch.Tensor, y: torch.Tensor) -> float:
    """Gaussian-decoder MI lower bound: 1/2 (log det Cov y - log det Cov(y | linear fit of f))."""
    f1 = torch.cat([f, torch.ones(f.shape[0], 1)], dim=1)
    coef = torch.linalg.lstsq(f1, y).solution
    resid = y - f1 @ coef
    yc = y - y.mean(0)
    return 0.5 * (torch.logdet(yc.t() @ yc) - torch.logdet(resid.t() @ resid)).item()


def test_minimising_club_through_encoder_reduces_mi():
    rho, seed = 0.8, 0
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    enc = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.ReLU(), torch.nn.Linear(32, D))
    club = CLUB(D, D, hidden_size=64)
    opt_q = torch.optim.Adam(club.parameters(), lr=3e-3)
    opt_f = torch.optim.Adam(enc.parameters(), lr=1e-3)

    def measure() -> tuple[float, float]:
        """Independent measurements: linear-Gaussian MI bound and a freshly trained InfoNCE."""
        with torch.no_grad():
            x, y = sample(4096, rho, gen)
            lin = _linear_gaussian_mi(enc(x), y)
        probe = InfoNCE(D, D, hidden_size=64, embed_dim=32)
        opt = torch.optim.Adam(probe.parameters(), lr=3e-3)
        for _ in range(200):
            x, y = sample(256, rho, gen)
            with torch.no_grad():
                fx = enc(x)
            opt.zero_grad()
            probe.learning_loss(fx, y).backward()
            opt.step()
        with torch.no_grad():
            nce = sum(probe(enc(x), y).item() for x, y in (sample(256, rho, gen) for _ in range(5))) / 5
        return lin, nce

    lin0, nce0 = measure()
    for _ in range(200):
        x, y = sample(256, rho, gen)
        # (a) fit q(y | f(x)) on detached features so the bound stays an upper bound.
        # Several q steps per encoder step: with one, the encoder outruns q and drives
        # the CLUB *estimate* to ~0 while the real MI barely moves (checked).
        for _ in range(5):
            opt_q.zero_grad()
            club.learning_loss(enc(x).detach(), y).backward()
            opt_q.step()
        # (b) move the encoder down the CLUB estimate
        opt_f.zero_grad()
        club(enc(x), y).backward()
        opt_f.step()
    lin1, nce1 = measure()
    assert lin0 > 2.0 and nce0 > 1.5, (lin0, nce0)
    # measured on 3 seeds: linear bound 2.6-2.9 -> 1.8-1.9 nats (ratio 0.66-0.71), probe InfoNCE ratio 0.69-0.74
    assert lin1 < 0.8 * lin0, (lin0, lin1)
    assert nce1 < 0.85 * nce0, (nce0, nce1)
