"""Image data sets (digits, sprites, MNIST-1D) and the convolutional encoder / decoder nets."""

from __future__ import annotations

import math
import random
import sys
import time

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from mapa_vae.data.images import (
    IMAGE_DATASETS,
    SHAPES,
    digits,
    image_shape,
    load_image_dataset,
    make_sprites,
    mnist1d,
    render_sprites,
    sprites,
)
from mapa_vae.errors import MapaError
from mapa_vae.inference.exact import compute_posterior
from mapa_vae.inference.objectives import IWAE, MAPA, EmpiricalLogLikelihood
from mapa_vae.kernels import BernoulliKernel
from mapa_vae.models.latent import CodeEncoder, Decoder, GaussianEncoder, LatentVariableModel, StandardNormal
from mapa_vae.models.likelihoods import BernoulliLikelihood, make_likelihood
from mapa_vae.models.networks import ConvDecoderNet, ConvEncoderNet, build_networks

# ----------------------------------------------------------------------------- digits


def _sorted_rows(x: torch.Tensor) -> np.ndarray:
    a = x.numpy()
    return a[np.lexsort(a.T[::-1])]


@pytest.mark.parametrize("binarize", [False, True])
def test_digits_splits_partition_the_data_reproducibly(binarize: bool) -> None:
    ds = digits(binarize, seed=3)
    assert [t.shape for t in (ds.train, ds.val, ds.test)] == [(1197, 64), (300, 64), (300, 64)]
    assert ds.train.dtype == torch.float64 and ds.truth is None
    full = torch.from_numpy(load_digits().data / 16.0)
    if binarize:
        full = (full > 0.5).double()
    # the three splits are the data set's rows, each used exactly once
    np.testing.assert_array_equal(_sorted_rows(torch.cat([ds.train, ds.val, ds.test])), _sorted_rows(full))
    again, other = digits(binarize, seed=3), digits(binarize, seed=4)
    assert torch.equal(again.train, ds.train) and torch.equal(again.test, ds.test)
    assert not torch.equal(other.train, ds.train)


def test_digits_ranges_and_binarization() -> None:
    grey, binary = digits(False, seed=0), digits(True, seed=0)
    x = torch.cat([grey.train, grey.val, grey.test])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(x * 16, (x * 16).round())  # grey levels 0..16
    # same seed, same order: the binary images threshold the grey ones at 1/2
    assert torch.equal(binary.train, (grey.train > 0.5).double())
    assert set(binary.test.unique().tolist()) == {0.0, 1.0}


def test_digits_labels_travel_with_their_images() -> None:
    ds = digits(False, seed=1)
    assert ds.z_train is not None and ds.z_test is not None
    y_tr, y_te = ds.z_train[:, 0].long(), ds.z_test[:, 0].long()
    assert set(y_tr.tolist()) == set(range(10))
    centroids = torch.stack([ds.train[y_tr == c].mean(0) for c in range(10)])  # (10, 64)
    predicted = torch.cdist(ds.test, centroids).argmin(1)
    assert (predicted == y_te).double().mean() > 0.85  # misaligned labels would give ~0.1


# ----------------------------------------------------------------------------- sprites


def _moments(images: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """Total intensity, centre of mass (x, y) and ellipse orientation of ``(n, size²)`` images."""
    img = images.reshape(-1, size, size).astype(np.float64) / 255
    g = (np.arange(size) + 0.5) / size
    mass = img.sum((1, 2))
    cx = (img.sum(1) * g).sum(1) / mass
    cy = (img.sum(2) * g).sum(1) / mass
    dx, dy = g[None, None, :] - cx[:, None, None], g[None, :, None] - cy[:, None, None]
    mu20, mu02, mu11 = ((img * m).sum((1, 2)) for m in (dx * dx, dy * dy, dx * dy))
    return mass, cx, cy, 0.5 * np.arctan2(2 * mu11, mu20 - mu02)


def test_sprites_are_reproducible_and_splits_extend() -> None:
    a = sprites(60, 20, 20, seed=5)
    b = sprites(60, 20, 20, seed=5)
    c = sprites(30, 20, 20, seed=5)
    d = sprites(60, 20, 20, seed=6)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert a.z_train is not None and c.z_train is not None and a.z_val is not None and c.z_val is not None
    # a smaller training split is a prefix of a larger one; validation does not move
    assert torch.equal(c.train, a.train[:30]) and torch.equal(c.z_train, a.z_train[:30])
    assert torch.equal(c.val, a.val) and torch.equal(c.z_val, a.z_val)
    assert not torch.equal(a.train, d.train)


def test_sprites_values_and_factor_ranges() -> None:
    ds = sprites(400, 5, 5, size=32, seed=0)
    x, z = ds.train, ds.z_train
    assert z is not None and ds.truth is None
    assert x.shape == (400, 32 * 32) and x.dtype == torch.float64 and z.shape == (400, 5)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(z[:, 0].unique().tolist()) == set(range(len(SHAPES)))
    assert float(z[:, 1].min()) >= 0.5 and float(z[:, 1].max()) <= 1.0
    assert float(z[:, 2].min()) >= 0.0 and float(z[:, 2].max()) < 2 * math.pi
    assert float(z[:, 3:].min()) >= 0.0 and float(z[:, 3:].max()) <= 1.0
    # every sprite is whole: the border rows and columns stay dark
    img = x.reshape(-1, 32, 32)
    assert float(img[:, [0, -1], :].max()) < 0.1 and float(img[:, :, [0, -1]].max()) < 0.1
    binary = sprites(400, 5, 5, seed=0, binary=True).train
    assert set(binary.unique().tolist()) == {0.0, 1.0}
    assert abs(float(binary.mean() - x.mean())) < 0.01 * float(x.mean())


@pytest.mark.parametrize("size", [32, 64])
def test_sprite_area_and_centre_match_the_factors(size: int) -> None:
    s = make_sprites(1200, size, seed=1)
    shape, scale, angle, fx, fy = s.factors.T
    mass, cx, cy, orient = _moments(s.images, size)
    unit = (scale * 0.22) ** 2  # (circumradius at this scale)², in image areas
    areas = {0: 1.4**2, 1: math.pi * 0.5, 2: 3 * math.sqrt(3) / 4}  # square, ellipse, triangle
    for k, area in areas.items():
        m = shape == k
        ratio = mass[m] / size**2 / unit[m] / area
        assert np.abs(ratio - 1).max() < 0.06, SHAPES[k]
        # these shapes' centroids are their centres: within a fraction of a pixel of the factors
        assert np.abs(cx[m] - (0.25 + 0.5 * fx[m])).max() * size < 0.2
        assert np.abs(cy[m] - (0.25 + 0.5 * fy[m])).max() * size < 0.2
    for k in range(len(SHAPES)):  # every shape, the heart included
        m = shape == k
        assert np.corrcoef(scale[m], mass[m])[0, 1] > 0.95
        assert np.corrcoef(fx[m], cx[m])[0, 1] > 0.99 and np.corrcoef(fy[m], cy[m])[0, 1] > 0.99
    # the ellipse's long axis points along its angle (mod π)
    m = shape == 1
    diff = np.angle(np.exp(2j * (orient[m] - angle[m]))) / 2
    assert np.abs(diff).max() < 0.05


def test_sprite_rotation_by_the_symmetry_period_is_the_identity() -> None:
    f = np.array([[k, 0.8, 0.4, 0.3, 0.6] for k in range(len(SHAPES))])
    turned = f.copy()
    turned[:, 2] += [math.pi / 2, math.pi, 2 * math.pi / 3, 2 * math.pi]
    a, b = render_sprites(f, 32).astype(int), render_sprites(turned, 32).astype(int)
    assert np.abs(a - b).max() <= 1  # up to rounding to 1/255
    half = f.copy()
    half[:, 2] += [math.pi / 4, math.pi / 2, math.pi / 3, math.pi]  # half a period: a new image
    assert (np.abs(a - render_sprites(half, 32).astype(int)).max(1) > 100).all()
    with pytest.raises(MapaError, match="shape ids"):
        render_sprites(np.array([[4, 0.8, 0.0, 0.5, 0.5]]))


def test_sprites_render_fast() -> None:
    start = time.perf_counter()
    s = make_sprites(20_000, 32, seed=0)
    assert time.perf_counter() - start < 10.0
    assert s.images.dtype == np.uint8 and s.images.shape == (20_000, 1024)


# ----------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_without_the_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(MapaError, match="pip install mnist1d"):
        mnist1d()


def test_mnist1d_generates_offline_and_leaves_global_rngs_alone() -> None:
    pytest.importorskip("mnist1d")
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002
    ds = mnist1d(seed=0, num_samples=1000, n_val=100)
    np.testing.assert_array_equal(np.random.get_state()[1], np_before)  # noqa: NPY002
    assert random.getstate() == py_before
    assert [t.shape for t in (ds.train, ds.val, ds.test)] == [(700, 40), (100, 40), (200, 40)]
    x = torch.cat([ds.train, ds.val, ds.test])
    assert abs(float(x.mean())) < 1e-6 and abs(float(x.std()) - 1) < 1e-3  # standardized
    assert torch.equal(mnist1d(seed=0, num_samples=1000, n_val=100).test, ds.test)


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", list(IMAGE_DATASETS))
def test_registry_loads_every_data_set(name: str) -> None:
    if name == "mnist1d":
        pytest.importorskip("mnist1d")
    ds = load_image_dataset(name, n_train=20, n_val=5, n_test=5, seed=0)
    assert ds.dim == math.prod(image_shape(name))
    assert ds.z_train is not None
    assert ds.z_train.shape == (ds.train.shape[0], len(IMAGE_DATASETS[name].factors))
    lik = IMAGE_DATASETS[name].likelihood
    if lik != "gaussian":
        make_likelihood({"name": lik}).check_data(ds.train, name)  # in [0, 1]


def test_registry_refuses_unknown_names() -> None:
    with pytest.raises(MapaError, match="unknown image data set"):
        load_image_dataset("cifar")
    with pytest.raises(MapaError, match="unknown image data set"):
        image_shape("cifar")


# ----------------------------------------------------------------------------- networks

SHAPES_TO_TRY = [(1, 8, 8), (1, 28, 28), (2, 7, 9), (1, 1, 40)]


@pytest.mark.parametrize("shape", SHAPES_TO_TRY)
@pytest.mark.parametrize("lead", [(5,), (3, 5)])
def test_conv_nets_keep_leading_dims_and_do_not_mix_the_batch(shape: tuple[int, int, int],
                                                               lead: tuple[int, ...]) -> None:
    d = math.prod(shape)
    enc, dec = ConvEncoderNet(shape, 6, (8, 16), 32), ConvDecoderNet(3, shape, (16, 8), 32)
    x, z = torch.rand(*lead, d), torch.randn(*lead, 3)
    assert enc(x).shape == (*lead, 6) and dec(z).shape == (*lead, d)
    last = (*(0,) * (len(lead) - 1), 4)
    torch.testing.assert_close(enc(x)[last], enc(x[last][None])[0])
    torch.testing.assert_close(dec(z)[last], dec(z[last][None])[0])


@pytest.mark.parametrize("shape", SHAPES_TO_TRY)
def test_conv_nets_pass_gradients_everywhere(shape: tuple[int, int, int]) -> None:
    d = math.prod(shape)
    enc, dec = ConvEncoderNet(shape, 4, (8, 16), 32), ConvDecoderNet(2, shape, (16, 8), 32)
    x = torch.rand(6, d, requires_grad=True)
    z = enc(x)[:, :2]
    (dec(z) ** 2).sum().backward()
    for net in (enc, dec):
        for name, p in net.named_parameters():
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    # every input pixel reaches the code (padding moves the image, never drops part of it)
    assert x.grad is not None and bool((x.grad.abs().sum(0) > 0).all())


def test_build_networks() -> None:
    enc_net, dec_net = build_networks("conv", 64, 2, image_shape=(1, 8, 8), hidden=(32,))
    assert isinstance(enc_net(4), ConvEncoderNet) and isinstance(dec_net(), ConvDecoderNet)
    assert enc_net(4)(torch.rand(3, 64)).shape == (3, 4) and dec_net()(torch.rand(3, 2)).shape == (3, 64)
    mlp_enc, mlp_dec = build_networks("mlp", 64, 2, hidden=(16,))
    assert mlp_enc(2)(torch.rand(3, 64)).shape == (3, 2) and mlp_dec()(torch.rand(3, 2)).shape == (3, 64)
    with pytest.raises(MapaError, match="image shape"):
        build_networks("conv", 64, 2)
    with pytest.raises(MapaError, match="64 columns"):
        build_networks("conv", 64, 2, image_shape=(1, 8, 9))
    with pytest.raises(MapaError, match="unknown network"):
        build_networks("resnet", 64, 2)


def _conv_model(encoder: type[GaussianEncoder] | type[CodeEncoder], latent: int) -> LatentVariableModel:
    out = 2 * latent if encoder is GaussianEncoder else latent
    return LatentVariableModel(
        encoder(ConvEncoderNet((1, 8, 8), out, (16, 32), 64)),
        Decoder(ConvDecoderNet(latent, (1, 8, 8), (32, 16), 64), BernoulliLikelihood()),
        StandardNormal(latent),
    )


def test_conv_models_give_finite_iwae_and_mapa_bounds() -> None:
    ds = digits(True, seed=0)
    train = ds.train[:200]
    index = torch.arange(32)
    vae = _conv_model(GaussianEncoder, 3).double()
    bound = IWAE(8)(vae, train[:32], index).value
    assert bound.shape == (32,) and bool(torch.isfinite(bound).all())
    assert bool((bound < 0).all())  # log-probabilities of binary images

    mapa = _conv_model(CodeEncoder, 3).double()
    posterior = compute_posterior(train, BernoulliKernel(0.9))
    exact = EmpiricalLogLikelihood(train)(mapa, train[:32]).value
    full = MAPA(posterior, train, k=200, samples=0)(mapa, train[:32], index).value
    partial = MAPA(posterior, train, k=10, samples=0)(mapa, train[:32], index).value
    sampled = MAPA(posterior, train, k=10, samples=4)(mapa, train[:32], index).value
    torch.testing.assert_close(full, exact)  # k = N, S = 0 is the empiricalized likelihood
    assert bool((partial <= exact + 1e-12).all()) and bool(torch.isfinite(sampled).all())


def test_iwae_training_on_binary_digits_raises_the_bound() -> None:
    ds = digits(True, seed=0)
    train, val = ds.train.float(), ds.val.float()
    model = _conv_model(GaussianEncoder, 4)
    objective = IWAE(5)

    def held_out() -> float:
        with torch.no_grad():
            return float(objective(model, val, torch.arange(val.shape[0])).value.mean())

    before = held_out()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, train.shape[0], (64,), generator=g)
        loss = -objective(model, train[idx], idx).surrogate.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    assert after > before + 15, (before, after)
    assert after > -30, after
