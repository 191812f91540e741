"""Neuron resampling: give dead SAE features a new start on the inputs the SAE reconstructs worst.

Features that stop firing ("dead" features) waste dictionary capacity. Resampling (Bricken et al., 2023) re-aims them:

1. Over a window of items, record every item's reconstruction error and every feature's activity. The library gives
   both: ``L2ReconstructionLoss(keep_batch_dim=True, feature_reduction="sum")`` keeps the per-item squared error
   :math:`\\lVert x_b - \\hat x_b \\rVert^2` (its ``compute()`` returns the ``[window]`` values), and
   ``DeadFeatures(d_sae, window=len(window))`` tracks, per feature, the items since it last fired.
2. Dead features are those that fired on no item of the window: ``DeadFeatures.dead_mask()``.
3. For each dead feature, draw an input with probability proportional to its squared error (without replacement),
   point the feature's decoder row at it (unit norm, after subtracting the decoder bias), set its encoder column to
   the same direction scaled to a fifth of the live features' mean encoder norm, zero its encoder bias, and clear
   the optimiser's moments for those rows so that stale statistics do not push them straight back.

To show the mechanism on a small run, ``--kill`` features start with a large negative encoder bias, so they never fire
(as features that died during training). The script reports the dead count before and after resampling.

The window's inputs stay on the process that saw them, so this script is single-process. Under DDP the per-item
errors of ``compute()`` come from every rank ("cat" sync); gather the window's inputs the same way, or draw the items
with a generator seeded identically on every rank, to resample the same inputs everywhere.

Examples:
    python examples/resampling.py
    python examples/resampling.py --kill 128 --window 4096
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor, nn
from train_sae import D_MODEL, SparseAutoencoder, _one_thread, make_data

import sparse_metrics as sm

ENCODER_SCALE = 0.2  # revived encoder columns: this fraction of the live columns' mean norm
DEAD_BIAS = -1e3  # encoder bias that keeps a --kill feature silent on this data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs before and again after resampling (default 2)")
    parser.add_argument("--num-samples", type=int, default=8192, help="size of the synthetic data set")
    parser.add_argument("--batch-size", type=int, default=256, help="items per optimiser step")
    parser.add_argument("--d-sae", type=int, default=256, help="dictionary size")
    parser.add_argument("--kill", type=int, default=64, help="features that start dead (default 64)")
    parser.add_argument("--window", type=int, default=2048, help="items over which dead features are found")
    parser.add_argument("--sparsity-coefficient", type=float, default=2e-2, help="weight of the L1 penalty")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the SAE and the sampling")
    args = parser.parse_args(argv)
    for name in ("epochs", "num_samples", "batch_size", "d_sae", "window"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.kill < args.d_sae:
        parser.error(f"--kill must be in [0, d_sae={args.d_sae}), got {args.kill}")
    if args.window > args.num_samples:
        parser.error(f"--window ({args.window}) must not exceed --num-samples ({args.num_samples})")
    return args


def train_epochs(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    loss_fn: sm.SparseAutoencoderLoss,
    activations: Tensor,
    args: argparse.Namespace,
    generator: torch.Generator,
) -> float:
    """Train for ``args.epochs`` epochs; return the last epoch's loss (``compute()``)."""
    loss = float("nan")
    for _ in range(args.epochs):
        for indices in torch.randperm(len(activations), generator=generator).split(args.batch_size):
            x = activations[indices]
            f, x_hat = sae(x)
            out = loss_fn(source_activations=x, learned_activations=f, decoded_activations=x_hat)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            sae.normalize_decoder()
        loss = loss_fn.compute()["loss"].item()
        loss_fn.reset()
    return loss


@torch.no_grad()
def scan_window(sae: SparseAutoencoder, window: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Per-item squared errors ``[window]`` and the dead-feature mask ``[d_sae]`` over the window's items."""
    errors = sm.L2ReconstructionLoss(keep_batch_dim=True, feature_reduction="sum")
    # Dead: silent for at least `window` items, i.e. on every item of the window once all of it has been seen.
    dead_features = sm.DeadFeatures(sae.W_dec.shape[0], window=window.shape[0])
    for x in window.split(batch_size):
        f, x_hat = sae(x)
        errors.update(decoded_activations=x_hat, source_activations=x)
        dead_features.update(learned_activations=f)
    return errors.compute(), dead_features.dead_mask()


@torch.no_grad()
def resample(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    dead: Tensor,
    window: Tensor,
    squared_errors: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """Re-initialise the ``dead`` features from window items drawn with probability ∝ squared error.

    Returns:
        The indices into ``window`` of the items drawn, one per dead feature (in the order of ``dead.nonzero()``).
    """
    features = dead.nonzero().squeeze(-1)
    if not len(features):
        return torch.zeros(0, dtype=torch.int64)
    weights = squared_errors.clamp_min(0)
    if not bool((weights > 0).any()):  # a perfect reconstruction: any item will do
        weights = torch.ones_like(weights)
    replacement = len(features) > int((weights > 0).sum())
    drawn = torch.multinomial(weights, len(features), replacement=replacement, generator=generator)
    directions = nn.functional.normalize(window[drawn] - sae.b_dec, dim=-1)
    alive = ~dead
    live_norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
    sae.W_dec[features] = directions
    sae.W_enc[:, features] = (directions * ENCODER_SCALE * live_norm).T
    sae.b_enc[features] = 0.0
    _clear_moments(optimizer, sae, features)
    return drawn


def _clear_moments(optimizer: torch.optim.Optimizer, sae: SparseAutoencoder, features: Tensor) -> None:
    # Adam's running moments belong to the features' old roles; keeping them would drag the new rows back.
    rows: dict[nn.Parameter, Any] = {
        sae.W_dec: (features,),
        sae.W_enc: (slice(None), features),
        sae.b_enc: (features,),
    }
    for parameter, index in rows.items():
        for moment in optimizer.state.get(parameter, {}).values():
            if isinstance(moment, Tensor) and moment.shape == parameter.shape:
                moment[index] = 0.0


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, resample the dead features, train again; print and return the dead counts and losses."""
    args = parse_args(argv)
    with _one_thread():  # small tensors: one thread is faster (see train_sae)
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, float]:
    generator = torch.Generator().manual_seed(args.seed)
    activations, _ = make_data(args.num_samples, generator)
    sae = SparseAutoencoder(D_MODEL, args.d_sae, generator)
    with torch.no_grad():
        sae.b_enc[: args.kill] = DEAD_BIAS
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    loss_fn = sm.SparseAutoencoderLoss(sparsity_coefficient=args.sparsity_coefficient)

    loss_before = train_epochs(sae, optimizer, loss_fn, activations, args, generator)
    window = activations[torch.randperm(args.num_samples, generator=generator)[: args.window]]
    squared_errors, dead = scan_window(sae, window, args.batch_size)
    drawn = resample(sae, optimizer, dead, window, squared_errors, generator)
    print(
        f"after {args.epochs} epochs: loss {loss_before:.4g}, {int(dead.sum())} of {args.d_sae} features dead over "
        f"{args.window} items; resampled them from {len(drawn.unique())} high-error items"
    )
    loss_after = train_epochs(sae, optimizer, loss_fn, activations, args, generator)
    _, dead_mask_after = scan_window(sae, window, args.batch_size)
    dead_after = int(dead_mask_after.sum())
    print(f"after {args.epochs} more epochs: loss {loss_after:.4g}, {dead_after} features dead")
    return {
        "dead_before": float(dead.sum()),
        "dead_after": float(dead_after),
        "loss_before": loss_before,
        "loss_after": loss_after,
    }


if __name__ == "__main__":
    main()
