"""The example training script runs, single-process and on 2 DDP processes, and its loss goes down."""

import math
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Small enough to run in about a second per process: 3 epochs of 16 steps.
SMALL = ["--epochs", "3", "--num-samples", "2048", "--batch-size", "128", "--d-sae", "128"]
EPOCH_KEYS = {"loss", "l2", "l0", "l1", "sparsity"}


@pytest.fixture(scope="module")
def train_sae() -> ModuleType:
    # examples/ is not a package: import the script by name from its folder. The folder stays on sys.path for the
    # module's tests, since the 2-process run's spawned ranks import the script by that name too.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES))
        import train_sae  # noqa: PLC0415

        yield train_sae


def check_trained(result: dict[str, float], expected_keys: set[str]) -> None:
    assert set(result) == expected_keys | {"first_epoch_loss"}
    assert all(math.isfinite(value) for value in result.values()), result
    assert result["loss"] < result["first_epoch_loss"]


def test_single_process(train_sae: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    result = train_sae.main(SMALL)
    check_trained(result, EPOCH_KEYS)
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["epoch", "loss", "l2", "l0", "l1", "sparsity"]
    assert [line.split()[0] for line in table[2:5]] == ["1", "2", "3"]


def test_matryoshka(train_sae: ModuleType) -> None:
    result = train_sae.main([*SMALL, "--matryoshka"])
    prefixes = {f"matryoshka_prefix_{size}" for size in (16, 32, 64, 128)}
    check_trained(result, EPOCH_KEYS | {"matryoshka"} | prefixes)
    # The largest prefix is the whole dictionary, whose error is the L2 reconstruction loss.
    assert result["matryoshka_prefix_128"] == pytest.approx(result["l2"], rel=1e-5)


@pytest.mark.distributed
def test_two_processes_match_one(train_sae: ModuleType) -> None:
    # --batch-size is global: 2 ranks of 64 items see together the same batches as 1 process of 128, and compute()
    # averages over both ranks' items, so the runs agree up to float rounding. Per-rank means would differ by percents.
    single = train_sae.main(SMALL)
    double = train_sae.main([*SMALL, "--nproc", "2"])
    check_trained(double, EPOCH_KEYS)
    assert double == pytest.approx(single, rel=1e-5)


def test_rejects_batch_not_divisible_by_processes(train_sae: ModuleType) -> None:
    with pytest.raises(SystemExit):
        train_sae.main([*SMALL, "--batch-size", "127", "--nproc", "2"])
