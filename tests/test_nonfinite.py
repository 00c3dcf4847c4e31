"""Non-finite values never reach the weights and never pass for a result.

- a step whose bound, decoder output or gradient is NaN or infinite is skipped before the
  weights (and the optimizer's state) change, and counted; with R copies only that copy skips;
- a run whose every step was skipped is no usable model (exit 3), written as strict JSON, and
  ``sample`` refuses it; a noise variance that would make every step non-finite is refused up
  front;
- a non-finite validation score is written as null plus its reason;
- log-space sums: all ``-inf`` log-weights stay ``-inf`` (and the step is skipped), float32
  log-mean-exp over extreme log-weights matches float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mapa_vae.cli import main
from mapa_vae.errors import NoUsableModel
from mapa_vae.registry import METHODS
from mapa_vae.storage import load_tensors
from mapa_vae.training.loop import train
from mapa_vae.training.restart_state import RestartAdam

# --- one step skipped ----------------------------------------------------------------------------


def test_non_finite_steps_are_skipped_and_counted(tiny_config, tmp_path, monkeypatch):
    """A NaN bound at one step leaves the weights as they were and is reported."""
    from mapa_vae.inference import objectives

    calls = {"n": 0}
    original = objectives.MAPA.__call__

    def poisoned(self, model, x, index):
        calls["n"] += 1
        bound = original(self, model, x, index)
        if calls["n"] == 3:
            return objectives.Bound(bound.value * float("nan"), bound.surrogate * float("nan"))
        return bound

    monkeypatch.setattr(objectives.MAPA, "__call__", poisoned)
    result = train(tiny_config(method="mapa", epochs=2, n_train=200), tmp_path / "run",
                   progress=False)  # 4 steps: the third is poisoned
    assert result.metrics["skipped_steps"] == 1
    ck = load_tensors(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def _inject(kind: str, out: torch.Tensor) -> torch.Tensor:
    """Poison a decoder output the way an overflow would: gradients still flow through it."""
    mask = torch.zeros_like(out, dtype=torch.bool)
    mask.view(-1, out.shape[-1])[0, 0] = True
    if kind == "nan":
        return torch.where(mask, out * math.nan, out)
    if kind == "inf":
        return torch.where(mask, out + math.inf, out)
    return out + 1e30  # "huge": finite outputs, but every log-likelihood overflows to -inf


@pytest.mark.parametrize("kind", ["nan", "inf", "huge"])
@pytest.mark.parametrize("method", ["vae", "iwae", "mapa"])
def test_poisoned_decoder_output_skips_the_step(tiny_config, tmp_path, monkeypatch, method, kind):
    """Decoder output poisoned at step 3: the weights after it equal those before it, the
    optimizer state does not advance, the skip is counted and no checkpoint holds inf or NaN."""
    cls = type(METHODS[method])
    build = cls.build
    seen: dict[str, object] = {"calls": 0}

    def build_with_hook(self, arch, likelihood, cfg):
        model = build(self, arch, likelihood, cfg)

        def hook(module, inputs, out):
            if not (module.training and torch.is_grad_enabled()):
                return None
            seen["calls"] += 1
            if seen["calls"] == 3:
                seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
                return _inject(kind, out)
            if seen["calls"] == 4:
                seen["after"] = {k: v.clone() for k, v in model.state_dict().items()}
            return None

        model.decoder.net.register_forward_hook(hook)
        return model

    monkeypatch.setattr(cls, "build", build_with_hook)
    cfg = tiny_config(method=method, hidden=(16, 16), samples=10, epochs=4, n_train=200)
    result = train(cfg, tmp_path / "run", progress=False)
    assert seen["calls"] == 8  # one decoder pass per step, 2 steps per epoch
    before, after = seen["before"], seen["after"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.metrics["skipped_steps"] == 1
    ck = load_tensors(tmp_path / "run" / "checkpoint.pt")
    tensors = [*ck["model"].values(), *ck["best_model"].values()]
    tensors += [t for s in ck["optimizer"]["state"].values() for t in s.values()]
    assert all(torch.isfinite(t).all() for t in tensors)
    steps = {float(s["step"]) for s in ck["optimizer"]["state"].values()}
    assert steps == {7.0}  # 8 steps, 1 skipped
    assert not all(torch.equal(after[k], v) for k, v in result.trained.state_dict().items())


def test_restart_adam_skips_one_restart_and_matches_torch_adam():
    """A step skipped in restart 1 leaves restart 0 moving; each equals torch's Adam run alone."""
    torch.manual_seed(0)
    w0 = torch.randn(2, 3, 4, dtype=torch.float64)
    grads = torch.randn(4, 2, 3, 4, dtype=torch.float64)
    active = torch.tensor([[True, True], [True, False], [True, True], [False, True]])
    stacked = w0.clone().requires_grad_()
    opt = RestartAdam([stacked], lr=1e-2)
    for g, on in zip(grads, active, strict=True):
        stacked.grad = torch.where(on[:, None, None], g, torch.full_like(g, float("nan")))
        opt.step(on)
    for r in range(2):
        w = w0[r].clone().requires_grad_()
        ref = torch.optim.Adam([w], lr=1e-2)
        for g, on in zip(grads, active, strict=True):
            if on[r]:
                w.grad = g[r].clone()
                ref.step()
        torch.testing.assert_close(stacked.detach()[r], w.detach(), rtol=1e-13, atol=1e-15)


# --- log-space sums ------------------------------------------------------------------------


def test_logsumexp_of_all_minus_inf():
    """All log-weights -inf: the bound is -inf, so the loss is not finite and the training loop
    skips the step before backpropagating. (torch's gradient here is NaN, not finite: the skip
    is what keeps it out of the weights; see ``test_poisoned_decoder_output_skips_the_step``.)"""
    log_w = torch.full((10, 3), -math.inf, requires_grad=True)
    bound = torch.logsumexp(log_w, 0) - math.log(10)
    assert torch.equal(bound, torch.full((3,), -math.inf))
    assert not torch.isfinite(-bound.mean())
    # one point's weights all -inf, the others finite: still not finite as a batch loss
    mixed = torch.cat([torch.full((10, 1), -math.inf), torch.zeros(10, 2)], 1)
    assert not torch.isfinite(-(torch.logsumexp(mixed, 0) - math.log(10)).mean())
    # a single -inf weight among finite ones: finite value, finite gradient (weight exactly 0)
    part = torch.zeros(10, 3)
    part[0] = -math.inf
    part.requires_grad_(True)
    (torch.logsumexp(part, 0) - math.log(10)).sum().backward()
    assert part.grad is not None and torch.isfinite(part.grad).all()
    assert torch.equal(part.grad[0], torch.zeros(3))


@pytest.mark.parametrize("offset", [1e4, -1e4, 0.0])
def test_float32_log_mean_exp_matches_float64_on_extreme_log_weights(offset):
    """``logsumexp(log w) - log S`` in float32 agrees with a float64 reference for log-weights
    near ±1e4, spread over hundreds of nats; the normalized weights stay a distribution."""
    g = torch.Generator().manual_seed(0)
    s, b = 100, 50
    log_w64 = offset + 300.0 * torch.randn(s, b, generator=g, dtype=torch.float64)
    log_w64[:, 0] = offset  # ties
    log_w64[1:, 1] = offset - 1e4  # one dominant weight
    log_w32 = log_w64.float().requires_grad_(True)
    value32 = torch.logsumexp(log_w32, 0) - math.log(s)
    top = log_w64.max(0).values
    ref = top + torch.log(torch.exp(log_w64 - top).sum(0)) - math.log(s)  # written out, float64
    assert torch.isfinite(value32).all()
    # float32 can only resolve |log w| ≈ 1e4 to ~1e-3 nats: the inputs' own rounding
    torch.testing.assert_close(value32.double(), ref, rtol=1e-6, atol=4e-3)
    torch.testing.assert_close(value32[0].double(), torch.tensor(offset, dtype=torch.float64),
                               rtol=0, atol=4e-3)
    value32.sum().backward()
    w = log_w32.grad
    assert w is not None and torch.isfinite(w).all()
    # w = exp(log w - value), both near 1e4 in float32: each weight is good to ~1 ulp(1e4) ≈ 1e-3
    torch.testing.assert_close(w.sum(0), torch.ones(b), rtol=0, atol=2e-3)
    assert float(w[0, 1]) == pytest.approx(1.0)
    with torch.no_grad():  # the naive formula overflows in float32: why logsumexp is needed
        naive = torch.log(torch.exp(log_w32).mean(0))
    assert not torch.isfinite(naive).all()


# --- every step skipped, or no finite score -------------------------------------------------


def test_all_steps_skipped_is_no_usable_model_exit_3(tmp_path, train_args, strict_json, capsys):
    """Finite data at the scale 1e30: every squared error overflows float32, so every step is
    non-finite; the CLI says so with the numbers, exits 3, writes strict JSON, and ``sample``
    refuses the run instead of drawing from an untrained model."""
    points = tmp_path / "huge.npy"
    np.save(points, np.random.default_rng(0).normal(size=(200, 2)) * 1e30)
    out = tmp_path / "run"
    argv = train_args(out, method="vae", epochs=2, data=str(points), noise_var=0.5,
                      n_train=None, n_val=None, n_test=None)  # the file's own 160/20/20 split
    assert main(argv) == 3
    err = capsys.readouterr().err
    metrics = strict_json(out / "metrics.json")
    steps = metrics["steps"]
    assert steps >= 2 and metrics["usable"] is False and metrics["skipped_steps"] == steps
    assert "no usable model" in err and f"{steps} of {steps} steps were skipped" in err, err
    strict_json(out / "history.json")
    assert main(["sample", str(out), "--n", "5", "--out", str(tmp_path / "x.npy")]) == 2
    assert "no usable model" in capsys.readouterr().err


def test_a_noise_var_too_small_for_the_dtype_is_refused_in_one_line(tmp_path, train_args,
                                                                    one_line_error, capsys):
    """--noise-var 1e-300 would make every step non-finite: refused up front, exit 2, one line."""
    out = tmp_path / "run"
    assert main(train_args(out, method="vae", epochs=2, noise_var=1e-300)) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "--noise-var" in err and "1e-300" in err
    assert not (out / "metrics.json").exists()


def test_metrics_files_are_strict_json_with_reasons(tiny_config, tmp_path, strict_json, monkeypatch):
    """A validation score of -inf (weights stay finite) is written as null plus its reason; the
    returned metrics keep the float. No finite validation score: no usable model."""
    from mapa_vae.methods.gaussian import VAEMethod

    monkeypatch.setattr(VAEMethod, "validation_log_likelihood", lambda *a: -math.inf)
    with pytest.raises(NoUsableModel, match="no finite validation score") as caught:
        train(tiny_config(method="vae", epochs=2), tmp_path / "run", progress=False)
    assert math.isinf(caught.value.result.metrics["best_val_selection_score"])
    metrics = strict_json(tmp_path / "run" / "metrics.json")
    assert metrics["best_val_selection_score"] is None
    assert metrics["best_val_selection_score_nonfinite"] == "-inf"
    history = strict_json(tmp_path / "run" / "history.json")
    assert history[-1]["val_log_lik"] is None and history[-1]["val_log_lik_nonfinite"] == "-inf"

