"""Train a Matryoshka SAE and log the reconstruction loss of every nested prefix of its dictionary.

A Matryoshka SAE (Bussmann et al., 2025; Nabeshima, 2024) is trained so that every prefix of its dictionary, the first
``m`` features for each width ``m``, reconstructs the input on its own: small prefixes learn general features and the
later ones refine them. ``SparseAutoencoderLoss(matryoshka_prefix_sizes=...)`` makes the loss the mean of the
prefixes' errors (saev's convention; ``matryoshka_prefix_weights`` and ``feature_reduction="sum"`` give the others),
and its ``compute()`` returns each prefix's epoch error under ``matryoshka_prefix_<m>``: the table below logs them.

Two training losses:

- default: the collection's own ``"loss"``, with fixed widths ``d_sae/8, d_sae/4, d_sae/2, d_sae``;
- ``--sampled-prefixes N``: saev's objective with ``N`` widths drawn afresh on every step
  (``sparse_metrics.objectives.Matryoshka(n_prefixes=N)``, seeded, so every DDP rank would draw the same widths);
  the collection then only logs the fixed widths, through ``update()`` (no autograd graph).

Examples:
    python examples/matryoshka.py
    python examples/matryoshka.py --sampled-prefixes 6
"""

from __future__ import annotations

import argparse

import torch
from train_sae import (
    D_MODEL,
    SparseAutoencoder,
    _one_thread,
    _table_header,
    _table_row,
    make_data,
    matryoshka_prefix_sizes,
    table_columns,
)

import sparse_metrics as sm
from sparse_metrics.objectives import Matryoshka, get_objective


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="passes over the data (default 5)")
    parser.add_argument("--num-samples", type=int, default=8192, help="size of the synthetic data set")
    parser.add_argument("--batch-size", type=int, default=256, help="items per optimiser step")
    parser.add_argument("--d-sae", type=int, default=256, help="dictionary size (at least 8)")
    parser.add_argument("--sparsity-coefficient", type=float, default=2e-2, help="weight of the L1 penalty")
    parser.add_argument("--sampled-prefixes", type=int, default=None, metavar="N", help="train on N sampled widths")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the SAE and the prefix sampler")
    args = parser.parse_args(argv)
    for name in ("epochs", "num_samples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.d_sae < 8:
        parser.error(f"--d-sae must be at least 8 for the 4 logged prefixes, got {args.d_sae}")
    if args.sampled_prefixes is not None and not 1 <= args.sampled_prefixes <= args.d_sae:
        parser.error(f"--sampled-prefixes must be in [1, d_sae={args.d_sae}], got {args.sampled_prefixes}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and print one row per epoch; return the last epoch's ``compute()`` values."""
    args = parse_args(argv)
    with _one_thread():  # small tensors: one thread is faster (see train_sae)
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, float]:
    generator = torch.Generator().manual_seed(args.seed)
    activations, _ = make_data(args.num_samples, generator)
    sae = SparseAutoencoder(D_MODEL, args.d_sae, generator)
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    sizes = matryoshka_prefix_sizes(args.d_sae)
    # Every prefix, the whole dictionary's too, is decoded from W_dec. This SAE's x_hat is exactly f W_dec + b_dec, so
    # `matryoshka_reuse_decoded_activations=True` would also be right here (it saves one block of the decode); with
    # a skip connection or an output normalisation it would not.
    loss_fn = sm.SparseAutoencoderLoss(sparsity_coefficient=args.sparsity_coefficient, matryoshka_prefix_sizes=sizes)
    objective = None
    if args.sampled_prefixes is not None:
        config = Matryoshka(sparsity_coeff=args.sparsity_coefficient, n_prefixes=args.sampled_prefixes, seed=args.seed)
        objective = get_objective(config)
    training = f"{args.sampled_prefixes} sampled widths per step" if objective else f"fixed widths {sizes}"
    print(f"Matryoshka SAE d_sae={args.d_sae}, trained on {training}; logged prefixes {sizes}")

    values: dict[str, float] = {}
    for epoch in range(1, args.epochs + 1):
        for indices in torch.randperm(args.num_samples, generator=generator).split(args.batch_size):
            x = activations[indices]
            f, x_hat = sae(x)
            inputs = {
                "source_activations": x,
                "learned_activations": f,
                "decoded_activations": x_hat,
                "decoder_weight": sae.W_dec,
                "decoder_bias": sae.b_dec,
            }
            if objective is None:
                loss = loss_fn(**inputs)["loss"]
            else:
                loss = objective(x, f, x_hat, sae.W_dec, sae.b_dec).loss
                loss_fn.update(**inputs)  # logging only
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sae.normalize_decoder()
        values = {name: value.item() for name, value in loss_fn.compute().items()}
        loss_fn.reset()
        if objective is not None:
            objective.reset()  # its collection accumulated too; only the fixed widths are logged here
        columns = table_columns(values)
        if epoch == 1:
            print(_table_header(columns))
        print(_table_row(epoch, values, columns), flush=True)
    return values


if __name__ == "__main__":
    main()
