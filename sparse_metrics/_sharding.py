"""Dictionaries sharded over features (tensor parallel), with data parallelism on top.

Each process of a *feature group* holds one equal slice of the dictionary's features: its columns of
``learned_activations`` / ``pre_activations``, its rows of ``decoder_weight`` (and of ``threshold``, ``dead_mask``), and
the full, replicated ``source_activations`` / ``decoded_activations``. A metric is given the group with
``feature_group=`` (beside torchmetrics' ``process_group=``, the *data* group over which items are summed), or both at
once with ``device_mesh=``, a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh` with dims named
``("data", "feature")``.

What changes under sharding is owned by :class:`~sparse_metrics._batch.SaeBatch`: every per-item statistic that sums
over features goes through ``SaeBatch.sum_over_features``, which adds the shards' partial sums with one fused
all-reduce over the feature group per step (differentiable: the backward is the identity, as Megatron's
"reduce from the tensor-parallel region", so each shard gets exactly the unsharded gradient of its own slice).
Per-feature states stay sharded; :func:`gather_features` assembles a full per-feature array.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["FeatureSharding", "gather_features", "resolve_sharding", "sum_over_feature_group"]

#: The names a 2-D ``device_mesh`` must give its dims: items are split over the first, features over the second.
MESH_DIMS = ("data", "feature")


class _SumOverShards(torch.autograd.Function):
    """All-reduce (sum) over the feature group forward; the identity backward.

    Every shard computes the same loss from the summed value, so the gradient of that loss with respect to the shard's
    own partial sum is the gradient with respect to the sum: passed through unchanged (summing it over the shards, as
    ``torch.distributed.nn.functional.all_reduce`` does, would multiply it by the number of shards).
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def sum_over_feature_group(tensor: Tensor, group: Any) -> Tensor:
    """``tensor`` summed over the processes of ``group``, differentiable (identity backward)."""
    if tensor.requires_grad:
        return _SumOverShards.apply(tensor, group)  # type: ignore[no-any-return, no-untyped-call]
    total = tensor.clone()
    dist.all_reduce(total, group=group)
    return total


@dataclasses.dataclass(eq=False)
class FeatureSharding:
    """The feature group of a sharded dictionary: which slice of the features this process holds.

    Attributes:
        group: The process group over the feature shards (``None``: the default group).
        size: Number of shards (processes in ``group``).
        rank: This process's shard, ``0 <= rank < size``; it holds features ``rank * d_local ... (rank + 1) * d_local``.
    """

    group: Any
    size: int
    rank: int
    #: Shapes already checked equal across the shards (see :meth:`check_shapes`).
    _checked: set[tuple[int, ...]] = dataclasses.field(default_factory=set)

    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureSharding:
        """A copy of a metric shares its process group: the group itself."""
        return self

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "A feature-sharded metric holds a process group, which cannot be pickled; save its `state_dict()`."
        )

    def offset(self, local_features: int) -> int:
        """The global index of this shard's first feature (equal shards of ``local_features``)."""
        return self.rank * local_features

    def local_features(self, global_features: int, setting: str, owner: str) -> int:
        """The features of one shard, ``global_features / size``; a ``ValueError`` if they do not divide evenly."""
        if global_features % self.size:
            raise ValueError(
                f"{owner}: {setting}={global_features} (the whole dictionary) must divide evenly over the "
                f"{self.size} feature shards of `feature_group`, got a remainder of {global_features % self.size}."
            )
        return global_features // self.size

    def sum(self, tensors: Mapping[Any, Tensor]) -> dict[Any, Tensor]:
        """Each tensor summed over the shards, in ONE all-reduce of their flattened concatenation (differentiable)."""
        if not tensors:
            return {}
        items = list(tensors.items())
        if all(not value.is_floating_point() for _, value in items):
            dtype = torch.int64  # counts stay exact
        else:
            dtype = torch.promote_types(torch.float32, items[0][1].dtype)
            for _, value in items[1:]:
                dtype = torch.promote_types(dtype, value.dtype)
        flat = torch.cat([value.to(dtype).reshape(-1) for _, value in items])
        total = sum_over_feature_group(flat, self.group) if self.size > 1 else flat
        pieces = torch.split(total, [value.numel() for _, value in items])
        return {key: piece.view(value.shape).to(value.dtype) for (key, value), piece in zip(items, pieces, strict=True)}

    def check_shapes(self, owner: str, shape: Sequence[int], names: Sequence[str]) -> None:
        """Raise the same ``ValueError`` on every shard if the shards' ``shape`` differ (one small all-gather).

        Run the first time a shape is seen on this process (a host read), not at every step.
        """
        key = tuple(shape)
        if self.size == 1 or key in self._checked:
            return
        local = torch.tensor(key, dtype=torch.int64)
        gathered = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(gathered, local, group=self.group)
        shapes = [tuple(rows.tolist()) for rows in gathered]
        if len(set(shapes)) > 1:
            shown = "; ".join(
                f"shard {rank}: " + ", ".join(f"{n}={v}" for n, v in zip(names, s, strict=True))
                for rank, s in enumerate(shapes)
            )
            raise ValueError(
                f"{owner}: the feature shards disagree on the shapes of the inputs ({shown}). Every shard of "
                "`feature_group` must hold the same items and an equal slice of the features."
            )
        self._checked.add(key)

    def gather(self, tensor: Tensor, dim: int = -1) -> Tensor:
        """Every shard's ``tensor`` concatenated along ``dim`` in shard order (the full per-feature array)."""
        if self.size == 1:
            return tensor
        pieces = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(pieces, tensor.contiguous(), group=self.group)
        return torch.cat(pieces, dim=dim)


def _mesh_groups(device_mesh: Any) -> tuple[Any, Any]:
    from torch.distributed.device_mesh import DeviceMesh  # noqa: PLC0415  # only where a mesh is given

    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(f"`device_mesh` must be a torch.distributed DeviceMesh, got {type(device_mesh).__name__}.")
    names = tuple(device_mesh.mesh_dim_names or ())
    if device_mesh.ndim != 2 or set(names) != set(MESH_DIMS):
        raise ValueError(
            f"`device_mesh` must be 2-D with dims named {MESH_DIMS} (items over 'data', dictionary shards over "
            f"'feature'), got {device_mesh.ndim}-D with dims {names or None}; e.g. "
            "init_device_mesh('cuda', (data, feature), mesh_dim_names=('data', 'feature'))."
        )
    return device_mesh.get_group("data"), device_mesh.get_group("feature")


def resolve_sharding(kwargs: dict[str, Any], owner: str) -> FeatureSharding | None:
    """Pop ``feature_group`` / ``device_mesh`` from a metric's keyword arguments; set ``process_group`` from a mesh.

    Returns the feature sharding (None when the dictionary is not sharded).
    """
    feature_group = kwargs.pop("feature_group", None)
    device_mesh = kwargs.pop("device_mesh", None)
    if isinstance(feature_group, FeatureSharding):  # a collection passing its members one shared sharding
        return feature_group
    if device_mesh is not None:
        if feature_group is not None or kwargs.get("process_group") is not None:
            raise ValueError(
                f"{owner}: pass either `device_mesh` or `process_group`/`feature_group`, not both: the mesh's 'data' "
                "dim is the process group and its 'feature' dim the feature group."
            )
        kwargs["process_group"], feature_group = _mesh_groups(device_mesh)
    if feature_group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{owner}: `feature_group` was given but torch.distributed is not initialised.")
    sharding = FeatureSharding(feature_group, dist.get_world_size(feature_group), dist.get_rank(feature_group))
    if sharding.size > 1 and kwargs.get("process_group") is None and kwargs.get("sync_on_compute", True):
        raise ValueError(
            f"{owner}: `feature_group` without `process_group`: compute() would sync over the default group, which "
            "holds this process's feature shards too, and add the counts of different features together. Pass "
            "`process_group=` (the data-parallel group: the processes holding this same shard of the dictionary), "
            "or `device_mesh=`, or `sync_on_compute=False` where there is no data parallelism."
        )
    return sharding


def gather_features(tensor: Tensor, metric: Any, dim: int = -1) -> Tensor:
    """The full per-feature array from each shard's slice ``tensor`` (e.g. ``FeatureDensity.compute()``).

    Args:
        tensor: This shard's slice, features along ``dim``.
        metric: The metric (or collection) whose ``feature_group`` the slices come from; unsharded, ``tensor`` is
            returned as it is.
        dim: The feature axis.

    Every process of the feature group must call it (an all-gather).
    """
    sharding = getattr(metric, "feature_sharding", None)
    return tensor if sharding is None else sharding.gather(tensor, dim)
