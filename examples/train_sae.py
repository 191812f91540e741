"""Train a small sparse autoencoder on synthetic data, with ``SparseAutoencoderLoss`` as its loss.

``--architecture`` picks the SAE and the loss the collection composes for it (see ``make_loss``): ``relu`` (the
default: L2 + L1 penalty), ``topk`` and ``batchtopk`` (L2 + the AuxK auxiliary loss on dead latents; BatchTopK also
tracks its inference threshold) or ``jumprelu`` (L2 + the JumpReLU L0 penalty, whose straight-through gradient trains
the thresholds). The table prints every term of the loss.

The data have a known sparse ground truth: a few hundred unit-norm "true feature" directions in superposition in a
64-dimensional space, each item a sparse non-negative combination of a handful of them plus a little noise. A good
SAE learns decoder rows that point along those directions, so besides the loss terms the script reports how many
true directions the trained dictionary recovered.

The per-epoch table shows the values practitioners look at first, all from the one collection
(``explained_variance=True``, ``feature_density=True``, ``dead_feature_window``), synced with the loss terms:

- ``expl_var``: the explained variance ``1 - FVU`` of the epoch, pooled over every item on every process;
- ``dead`` and ``dead_frac``: the features that fired on none of the last ``--dead-window`` items (default: one
  epoch's items), and their share of the dictionary. These counters run over the whole training, not one epoch.

The loop uses the metric collection as a training loss should be used under DDP:

- ``forward`` on every batch returns the differentiable ``"loss"`` of that batch (and accumulates the batch);
- ``compute()`` at the end of each epoch returns exact means over every item seen by every process, and must be
  called on every rank, since it is a collective;
- ``reset()`` starts the next epoch.

``--batch-size`` is the global batch: with 2 processes each takes half of every batch from its own shard, and DDP
averages the two halves' gradients. The two-process run therefore trains the same model on the same batches as the
single-process run and prints the same table, up to floating-point rounding (but for ``batchtopk``, whose top
``k * batch`` activations are chosen within each process's half of the batch). Two processes are started either by the
script itself (``--nproc 2``) or by ``torchrun``, whose environment variables the script detects.

With ``tqdm`` installed (``pip install -e ".[examples]"``) rank 0 shows a progress bar when writing to a terminal
(never in CI logs or pipes); ``--plot PATH`` (needs matplotlib) writes the loss curves and the histogram of the
last epoch's feature densities (the collection's ``"feature_density"``) to a PNG.

Examples:
    python examples/train_sae.py
    python examples/train_sae.py --matryoshka --plot sae.png
    python examples/train_sae.py --architecture topk --k 8
    python examples/train_sae.py --nproc 2
    torchrun --nproc_per_node 2 examples/train_sae.py
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import sparse_metrics as sm
from sparse_metrics.functional import DENSITY_EPSILON

D_MODEL = 64  # width of the activations the SAE reads
NUM_TRUE_FEATURES = 256  # ground-truth directions, 4x more than dimensions: they must share the space
ACTIVE_PER_ITEM = 4.0  # expected number of true features active on one item
NOISE_STD = 0.05  # relative to an item's signal, which is scaled to unit variance per dimension
RECOVERY_COSINE = 0.9  # a true direction counts as recovered if some decoder row is at least this close
ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
JUMPRELU_BANDWIDTH = 0.05  # SAELens' default ε of the straight-through estimators
JUMPRELU_INITIAL_THRESHOLD = 0.2  # above most early pre-activations: L0 starts low

# Columns of the per-epoch table, in order, with their headers; Matryoshka runs append one column per prefix.
TABLE_COLUMNS = {
    "loss": "loss",
    "l2": "l2",
    "l0": "l0",
    "l1": "l1",
    "sparsity": "sparsity",
    "auxk": "auxk",
    "l0_loss": "l0_loss",
    "threshold": "threshold",
    "explained_variance": "expl_var",
    "dead_features": "dead",
    "dead_feature_fraction": "dead_frac",
}
TABLE_KEYS = tuple(TABLE_COLUMNS)
HISTORY_FILE = "history.json"  # where rank 0 of a --nproc run leaves the epochs' values for the parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=_positive_int, default=10, help="passes over the data (default: 10)")
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        help="items per optimiser step, over all processes together (default: 256)",
    )
    parser.add_argument(
        "--num-samples", type=_positive_int, default=16384, help="size of the synthetic data set (default: 16384)"
    )
    parser.add_argument("--d-sae", type=_positive_int, default=512, help="dictionary size (default: 512)")
    parser.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default="relu",
        help="the SAE's activation and its loss (default: relu, with an L1 penalty; see make_loss)",
    )
    parser.add_argument(
        "--k", type=_positive_int, default=None, help="active latents per item of topk and batchtopk (default: 8)"
    )
    parser.add_argument(
        "--sparsity-coefficient",
        type=float,
        default=None,
        help="weight of the L1 penalty (relu) or of the L0 penalty (jumprelu); default 2e-2",
    )
    parser.add_argument(
        "--matryoshka",
        action="store_true",
        help="reconstruct from nested prefixes of the dictionary (d_sae/8, d_sae/4, d_sae/2, d_sae)",
    )
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default: 1e-2)")
    parser.add_argument(
        "--dead-window",
        type=_positive_int,
        default=None,
        metavar="ITEMS",
        help="a feature is dead once silent for this many items, counted over all processes (default: one epoch's)",
    )
    parser.add_argument(
        "--nproc", type=_positive_int, default=1, help="processes (DDP on the gloo backend when > 1; default: 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initial SAE and the shuffles")
    parser.add_argument(
        "--plot", type=Path, default=None, metavar="PATH", help="write the loss curves to this PNG (needs matplotlib)"
    )
    args = parser.parse_args(argv)
    if args.sparsity_coefficient is None:
        args.sparsity_coefficient = 2e-2
    elif args.architecture in ("topk", "batchtopk"):
        parser.error(f"--sparsity-coefficient: a {args.architecture} SAE has no sparsity penalty (its k sets the L0)")
    if args.k is not None and args.architecture not in ("topk", "batchtopk"):
        parser.error(f"--k applies to topk and batchtopk, not to {args.architecture}")
    args.k = 8 if args.k is None else args.k
    if args.k > args.d_sae:
        parser.error(f"--k ({args.k}) must be at most --d-sae ({args.d_sae})")
    launched = torchrun_world_size()
    if launched is not None and args.nproc != 1:
        parser.error(f"--nproc {args.nproc} under torchrun: torchrun already started {launched} processes")
    processes = launched or args.nproc
    if args.batch_size % processes:
        parser.error(f"--batch-size ({args.batch_size}) must be divisible by the process count ({processes})")
    if args.num_samples < args.batch_size:
        parser.error(f"--num-samples ({args.num_samples}) must be at least --batch-size ({args.batch_size})")
    if args.matryoshka and args.d_sae < 8:
        parser.error(f"--matryoshka needs --d-sae of at least 8 for its 4 prefixes, got {args.d_sae}")
    return args


def torchrun_world_size() -> int | None:
    """The process count when started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def make_data(num_samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Synthetic activations with a known sparse code: ``(activations [N, D_MODEL], directions [F_true, D_MODEL])``."""
    directions = nn.functional.normalize(torch.randn(NUM_TRUE_FEATURES, D_MODEL, generator=generator), dim=-1)
    active = torch.rand(num_samples, NUM_TRUE_FEATURES, generator=generator) < ACTIVE_PER_ITEM / NUM_TRUE_FEATURES
    magnitudes = torch.rand(num_samples, NUM_TRUE_FEATURES, generator=generator)
    signal = (active * magnitudes) @ directions
    # Unit variance per dimension (mean squared norm D_MODEL), a common SAE convention: the mean-over-d_model L2 of
    # an SAE that outputs zeros is then about 1, whatever the data's sizes.
    signal = signal * math.sqrt(D_MODEL / signal.square().sum(dim=-1).mean())
    activations = signal + NOISE_STD * torch.randn(num_samples, D_MODEL, generator=generator)
    return activations, directions


class _JumpReLU(torch.autograd.Function):
    """``f = h * H(h - θ)``; the threshold learns through the straight-through estimator of SAELens' ``JumpReLU``.

    ``∂f/∂h = H(h - θ)``; ``∂f/∂θ = -(θ/ε) K((h - θ)/ε)`` with the rectangle kernel ``K(u) = 1[|u| < 1/2]``.
    """

    @staticmethod
    def forward(ctx: Any, pre_activations: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_activations, threshold)
        ctx.bandwidth = bandwidth
        return pre_activations * (pre_activations > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_activations, threshold = ctx.saved_tensors
        inside = ((pre_activations - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = -(threshold / ctx.bandwidth) * inside * grad
        return (pre_activations > threshold) * grad, grad_threshold.sum(dim=0), None


class SparseAutoencoder(nn.Module):
    """An SAE of one of ``ARCHITECTURES``: ``h = (x - b_dec) W_enc + b_enc``, ``f = act(h)``, ``x̂ = f W_dec + b_dec``.

    - ``relu``: ``f = ReLU(h)``;
    - ``topk``: the ``k`` largest ``h`` of each item, ReLU'd, the others 0;
    - ``batchtopk``: the ``k * batch`` largest ReLU'd ``h`` of this process's batch;
    - ``jumprelu``: ``f = h * H(h - θ)`` with a learned per-feature threshold ``θ`` (:class:`_JumpReLU`).

    ``W_dec`` is feature-major, ``[d_sae, d_model]``: one row per dictionary feature, the layout that
    ``sparse_metrics`` expects.
    """

    def __init__(
        self, d_model: int, d_sae: int, generator: torch.Generator, architecture: str = "relu", k: int = 8
    ) -> None:
        super().__init__()
        self.architecture = architecture
        self.k = k
        # Unit-norm rows from the start, as normalize_decoder keeps them.
        decoder = nn.functional.normalize(torch.randn(d_sae, d_model, generator=generator), dim=-1)
        self.W_dec = nn.Parameter(decoder)
        # Encoder initialised as a scaled-down transpose of the decoder: every feature starts out reading its own
        # direction, and weakly enough that the hundreds of features active at first do not swamp the reconstruction.
        self.W_enc = nn.Parameter(0.1 * decoder.T.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        if architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(JUMPRELU_INITIAL_THRESHOLD)))

    @property
    def threshold(self) -> Tensor:
        """The JumpReLU threshold ``θ = exp(log θ)``, positive."""
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        """The feature activations ``f``."""
        return self.encode_with_pre_activations(x)[0]

    def encode_with_pre_activations(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The feature activations ``f`` and the pre-activations ``h``."""
        pre_activations = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.architecture == "relu":
            return torch.relu(pre_activations), pre_activations
        if self.architecture == "jumprelu":
            return _JumpReLU.apply(pre_activations, self.threshold, JUMPRELU_BANDWIDTH), pre_activations
        if self.architecture == "topk":
            values, indices = pre_activations.topk(self.k, dim=-1)
            return torch.zeros_like(pre_activations).scatter(-1, indices, torch.relu(values)), pre_activations
        flat = torch.relu(pre_activations).flatten()  # batchtopk: k per item on average, over the batch
        values, indices = flat.topk(min(self.k * x.shape[0], flat.numel()))
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_activations), pre_activations

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, *, with_pre_activations: bool = False) -> tuple[Tensor, ...]:
        """``(f, x_hat)``, and ``h`` after them with ``with_pre_activations`` (what AuxK and JumpReLU's L0 read)."""
        f, pre_activations = self.encode_with_pre_activations(x)
        return (f, self.decode(f), pre_activations) if with_pre_activations else (f, self.decode(f))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # Unit-norm decoder rows: otherwise the SAE lowers the L1 penalty by shrinking f and growing W_dec.
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True))


def make_loss(args: argparse.Namespace, dead_window: int) -> sm.SparseAutoencoderLoss:
    """The collection with the loss of ``args.architecture``, and the values to watch besides the loss terms.

    - ``relu``: L2 + the L1 penalty;
    - ``topk``, ``batchtopk``: L2 + AuxK (dictionary_learning's auxiliary loss, coefficient 1/32: the dead latents'
      top ``d_model / 2`` pre-activations reconstruct the residual), no L1 penalty; ``batchtopk`` also tracks the
      inference threshold (``BatchTopKThreshold``);
    - ``jumprelu``: L2 + ``--sparsity-coefficient`` times the JumpReLU L0 (its gradient reaches the threshold through
      the straight-through estimator).
    """
    terms: dict[str, sm.metrics.SaeMetric] = {}
    coefficients: dict[str, float] = {}
    if args.architecture in ("topk", "batchtopk"):
        terms["auxk"] = sm.AuxiliaryKLoss(k_aux=D_MODEL // 2, convention="dictionary_learning", d_model=D_MODEL)
        coefficients["auxk"] = 1 / 32
    elif args.architecture == "jumprelu":
        terms["l0_loss"] = sm.JumpReLUL0Loss(bandwidth=JUMPRELU_BANDWIDTH)
        coefficients["l0_loss"] = args.sparsity_coefficient
    l1_penalty = args.architecture == "relu"
    loss_fn = sm.SparseAutoencoderLoss(
        1,  # one SAE (num_components)
        args.sparsity_coefficient if l1_penalty else None,
        sparsity_penalty=l1_penalty,  # the TopK and JumpReLU losses have no L1 penalty
        matryoshka_prefix_sizes=matryoshka_prefix_sizes(args.d_sae) if args.matryoshka else None,
        # The values to watch besides the loss terms, from the same batches and the same (single) sync.
        explained_variance=True,
        d_model=D_MODEL,
        feature_density=True,
        dead_feature_window=dead_window,
        num_features=args.d_sae,
        loss_terms=terms,
        loss_coefficients=coefficients,
    )
    if args.architecture == "batchtopk":
        loss_fn.add_metrics({"threshold": sm.BatchTopKThreshold()})
    return loss_fn


def step_inputs(
    args: argparse.Namespace,
    sae: SparseAutoencoder,
    loss_fn: sm.SparseAutoencoderLoss,
    x: Tensor,
    f: Tensor,
    x_hat: Tensor,
    pre_activations: Tensor,
) -> dict[str, Tensor]:
    """The collection's inputs of one step: what every loss reads, and what ``args.architecture``'s loss adds."""
    inputs = {"source_activations": x, "learned_activations": f, "decoded_activations": x_hat}
    topk = args.architecture in ("topk", "batchtopk")
    if args.matryoshka or topk:  # the Matryoshka loss and AuxK decode with the decoder themselves
        inputs |= {"decoder_weight": sae.W_dec, "decoder_bias": sae.b_dec}
    if topk:
        # The latents dead before this step, over every process (a collective): those AuxK revives.
        inputs |= {"pre_activations": pre_activations, "dead_mask": loss_fn["dead_features"].dead_mask()}
    if args.architecture == "jumprelu":
        inputs |= {"pre_activations": pre_activations, "threshold": sae.threshold}
    return inputs


def matryoshka_prefix_sizes(d_sae: int) -> list[int]:
    return [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]


def recovered_fraction(decoder: Tensor, directions: Tensor) -> float:
    """Fraction of the true directions matched by some (unit-norm) decoder row with cosine >= RECOVERY_COSINE."""
    best_cosine = (directions @ decoder.T).amax(dim=-1)
    return (best_cosine >= RECOVERY_COSINE).float().mean().item()


def train(
    rank: int, world_size: int, args: argparse.Namespace, init_method: str | None = None
) -> list[dict[str, float]]:
    """Train on this rank's shard; return every epoch's ``compute()`` values (the same on every rank).

    ``init_method`` joins the process group (``file://...`` from ``--nproc``, ``env://`` under torchrun). The group
    outlives everything that uses it: the DDP model, the optimiser and the metrics live in ``_train``'s frame, and
    the group is destroyed here, after that frame is gone.
    """
    if world_size == 1:
        return _train(rank, world_size, args)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        history = _train(rank, world_size, args)
    except BaseException as error:
        # The traceback keeps the frames it went through, _train's and its DDP model among them: clear them, so that
        # the model lets go of the group before the group is destroyed. The peers may be anywhere: no barrier.
        traceback.clear_frames(error.__traceback__)
        _leave_group(together=False)
        raise
    _leave_group(together=True)
    return history


def _leave_group(*, together: bool) -> None:
    """Destroy the process group once nothing but ``torch.distributed`` itself holds it.

    Whatever drops the group's last reference runs its destructor, which joins gloo's worker threads. Dropped by the
    DDP model's C++ Reducer, that happens with the GIL held, while a worker may still be freeing the last
    collectives' tensors, which takes the GIL: both wait forever (a hang at exit, under load). So the model must be
    gone first. It died with ``_train``'s frame but for the reference cycle DDP sits in, which ``gc.collect()`` frees
    while the group still exists; the last reference is then ``destroy_process_group``'s, which releases the GIL.
    """
    gc.collect()
    if together:
        # Leave together: a rank that tears the group down while its peer is still busy (rank 0 plotting, say) can
        # leave that peer hanging in its own teardown.
        dist.barrier()
    dist.destroy_process_group()


def _train(rank: int, world_size: int, args: argparse.Namespace) -> list[dict[str, float]]:
    """The training loop of ``train``, in a process group already joined when ``world_size > 1``."""
    distributed = world_size > 1
    # Every rank draws the same data, initial SAE and shuffles from one seeded generator, so nothing needs to be sent
    # around and each rank can pick its own shard.
    generator = torch.Generator().manual_seed(args.seed)
    activations, directions = make_data(args.num_samples, generator)
    sae = SparseAutoencoder(D_MODEL, args.d_sae, generator, args.architecture, args.k)
    model: nn.Module = DistributedDataParallel(sae) if distributed else sae
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)

    local_batch = args.batch_size // world_size
    steps_per_epoch = args.num_samples // args.batch_size  # the last partial batch is dropped
    # Items are counted over all processes: with the default window a dead feature fired on no item of the last
    # epoch, whatever the process count.
    dead_window = args.dead_window or steps_per_epoch * args.batch_size
    loss_fn = make_loss(args, dead_window)
    recorder = _Recorder(plotting=args.plot is not None)
    is_printer = rank == 0
    if is_printer:
        processes = f"{world_size} processes (DDP, gloo)" if distributed else "1 process"
        print(
            f"{args.architecture} SAE d_model={D_MODEL} d_sae={args.d_sae} on {args.num_samples} synthetic items "
            f"({NUM_TRUE_FEATURES} true features, {ACTIVE_PER_ITEM:g} active per item on average); "
            f"{processes}, {steps_per_epoch} steps of {args.batch_size} items per epoch; "
            f"dead: silent for {dead_window} items"
        )
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        # Every rank draws the same permutation and takes every world_size-th item of it: the shards are disjoint,
        # and the ranks' i-th batches together hold exactly the items of the single-process run's i-th batch.
        order = torch.randperm(args.num_samples, generator=generator)
        shard = order[rank::world_size][: steps_per_epoch * local_batch]
        with _progress(steps_per_epoch, f"epoch {epoch}", enabled=is_printer) as recorder.bar:
            for indices in shard.split(local_batch):
                x = activations[indices]
                out = loss_fn(**step_inputs(args, sae, loss_fn, x, *model(x, with_pre_activations=True)))
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()  # DDP averages the gradients over the ranks here
                optimizer.step()
                sae.normalize_decoder()
                recorder.step(out["loss"])
        # compute() syncs the states across ranks: every rank must call it, even those that print nothing.
        computed = loss_fn.compute()
        # The scalars (the per-feature densities, an array, go to the plot); the dead-feature count is an int.
        epoch_values = {name: value.item() for name, value in loss_fn.loggable(computed).items()}
        loss_fn.reset()  # a new epoch for every member but the dead-feature counters, which span the run
        history.append(epoch_values)
        recorder.end_epoch(computed["feature_density"])
        if is_printer:
            columns = table_columns(epoch_values)
            if epoch == 1:
                print(_table_header(columns))
            print(_table_row(epoch, epoch_values, columns), flush=True)
    if is_printer:
        fraction = recovered_fraction(sae.W_dec.detach(), directions)
        print(
            f"recovered {fraction:.0%} of the {NUM_TRUE_FEATURES} true directions (cosine >= {RECOVERY_COSINE}); "
            f"trained in {time.perf_counter() - start:.1f} s"
        )
        if args.plot is not None:
            plot_training(args.plot, history, recorder.step_losses, steps_per_epoch, recorder.densities)
            print(f"wrote {args.plot}")
    return history


class _Recorder:
    """What the loop keeps besides the epoch values: the progress bar, and for the plot batch losses and densities."""

    def __init__(self, *, plotting: bool) -> None:
        self.plotting = plotting
        self.densities: Tensor | None = None
        self.step_losses: list[float] = []
        self.bar: Any = None

    def step(self, loss: Tensor) -> None:
        if self.plotting:
            self.step_losses.append(loss.item())
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)

    def end_epoch(self, densities: Tensor) -> None:
        # The epoch's per-feature densities, from the collection's compute(): they feed the plot's histogram.
        if self.plotting:
            self.densities = densities


def _progress_enabled() -> bool:
    # A bar redraws itself with carriage returns: fine on a terminal, noise in a log file or a CI job.
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextlib.contextmanager
def _progress(total: int, description: str, *, enabled: bool) -> Iterator[Any]:
    """A tqdm bar on a terminal, where tqdm is installed; otherwise None (the loop runs the same)."""
    if not (enabled and _progress_enabled()):
        yield None
        return
    try:
        from tqdm import tqdm  # noqa: PLC0415  # optional: the "examples" extra
    except ImportError:
        yield None
        return
    with tqdm(total=total, desc=description, leave=False, unit="step") as bar:
        yield bar


def plot_training(
    path: Path,
    history: list[dict[str, float]],
    step_losses: list[float],
    steps_per_epoch: int,
    densities: Tensor | None = None,
) -> None:
    """Write the loss curves (and, given feature densities, their log10 histogram) to a PNG."""
    try:
        import matplotlib as mpl  # noqa: PLC0415  # optional: the "examples" extra

        mpl.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as error:
        raise SystemExit(f"--plot needs matplotlib: pip install matplotlib ({error})") from error
    panels = 2 if densities is not None else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    curves = axes[0, 0]
    steps = torch.arange(1, len(step_losses) + 1) / steps_per_epoch
    curves.plot(steps.tolist(), step_losses, color="lightgray", linewidth=0.8, label="batch loss (rank 0)")
    epochs = list(range(1, len(history) + 1))
    for name in ("loss", "l2", "sparsity", *(key for key in history[0] if key.startswith("matryoshka"))):
        if name in history[0]:
            curves.plot(epochs, [values[name] for values in history], marker="o", label=f"epoch {name}")
    curves.set(xlabel="epoch", ylabel="value", yscale="log", title="compute() per epoch")
    curves.legend(fontsize="small")
    if densities is not None:
        histogram = axes[0, 1]
        # Dead features have density 0: they are drawn at the epsilon, left of every live one.
        epsilon = DENSITY_EPSILON
        histogram.hist(torch.log10(densities.double().flatten() + epsilon).tolist(), bins=40)
        histogram.set(xlabel=f"log10(feature density + {epsilon:g})", ylabel="features", title="last epoch")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def table_columns(values: dict[str, float]) -> list[str]:
    """The keys of ``values`` that the table shows: the ``TABLE_COLUMNS`` it has, then the Matryoshka terms."""
    return [*(key for key in TABLE_KEYS if key in values), *(key for key in values if key.startswith("matryoshka"))]


def _table_header(columns: list[str]) -> str:
    return "  ".join(f"{label:>{_cell_width(label)}}" for label in ["epoch", *map(_label, columns)])


def _table_row(epoch: int, values: dict[str, float], columns: list[str]) -> str:
    cells = [f"{epoch:>{_cell_width('epoch')}}"]
    cells += [_format_cell(key, values[key]) for key in columns]
    return "  ".join(cells)


def _label(key: str) -> str:
    return TABLE_COLUMNS.get(key, key)


def _cell_width(label: str) -> int:
    return max(9, len(label))


def _format_cell(key: str, value: float) -> str:
    width = _cell_width(_label(key))
    if key == "explained_variance":
        return f"{value:>{width}.4f}"
    if key == "dead_features":
        return f"{round(value):>{width}d}"
    if key == "dead_feature_fraction":
        return f"{value:>{width}.1%}"
    return f"{value:>{width}.4g}"


def _spawned_rank(rank: int, world_size: int, args: argparse.Namespace, run_dir: str) -> None:
    torch.set_num_threads(1)  # see _one_thread: the ranks already fill the cores
    # The ranks meet through a file store in the run's own directory rather than on a TCP port: a free port found by
    # the parent and released for the ranks to bind could be taken by another program in between.
    history = train(rank, world_size, args, (Path(run_dir) / "store").as_uri())
    if rank == 0:
        # A file, not a pipe: however many epochs, nothing blocks while the parent waits for the ranks to exit.
        (Path(run_dir) / HISTORY_FILE).write_text(json.dumps(history), encoding="utf-8")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # The tensors here are small: a second intra-op thread costs more in hand-offs than it saves, and when other work
    # shares the cores it can make a run several times slower. The caller's setting is restored afterwards.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and print the per-epoch table.

    Returns:
        The scalars of the last epoch's ``compute()`` (``loss``, ``l2``, ``l0``, ``l1``, ``sparsity`` (ReLU only),
        ``fvu``, ``explained_variance``, ``mean_log10_feature_density``, ``dead_features``, ``dead_feature_fraction``
        and, with ``--matryoshka``, ``matryoshka`` and ``matryoshka_prefix_<m>``), plus ``first_epoch_loss``, the first
        epoch's loss, to compare against.
    """
    args = parse_args(argv)
    launched = torchrun_world_size()
    if launched is not None:
        # torchrun started this process as one of `launched` ranks; its environment says where to meet the others.
        with _one_thread():
            history = train(int(os.environ["RANK"]), launched, args, "env://")
    elif args.nproc == 1:
        with _one_thread():
            history = train(0, 1, args)
    else:
        # mp.spawn starts clean interpreters (fork and threads do not mix); they import this file by its module name.
        with tempfile.TemporaryDirectory(prefix="train_sae_") as run_dir:
            mp.spawn(_spawned_rank, args=(args.nproc, args, run_dir), nprocs=args.nproc, join=True)
            history = json.loads((Path(run_dir) / HISTORY_FILE).read_text(encoding="utf-8"))
    return {**history[-1], "first_epoch_loss": history[0]["loss"]}


if __name__ == "__main__":
    main()
