"""The VAE-DGP's doubly-stochastic minibatch bound (Dai et al. 2016; Salimbeni & Deisenroth 2017).

For data ``X`` ``(N, D)``, an amortized ``q(z_n | x_n)``, GP layers with inducing outputs ``U``
and ``q(U) = Π_l q(u_l)``, the evidence lower bound on ``log p(X)`` is

    L = Σ_n ( E_{q(z_n|x_n)} E_{q(f(z_n))}[log p(x_n | f(z_n))] - KL(q(z_n|x_n) ‖ p(z_n)) )
        - KL(q(U) ‖ p(U)).

It splits into per-point terms ``ℓ_n = E[log p(x_n | f)] - KL_n(z) - KL(U) / N`` with
``Σ_n ℓ_n = L``; a minibatch's ``(N / B) Σ_{n∈batch} ℓ_n`` is an unbiased estimate of ``L`` and
the loop's ``-mean(ℓ)`` its negative divided by ``N``. "Doubly stochastic": ``z`` is drawn from
``q(z | x)`` by reparameterization (``S`` draws, averaged), and with two layers the hidden
``h ~ q(h | z)`` too; the last layer's expectation ``E_{q(f)}[log N(x; f, σ²)]`` is closed form
(:meth:`~mapa_vae.models.gp.GPPredictiveLikelihood.expected_log_prob`).

Only the sum over all ``N`` points is a bound on ``log p(X)`` (the GP couples the points); a
single ``ℓ_n`` is the point's share of it, which is what the training loop averages and logs.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import kl_divergence

from ..models.gp import GPNet, GPPredictiveLikelihood
from ..models.latent import Decoder, LatentVariableModel
from .objectives import Bound, Objective

__all__ = ["DoublyStochasticGPBound", "gp_data_bound"]


def _gp_parts(decoder: Decoder) -> tuple[GPNet, GPPredictiveLikelihood]:
    net, lik = decoder.net, decoder.likelihood
    if not isinstance(net, GPNet) or not isinstance(lik, GPPredictiveLikelihood):
        raise TypeError("the GP bound needs a decoder built by build_vae_dgp (a GPNet and its likelihood)")
    return net, lik


def gp_data_bound(decoder: Decoder, z: Tensor, x: Tensor, num_data: int) -> Tensor:
    """The GP decoder's share of the bound at given inputs, ``(…, B)``:

    ``E_{q(f(z_n))}[log p(x_n | f(z_n))] - KL(q(U) ‖ p(U)) / N`` for ``z`` ``(…, B, L)`` and
    ``x`` ``(B, D)``. With ``z`` the true codes of all ``N`` points its sum is the SVGP bound of
    Hensman et al. (2013) on ``log p(X | Z)``, which never exceeds the exact GP marginal likelihood.
    """
    net, lik = _gp_parts(decoder)
    params = net(z)  # (…, B, 2D)
    return lik.expected_log_prob(x, params) - net.kl_divergence() / num_data


class DoublyStochasticGPBound(Objective):
    """``ℓ_n`` above with ``S`` reparameterized draws of ``z_n ~ q(z | x_n)``, averaged:

    ``ℓ_n = (1/S) Σ_s E_{q(f)}[log p(x_n | f(z_n^s))] - KL(q(z|x_n) ‖ N(0, I)) - KL(U) / N``,
    ``(B,)``. ``KL(q(z|x) ‖ p(z))`` is closed form. Passes: ``B`` encoder rows and ``B·S`` decoder
    rows (each a GP prediction, ``O(M²)`` per row and layer, plus ``O(M³)`` per batch).
    """

    def __init__(self, num_data: int, samples: int = 1) -> None:
        super().__init__()
        if samples < 1:
            raise ValueError(f"the GP bound needs at least one sample of z, got {samples}")
        self.num_data = num_data
        self.samples = samples

    def __call__(self, model: LatentVariableModel, x: Tensor, index: Tensor) -> Bound:
        q = model.encoder(x)
        z = q.rsample((self.samples,))  # (S, B, L)
        self.passes.add(x.shape[0], x.shape[0] * self.samples, x.shape[0])
        data = gp_data_bound(model.decoder, z, x, self.num_data).mean(0)  # (B,)
        value = data - kl_divergence(q, model.prior())  # (B,)
        return Bound(value, value)
