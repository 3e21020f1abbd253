"""Time grids: every kind, for every SDE and step count, is what its docstring says it is."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_diffusion import SDE, DiscreteVPSDE, get_sde
from sde_diffusion.solvers import GRIDS, time_grid
from sde_diffusion.solvers.grids import final_time

F64 = torch.float64

SDES = st.one_of(
    st.builds(
        get_sde,
        st.just("vp"),
        beta_min=st.floats(0.01, 1.0),
        beta_max=st.floats(5.0, 30.0),
    ),
    st.builds(get_sde, st.just("subvp"), beta_max=st.floats(5.0, 30.0)),
    st.builds(get_sde, st.just("vp_cosine"), T=st.floats(0.5, 0.9946)),
    st.builds(get_sde, st.just("ve"), sigma_max=st.floats(1.0, 100.0)),
    st.builds(lambda n: DiscreteVPSDE.ddpm(N=n), st.integers(10, 1000)),
)
STEPS = st.integers(1, 200)


def ends(sde: SDE, data: st.DataObject) -> tuple[float, float]:
    """t_start in (T/2, T] (T itself half the time) and t_end in [t_min, t_start / 4]."""
    t0 = data.draw(st.one_of(st.just(sde.T), st.floats(sde.T / 2, sde.T)))
    t1 = data.draw(st.floats(sde.t_min, t0 / 4))
    return t0, t1


def log_snr(sde: SDE, ts: torch.Tensor) -> torch.Tensor:
    gamma, sigma = sde.marginal(ts)
    return torch.log(gamma) - torch.log(sigma)


@settings(max_examples=40, deadline=None)
@given(sde=SDES, steps=STEPS, kind=st.sampled_from(GRIDS), data=st.data())
def test_every_grid_decreases_strictly_from_t_start_to_t_end(sde, steps, kind, data) -> None:
    t0, t1 = ends(sde, data)
    ts = time_grid(sde, steps, kind, t_end=t1, t_start=t0)
    assert ts.dtype == F64 and ts.shape == (steps + 1,)
    assert ts[0].item() == t0 and ts[-1].item() == t1
    assert bool((ts[1:] < ts[:-1]).all())


@settings(max_examples=40, deadline=None)
@given(sde=SDES, steps=STEPS, data=st.data())
def test_log_snr_grid_has_equal_lambda_steps(sde, steps, data) -> None:
    t0, t1 = ends(sde, data)
    lam = log_snr(sde, time_grid(sde, steps, "log_snr", t_end=t1, t_start=t0))
    expected = torch.linspace(float(lam[0]), float(lam[-1]), steps + 1, dtype=F64)
    torch.testing.assert_close(lam, expected, rtol=1e-7, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(sde=SDES, steps=STEPS, rho=st.floats(1.0, 10.0), data=st.data())
def test_edm_grid_follows_karras_eq_5(sde, steps, rho, data) -> None:
    """sigma_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho on sigma_t / gamma_t."""
    t0, t1 = ends(sde, data)
    level = torch.exp(-log_snr(sde, time_grid(sde, steps, "edm", t_end=t1, t_start=t0, rho=rho)))
    s_max, s_min = float(level[0]), float(level[-1])
    expected = [
        (s_max ** (1 / rho) + i / steps * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        for i in range(steps + 1)
    ]
    torch.testing.assert_close(level, torch.tensor(expected, dtype=F64), rtol=1e-7, atol=0)


@settings(max_examples=40, deadline=None)
@given(sde=SDES, steps=STEPS, data=st.data())
def test_uniform_and_quadratic_grids(sde, steps, data) -> None:
    t0, t1 = ends(sde, data)
    u = torch.arange(steps + 1, dtype=F64) / steps
    uniform = time_grid(sde, steps, "uniform", t_end=t1, t_start=t0)
    torch.testing.assert_close(uniform, t0 + (t1 - t0) * u, rtol=1e-12, atol=1e-12)
    quad = time_grid(sde, steps, "quadratic", t_end=t1, t_start=t0)
    # sqrt of the distance to t_end falls linearly: DDIM's "quad" spacing
    torch.testing.assert_close(torch.sqrt((quad - t1) / (t0 - t1)), 1 - u, rtol=1e-10, atol=1e-10)


def test_defaults_run_from_T_to_t_min() -> None:
    for name in ("vp", "subvp", "vp_cosine", "ve", "ddpm"):
        sde = get_sde(name)
        for kind in GRIDS:
            ts = time_grid(sde, 10, kind)
            assert (ts[0].item(), ts[-1].item()) == (sde.T, sde.t_min)


@pytest.mark.parametrize("kind", GRIDS)
def test_one_step_grid_is_its_two_ends(kind: str) -> None:
    sde = get_sde("vp")
    assert time_grid(sde, 1, kind).tolist() == [sde.T, sde.t_min]


def test_rho_shapes_the_edm_grid_towards_small_noise() -> None:
    """Larger rho puts more points at low noise: the midpoint time falls as rho grows."""
    sde = get_sde("ve")
    mids = [time_grid(sde, 10, "edm", rho=rho)[5].item() for rho in (1.0, 3.0, 7.0)]
    assert mids[0] > mids[1] > mids[2]


@given(SDES, STEPS, st.floats(0.1, 2.0))
@settings(max_examples=60, deadline=None)
def test_final_time_makes_the_tweedie_jump_a_share_of_an_equal_step(sde, steps, share) -> None:
    """final_time(sde, steps, share): the jump t_end -> 0 is `share` of the equal step of
    [t_end, T] (share 1: the trailing timesteps, T / (steps + 1)), or t_end = t_min if that is
    later."""
    t_end = final_time(sde, steps, share)
    if t_end > sde.t_min:
        assert t_end == pytest.approx(share * (sde.T - t_end) / steps, rel=1e-12)
    else:
        assert t_end == sde.t_min and share * (sde.T - sde.t_min) / steps <= sde.t_min * (1 + 1e-12)
    assert final_time(sde, steps) == final_time(sde, steps, 0.5)
    with pytest.raises(ValueError, match="share"):
        final_time(sde, steps, 0.0)
