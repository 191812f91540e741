"""Smoke test of an installed wheel: run by `nox -s build` in a fresh virtualenv, from outside the source tree.

Checks that the installed package (not the source tree) imports, reports the version of pyproject.toml, ships its
``py.typed`` marker and the C++ source of the CPU activity kernel, declares its optional extras, that importing it
pulls in no optional dependency, and that the loss collection runs a forward and backward pass.

Usage: ``python smoke_wheel.py EXPECTED_VERSION``
"""

import argparse
import importlib.metadata
import importlib.resources
import sys
from pathlib import Path

import torch

import sparse_metrics as sm

OPTIONAL_MODULES = ("matplotlib", "lightning", "pytorch_lightning", "mkdocs")
EXTRAS = {"plot", "lightning", "docs"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("expected_version")
    args = parser.parse_args(argv)
    location = Path(sm.__file__).resolve()
    assert "site-packages" in location.parts, f"imported {location}, not the installed wheel"
    assert sm.__version__ == args.expected_version, (sm.__version__, args.expected_version)
    assert importlib.resources.files("sparse_metrics").joinpath("py.typed").is_file(), "py.typed is missing"
    kernel = importlib.resources.files("sparse_metrics.functional").joinpath("_activity_kernel.cpp")
    assert kernel.is_file(), "the CPU activity kernel's source is missing"
    extras = set(importlib.metadata.metadata("sparse_metrics").get_all("Provides-Extra") or [])
    assert extras >= EXTRAS, f"extras {sorted(extras)} lack {sorted(EXTRAS - extras)}"
    imported = [name for name in OPTIONAL_MODULES if name in sys.modules]
    assert not imported, f"importing sparse_metrics imported {imported}"

    loss_fn = sm.SparseAutoencoderLoss(sparsity_coefficient=1e-3, matryoshka_prefix_sizes=[4, 8])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=generator)
    w_dec = torch.randn(8, 5, generator=generator, requires_grad=True)
    f = torch.relu(torch.randn(16, 8, generator=generator))
    out = loss_fn(source_activations=x, learned_activations=f, decoded_activations=f @ w_dec, decoder_weight=w_dec)
    out["loss"].backward()
    assert w_dec.grad is not None
    assert bool(torch.isfinite(w_dec.grad).all())
    epoch = loss_fn.compute()
    assert set(epoch) >= {"l2", "l0", "l1", "sparsity", "matryoshka", "loss"}, sorted(epoch)
    torch.testing.assert_close(epoch["loss"].float(), out["loss"].detach())
    print(f"sparse_metrics {sm.__version__} from {location.parent}: wheel smoke test passed")


if __name__ == "__main__":
    main()
