"""Sigmoid belief networks: exact enumeration, unbiased score-function gradients (REINFORCE,
NVIL, VIMCO), their variance ordering, the bounds' ordering, the MNIST loader and the CLI."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mapa_vae.cli import main
from mapa_vae.data.images import load_image_dataset
from mapa_vae.data.loading import load_dataset
from mapa_vae.evaluation.sbn import exact_bound, exact_log_likelihood, importance_log_likelihood
from mapa_vae.inference.objectives import Objective
from mapa_vae.inference.score_function import NVIL, VIMCO, Reinforce, leave_one_out_bounds
from mapa_vae.models.likelihoods import BernoulliLikelihood
from mapa_vae.models.sbn import SBN

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist.npz"  # beside the checkout
D = 6


def _model(layers: tuple[int, ...] = (2, 1), baseline: bool = False, scale: float = 3.0) -> SBN:
    """A tiny float64 SBN with weights large enough that q is far from p(h | x)."""
    m = SBN(D, layers, BernoulliLikelihood(), baseline=baseline).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith("baseline"):
                p.mul_(scale)
    return m


def _x() -> torch.Tensor:
    return torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 1]], dtype=torch.float64)


def _params(m: SBN) -> list[torch.nn.Parameter]:
    return [p for n, p in m.named_parameters() if not n.startswith("baseline")]


def _grad(m: SBN) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                      for p in _params(m)])


def _exact_grad(m: SBN, x: torch.Tensor, samples: int) -> torch.Tensor:
    m.zero_grad()
    exact_bound(m, x, samples).sum().backward()
    return _grad(m)


def _draws(m: SBN, objective: Objective, x: torch.Tensor, reps: int, chunks: int) -> torch.Tensor:
    """``chunks`` gradient estimates ``(chunks, P)``, each the mean over ``reps`` independent draws
    per point (the batch holds ``reps`` copies of ``x``)."""
    xs = x.repeat(reps, 1)
    out = []
    for _ in range(chunks):
        m.zero_grad()
        (objective(m, xs, torch.arange(xs.shape[0])).surrogate.sum() / reps).backward()
        out.append(_grad(m))
    return torch.stack(out)


def _recognition_mask(m: SBN) -> torch.Tensor:
    return torch.cat([torch.full((p.numel(),), n.startswith("encoder"))
                      for n, p in m.named_parameters() if not n.startswith("baseline")])


# --- exact enumeration ------------------------------------------------------------------------


def test_exact_log_likelihood_is_brute_force_and_normalized():
    m = _model((3,))
    w, c = m.decoder.net.weight.detach(), m.decoder.net.bias.detach()
    prior = m.prior.logits.detach()
    x = _x()
    brute = torch.zeros(x.shape[0], dtype=torch.float64)
    for bits in itertools.product((0.0, 1.0), repeat=3):
        h = torch.tensor(bits, dtype=torch.float64)
        log_ph = (h * F.logsigmoid(prior) + (1 - h) * F.logsigmoid(-prior)).sum()
        logits = w @ h + c
        log_px = (x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum(-1)
        brute += (log_ph + log_px).exp()
    torch.testing.assert_close(exact_log_likelihood(m, x), brute.log())
    every_x = torch.tensor(list(itertools.product((0.0, 1.0), repeat=D)), dtype=torch.float64)
    two = _model((2, 2))
    total = exact_log_likelihood(two, every_x).exp().sum()
    assert abs(float(total) - 1.0) < 1e-10, f"Σ_x p(x) = {float(total)} for a 2-layer SBN"


def test_multi_sample_bounds_tighten_towards_log_p():
    m, x = _model(), _x()
    log_p = exact_log_likelihood(m, x)
    bounds = [exact_bound(m, x, k) for k in (1, 2, 3)]
    for k, (lo, hi) in enumerate(itertools.pairwise([*bounds, log_p]), start=1):
        assert bool((lo < hi - 1e-6).all()), f"L_{k} = {lo.tolist()} not below {hi.tolist()}"


def test_importance_sampling_agrees_with_enumeration():
    m, x = _model(), _x()
    est, err = importance_log_likelihood(m, x, samples=4000)
    exact = exact_log_likelihood(m, x).detach()
    z = (est - exact) / err
    assert bool((z.abs() < 5).all()), f"IS {est.tolist()} ± {err.tolist()} vs exact {exact.tolist()}"


# --- VIMCO's leave-one-out signals -------------------------------------------------------------


def test_leave_one_out_bounds_match_their_definition_and_survive_a_dominant_weight():
    log_w = torch.randn(5, 4, dtype=torch.float64)
    w = log_w.exp()
    for k in range(5):
        others = torch.cat([log_w[:k], log_w[k + 1 :]])
        geo = (w.sum(0) - w[k] + others.mean(0).exp()) / 5
        ari = (w.sum(0) - w[k] + others.exp().mean(0)) / 5
        torch.testing.assert_close(leave_one_out_bounds(log_w)[k], geo.log())
        torch.testing.assert_close(leave_one_out_bounds(log_w, "arithmetic")[k], ari.log())
    spiky = torch.tensor([[0.0], [-900.0], [-1000.0]], dtype=torch.float64)
    loo = leave_one_out_bounds(spiky)
    assert bool(torch.isfinite(loo).all())
    # without the dominant weight only the others remain: log((w_2 + w_3 + sqrt(w_2 w_3)) / 3)
    torch.testing.assert_close(loo[0, 0], torch.tensor(-900.0 + math.log1p(math.exp(-50) + math.exp(-100))
                                                        - math.log(3), dtype=torch.float64))


# --- unbiasedness: mean estimate = exact gradient of the estimator's own bound ------------------


def _check_unbiased(m: SBN, objective: Objective, samples: int, scale: torch.Tensor | None = None,
                    reps: int = 500, chunks: int = 40) -> None:
    x = _x()
    exact = _exact_grad(m, x, samples)
    if scale is not None:
        exact = exact * scale
    g = _draws(m, objective, x, reps, chunks)
    mean, se = g.mean(0), g.std(0) / math.sqrt(chunks)
    z = (mean - exact) / (se + 1e-3 * exact.abs().max())
    worst = int(z.abs().argmax())
    assert float(z.abs().max()) < 5.5, (
        f"{type(objective).__name__}: coordinate {worst}: mean {float(mean[worst]):.4f} ± "
        f"{float(se[worst]):.4f}, exact {float(exact[worst]):.4f}")


@pytest.mark.parametrize(("objective", "samples"), [(Reinforce(1), 1), (Reinforce(3), 3), (VIMCO(3), 3),
                                                    (VIMCO(3, mean="arithmetic"), 3)],
                         ids=["reinforce-1", "reinforce-3", "vimco-3", "vimco-3-arithmetic"])
def test_score_function_estimators_are_unbiased(objective, samples):
    _check_unbiased(_model(), objective, samples)


def test_nvil_is_unbiased_up_to_its_per_layer_scaling():
    m = _model(baseline=True)
    m.eval()  # running statistics frozen: mean c_i, σ_i = 2 (layer 1) and 1 (layer 2)
    with torch.no_grad():
        m.baseline.mean.copy_(torch.tensor([0.7, -0.4]))
        m.baseline.var.copy_(torch.tensor([4.0, 0.25]))
    scale = torch.cat([torch.full((p.numel(),), 0.5 if n.startswith("encoder.0") else 1.0,
                                  dtype=torch.float64)
                       for n, p in m.named_parameters() if not n.startswith("baseline")])
    _check_unbiased(m, NVIL(1), 1, scale)


def test_the_unbiasedness_check_catches_a_biased_estimator():
    """Dropping the score term (``log q`` detached) biases the recognition gradient: the same
    check must fail, or it proves nothing."""

    class NoScore(Objective):
        def __call__(self, model, x, index):
            t = model.trace(x, 1)
            log_w = t.log_w()[0]
            return type(Reinforce(1)(model, x, index))(log_w.detach(), log_w)

    with pytest.raises(AssertionError, match="NoScore"):
        _check_unbiased(_model(), NoScore(), 1)


# --- variance ordering ------------------------------------------------------------------------


def _recognition_variance(m: SBN, objective: Objective, chunks: int = 150, reps: int = 20) -> float:
    """Per-draw variance of the recognition gradient, summed over coordinates."""
    g = _draws(m, objective, _x(), reps, chunks)[:, _recognition_mask(m)]
    return float(g.var(0).sum() * reps)


def test_variance_ordering_reinforce_above_nvil_and_vimco():
    m = _model(baseline=True)
    # fit NVIL's baseline network and running statistics first (recognition and model fixed)
    opt = torch.optim.Adam(m.baseline.parameters(), lr=1e-2)
    nvil, x = NVIL(1), _x().repeat(20, 1)
    for _ in range(300):
        opt.zero_grad()
        (-nvil(m, x, torch.arange(x.shape[0])).surrogate.mean()).backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        m.baseline.var.fill_(1.0)  # no rescaling: both estimate the same ELBO gradient
    v_reinforce, v_nvil = _recognition_variance(m, Reinforce(1)), _recognition_variance(m, NVIL(1))
    v_reinforce3, v_vimco3 = _recognition_variance(m, Reinforce(3)), _recognition_variance(m, VIMCO(3))
    report = (f"recognition-gradient variance: REINFORCE {v_reinforce:.2f}, NVIL {v_nvil:.2f}; "
              f"REINFORCE(3) {v_reinforce3:.2f}, VIMCO(3) {v_vimco3:.2f}")
    print(report)
    assert v_nvil < 0.5 * v_reinforce, report
    assert v_vimco3 < 0.5 * v_reinforce3, report


# --- data and command line ----------------------------------------------------------------------


@pytest.mark.skipif(not MNIST.exists(), reason=f"{MNIST} absent (the binarized MNIST file is optional)")
def test_binarized_mnist_file_loads_with_its_own_split():
    ds = load_dataset(str(MNIST))
    assert (ds.train.shape, ds.val.shape, ds.test.shape) == ((50000, 784), (10000, 784), (10000, 784))
    assert abs(float(ds.train.mean()) - 0.1306) < 1e-3


def test_cli_train_sample_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--method", "sbn", "--estimator", "nvil", "--samples", "2", "--layers", "5", "3",
               "--data", "digits-binary", "--epochs", "2", "--eval-every", "1", "--quiet", "--out", str(run)])
    assert rc in (0, None)
    capsys.readouterr()
    samples = tmp_path / "s.npy"
    main(["sample", str(run), "--n", "7", "--out", str(samples)])
    x = np.load(samples)
    assert x.shape == (7, 64) and set(np.unique(x)) <= {0.0, 1.0}
    test = load_image_dataset("digits-binary", 0, 0, 0, 0).test.numpy()
    data = tmp_path / "test.npy"
    np.save(data, test)
    capsys.readouterr()
    main(["evaluate", str(run), "--data", str(data)])
    out = capsys.readouterr().out
    assert "exact" in out, out
    value = float(out.split("log-likelihood:")[1].split()[0])
    assert -64 * math.log(2) - 30 < value < 0, out  # a trained 8-unit SBN beats nothing by much yet
    big = tmp_path / "big"
    main(["train", "--method", "sbn", "--estimator", "vimco", "--samples", "3", "--layers", "20",
          "--data", "digits-binary", "--epochs", "1", "--quiet", "--out", str(big)])
    capsys.readouterr()
    main(["evaluate", str(big), "--data", str(data)])
    out = capsys.readouterr().out
    assert "importance sampling" in out and "S=1000" in out and "standard error" in out, out


def test_evaluate_reads_the_test_split_of_a_binarized_mnist_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    splits = {k: np.packbits(rng.random((n, 784)) < 0.2, axis=1) for k, n in
              (("train", 40), ("valid", 10), ("test", 12))}
    path = tmp_path / "mnist.npz"
    np.savez(path, **splits)
    run = tmp_path / "run"
    main(["train", "--method", "sbn", "--estimator", "nvil", "--samples", "1", "--layers", "4",
          "--data", str(path), "--likelihood", "bernoulli", "--epochs", "1", "--quiet",
          "--out", str(run)])
    capsys.readouterr()
    main(["evaluate", str(run), "--data", str(path)])
    out = capsys.readouterr().out
    assert "over 12 points" in out and "exact" in out, out  # the file's own 12 test rows


def test_compare_includes_sbn_on_binary_images(tmp_path, capsys):
    out = tmp_path / "cmp"
    main(["compare", "--data", "digits-binary", "--methods", "sbn", "mapa", "--epochs", "1",
          "--samples", "2", "--layers", "6", "--n-train", "60", "--n-val", "20", "--n-test", "20",
          "--val-grid", "256", "--test-grid", "512",
          "--quiet", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| sbn |" in table and "| mapa |" in table, table
    import json
    metrics = json.loads((out / "comparison.json").read_text())
    assert set(metrics) == {"sbn", "mapa"} and metrics["sbn"]["estimator"] == "nvil"
    from PIL import Image
    with Image.open(out / "samples.png") as img:  # image grids, not a scatter of two pixels
        assert img.size[0] > 300
