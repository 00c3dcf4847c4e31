"""compare(): one TrainConfig for every method; side by side in processes it is the same protocol
as one after another (the same numbers); a folder with results is refused, reused or replaced."""

from __future__ import annotations

import json
import shutil

import pytest

from mapa_vae import MapaError, TrainConfig
from mapa_vae.experiments.compare import compare

CFG = TrainConfig(data="circle", epochs=2, restarts=2, hidden=(8,), n_train=60, n_val=20, n_test=20,
                  samples=5, val_grid=64, test_grid=64, prior_steps=5)


@pytest.mark.slow
def test_side_by_side_is_the_same_protocol(tmp_path):
    cfg = TrainConfig(**{**CFG.to_dict(), "cache_dir": str(tmp_path / "cache")})
    apart = compare(cfg, tmp_path / "apart", ("vae", "iwae"), progress=False, jobs=2)
    inline = compare(cfg, tmp_path / "inline", ("vae", "iwae"), progress=False, jobs=1)
    for method in ("vae", "iwae"):
        for key in ("test_log_lik", "val_log_lik", "test_kl", "restart", "epochs"):
            assert apart[method][key] == inline[method][key], (method, key)
        saved = json.loads((tmp_path / "apart" / method / "config.json").read_text())
        assert (saved["epochs"], saved["restarts"], saved["method"]) == (2, 2, method)
    assert json.loads((tmp_path / "apart" / "comparison.json").read_text()).keys() == {"vae", "iwae"}


@pytest.mark.slow
def test_resume_reuses_finished_runs_and_continues_interrupted_ones(tmp_path):
    cfg = TrainConfig(**{**CFG.to_dict(), "cache_dir": str(tmp_path / "cache")})
    first = compare(cfg, tmp_path / "c", ("vae", "iwae"), progress=False, jobs=1)
    model = tmp_path / "c" / "vae" / "model.pt"
    stamp = model.stat().st_mtime_ns
    # iwae as if interrupted: its checkpoint stays, the finished files go
    for name in ("config.json", "metrics.json", "model.pt", "trained.pt", "history.json", "curves.png"):
        (tmp_path / "c" / "iwae" / name).unlink(missing_ok=True)
    with pytest.raises(MapaError, match="holds results"):
        compare(cfg, tmp_path / "c", ("vae", "iwae"), progress=False)
    again = compare(cfg, tmp_path / "c", ("vae", "iwae"), progress=False, resume=True, jobs=1)
    assert model.stat().st_mtime_ns == stamp  # vae: reused, not trained again
    assert again["vae"] == first["vae"]
    assert again["iwae"]["test_log_lik"] == first["iwae"]["test_log_lik"]  # continued to the end
    with pytest.raises(MapaError, match="another configuration"):
        compare(TrainConfig(**{**cfg.to_dict(), "lr": 0.01}), tmp_path / "c", ("vae", "iwae"),
                progress=False, resume=True)
    with pytest.raises(MapaError, match="also has iwae"):  # a smaller comparison would replace it
        compare(cfg, tmp_path / "c", ("vae",), progress=False, resume=True)
    shutil.rmtree(tmp_path / "c" / "iwae")
    replaced = compare(cfg, tmp_path / "c", ("vae",), progress=False, overwrite=True)
    assert set(replaced) == {"vae"}


def test_a_config_is_checked_before_any_folder_is_made(tmp_path):
    with pytest.raises(MapaError, match="--seed"):
        compare("circle", tmp_path / "c", ("vae",), progress=False, seed=-1)
    with pytest.raises(MapaError, match="--resume and --overwrite"):
        compare(CFG, tmp_path / "c", ("vae",), progress=False, resume=True, overwrite=True)
    assert not (tmp_path / "c").exists()
