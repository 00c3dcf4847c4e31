"""Networks, likelihoods and the latent-variable model (docs/design.md §1).

Every stochastic piece returns a ``torch.distributions.Distribution``: a :class:`Likelihood`
maps decoder outputs to ``p(x | f(z))``, a :class:`Decoder` maps ``z`` to that distribution,
a :class:`GaussianEncoder` maps ``x`` to a mean-field ``q(z | x)`` and :class:`StandardNormal`
is the prior. MAPA's encoder ``g_ψ`` is deterministic (the atoms of the empirical prior are
``z_i = g_ψ(x_i)``), so :class:`CodeEncoder` returns a tensor of codes.


Encoder and decoder networks for images (docs/design.md §8): small convolutional nets beside the MLP.

The networks are plain ``nn.Module``s on *flattened* data, so they slot into the model classes
of :mod:`mapa_vae.models` unchanged: ``GaussianEncoder(ConvEncoderNet(shape, 2 * L))`` (VAE,
IWAE), ``CodeEncoder(ConvEncoderNet(shape, L))`` (MAPA) and
``Decoder(ConvDecoderNet(L, shape), likelihood)``. Both accept any leading batch dimensions:
the IWAE bound decodes ``(S, B, L)`` samples and MAPA ``(U, L)`` codes.

Any image size works. Each of the ``n = len(channels)`` stride-2 layers halves (encoder) or
doubles (decoder) the side, so the nets work on a canvas of ``⌈H / 2ⁿ⌉·2ⁿ × ⌈W / 2ⁿ⌉·2ⁿ``
pixels: the encoder zero-pads the image into its centre and the decoder crops the same window
out. Sides divisible by ``2ⁿ`` (8, 32, 64 with the default two layers; 28 = 7·4) need neither.

>>> import torch
>>> enc, dec = ConvEncoderNet((1, 8, 8), 4), ConvDecoderNet(2, (1, 8, 8))
>>> tuple(enc(torch.zeros(3, 5, 64)).shape), tuple(dec(torch.zeros(7, 2)).shape)
((3, 5, 4), (7, 64))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MapaError
from ..registry import ACTIVATIONS, NETWORKS

__all__ = ["ConvDecoderNet", "ConvEncoderNet", "build_networks"]


for _name, _act in (("tanh", nn.Tanh), ("relu", nn.ReLU), ("leaky_relu", nn.LeakyReLU), ("silu", nn.SiLU)):
    ACTIVATIONS.register(_name, _act)



class MLP(nn.Sequential):
    """Fully connected network ``d_in → hidden… → d_out`` (the paper's is 3 × 50, tanh here)."""

    def __init__(
        self, d_in: int, d_out: int, hidden: Sequence[int] = (50, 50, 50), activation: str = "tanh"
    ) -> None:
        layers: list[nn.Module] = []
        widths = [d_in, *hidden]
        for a, b in pairwise(widths):
            layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(widths[-1], d_out))
        super().__init__(*layers)



NETWORKS.register("mlp", "fully connected encoder and decoder")
NETWORKS.register("conv", "a small conv encoder and decoder for images")



def _check(image_shape: Sequence[int], channels: Sequence[int], activation: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise MapaError(f"image shape must be (C, H, W) with positive sides, got {tuple(image_shape)}")
    if not channels or min(channels) < 1:
        raise MapaError(f"conv channels must be one or more positive widths, got {tuple(channels)}")
    ACTIVATIONS[activation]  # an unknown name is a one-line error
    return shape[0], shape[1], shape[2]



def _widths(hidden: int | Sequence[int]) -> tuple[int, ...]:
    return (hidden,) if isinstance(hidden, int) else tuple(hidden)



class _Canvas:
    """The padded canvas of an ``H × W`` image for ``n`` stride-2 layers: its side lengths, the
    side at the bottom of the net, and the offsets of the image inside it."""

    def __init__(self, h: int, w: int, n: int) -> None:
        f = 2**n
        self.h0, self.w0 = math.ceil(h / f), math.ceil(w / f)  # side after n halvings
        self.top, self.left = (self.h0 * f - h) // 2, (self.w0 * f - w) // 2
        self.pad = (self.left, self.w0 * f - w - self.left, self.top, self.h0 * f - h - self.top)



class ConvEncoderNet(nn.Module):
    """``x (…, C·H·W) ↦ (…, out_dim)``: stride-2 4×4 convolutions, then an MLP head.

    ``channels`` are the widths of the convolutions (each halves the side), ``hidden`` the
    widths of the head's hidden layers.
    """

    def __init__(self, image_shape: Sequence[int], out_dim: int, channels: Sequence[int] = (32, 64),
                 hidden: int | Sequence[int] = 256, activation: str = "relu") -> None:
        super().__init__()
        self.image_shape = _check(image_shape, channels, activation)
        c, h, w = self.image_shape
        self.canvas = _Canvas(h, w, len(channels))
        layers: list[nn.Module] = []
        for a, b in pairwise([c, *channels]):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), ACTIVATIONS[activation]()]
        self.conv = nn.Sequential(*layers)
        flat = channels[-1] * self.canvas.h0 * self.canvas.w0
        self.head = MLP(flat, out_dim, _widths(hidden), activation)

    def forward(self, x: Tensor) -> Tensor:
        c, h, w = self.image_shape
        if x.shape[-1] != c * h * w:
            raise ValueError(f"expected inputs (…, {c * h * w}) for images {self.image_shape}, "
                             f"got {tuple(x.shape)}")
        lead = x.shape[:-1]
        img = F.pad(x.reshape(math.prod(lead), c, h, w), self.canvas.pad)  # (N, C, H', W')
        feats = self.conv(img).flatten(1)  # (N, channels[-1]·h0·w0)
        out = self.head(feats)  # (N, out_dim)
        return out.reshape(*lead, out.shape[-1])



class ConvDecoderNet(nn.Module):
    """``z (…, L) ↦ (…, C·H·W)``: an MLP to a ``channels[0] × h0 × w0`` map, then stride-2 4×4
    transposed convolutions (the last one to ``C`` channels, no activation), cropped to ``H × W``.

    The outputs are the likelihood's parameters (Bernoulli logits, Gaussian means).
    """

    def __init__(self, latent_dim: int, image_shape: Sequence[int], channels: Sequence[int] = (64, 32),
                 hidden: int | Sequence[int] = 256, activation: str = "relu") -> None:
        super().__init__()
        self.image_shape = _check(image_shape, channels, activation)
        c, h, w = self.image_shape
        self.canvas = _Canvas(h, w, len(channels))
        self.c0 = channels[0]
        self.head = MLP(latent_dim, self.c0 * self.canvas.h0 * self.canvas.w0, _widths(hidden),
                        activation)
        self.head.append(ACTIVATIONS[activation]())
        layers: list[nn.Module] = []
        for a, b in pairwise([*channels, c]):
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), ACTIVATIONS[activation]()]
        self.deconv = nn.Sequential(*layers[:-1])

    def forward(self, z: Tensor) -> Tensor:
        c, h, w = self.image_shape
        lead = z.shape[:-1]
        n = math.prod(lead)
        feats = self.head(z.reshape(n, z.shape[-1]))  # (N, c0·h0·w0)
        img = self.deconv(feats.reshape(n, self.c0, self.canvas.h0, self.canvas.w0))  # (N, C, H', W')
        top, left = self.canvas.top, self.canvas.left
        return img[:, :, top : top + h, left : left + w].reshape(*lead, c * h * w)



def build_networks(
    kind: str,
    data_dim: int,
    latent_dim: int,
    image_shape: Sequence[int] | None = None,
    hidden: Sequence[int] = (50, 50, 50),
    activation: str = "tanh",
    channels: Sequence[int] = (32, 64),
) -> tuple[Callable[[int], nn.Module], Callable[[], nn.Module]]:
    """Factories for the encoder's network (given its output width) and the decoder's network.

    Both are built lazily, so the caller fixes the order in which their weights are drawn
    (mapa-vae builds the encoder first: the same seed gives the same networks as ever).

    ``kind="mlp"``: :class:`~mapa_vae.models.MLP` s with hidden widths ``hidden``.
    ``kind="conv"``: :class:`ConvEncoderNet` with conv widths ``channels`` and
    :class:`ConvDecoderNet` with them reversed, both with MLP heads of widths ``hidden``;
    ``image_shape`` ``(C, H, W)`` is required and ``C·H·W`` must equal ``data_dim``.

    >>> import torch
    >>> from mapa_vae.models import BernoulliLikelihood, Decoder, GaussianEncoder
    >>> enc_net, dec_net = build_networks("conv", 64, 2, image_shape=(1, 8, 8), hidden=(32,))
    >>> enc = GaussianEncoder(enc_net(2 * 2))  # a VAE's; MAPA's is CodeEncoder(enc_net(2))
    >>> z = enc(torch.rand(5, 64)).rsample((3,))  # (S, B, L)
    >>> tuple(Decoder(dec_net(), BernoulliLikelihood())(z).log_prob(torch.rand(5, 64)).shape)
    (3, 5)
    """
    if kind == "mlp":
        return (lambda out: MLP(data_dim, out, hidden, activation),
                lambda: MLP(latent_dim, data_dim, hidden, activation))
    NETWORKS[kind]  # an unknown name is a one-line error
    if image_shape is None:
        raise MapaError("conv networks need the image shape (C, H, W) of the data")
    if math.prod(image_shape) != data_dim:
        raise MapaError(f"image shape {tuple(image_shape)} has {math.prod(image_shape)} pixels but the "
                        f"data has {data_dim} columns")
    shape = tuple(image_shape)
    return (
        lambda out: ConvEncoderNet(shape, out, channels, hidden, activation),
        lambda: ConvDecoderNet(latent_dim, shape, tuple(reversed(channels)), hidden, activation),
    )

