"""bench/curriculum_reach.py: the fitted pass-rate mixture and the simulation of the shipped samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def cr():
    return load_bench("curriculum_reach")


def test_group_rates_closed_form(cr):
    # Beta(1, 1) is uniform: E[p] = 1/2, P(all 2 wrong) = E[(1-p)^2] = 1/3, P(both right) = 1/3, spread 1/3
    mean, dead, spread = cr.group_rates(0.0, 1.0, 1.0, 2)
    assert (mean, dead, spread) == pytest.approx((0.5, 1 / 3, 1 / 3))
    # half the questions never right: the mean halves, and they join the dead ends
    mean, dead, spread = cr.group_rates(0.5, 1.0, 1.0, 2)
    assert (mean, dead, spread) == pytest.approx((0.25, 0.5 + 1 / 6, 1 / 6))


def test_fit_reproduces_the_measured_rates(cr):
    m = cr.MEASURED
    z, a, b = cr.fit_mixture(m["em_rate"], m["dead_end_frac"], m["spread_frac"], m["group"])
    got = cr.group_rates(z, a, b, m["group"])
    assert all(math.isclose(g, w, abs_tol=0.01) for g, w in zip(got, (m["em_rate"], m["dead_end_frac"], m["spread_frac"])))


def test_simulation_counts_signal_and_revisits(cr):
    from rexrag.curriculum import PassRateSampler
    from rexrag.data import PromptSampler

    # every question is right half the time: with G=1 no group can hold a right and a wrong rollout
    p = np.full(4, 0.5)
    res = cr.simulate(PromptSampler(4, 2, seed=0), p, 4, 1, np.random.default_rng(0), learns=False)
    assert res["signal"] == [0, 0, 0, 0]
    assert res["revisits"] == [0, 0, 2, 2]  # the second pass over 4 questions draws only seen ones
    # the curriculum learns: a pool where one question of 50 is ever right, the learning sampler draws it again
    p = np.zeros(50)
    p[7] = 0.5
    sampler = PassRateSampler(50, 5, seed=0)
    res = cr.simulate(sampler, p, 40, 4, np.random.default_rng(1), learns=True)
    assert sampler.stats[7][0] > 0 and sum(res["revisits"]) > 0
    assert int(sampler.weights().argmax()) == 7
    assert sum(res["signal"]) > 0  # only question 7 can give a group signal, and it was drawn


@pytest.mark.parametrize("argv, says", [(["--steps", "15,ten"], "--steps: comma-separated whole numbers"),
                                        (["--steps", "0,15"], "--steps: positive step counts"),
                                        (["--sims", "0"], "--sims must be at least 1"),
                                        (["--decay", "0"], "--decay: in (0, 1]")])
def test_bad_options_are_one_line_usage_errors(cr, capsys, argv, says):
    with pytest.raises(SystemExit) as exc:
        cr.main(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err
