"""``nan_strategy``: what is particular to it beyond the generic checks.

That "propagate" (the default) lets NaN through, "ignore" drops whole items from every member (and from ``forward``'s
value), and "error" raises naming the inputs and changes nothing is checked for every registered case and every
activation it reads, by the generic checks in ``test_tester.py``.
"""

import pytest
import torch

import sparse_metrics as sm
from tests.tester import D_MODEL, D_SAE


def test_nan_strategy_is_validated():
    with pytest.raises(ValueError, match=r"`nan_strategy` must be 'propagate', 'ignore' or 'error', got 'warn'"):
        sm.L2ReconstructionLoss(nan_strategy="warn")
    with pytest.raises(ValueError, match="nan_strategy"):
        sm.SparseAutoencoderLoss(nan_strategy="skip")


def test_propagate_reads_no_value_and_error_must():
    """On the meta device any read of a value fails: "propagate" never reads; "error" reads once (documented)."""
    inputs = {
        "source_activations": torch.empty(5, 2, D_MODEL, device="meta"),
        "learned_activations": torch.empty(5, 2, D_SAE, device="meta"),
        "decoded_activations": torch.empty(5, 2, D_MODEL, device="meta"),
    }
    sm.SparseAutoencoderLoss(2, 0.1, nan_strategy="propagate").to("meta")(**inputs)
    with pytest.raises(RuntimeError):  # .item()/bool() of a meta tensor
        sm.SparseAutoencoderLoss(2, 0.1, nan_strategy="error").to("meta")(**inputs)
