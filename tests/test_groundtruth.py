"""The paper's ground-truth curves and the shipped surrogate MLPs (App. C.1, SPEC §6)."""

from __future__ import annotations

import math

import pytest
import torch

from mapa_vae.data.groundtruth import (
    GROUND_TRUTHS,
    SURROGATE_MSE_TARGET,
    fit_surrogate,
    load_surrogate,
    surrogate_mse,
)


@pytest.mark.parametrize("name", list(GROUND_TRUTHS))
def test_shipped_surrogate_is_within_the_papers_mse(name):
    assert surrogate_mse(load_surrogate(name), name) < SURROGATE_MSE_TARGET


def test_curves_have_the_printed_shapes():
    z = torch.linspace(-3, 3, 101, dtype=torch.float64)
    circle = GROUND_TRUTHS["circle"].curve(z)
    torch.testing.assert_close(circle.norm(dim=-1), torch.ones(101, dtype=torch.float64))
    absval = GROUND_TRUTHS["absolute-value"].curve(z)
    assert torch.equal(absval[:, 0], absval[:, 1]) and (absval >= 0).all()
    clusters = GROUND_TRUTHS["clusters"].curve(z)
    torch.testing.assert_close(clusters.norm(dim=-1), torch.ones(101, dtype=torch.float64))
    spiral = GROUND_TRUTHS["spiral-dots"].curve(z)  # radius t grows with z
    assert (spiral.norm(dim=-1)[1:] >= spiral.norm(dim=-1)[:-1] - 1e-9).all()
    fig8 = GROUND_TRUTHS["figure-8"].curve(torch.tensor([0.0], dtype=torch.float64))
    u = 1.5 * math.pi  # Φ(0) = 1/2: the crossing of the figure-8 at the origin
    torch.testing.assert_close(fig8[0], torch.tensor([math.sqrt(2) / 2 * math.cos(u) / 2, 0.0],
                                                     dtype=torch.float64), atol=1e-12, rtol=0)


def test_fitting_procedure_converges():
    """A short refit of the circle already gets far below the starting error."""
    net, mse = fit_surrogate("circle", steps=400, batch=512)
    assert mse < 2e-2
    assert abs(surrogate_mse(net, "circle") - mse) < 1e-12
