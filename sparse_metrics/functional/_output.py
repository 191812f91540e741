"""Shape the per-item values of the functional API the way the caller's inputs were shaped."""

from torch import Tensor


def batch_output(per_item: Tensor, has_component_dim: bool, keep_batch_dim: bool) -> Tensor:
    """Reduce ``[batch, component]`` per-item values to what the public functions return.

    Args:
        per_item: Per-item values, ``[batch, component]``.
        has_component_dim: Whether the caller's input had a component axis (``[batch, component, feature]``).
        keep_batch_dim: Return the per-item values instead of their mean over the batch.

    Returns:
        ``[batch, *component]`` if ``keep_batch_dim`` else ``[*component]``, where ``*component`` is empty for
        inputs without a component axis.
    """
    values = per_item if keep_batch_dim else per_item.mean(dim=0)
    return values if has_component_dim else values.squeeze(-1)
