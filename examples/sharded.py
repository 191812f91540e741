"""A dictionary sharded over features, with data parallelism on top: the metrics on a 2 x 2 mesh of CPU processes.

Four processes form a ``("data", "feature")`` mesh: two data replicas, each with the dictionary split into two
feature shards. Each process encodes its data replica's items with its slice of the encoder, decodes them with its
rows of the decoder, and the partial decodes are summed over the feature group (as the model itself would do); the
collection is given the mesh, so that L0, L1, the sparsity penalty and the Matryoshka prefixes count the whole
dictionary, the items sync over the data group only, and per-feature values stay sharded (gathered for printing).

Run: ``python examples/sharded.py`` (spawns 4 gloo processes; prints the loss and the density of each feature, the
same on every process, and checks them against one process on the full dictionary).
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

import sparse_metrics as sm

D_MODEL, D_SAE, DATA, FEATURE, BATCH = 8, 16, 2, 2, 6


def sae(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full dictionary: encoder, decoder ``[d_sae, d_model]`` (feature-major) and decoder bias."""
    encoder = torch.randn(D_MODEL, D_SAE, generator=generator, dtype=torch.float64)
    decoder = torch.randn(D_SAE, D_MODEL, generator=generator, dtype=torch.float64) / D_SAE**0.5
    return encoder, decoder, torch.randn(D_MODEL, generator=generator, dtype=torch.float64)


def loss_fn(**kwargs: object) -> sm.SparseAutoencoderLoss:
    return sm.SparseAutoencoderLoss(
        sparsity_coefficient=0.1,
        matryoshka_prefix_sizes=[4, D_SAE],
        feature_density=True,
        num_features=D_SAE,
        **kwargs,
    )


def step(x: torch.Tensor, encoder: torch.Tensor, decoder: torch.Tensor, bias: torch.Tensor) -> dict:
    features = torch.relu(x @ encoder)
    return {
        "source_activations": x,
        "learned_activations": features,
        "decoded_activations": features @ decoder + bias,
        "decoder_weight": decoder,
        "decoder_bias": bias,
    }


def worker(rank: int, directory: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=DATA * FEATURE,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    mesh = init_device_mesh("cpu", (DATA, FEATURE), mesh_dim_names=("data", "feature"))
    data_rank, shard = mesh.get_local_rank("data"), mesh.get_local_rank("feature")
    encoder, decoder, bias = sae(torch.Generator().manual_seed(0))
    items = torch.randn(DATA * BATCH, D_MODEL, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = items[data_rank * BATCH : (data_rank + 1) * BATCH]
    width = D_SAE // FEATURE
    owned = slice(shard * width, (shard + 1) * width)
    # This shard's slice of the SAE; the model sums the partial decodes over the feature group.
    features = torch.relu(x @ encoder[:, owned]).requires_grad_()
    partial = features @ decoder[owned]
    decoded = partial.clone()
    dist.all_reduce(decoded, group=mesh.get_group("feature"))
    sharded = loss_fn(device_mesh=mesh)
    values = sharded(
        source_activations=x,
        learned_activations=features,
        decoded_activations=decoded + bias,
        decoder_weight=decoder[owned],
        decoder_bias=bias,
    )
    values["loss"].backward()  # this shard's gradient: the full dictionary's, for its features
    result = sharded.compute()
    density = sm.gather_features(result["feature_density"], sharded)  # the whole dictionary's densities
    # One process, the full dictionary, all the data: the same numbers.
    full = loss_fn(sync_on_compute=False)
    full.update(**step(items, encoder, decoder, bias))
    expected = full.compute()
    torch.testing.assert_close(result["loss"], expected["loss"])
    torch.testing.assert_close(density, expected["feature_density"])
    check = loss_fn(sync_on_compute=False)
    full_features = torch.relu(x @ encoder).requires_grad_()
    check(**{**step(x, encoder, decoder, bias), "learned_activations": full_features})["loss"].backward()
    assert features.grad is not None
    assert full_features.grad is not None
    torch.testing.assert_close(features.grad, full_features.grad[:, owned])
    if rank == 0:
        print(f"loss {result['loss'].item():.6f} (one process: {expected['loss'].item():.6f})")
        print("feature density", [round(value, 3) for value in density.tolist()])
    dist.destroy_process_group()


def main() -> int:
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(worker, args=(directory,), nprocs=DATA * FEATURE, join=True)
    print("sharded == one process on the full dictionary")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
