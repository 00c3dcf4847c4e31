"""Seeds: copy r of a run seeded s is seeded from (s, r), so different seeds never share a copy,
copy 0 is the single run (tests/test_restarts.py checks its weights), and any non-negative
integer is a seed."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from mapa_vae.cli import main
from mapa_vae.config import TrainConfig
from mapa_vae.data.loading import load_dataset
from mapa_vae.errors import MapaError
from mapa_vae.models.likelihoods import make_likelihood
from mapa_vae.registry import METHODS
from mapa_vae.seeds import check_seed, copy_seeds
from mapa_vae.training.distributed import init_parallel
from mapa_vae.training.engines import make_engine
from mapa_vae.training.loop import _likelihood_config


def initial_copies(tiny_config, method: str, seed: int, restarts: int) -> list[dict[str, torch.Tensor]]:
    """The initial weights of every copy of a run, and each copy's first draw of its stream."""
    cfg = tiny_config(method=method, seed=seed, restarts=restarts, epochs=1)
    data = load_dataset(cfg.data, cfg.n_train, cfg.n_val, cfg.n_test, cfg.data_seed)
    likelihood = make_likelihood(_likelihood_config(cfg, data))
    engine, _ = make_engine(METHODS[method], cfg, data, likelihood, data.train.float(),
                            init_parallel("cpu"))
    copies = []
    for r in range(restarts):
        weights = {k: v.clone() for k, v in engine.member(r).state_dict().items()}
        with engine.streams.use(r):
            weights["first draw"] = torch.rand(4)
        copies.append(weights)
    engine.close()
    return copies


@pytest.mark.parametrize("method", ["mapa", "vae"])
def test_different_seeds_share_no_copy(tiny_config, method):
    """``--seed 0`` and ``--seed 1`` with ``--restarts 3``: six copies, no two with the same
    initial weights or the same stream; copy 0 of R = 3 starts as the single run."""
    copies = initial_copies(tiny_config, method, 0, 3) + initial_copies(tiny_config, method, 1, 3)
    for a, b in itertools.combinations(copies, 2):
        assert a.keys() == b.keys()
        assert not any(torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point()
                       and a[k].numel() > 1)
    single = initial_copies(tiny_config, method, 1, 1)[0]
    assert all(torch.equal(single[k], copies[3][k]) for k in single)


def test_copy_seeds_are_distinct_and_any_size():
    seeds = {copy_seeds(s, r).torch for s in range(30) for r in range(10)}
    assert len(seeds) == 300  # no (seed, copy) pair collides with another
    assert all(0 <= s < 2**64 for s in seeds)
    big = copy_seeds(2**70, 0)
    assert big != copy_seeds(2**70 + 1, 0) and big != copy_seeds(2**70 - 2**64, 0)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(MapaError, match="--seed must be a non-negative integer"):
            check_seed(bad)


def test_seeds_of_any_size_train_and_negative_ones_are_one_line(train_args, tmp_path, capsys):
    TrainConfig(seed=2**70)
    out = tmp_path / "run"
    assert main(train_args(out, epochs=1, restarts=2, seed="18446744073709551616")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seed_per_copy"] == [copy_seeds(2**64, r).torch for r in range(2)]
    capsys.readouterr()
    assert main(train_args(tmp_path / "neg", epochs=1, restarts=2, seed=-1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed" in err[0], err
    with pytest.raises(MapaError, match="seed"):
        TrainConfig(seed=-1)
