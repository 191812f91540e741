"""Train an SAE with PyTorch Lightning, logging ``SparseAutoencoderLoss`` with ``self.log_dict``.

Needs Lightning: ``pip install torch==2.13.0 -e ".[lightning]"``.

The collection is a submodule of the ``LightningModule``, so it moves to the module's device with it. Two kinds of
values are logged:

- ``train/<term>`` on every step: the batch values that ``forward`` returns (the ``"loss"`` among them is the
  differentiable total that ``training_step`` returns to Lightning);
- ``epoch/<term>`` at the end of every epoch: ``compute()``, the exact means over every item of the epoch on every
  process, synced in one packed collective. Every rank calls it (``on_train_epoch_end`` runs on all of them), and the
  values are already global, so ``log_dict`` is told not to sync them again (``sync_dist=False``). Lightning's own
  ``sync_dist=True`` would instead average per-rank means, which is wrong for uneven ranks.

Both go through ``loss_fn.loggable``, which keeps the scalars (one key per component for several SAEs, none for
per-feature values such as ``feature_density``). Passing the collection object itself to ``log_dict`` also works
(every key, ``"loss"`` included, is a member), but then Lightning calls each member's ``compute()`` separately, a
collective each, where ``loss_fn.compute()`` syncs them all at once.

Examples:
    python examples/lightning_module.py
    python examples/lightning_module.py --devices 2   # DDP on CPU (gloo), started by Lightning
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import lightning as L  # noqa: N812  # Lightning's documented alias
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from train_sae import D_MODEL, SparseAutoencoder, make_data

import sparse_metrics as sm


class SparseAutoencoderModule(L.LightningModule):
    """A ReLU SAE whose loss and logged metrics come from one ``SparseAutoencoderLoss``."""

    def __init__(self, d_model: int, d_sae: int, sparsity_coefficient: float, lr: float, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sae = SparseAutoencoder(d_model, d_sae, torch.Generator().manual_seed(seed))
        self.loss_fn = sm.SparseAutoencoderLoss(sparsity_coefficient=sparsity_coefficient)
        self.lr = lr

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (x,) = batch
        f, x_hat = self.sae(x)
        out = self.loss_fn(source_activations=x, learned_activations=f, decoded_activations=x_hat)
        logged = self.loss_fn.loggable(out)
        self.log_dict({f"train/{name}": value.detach() for name, value in logged.items()}, on_step=True, on_epoch=False)
        loss: Tensor = out["loss"]
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.sae.normalize_decoder()

    def on_train_epoch_end(self) -> None:
        epoch = self.loss_fn.loggable(self.loss_fn.compute())  # compute() is a collective: runs on every rank
        self.log_dict({f"epoch/{name}": value.float() for name, value in epoch.items()}, sync_dist=False)
        self.loss_fn.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.sae.parameters(), lr=self.lr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="passes over the data (default 5)")
    parser.add_argument("--num-samples", type=int, default=8192, help="size of the synthetic data set")
    parser.add_argument("--batch-size", type=int, default=256, help="items per optimiser step and process")
    parser.add_argument("--d-sae", type=int, default=256, help="dictionary size")
    parser.add_argument("--sparsity-coefficient", type=float, default=2e-2, help="weight of the L1 penalty")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP on gloo when > 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the SAE")
    args = parser.parse_args(argv)
    for name in ("epochs", "num_samples", "batch_size", "d_sae", "devices"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Fit and return the last logged values (``train/*`` of the last step, ``epoch/*`` of the last epoch)."""
    args = parse_args(argv)
    activations, _ = make_data(args.num_samples, torch.Generator().manual_seed(args.seed))
    loader = DataLoader(TensorDataset(activations), batch_size=args.batch_size, shuffle=True)
    module = SparseAutoencoderModule(D_MODEL, args.d_sae, args.sparsity_coefficient, args.lr, args.seed)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp_spawn" if args.devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
    )
    trainer.fit(module, loader)
    values = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        print("  ".join(f"{name}={value:.4g}" for name, value in sorted(values.items()) if name.startswith("epoch/")))
    return values


if __name__ == "__main__":
    main()
