r"""Whole training losses of the peers, each a configured :class:`~sparse_metrics.SparseAutoencoderLoss`.

One function per peer returns a collection whose ``"loss"`` equals, value and gradients, that peer's whole training
loss for one architecture (its reconstruction term, its sparsity penalty and its auxiliary terms with their
coefficients), with the peer's defaults and its config names. Options that the peer does not have for that
architecture raise. The other members (``"l2"``, ``"l0"``, ``"l1"``, ...) come along for logging, and ``compute()``
gives the epoch values (the epoch ``"loss"`` is the peer's loss over every item where its terms are item means).

Coefficients that the peer warms up or anneals change between steps with
:meth:`~sparse_metrics.SparseAutoencoderLoss.set_loss_coefficient` (a loss term's) or the
:attr:`~sparse_metrics.SparseAutoencoderLoss.sparsity_coefficient` property (the L1 penalty's).

The inputs are this library's usual names; each function says which to pass. ``decoder_weight`` is always
feature-major ``[d_sae, d_model]`` (SAELens' and saev's ``W_dec``, dictionary_learning's and OpenAI's
``decoder.weight.T``); ``dead_mask`` ``[d_sae]`` is the peer's dead-latent mask of the step.

Example:
    >>> import torch
    >>> from sparse_metrics import presets
    >>> loss_fn = presets.dictionary_learning("standard", l1_penalty=0.5)
    >>> x = torch.tensor([[1.0, 2.0]])
    >>> f = torch.tensor([[0.5, 0.0, 1.5]])
    >>> out = loss_fn(source_activations=x, learned_activations=f, decoded_activations=torch.tensor([[1.0, 1.0]]))
    >>> round(out["loss"].item(), 4)  # summed squared error 1, plus 0.5 * L1 2
    2.0
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from sparse_metrics._config import NanStrategy
from sparse_metrics.collection import SparseAutoencoderLoss
from sparse_metrics.metrics._base import SaeMetric
from sparse_metrics.metrics.auxiliary_k import AuxiliaryKLoss
from sparse_metrics.metrics.explained_variance import FractionOfVarianceUnexplained
from sparse_metrics.metrics.jumprelu_l0 import JumpReLUL0Loss
from sparse_metrics.metrics.pre_activation import PreActivationLoss
from sparse_metrics.metrics.sparsity import SparsityLoss
from sparse_metrics.metrics.tanh_sparsity import TanhSparsityLoss

__all__ = ["dictionary_learning", "openai", "saelens", "saev", "sparsify"]


def _resolve(peer: str, architecture: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The peer's config for one architecture: its defaults, overridden by the names given (None: not given).

    A name the architecture does not have raises, naming those it has.
    """
    if unknown := sorted(name for name, value in given.items() if value is not None and name not in defaults):
        raise ValueError(
            f"{peer} architecture {architecture!r} has no config {unknown}; its loss options are "
            f"{sorted(defaults) or 'none'}."
        )
    return {name: given[name] if given.get(name) is not None else default for name, default in defaults.items()}


def _architecture(peer: str, architecture: str, valid: Sequence[str]) -> None:
    if architecture not in valid:
        raise ValueError(f"{peer} has no architecture {architecture!r}; the valid ones are {list(valid)}.")


def _collection(
    num_components: int,
    nan_strategy: NanStrategy,
    terms: Mapping[str, tuple[SaeMetric, float]],
    coefficients: Mapping[str, float] | None = None,
    **options: Any,
) -> SparseAutoencoderLoss:
    """A collection with the loss terms ``{key: (term, coefficient)}`` and the reconstruction's coefficients."""
    return SparseAutoencoderLoss(
        num_components,
        nan_strategy=nan_strategy,
        loss_terms={key: term for key, (term, _) in terms.items()},
        loss_coefficients={**(coefficients or {}), **{key: alpha for key, (_, alpha) in terms.items()}},
        **options,
    )


# SAELens


_SAELENS_TOPK: dict[str, Any] = {"aux_loss_coefficient": 1.0}
_SAELENS: dict[str, dict[str, Any]] = {
    "standard": {"l1_coefficient": 1.0, "lp_norm": 1.0},
    "topk": _SAELENS_TOPK,
    "batchtopk": _SAELENS_TOPK,
    "matryoshka_batchtopk": {
        **_SAELENS_TOPK,
        "matryoshka_widths": None,
        "d_sae": None,
        "use_matryoshka_aux_loss": False,
    },
    "jumprelu": {
        "l0_coefficient": 1.0,
        "jumprelu_bandwidth": 0.05,
        "jumprelu_sparsity_loss_mode": "step",
        "jumprelu_tanh_scale": 4.0,
        "jumprelu_ste_to_input": False,
        "target_l0": None,
        "pre_act_loss_coefficient": None,
    },
}


def saelens(
    architecture: str = "standard",
    *,
    l1_coefficient: float | None = None,
    lp_norm: float | None = None,
    aux_loss_coefficient: float | None = None,
    matryoshka_widths: Sequence[int] | None = None,
    d_sae: int | None = None,
    use_matryoshka_aux_loss: bool | None = None,
    l0_coefficient: float | None = None,
    jumprelu_bandwidth: float | None = None,
    jumprelu_sparsity_loss_mode: str | None = None,
    jumprelu_tanh_scale: float | None = None,
    jumprelu_ste_to_input: bool | None = None,
    target_l0: float | None = None,
    pre_act_loss_coefficient: float | None = None,
    num_components: int = 1,
    nan_strategy: NanStrategy = "propagate",
    **kwargs: Any,
) -> SparseAutoencoderLoss:
    r"""SAELens' training loss, ``TrainingSAE.training_forward_pass``: the MSE plus the architecture's aux losses.

    The MSE is ``mse_loss_fn(sae_out, sae_in).sum(-1).mean()`` (summed over ``d_in``, mean over the batch); the
    aux losses are each architecture's ``calculate_aux_loss`` (``sae_lens/saes/<architecture>_sae.py``), with the
    config names and defaults of its ``<Architecture>TrainingSAEConfig``:

    - ``"standard"``: ``+ l1_coefficient * mean_b ||f * ||W_dec,i|| ||_{lp_norm}``. With ``lp_norm=1`` it is the
      collection's ``"sparsity"`` (change ``sparsity_coefficient`` for the warm-up); otherwise the term
      ``"lp_sparsity"`` (a p-norm, :class:`SparsityLoss` with ``p_root``) weighted by ``l1_coefficient`` (change it
      with ``set_loss_coefficient("lp_sparsity", ...)``).
    - ``"topk"``, ``"batchtopk"``: ``+ aux_loss_coefficient * AuxK`` (``calculate_topk_aux_loss``: the top
      ``min(d_in // 2, n_dead)`` dead pre-activations decode the detached residual, scaled by
      ``min(n_dead / (d_in // 2), 1)``), the term ``"auxk"``. No sparsity penalty.
    - ``"matryoshka_batchtopk"``: the MSE of every inner width of ``matryoshka_widths`` is added, unweighted, to the
      full one (the ``"matryoshka"`` member, ``feature_reduction="sum"``, weights 1, the full width's error that of
      ``decoded_activations``); the widths end with ``d_sae`` (appended with a warning, as SAELens does);
      ``use_matryoshka_aux_loss=True`` makes ``"auxk"`` the sum over levels of each level's AuxK.
    - ``"jumprelu"``: ``+ l0_coefficient * `` the term ``"l0_loss"``: ``jumprelu_sparsity_loss_mode="step"``
      :class:`JumpReLUL0Loss` (bandwidth ``jumprelu_bandwidth``, ``jumprelu_ste_to_input``), ``"quadratic"`` the
      same with ``target_l0`` (:math:`\frac{2}{T}(L_0 - T)^2` per item), ``"tanh"`` :class:`TanhSparsityLoss`
      (``jumprelu_tanh_scale``, decoder-norm weighted); with ``pre_act_loss_coefficient``
      ``+ pre_act_loss_coefficient *`` :class:`PreActivationLoss` (``"pre_act_loss"``, dead latents only).

    Inputs: ``source_activations`` (``sae_in``), ``decoded_activations`` (``sae_out``), ``learned_activations``
    (``feature_acts``), ``decoder_weight`` (``W_dec``; standard, matryoshka, jumprelu tanh and pre-act),
    ``pre_activations`` (``hidden_pre``; topk family and jumprelu), ``dead_mask`` (``dead_neuron_mask``; topk family,
    pre-act loss), ``threshold`` (jumprelu), ``decoder_bias`` (``b_dec``; matryoshka).

    SAELens' TopK-family SAEs train with ``rescale_acts_by_decoder_norm=True`` (the default): ``hidden_pre`` and
    ``feature_acts`` carry the decoder norms and ``decode`` divides them out. Pass
    ``decoder_weight=W_dec / W_dec.norm(dim=-1, keepdim=True)`` then (computed in the autograd graph, so
    ``W_dec`` gets its gradient), and ``hidden_pre`` and ``feature_acts`` as SAELens returns them; with
    ``rescale_acts_by_decoder_norm=False`` pass ``W_dec`` itself.

    Args:
        architecture: The SAELens architecture: ``"standard"``, ``"topk"``, ``"batchtopk"``,
            ``"matryoshka_batchtopk"`` or ``"jumprelu"``.
        l1_coefficient: ``"standard"``: the sparsity penalty's weight (default 1.0).
        lp_norm: ``"standard"``: the norm's ``p`` (default 1.0).
        aux_loss_coefficient: TopK family: the AuxK weight (default 1.0).
        matryoshka_widths: ``"matryoshka_batchtopk"``: the cumulative widths.
        d_sae: ``"matryoshka_batchtopk"``: the dictionary size (required).
        use_matryoshka_aux_loss: ``"matryoshka_batchtopk"``: an AuxK per level (default False).
        l0_coefficient: ``"jumprelu"``: the L0 loss weight (default 1.0).
        jumprelu_bandwidth: ``"jumprelu"``: the straight-through kernel's width (default 0.05).
        jumprelu_sparsity_loss_mode: ``"jumprelu"``: ``"step"`` (default), ``"tanh"`` or ``"quadratic"``.
        jumprelu_tanh_scale: ``"jumprelu"``, ``"tanh"`` mode: the scale (default 4.0).
        jumprelu_ste_to_input: ``"jumprelu"``: the estimate's gradient also reaches ``hidden_pre`` (default False).
        target_l0: ``"jumprelu"``, ``"quadratic"`` mode: the target L0 (required there).
        pre_act_loss_coefficient: ``"jumprelu"``: the pre-activation loss's weight (default None: no such term).
        num_components: SAEs trained side by side.
        nan_strategy: As the collection's.
        kwargs: Passed to the collection and every term (``process_group``, ``prefix``, ...).

    Example:
        >>> import torch
        >>> from sparse_metrics import presets
        >>> loss_fn = presets.saelens("standard", l1_coefficient=0.5)
        >>> x, x_hat = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]])
        >>> f, w_dec = torch.tensor([[0.5, 0.0, 1.5]]), torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> out = loss_fn(source_activations=x, learned_activations=f, decoded_activations=x_hat, decoder_weight=w_dec)
        >>> round(out["loss"].item(), 4)  # 1 + 0.5 * (0.5 * 2 + 1.5 * 1)
        2.25
    """
    _architecture("SAELens", architecture, list(_SAELENS))
    config = _resolve(
        "SAELens",
        architecture,
        {
            "l1_coefficient": l1_coefficient,
            "lp_norm": lp_norm,
            "aux_loss_coefficient": aux_loss_coefficient,
            "matryoshka_widths": matryoshka_widths,
            "d_sae": d_sae,
            "use_matryoshka_aux_loss": use_matryoshka_aux_loss,
            "l0_coefficient": l0_coefficient,
            "jumprelu_bandwidth": jumprelu_bandwidth,
            "jumprelu_sparsity_loss_mode": jumprelu_sparsity_loss_mode,
            "jumprelu_tanh_scale": jumprelu_tanh_scale,
            "jumprelu_ste_to_input": jumprelu_ste_to_input,
            "target_l0": target_l0,
            "pre_act_loss_coefficient": pre_act_loss_coefficient,
        },
        _SAELENS[architecture],
    )
    common: dict[str, Any] = {"nan_strategy": nan_strategy, **_term_kwargs(kwargs)}
    terms: dict[str, tuple[SaeMetric, float]] = {}
    options: dict[str, Any] = {"feature_reduction": "sum", "sparsity_penalty": False, **kwargs}  # checked above
    if architecture == "standard":
        if config["lp_norm"] == 1:
            options.update(
                sparsity_penalty=True,
                sparsity_coefficient=config["l1_coefficient"],
                sparsity_decoder_norm_weighting=True,
            )
        else:
            lp = SparsityLoss(
                1.0, num_components, p=config["lp_norm"], p_root=True, decoder_norm_weighting=True, **common
            )
            terms["lp_sparsity"] = (lp, config["l1_coefficient"])
    elif architecture == "jumprelu":
        mode = config["jumprelu_sparsity_loss_mode"]
        if mode not in ("step", "tanh", "quadratic"):
            raise ValueError(f"`jumprelu_sparsity_loss_mode` must be 'step', 'tanh' or 'quadratic', got {mode!r}.")
        l0_loss: SaeMetric
        if mode == "tanh":
            l0_loss = TanhSparsityLoss(num_components, scale=config["jumprelu_tanh_scale"], **common)
        else:
            if mode == "quadratic" and config["target_l0"] is None:
                raise ValueError("`target_l0` must be set for jumprelu_sparsity_loss_mode='quadratic' (as SAELens).")
            l0_loss = JumpReLUL0Loss(
                num_components,
                bandwidth=config["jumprelu_bandwidth"],
                target_l0=config["target_l0"] if mode == "quadratic" else None,
                convention="saelens",
                ste_to_input=config["jumprelu_ste_to_input"],
                **common,
            )
        terms["l0_loss"] = (l0_loss, config["l0_coefficient"])
        if config["pre_act_loss_coefficient"] is not None:
            pre_act = PreActivationLoss(num_components, dead_only=True, decoder_norm_weighting=True, **common)
            terms["pre_act_loss"] = (pre_act, config["pre_act_loss_coefficient"])
    else:
        prefix_sizes: tuple[int, ...] | None = None
        if architecture == "matryoshka_batchtopk":
            prefix_sizes = _saelens_widths(config["matryoshka_widths"], config["d_sae"])
            options.update(
                matryoshka_prefix_sizes=prefix_sizes,
                matryoshka_prefix_weights=[1.0] * len(prefix_sizes),
                matryoshka_reuse_decoded_activations=True,
            )
        auxk = AuxiliaryKLoss(
            num_components,
            convention="saelens",
            prefix_sizes=prefix_sizes if config.get("use_matryoshka_aux_loss") else None,
            **common,
        )
        terms["auxk"] = (auxk, config["aux_loss_coefficient"])
    return _collection(num_components, nan_strategy, terms, **options)


def _saelens_widths(widths: Sequence[int] | None, d_sae: int | None) -> tuple[int, ...]:
    if widths is None or d_sae is None:
        raise ValueError(
            "SAELens 'matryoshka_batchtopk' needs `matryoshka_widths` and `d_sae`, got "
            f"matryoshka_widths={widths}, d_sae={d_sae}."
        )
    sizes = tuple(int(width) for width in widths)
    if not sizes:
        raise ValueError("`matryoshka_widths` must not be empty (as SAELens).")
    if sizes[-1] != d_sae:
        warnings.warn(
            f"The final matryoshka width {sizes[-1]} is not d_sae={d_sae}: a final level of width d_sae is added "
            "(as SAELens does).",
            UserWarning,
            stacklevel=3,
        )
        sizes = (*sizes, d_sae)
    return sizes


_SET_BY_PRESET = frozenset(
    {
        "sparsity_coefficient",
        "l1_coefficient",
        "feature_reduction",
        "reconstruction",
        "loss_terms",
        "loss_coefficients",
        "matryoshka_prefix_sizes",
        "matryoshka_prefix_weights",
        "matryoshka_reuse_decoded_activations",
        "sparsity_decoder_norm_weighting",
        "sparsity_penalty",
        "keep_batch_dim",
    }
)


def _term_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords a loss term takes from the collection's: the torchmetrics ones, not the key's prefix/postfix.

    Raises where a keyword would change the peer's loss, which the preset sets.
    """
    if taken := sorted(set(kwargs) & _SET_BY_PRESET):
        raise ValueError(
            f"{taken} are set by the preset to reproduce the peer's loss; build a SparseAutoencoderLoss yourself to "
            "change them."
        )
    collection_only = (
        *("prefix", "postfix", "compiled", "component_reduction", "explained_variance", "d_model"),
        *("feature_density", "num_features", "dead_feature_window"),
    )
    return {name: value for name, value in kwargs.items() if name not in collection_only}


# EleutherAI sparsify


def sparsify(
    d_model: int,
    *,
    auxk_alpha: float = 0.0,
    multi_topk: bool = False,
    num_components: int = 1,
    nan_strategy: NanStrategy = "propagate",
    **kwargs: Any,
) -> SparseAutoencoderLoss:
    r"""EleutherAI sparsify's training loss (``trainer.py``): ``fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8``.

    Each term is ``SparseCoder.forward``'s (``sparse_coder.py``), a ratio of the batch:
    ``fvu = sum (y - sae_out)^2 / sum (y - mean_b y)^2`` (the collection's ``"fvu"``, ``reconstruction="fvu"``);
    ``auxk_loss`` (the term ``"auxk"``, only with ``auxk_alpha > 0``, where the trainer passes a dead mask): the top
    ``min(d_model // 2, n_dead)`` dead pre-activations decode the detached residual, scaled by
    ``min(n_dead / (d_model // 2), 1)``, over the same total variance; with ``multi_topk`` (``SparseCoderConfig``)
    ``multi_topk_fvu`` (the term ``"multi_topk_fvu"``), the FVU of the decode of the top ``4k`` latents. The epoch
    ``"loss"`` of ``compute()`` is the same sum of the ratios pooled over every item, not a mean of batch ratios.

    Inputs: ``source_activations`` (``y = x``), ``decoded_activations`` (``sae_out``, with ``W_skip`` if any),
    ``learned_activations`` (the dense top-k activations, for the logged L0/L1), and with ``auxk_alpha > 0``
    ``pre_activations`` (``pre_acts``), ``decoder_weight`` (``W_dec``) and ``dead_mask``; with ``multi_topk``
    ``multi_topk_decoded_activations`` (``decode(*pre_acts.topk(4 * k))``).

    Args:
        d_model: The activations' width (the FVU's state).
        auxk_alpha: The AuxK weight (``TrainConfig.auxk_alpha``, default 0).
        multi_topk: Add the multi-TopK FVU / 8 (``SparseCoderConfig.multi_topk``, default False).
        num_components: SAEs trained side by side.
        nan_strategy: As the collection's.
        kwargs: Passed to the collection and every term.

    Example:
        >>> import torch
        >>> from sparse_metrics import presets
        >>> loss_fn = presets.sparsify(d_model=2)
        >>> x, x_hat = torch.tensor([[0.0, 0.0], [2.0, 2.0]]), torch.tensor([[1.0, 0.0], [1.0, 2.0]])
        >>> out = loss_fn(source_activations=x, learned_activations=torch.ones(2, 3), decoded_activations=x_hat)
        >>> round(out["loss"].item(), 4)  # 2 / 4
        0.5
    """
    common: dict[str, Any] = {"nan_strategy": nan_strategy, **_term_kwargs(kwargs)}
    terms: dict[str, tuple[SaeMetric, float]] = {}
    if auxk_alpha > 0:
        terms["auxk"] = (AuxiliaryKLoss(num_components, convention="sparsify", d_model=d_model, **common), auxk_alpha)
    if multi_topk:
        multi = FractionOfVarianceUnexplained(
            num_components, d_model=d_model, reconstruction="multi_topk_decoded_activations", **common
        )
        terms["multi_topk_fvu"] = (multi, 1 / 8)
    return _collection(
        num_components,
        nan_strategy,
        terms,
        explained_variance=True,
        d_model=d_model,
        reconstruction="fvu",
        sparsity_penalty=False,
        **kwargs,
    )


# dictionary_learning


_DICTIONARY_LEARNING: dict[str, dict[str, Any]] = {
    "standard": {"l1_penalty": 0.1},
    "standard_april_update": {"l1_penalty": 0.1},
    "top_k": {"auxk_alpha": 1 / 32},
    "batch_top_k": {"auxk_alpha": 1 / 32},
    "matryoshka_batch_top_k": {
        "auxk_alpha": 1 / 32,
        "dict_size": None,
        "group_fractions": None,
        "group_weights": None,
    },
    "jumprelu": {"sparsity_penalty": 1.0, "target_l0": 20.0, "bandwidth": 0.001},
}


def dictionary_learning(
    trainer: str = "standard",
    *,
    d_model: int | None = None,
    l1_penalty: float | None = None,
    auxk_alpha: float | None = None,
    dict_size: int | None = None,
    group_fractions: Sequence[float] | None = None,
    group_weights: Sequence[float] | None = None,
    sparsity_penalty: float | None = None,
    target_l0: float | None = None,
    bandwidth: float | None = None,
    num_components: int = 1,
    nan_strategy: NanStrategy = "propagate",
    **kwargs: Any,
) -> SparseAutoencoderLoss:
    r"""dictionary_learning's trainer loss (``trainers/<trainer>.py``, the trainer's ``loss``), its config names.

    The reconstruction is ``(x - x_hat).pow(2).sum(-1).mean()`` (``feature_reduction="sum"``) throughout.

    - ``"standard"`` (``StandardTrainer``): ``+ l1_penalty * mean_b ||f||_1`` (default 0.1; the collection's
      ``"sparsity"``: its ``sparsity_coefficient`` takes the warm-up's ``sparsity_scale``).
    - ``"standard_april_update"`` (``StandardTrainerAprilUpdate``): the L1 weighted by the decoder's column norms.
    - ``"top_k"`` (``TopKTrainer``), ``"batch_top_k"`` (``BatchTopKTrainer``): ``+ auxk_alpha * auxk_loss`` (default
      1/32; the term ``"auxk"``, absent with ``auxk_alpha=0``): the top ``min(d_model // 2, n_dead)`` dead
      post-ReLU activations decode (no bias) the detached residual, over the residual's variance.
    - ``"matryoshka_batch_top_k"`` (``MatryoshkaBatchTopKTrainer``): ``mean_g(w_g * err_g) + auxk_alpha * auxk``:
      the ``"matryoshka"`` member with the group sizes of ``group_fractions`` of ``dict_size`` (the last group takes
      the rest, as the trainer) and weights ``w_g / G`` (``group_weights``, default ``1/G`` each), the AuxK of the
      full reconstruction's residual.
    - ``"jumprelu"`` (``JumpReluTrainer``): ``+ sparsity_penalty * (L0 / target_l0 - 1)^2`` (defaults 1.0, 20.0,
      ``bandwidth`` 0.001; the term ``"sparsity_loss"``, :class:`JumpReLUL0Loss` of the dictionary_learning
      convention: the warm-up's ``sparsity_scale`` goes through ``set_loss_coefficient``).

    Inputs: ``source_activations`` (``x``), ``decoded_activations`` (``x_hat``; for the matryoshka trainer the full
    reconstruction ``b_dec + f @ W_dec``), ``learned_activations`` (``f``), ``decoder_weight`` (the feature-major
    decoder: ``ae.decoder.weight.T``, or ``ae.W_dec``; April update, matryoshka, AuxK), ``decoder_bias`` (``b_dec``;
    matryoshka), ``pre_activations`` (``post_relu_acts_BF`` for AuxK; ``pre_jump`` for JumpReLU), ``dead_mask``
    (``num_tokens_since_fired >= dead_feature_threshold``; AuxK), ``threshold`` (JumpReLU).

    Args:
        trainer: ``"standard"``, ``"standard_april_update"``, ``"top_k"``, ``"batch_top_k"``,
            ``"matryoshka_batch_top_k"`` or ``"jumprelu"``.
        d_model: The activations' width: required with AuxK (its normaliser's state).
        l1_penalty: Standard trainers' L1 weight.
        auxk_alpha: TopK trainers' AuxK weight.
        dict_size: Matryoshka: the dictionary size.
        group_fractions: Matryoshka: each group's fraction of ``dict_size`` (summing to 1).
        group_weights: Matryoshka: each group's weight (default ``1/G``).
        sparsity_penalty: JumpReLU: the sparsity loss's weight.
        target_l0: JumpReLU: the target L0.
        bandwidth: JumpReLU: the straight-through kernel's width.
        num_components: SAEs trained side by side.
        nan_strategy: As the collection's.
        kwargs: Passed to the collection and every term.
    """
    _architecture("dictionary_learning", trainer, list(_DICTIONARY_LEARNING))
    config = _resolve(
        "dictionary_learning",
        trainer,
        {
            "l1_penalty": l1_penalty,
            "auxk_alpha": auxk_alpha,
            "dict_size": dict_size,
            "group_fractions": group_fractions,
            "group_weights": group_weights,
            "sparsity_penalty": sparsity_penalty,
            "target_l0": target_l0,
            "bandwidth": bandwidth,
        },
        _DICTIONARY_LEARNING[trainer],
    )
    common: dict[str, Any] = {"nan_strategy": nan_strategy, **_term_kwargs(kwargs)}
    terms: dict[str, tuple[SaeMetric, float]] = {}
    # the collection's `sparsity_penalty` (is there an L1 term), not this trainer's JumpReLU `sparsity_penalty` weight
    options: dict[str, Any] = {"feature_reduction": "sum", "sparsity_penalty": False, **kwargs}  # checked above
    if trainer in ("standard", "standard_april_update"):
        options.update(
            sparsity_penalty=True,
            sparsity_coefficient=config["l1_penalty"],
            sparsity_decoder_norm_weighting=trainer == "standard_april_update",
        )
    elif trainer == "jumprelu":
        step = JumpReLUL0Loss(
            num_components,
            bandwidth=config["bandwidth"],
            target_l0=config["target_l0"],
            convention="dictionary_learning",
            **common,
        )
        terms["sparsity_loss"] = (step, config["sparsity_penalty"])
    else:
        if trainer == "matryoshka_batch_top_k":
            sizes, weights = _matryoshka_groups(config["dict_size"], config["group_fractions"], config["group_weights"])
            options.update(matryoshka_prefix_sizes=sizes, matryoshka_prefix_weights=weights)
        if config["auxk_alpha"] > 0:
            if d_model is None:
                raise ValueError(f"dictionary_learning {trainer!r} with auxk_alpha > 0 needs `d_model`, got None.")
            auxk = AuxiliaryKLoss(num_components, convention="dictionary_learning", d_model=d_model, **common)
            terms["auxk"] = (auxk, config["auxk_alpha"])
    return _collection(num_components, nan_strategy, terms, **options)


def _matryoshka_groups(
    dict_size: int | None, fractions: Sequence[float] | None, weights: Sequence[float] | None
) -> tuple[list[int], list[float]]:
    """Cumulative prefix widths and their weights ``w_g / G`` from the trainer's groups."""
    if dict_size is None or fractions is None:
        raise ValueError(
            "dictionary_learning 'matryoshka_batch_top_k' needs `dict_size` and `group_fractions`, got "
            f"dict_size={dict_size}, group_fractions={fractions}."
        )
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"`group_fractions` must sum to 1.0 (as the trainer asserts), got {list(fractions)}.")
    sizes = [int(fraction * dict_size) for fraction in fractions[:-1]]
    sizes.append(dict_size - sum(sizes))
    count = len(sizes)
    group_weights = [1.0 / count] * count if weights is None else [float(weight) for weight in weights]
    if len(group_weights) != count:
        raise ValueError(
            f"`group_weights` must have one weight per group ({count}), got {len(group_weights)}: {group_weights}."
        )
    widths = [sum(sizes[: index + 1]) for index in range(count)]
    return widths, [weight / count for weight in group_weights]


# OpenAI sparse_autoencoder


def openai(
    d_model: int,
    *,
    mse_scale: float,
    auxk: int | None = 256,
    auxk_coef: float = 1 / 32,
    num_components: int = 1,
    nan_strategy: NanStrategy = "propagate",
    **kwargs: Any,
) -> SparseAutoencoderLoss:
    r"""OpenAI sparse_autoencoder's training loss (``train.py``'s ``loss_fn``): normalised MSE + AuxK.

    ``mse_scale * mse(recons, x) + auxk_coef * normalized_mse(decode_sparse(auxk), x - recons.detach() +
    pre_bias.detach()).nan_to_num(0)``: the element-mean squared error scaled by ``mse_scale`` (the collection's
    ``"l2"``, ``feature_reduction="mean"``, coefficient ``mse_scale``: ``train.py`` fixes it before training as
    ``1 / mean((mean_b x - x)^2)`` of a sample of activations) and the term ``"auxk"``: the top ``auxk`` latents
    of the masked pre-activations (dead ones only), ReLU'd, decoded with ``pre_bias``, against the residual plus
    the detached ``pre_bias``, over the residual's variance (``kernels.normalized_mse``). ``auxk=None`` leaves AuxK
    out. (``loss.py``'s ``autoencoder_loss``, the per-item normalised MSE with a normalised L1, is not this loss.)

    Inputs: ``source_activations`` (``x``), ``decoded_activations`` (``recons``), ``learned_activations``,
    ``pre_activations`` (``latents_pre_act``), ``decoder_weight`` (``decoder.weight.T``), ``decoder_bias``
    (``pre_bias``), ``dead_mask`` (``stats_last_nonzero > dead_steps_threshold``).

    Args:
        d_model: The activations' width (``n_inputs``; the AuxK normaliser's state).
        mse_scale: The MSE's scale (required: ``train.py`` computes it from data).
        auxk: How many dead latents decode (``Config.auxk``, default 256).
        auxk_coef: The AuxK weight (``Config.auxk_coef``, default 1/32).
        num_components: SAEs trained side by side.
        nan_strategy: As the collection's.
        kwargs: Passed to the collection and every term.
    """
    common: dict[str, Any] = {"nan_strategy": nan_strategy, **_term_kwargs(kwargs)}
    terms: dict[str, tuple[SaeMetric, float]] = {}
    if auxk is not None:
        terms["auxk"] = (
            AuxiliaryKLoss(num_components, k_aux=auxk, convention="openai", d_model=d_model, **common),
            auxk_coef,
        )
    return _collection(
        num_components,
        nan_strategy,
        terms,
        coefficients={"l2": mse_scale},
        feature_reduction="mean",
        sparsity_penalty=False,
        **kwargs,
    )


# saev


def saev(
    activation: str = "relu",
    *,
    sparsity_coeff: float | None = None,
    aux: str | None = None,
    k_aux: int = 512,
    alpha: float = 1 / 32,
    prefix_sizes: Sequence[int] | None = None,
    num_components: int = 1,
    nan_strategy: NanStrategy = "propagate",
    **kwargs: Any,
) -> SparseAutoencoderLoss:
    r"""The training loss of saev (``saev/nn/objectives.py``): ``mse + sparsity + aux``.

    ``mse`` is the element mean of the squared error over ``(batch, d_model)`` (``feature_reduction="mean"``);
    with fixed Matryoshka ``prefix_sizes`` the element mean over ``(batch, prefix, d_model)``, the ``"matryoshka"``
    member with weights ``1/P`` (``sparse_metrics.objectives`` samples the widths per step).
    ``sparsity = sparsity_coeff * mean_b ||f||_1`` (``L1Sparsity``; the activation's default: ``Relu`` 4e-4, the
    TopK ones none). ``aux`` (``saev/nn/modeling.py``): ``"auxk"`` (the TopK ones' default) is
    ``alpha * mean((decode(aux_acts) - (x - x_hat).detach())^2)``, the top ``min(k_aux, n_dead)`` dead
    pre-activations decoded with ``b_dec`` (the term ``"auxk"``); ``"no-aux"`` (``Relu``'s default) none.

    Inputs: ``source_activations`` (``x``), ``decoded_activations`` (``x_hat``, the full dictionary's),
    ``learned_activations`` (``f_x``); with AuxK ``pre_activations`` (``h_x``), ``decoder_weight`` (``W_dec``),
    ``decoder_bias`` (``b_dec``) and ``dead_mask``; with ``prefix_sizes`` ``decoder_weight`` and ``decoder_bias``.

    Args:
        activation: saev's activation config: ``"relu"``, ``"top-k"`` or ``"batch-top-k"``.
        sparsity_coeff: The L1 weight (None: the activation's default).
        aux: The auxiliary loss: ``"auxk"`` or ``"no-aux"`` (None: the activation's default).
        k_aux: AuxK: how many dead latents decode (``AuxK.k_aux``, default 512).
        alpha: AuxK: its weight (``AuxK.alpha``, default 1/32).
        prefix_sizes: Fixed Matryoshka widths (cumulative).
        num_components: SAEs trained side by side.
        nan_strategy: As the collection's.
        kwargs: Passed to the collection and every term.

    Example:
        >>> import torch
        >>> from sparse_metrics import presets
        >>> loss_fn = presets.saev(sparsity_coeff=0.1)
        >>> x, x_hat = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]])
        >>> out = loss_fn(source_activations=x, learned_activations=torch.tensor([[0.5, 0.0, 1.5]]),
        ...               decoded_activations=x_hat)
        >>> round(out["loss"].item(), 4)  # 0.5 + 0.1 * 2
        0.7
    """
    _architecture("saev", activation, ["relu", "top-k", "batch-top-k"])
    if aux not in (None, "auxk", "no-aux"):
        raise ValueError(f"saev has no aux {aux!r}; the valid ones are ['auxk', 'no-aux'].")
    if sparsity_coeff is None:
        sparsity_coeff = 4e-4 if activation == "relu" else 0.0
    if aux is None:
        aux = "no-aux" if activation == "relu" else "auxk"
    common: dict[str, Any] = {"nan_strategy": nan_strategy, **_term_kwargs(kwargs)}
    terms: dict[str, tuple[SaeMetric, float]] = {}
    if aux == "auxk":
        terms["auxk"] = (AuxiliaryKLoss(num_components, k_aux=k_aux, convention="saev", **common), alpha)
    options: dict[str, Any] = {}
    if prefix_sizes is not None:
        options["matryoshka_prefix_sizes"] = prefix_sizes
    return _collection(
        num_components,
        nan_strategy,
        terms,
        sparsity_coefficient=sparsity_coeff,
        feature_reduction="mean",
        **options,
        **kwargs,
    )
