"""Shared fixtures: every test starts from the same seeds; small float64 models and data."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mapa_vae.data.groundtruth import ground_truth
from mapa_vae.models.latent import CodeEncoder, Decoder, GaussianEncoder, LatentVariableModel, StandardNormal
from mapa_vae.models.likelihoods import GaussianLikelihood
from mapa_vae.models.networks import MLP


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny networks gain nothing from threads, and lose a lot when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002
    torch.manual_seed(0)


@pytest.fixture
def circle_data() -> torch.Tensor:
    """200 points of the analytic circle (σ² = 0.01), float64."""
    x, _ = ground_truth("circle", surrogate=False).sample(200, torch.Generator().manual_seed(0))
    return x


def _mapa_model(noise_var: float = 0.01, hidden: tuple[int, ...] = (16, 16)) -> LatentVariableModel:
    return LatentVariableModel(
        CodeEncoder(MLP(2, 1, hidden)),
        Decoder(MLP(1, 2, hidden), GaussianLikelihood(noise_var)),
        StandardNormal(1),
    ).double()


def _vae_model(noise_var: float = 0.01, hidden: tuple[int, ...] = (16, 16)) -> LatentVariableModel:
    return LatentVariableModel(
        GaussianEncoder(MLP(2, 2, hidden)),
        Decoder(MLP(1, 2, hidden), GaussianLikelihood(noise_var)),
        StandardNormal(1),
    ).double()


@pytest.fixture
def mapa_model() -> LatentVariableModel:
    """A small float64 MAPA model (deterministic encoder) for 2-D data, σ² = 0.01."""
    return _mapa_model()


@pytest.fixture
def vae_model() -> LatentVariableModel:
    """A small float64 VAE model (Gaussian encoder) for 2-D data, σ² = 0.01."""
    return _vae_model()
