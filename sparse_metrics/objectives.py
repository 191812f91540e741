r"""saev-compatible training objectives, built on :class:`~sparse_metrics.SparseAutoencoderLoss`.

Mirrors ``saev.nn.objectives`` (the docs' objectives page lists the differences): configs (:class:`Vanilla`,
:class:`Matryoshka`), :func:`get_objective` turning a config into an :class:`Objective` module, whose ``forward``
returns a frozen :class:`Loss` with a differentiable ``.loss`` and ``.metrics()`` for logging; and saev's element-wise
:func:`mean_squared_err` / :func:`ref_mean_squared_err`.

Every term comes from this library's collection and functional core; nothing here re-derives them:

- ``mse``: the collection's ``"l2"`` with ``feature_reduction="mean"``, the mean over ``d_model`` of each item's
  squared error, then over the batch. Every item has ``d_model`` elements, so this is saev's element mean over
  :math:`(B, D)`.
- ``l0``, ``l1``: the collection's ``"l0"`` (count of :math:`f \neq 0`) and ``"l1"`` (:math:`\sum |f|`), batch means.
  saev counts :math:`f > 0` and sums :math:`f`: the same for the non-negative activations of ReLU, TopK and JumpReLU
  SAEs, which is what saev trains.
- ``sparsity`` :math:`= \lambda \cdot \mathrm{l1}`, the collection's ``"sparsity"``; ``loss = mse + sparsity``.
- Matryoshka ``mse``: the mean over prefixes of each prefix's ``mse``, from
  :func:`~sparse_metrics.functional.matryoshka_prefix_errors`'s core, which decodes all prefixes in one pass.

Unlike saev's objectives the modules also accumulate: :meth:`Objective.compute` returns exact epoch means of the
collection's terms over every batch and every process (a collective: call it on every rank), and
:meth:`Objective.reset` starts a new epoch.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import torch
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from sparse_metrics import presets
from sparse_metrics._validation import check_prefix_sizes, check_same_shape
from sparse_metrics.collection import SparseAutoencoderLoss
from sparse_metrics.functional.l2_reconstruction import _elementwise_squared_error
from sparse_metrics.functional.matryoshka import _matryoshka_update

__all__ = [
    "Loss",
    "Matryoshka",
    "MatryoshkaLoss",
    "MatryoshkaObjective",
    "Objective",
    "Vanilla",
    "VanillaLoss",
    "VanillaObjective",
    "get_objective",
    "mean_squared_err",
    "ref_mean_squared_err",
    "sample_prefix_sizes",
]

SparsityCoeff = Annotated[float, Field(ge=0.0, allow_inf_nan=False, description="Weight of the L1 penalty.")]


def mean_squared_err(
    x_hat: Float[Tensor, "*batch d_model"], x: Float[Tensor, "*batch d_model"], norm: bool = False
) -> Float[Tensor, "*batch d_model"]:
    r"""Element-wise squared error, computed so that it stays finite wherever the result is representable.

    .. math:: e_{bd} = (\hat x_{bd} - x_{bd})^2 \quad\text{or, with } \texttt{norm}, \quad
       e_{bd} = \frac{(\hat x_{bd} - x_{bd})^2}{\lVert x_b \rVert_2}

    (the norm is not squared, as in saev). Both inputs are divided by :math:`u = \max |x|` first and the result is
    scaled back, so the norm never overflows: with ``x = 3e28`` in float32 and ``norm=True`` this is finite where
    :func:`ref_mean_squared_err` gives NaN. Reduce it yourself (saev's objectives take ``.mean()``).

    Args:
        x_hat: The reconstruction.
        x: The input, same shape.
        norm: Divide each item's errors by its input's L2 norm.

    Example:
        >>> import torch
        >>> from sparse_metrics.objectives import mean_squared_err
        >>> x = torch.tensor([[3e28, 4e28]])
        >>> mean_squared_err(torch.zeros_like(x), x, norm=True)
        tensor([[1.8000e+28, 3.2000e+28]])
    """
    _check_pair(x_hat, x)
    return _elementwise_squared_error(x_hat, x, normalize=norm, rescale=True)


def ref_mean_squared_err(
    x_hat: Float[Tensor, "*batch d_model"], x: Float[Tensor, "*batch d_model"], norm: bool = False
) -> Float[Tensor, "*batch d_model"]:
    r"""The plain formula of :func:`mean_squared_err`, without rescaling: a reference that overflows early.

    Example:
        >>> import torch
        >>> from sparse_metrics.objectives import ref_mean_squared_err
        >>> x = torch.tensor([[3.0, 4.0]])
        >>> ref_mean_squared_err(torch.zeros_like(x), x, norm=True)
        tensor([[1.8000, 3.2000]])
    """
    _check_pair(x_hat, x)
    return _elementwise_squared_error(x_hat, x, normalize=norm, rescale=False)


def _check_pair(x_hat: object, x: object) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"`x` must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}.")
    check_same_shape("x_hat", x_hat, "x", x)


# Configs. pydantic models in strict mode: a wrong type or range raises a ValidationError naming the field.


class Vanilla(BaseModel):
    """Config of the plain SAE objective: ``loss = mse + sparsity_coeff * l1``.

    Attributes:
        sparsity_coeff: Weight of the L1 penalty (saev's default ``4e-4``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    sparsity_coeff: SparsityCoeff = 4e-4


class Matryoshka(BaseModel):
    """Config of the Matryoshka objective: ``loss = mean over prefixes of each prefix's mse + sparsity``.

    Give exactly one of ``prefix_sizes`` (fixed cumulative widths) or ``n_prefixes`` (widths sampled anew on every
    step, as saev does, by :func:`sample_prefix_sizes` from a generator seeded with ``seed``: processes that share
    the seed draw the same widths at every step, with no communication).

    Attributes:
        sparsity_coeff: Weight of the L1 penalty.
        prefix_sizes: Fixed cumulative widths ``m_1 < ... < m_P <= d_sae``.
        n_prefixes: Number of widths to sample per step, the full dictionary included.
        seed: Seed of the width sampler.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    sparsity_coeff: SparsityCoeff = 4e-4
    prefix_sizes: tuple[int, ...] | None = None
    n_prefixes: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0

    @field_validator("prefix_sizes", mode="before")
    @classmethod
    def _sizes_as_tuple(cls, value: object) -> object:
        # Strict mode takes only tuples for a tuple field; a list of widths is as natural and just as exact.
        return tuple(value) if isinstance(value, list) else value

    @field_validator("prefix_sizes")
    @classmethod
    def _check_sizes(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return None if value is None else check_prefix_sizes(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> Matryoshka:
        if (self.prefix_sizes is None) == (self.n_prefixes is None):
            raise ValueError(
                "give exactly one of `prefix_sizes` (fixed widths) or `n_prefixes` (widths sampled per step), "
                f"got prefix_sizes={self.prefix_sizes} and n_prefixes={self.n_prefixes}."
            )
        return self


def sample_prefix_sizes(d_sae: int, n_prefixes: int, generator: torch.Generator) -> tuple[int, ...]:
    r"""Draw ``n_prefixes`` cumulative widths, the last always ``d_sae``.

    The other ``n_prefixes - 1`` widths are distinct draws from :math:`\{1, \dots, d_{sae} - 1\}` with probability
    :math:`\propto 1/m`, so small prefixes (the general features) are trained most often, as in Matryoshka SAEs.
    The draw depends only on the generator's state: equal seeds give equal widths on every process.

    Example:
        >>> import torch
        >>> from sparse_metrics.objectives import sample_prefix_sizes
        >>> sizes = sample_prefix_sizes(64, 4, torch.Generator().manual_seed(0))
        >>> len(sizes), sizes[-1], sizes == tuple(sorted(set(sizes)))
        (4, 64, True)
    """
    if not 1 <= n_prefixes <= d_sae:
        raise ValueError(f"`n_prefixes` must be between 1 and d_sae={d_sae}, got {n_prefixes}.")
    if n_prefixes == 1:
        return (d_sae,)
    weights = 1.0 / torch.arange(1, d_sae, dtype=torch.float64)
    drawn = torch.multinomial(weights, n_prefixes - 1, replacement=False, generator=generator) + 1
    return (*sorted(int(m) for m in drawn), d_sae)


# Losses: frozen records of one batch's terms.


@dataclasses.dataclass(frozen=True)
class Loss:
    """One batch's loss terms (0-d tensors; ``mse`` and ``sparsity`` carry the autograd graph)."""

    mse: Tensor
    sparsity: Tensor
    l0: Tensor
    l1: Tensor

    @property
    def loss(self) -> Tensor:
        """The differentiable total, ``mse + sparsity``."""
        return self.mse + self.sparsity

    def metrics(self) -> dict[str, float]:
        """Every term as a Python float, for logging (this reads the tensors: one device sync)."""
        values = {"loss": self.loss, **{field.name: getattr(self, field.name) for field in dataclasses.fields(self)}}
        return {
            name: float(value.detach())
            for name, value in values.items()
            if isinstance(value, Tensor) and not value.ndim
        }


@dataclasses.dataclass(frozen=True)
class VanillaLoss(Loss):
    """Loss terms of :class:`VanillaObjective`."""


@dataclasses.dataclass(frozen=True)
class MatryoshkaLoss(Loss):
    """Loss terms of :class:`MatryoshkaObjective`.

    ``mse`` is the mean over prefixes; ``full_mse`` the full dictionary's error (of ``x_hat``); ``prefix_mse`` the
    ``[prefix]`` per-prefix errors of the widths ``prefix_sizes`` used on this batch (left out of ``metrics()``:
    with sampled widths its entries mean different things on every step).
    """

    full_mse: Tensor = dataclasses.field(default_factory=lambda: torch.tensor(float("nan")))
    prefix_mse: Tensor = dataclasses.field(default_factory=lambda: torch.empty(0))
    prefix_sizes: tuple[int, ...] = ()


# Objectives.


class Objective(nn.Module):
    """Base of the objectives: owns the :class:`~sparse_metrics.SparseAutoencoderLoss` that computes the terms."""

    def __init__(self, sparsity_coeff: float) -> None:
        super().__init__()
        # saev's mse is an element mean over (batch, d_model): the per-item mean over d_model, then the batch mean;
        # the preset of saev's ReLU loss (mse + sparsity_coeff * l1) is that collection.
        self.collection: SparseAutoencoderLoss = presets.saev("relu", sparsity_coeff=sparsity_coeff)

    def forward(self, x: Tensor, f_x: Tensor, x_hat: Tensor, *args: Any, **kwargs: Any) -> Loss:
        """The batch's loss terms; the batch is also accumulated for :meth:`compute`. Defined by each objective."""
        raise NotImplementedError(f"{type(self).__name__} must define forward().")

    def _terms(self, x: Tensor, f_x: Tensor, x_hat: Tensor) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = self.collection(
            source_activations=x, learned_activations=f_x, decoded_activations=x_hat
        )
        return terms

    def compute(self) -> dict[str, float]:
        """Epoch means of ``l2`` (the full reconstruction's mse), ``l0``, ``l1`` and ``sparsity``, over every process.

        A collective under ``torch.distributed``: call it on every rank.
        """
        values = self.collection.compute()
        return {name: float(value) for name, value in values.items() if name != "loss"}

    def reset(self) -> None:
        """Forget the accumulated batches."""
        self.collection.reset()


class VanillaObjective(Objective):
    """``loss = mse + sparsity_coeff * l1`` (saev's ``VanillaObjective``).

    Example:
        >>> import torch
        >>> from sparse_metrics.objectives import Vanilla, get_objective
        >>> objective = get_objective(Vanilla(sparsity_coeff=0.1))
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> f_x = torch.tensor([[0.5, 0.0, 1.5]])
        >>> out = objective(x, f_x, torch.tensor([[1.0, 1.0]]))
        >>> {name: round(value, 4) for name, value in out.metrics().items()}
        {'loss': 0.7, 'mse': 0.5, 'sparsity': 0.2, 'l0': 2.0, 'l1': 2.0}
    """

    def __init__(self, cfg: Vanilla) -> None:
        super().__init__(cfg.sparsity_coeff)
        self.cfg = cfg

    def forward(self, x: Tensor, f_x: Tensor, x_hat: Tensor, *args: Any, **kwargs: Any) -> VanillaLoss:
        """Loss terms of one batch: ``x`` and ``x_hat`` ``[batch, d_model]``, ``f_x`` ``[batch, d_sae]``."""
        terms = self._terms(x, f_x, x_hat)
        return VanillaLoss(mse=terms["l2"], sparsity=terms["sparsity"], l0=terms["l0"], l1=terms["l1"])


class MatryoshkaObjective(Objective):
    r"""Matryoshka loss: mean over nested prefixes of the prefix reconstruction's mse, plus the sparsity penalty.

    .. math:: \mathrm{mse} = \frac{1}{P} \sum_{p=1}^{P} \frac{1}{BD} \sum_{b,d}
       \big(x_{bd} - (f_{b, :m_p} W_{:m_p} + b_{dec})_d\big)^2

    ``forward(x, f_x, x_hat, decoder_weight, decoder_bias=None)`` takes the feature-major decoder
    ``[d_sae, d_model]`` (saev's ``W_dec``) to decode the prefixes; ``x_hat`` (the full reconstruction) gives
    ``full_mse`` and the epoch ``l2``. With ``n_prefixes`` the widths are resampled on every call from the
    objective's seeded generator, whose state is saved in ``state_dict()`` so a resumed run draws on.

    Example:
        >>> import torch
        >>> from sparse_metrics.objectives import Matryoshka, get_objective
        >>> objective = get_objective(Matryoshka(sparsity_coeff=0.0, prefix_sizes=(1, 2)))
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> f_x = torch.tensor([[1.0, 2.0]])
        >>> out = objective(x, f_x, x, torch.eye(2))
        >>> out.prefix_mse, out.mse
        (tensor([2., 0.]), tensor(1.))
    """

    def __init__(self, cfg: Matryoshka) -> None:
        super().__init__(cfg.sparsity_coeff)
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def prefix_sizes(self, d_sae: int) -> tuple[int, ...]:
        """The widths for the next step: the fixed ones, or a fresh draw (advancing the generator)."""
        if self.cfg.prefix_sizes is not None:
            return self.cfg.prefix_sizes
        assert self.cfg.n_prefixes is not None  # the config requires one of the two
        return sample_prefix_sizes(d_sae, self.cfg.n_prefixes, self.generator)

    def forward(
        self,
        x: Tensor,
        f_x: Tensor,
        x_hat: Tensor,
        decoder_weight: Tensor | None = None,
        decoder_bias: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> MatryoshkaLoss:
        """Loss terms of one batch; the prefixes are decoded from ``f_x`` with ``decoder_weight``."""
        if decoder_weight is None:
            raise ValueError("`decoder_weight` is required: pass the feature-major decoder [d_sae, d_model].")
        if not isinstance(f_x, Tensor) or f_x.ndim != 2:
            raise ValueError(f"`f_x` must have shape [batch, d_sae], got {list(getattr(f_x, 'shape', []))}.")
        sizes = self.prefix_sizes(f_x.shape[-1])
        # [batch, 1, prefix] per-item errors, validated (shapes, decoder layout) before the collection sees the batch.
        prefix_errors = _matryoshka_update(x, f_x, decoder_weight, decoder_bias, sizes, num_components=1)
        terms = self._terms(x, f_x, x_hat)
        prefix_mse = prefix_errors.mean(dim=0).squeeze(0)
        return MatryoshkaLoss(
            mse=prefix_mse.mean(),
            sparsity=terms["sparsity"],
            l0=terms["l0"],
            l1=terms["l1"],
            full_mse=terms["l2"],
            prefix_mse=prefix_mse,
            prefix_sizes=sizes,
        )

    def get_extra_state(self) -> dict[str, Tensor]:
        """The sampler's position, saved in ``state_dict()``."""
        state: Tensor = self.generator.get_state()
        return {"generator": state}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        """Restore the sampler's position from ``load_state_dict()``."""
        self.generator.set_state(state["generator"])


def get_objective(cfg: Vanilla | Matryoshka) -> Objective:
    """The objective module for a config.

    Raises:
        TypeError: ``cfg`` is not a :class:`Vanilla` or :class:`Matryoshka` config.
    """
    if isinstance(cfg, Vanilla):
        return VanillaObjective(cfg)
    if isinstance(cfg, Matryoshka):
        return MatryoshkaObjective(cfg)
    raise TypeError(f"`cfg` must be a Vanilla or Matryoshka config, got {type(cfg).__name__}.")
