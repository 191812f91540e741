"""The public surface: what `__all__` promises imports, is documented, and importing the package stays light."""

import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torchmetrics import Metric, MetricCollection

import sparse_metrics

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = [
    "sparse_metrics",
    "sparse_metrics.functional",
    "sparse_metrics.metrics",
    "sparse_metrics.objectives",
    "sparse_metrics.presets",
]
#: Optional extras (plot, lightning, docs): never imported by `import sparse_metrics`.
OPTIONAL_MODULES = ["matplotlib", "lightning", "pytorch_lightning", "mkdocs", "mkdocstrings"]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_lists_importable_documented_names(module_name):
    module = importlib.import_module(module_name)
    assert len(set(module.__all__)) == len(module.__all__), "duplicates in __all__"
    namespace: dict[str, object] = {}
    exec(f"from {module_name} import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(module.__all__)
    for name in module.__all__:
        value = getattr(module, name)
        if callable(value):
            assert value.__doc__, f"{module_name}.{name} has no docstring"


def test_top_level_exports_the_metrics_and_the_collection():
    for name in sparse_metrics.__all__:
        value = getattr(sparse_metrics, name)
        if isinstance(value, type):
            assert issubclass(value, Metric | MetricCollection), name


def test_version_is_the_project_version():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version = "([^"]+)"$', pyproject, flags=re.MULTILINE)
    assert match is not None
    assert sparse_metrics.__version__ == importlib.metadata.version("sparse_metrics") == match[1]


def test_the_package_is_typed():
    assert (Path(sparse_metrics.__file__).parent / "py.typed").is_file()


def test_import_pulls_in_no_optional_dependency():
    # torchmetrics itself imports matplotlib whenever it is installed: count only what sparse_metrics adds to the
    # modules its required dependencies already import.
    code = (
        "import sys, torch, torchmetrics, jaxtyping, pydantic; before = set(sys.modules); "
        "import sparse_metrics, sparse_metrics.functional; "
        "added = {name.split('.')[0] for name in set(sys.modules) - before}; "
        f"print(sparse_metrics.__file__); print(sorted(added & {set(OPTIONAL_MODULES)!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    location, imported = result.stdout.strip().splitlines()
    assert Path(location).resolve().is_relative_to(ROOT)
    assert imported == "[]"
