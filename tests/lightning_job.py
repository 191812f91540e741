"""A Lightning run that logs ``SparseAutoencoderLoss`` with ``self.log_dict(collection, on_step=True, on_epoch=True)``.

Run as ``python tests/lightning_job.py OUT`` (one process) or under ``torchrun --nproc-per-node 2`` (DDP, gloo). The
SAE is frozen (learning rate 0), so every batch value is known in advance: rank 0 writes, beside Lightning's
``OUT/csv/version_0/metrics.csv``, ``OUT/expected.json`` with the values a step must log (rank 0's batch values) and an
epoch must log (the pooled value over every rank's items), computed by a fresh collection without Lightning.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L  # noqa: N812
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import sparse_metrics as sm

D_MODEL, D_SAE, STEPS = 6, 16, 3
#: rank -> items per batch: uneven, so the pooled epoch value differs from the mean of the ranks' values.
BATCH_SIZES = {0: 5, 1: 2}


def make_loss(**kwargs: Any) -> sm.SparseAutoencoderLoss:
    return sm.SparseAutoencoderLoss(
        sparsity_coefficient=0.3,
        matryoshka_prefix_sizes=[4, D_SAE],
        explained_variance=True,
        d_model=D_MODEL,
        dead_feature_window=64,
        num_features=D_SAE,
        **kwargs,
    )


def data(rank: int) -> Tensor:
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(STEPS * BATCH_SIZES[rank], D_MODEL, generator=generator) + rank


class FrozenSae(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.encoder = nn.Linear(D_MODEL, D_SAE)
        self.decoder = nn.Linear(D_SAE, D_MODEL)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        self.loss_fn = make_loss()

    def sae_inputs(self, x: Tensor) -> dict[str, Tensor]:
        learned = torch.relu(self.encoder(x))
        return {
            "source_activations": x,
            "learned_activations": learned,
            "decoded_activations": self.decoder(learned),
            "decoder_weight": self.decoder.weight.mT,
            "decoder_bias": self.decoder.bias,
        }

    def training_step(self, batch: list[Tensor], batch_index: int) -> Tensor:
        out = self.loss_fn(**self.sae_inputs(batch[0]))
        self.log_dict(self.loss_fn, on_step=True, on_epoch=True)
        loss: Tensor = out["loss"]
        return loss

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(data(self.global_rank)), batch_size=BATCH_SIZES[self.global_rank])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def expected(model: FrozenSae, world_size: int) -> dict[str, Any]:
    """Rank 0's batch values per step, and the pooled epoch values over every rank's items."""
    steps: list[dict[str, float]] = []
    pooled = make_loss(sync_on_compute=False)  # one process's replay of every rank's batches
    with torch.no_grad():
        for rank in range(world_size):
            running = make_loss(
                sync_on_compute=False
            )  # the rank's own collection: dead-feature counts run on over the steps
            for batch in data(rank).split(BATCH_SIZES[rank]):
                inputs = model.sae_inputs(batch)
                values = running(**inputs)
                pooled.update(**inputs)
                if rank == 0:
                    steps.append({key: float(value) for key, value in values.items()})
    return {"steps": steps, "epoch": {key: float(value) for key, value in pooled.compute().items()}}


def main(out: Path) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    model = FrozenSae()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        max_epochs=1,
        logger=CSVLogger(out, name="csv", version=0),
        log_every_n_steps=1,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    if trainer.global_rank == 0:
        (out / "expected.json").write_text(json.dumps(expected(model, world_size)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
