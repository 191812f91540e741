"""The examples run at small size (single process, 2 DDP processes, torchrun) and their losses go down."""

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.processes import run_process_tree

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# Small enough to run in about a second per process: 3 epochs of 16 steps.
SMALL = ["--epochs", "3", "--num-samples", "2048", "--batch-size", "128", "--d-sae", "128"]
# The scalars of the collection's compute(): the loss terms, then the values watched besides them.
LOSS_KEYS = {"loss", "l2", "l0", "l1", "sparsity"}
WATCHED_KEYS = {"fvu", "explained_variance", "mean_log10_feature_density", "dead_features", "dead_feature_fraction"}
# The density bands the collection reports with feature_density=True (fractions of the features).
WATCHED_KEYS |= {f"feature_density_{band}" for band in ("above_1e-1", "above_1e-2", "below_1e-5", "below_1e-6")}
WATCHED_KEYS |= {"feature_density_never_fired"}
EPOCH_KEYS = LOSS_KEYS | WATCHED_KEYS
TABLE_HEADER = ["epoch", "loss", "l2", "l0", "l1", "sparsity", "expl_var", "dead", "dead_frac"]


@pytest.fixture(scope="module")
def train_sae() -> ModuleType:
    # examples/ is not a package: import the script by name from its folder. The folder stays on sys.path for the
    # module's tests, since the 2-process run's spawned ranks import the script by that name too.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES))
        import train_sae  # noqa: PLC0415

        yield train_sae


def check_trained(result: dict[str, float], expected_keys: set[str], d_sae: int = 128) -> None:
    assert set(result) == expected_keys | {"first_epoch_loss"}
    assert all(math.isfinite(value) for value in result.values()), result
    assert result["loss"] < result["first_epoch_loss"]
    # The trained SAE explains some of the variance (check_table: more every epoch); FVU is its complement.
    assert 0.0 < result["explained_variance"] <= 1.0
    assert result["fvu"] == pytest.approx(1.0 - result["explained_variance"], abs=1e-9)
    # A count of features and its share of the dictionary.
    assert result["dead_features"] == int(result["dead_features"])
    assert 0 <= result["dead_features"] <= d_sae
    assert result["dead_feature_fraction"] == pytest.approx(result["dead_features"] / d_sae)
    assert math.log10(1e-10) <= result["mean_log10_feature_density"] <= 0.0


def table_rows(lines: list[str]) -> list[dict[str, str]]:
    """The per-epoch rows of a printed table, as ``{header: cell}``."""
    start = next(index for index, line in enumerate(lines) if line.split()[:1] == ["epoch"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        cells = line.split()
        if not cells or not cells[0].isdigit():
            break
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def check_table(lines: list[str], epochs: int, d_sae: int = 128) -> None:
    """The table's columns, and the values practitioners look at first within their ranges."""
    assert lines[1].split() == TABLE_HEADER
    rows = table_rows(lines)
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(1, epochs + 1)]
    # Fixed width: every line of the table as long as its header.
    assert {len(line) for line in lines[1 : 2 + epochs]} == {len(lines[1])}
    explained = [float(row["expl_var"]) for row in rows]
    assert all(0.0 <= value <= 1.0 for value in explained), explained
    assert explained[-1] > explained[0]  # the SAE learns to reconstruct
    for row in rows:
        dead = int(row["dead"])
        assert 0 <= dead <= d_sae
        assert row["dead_frac"].endswith("%")
        assert float(row["dead_frac"].rstrip("%")) == pytest.approx(100 * dead / d_sae, abs=0.05)


def test_single_process(train_sae: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    result = train_sae.main(SMALL)
    check_trained(result, EPOCH_KEYS)
    check_table(capsys.readouterr().out.splitlines(), epochs=3)


def test_dead_features_over_a_window(train_sae: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    # The dead counters span the run (reset() at each epoch end keeps them); --dead-window sets their window in items.
    # With a window of 4 items, a feature is dead unless it fired on one of the last 4 items: a good part of them.
    narrow = train_sae.main([*SMALL, "--dead-window", "4"])
    assert "dead: silent for 4 items" in capsys.readouterr().out
    default = train_sae.main(SMALL)  # one epoch's items, 2048
    assert "dead: silent for 2048 items" in capsys.readouterr().out
    assert narrow["dead_features"] > default["dead_features"]
    # Everything else is the same run.
    assert {key: narrow[key] for key in LOSS_KEYS} == {key: default[key] for key in LOSS_KEYS}


def test_matryoshka(train_sae: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    result = train_sae.main([*SMALL, "--matryoshka"])
    prefixes = [f"matryoshka_prefix_{size}" for size in (16, 32, 64, 128)]
    check_trained(result, EPOCH_KEYS | {"matryoshka", *prefixes})
    # The Matryoshka terms follow the usual columns.
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == [*TABLE_HEADER, "matryoshka", *prefixes]
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


def test_rejects_nproc_under_torchrun(train_sae: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert train_sae.torchrun_world_size() == 2
    with pytest.raises(SystemExit):
        train_sae.main([*SMALL, "--nproc", "2"])


def test_timeout_kills_the_whole_process_tree() -> None:
    # Like torchrun: the launcher starts a worker in a session of its own, and both outlive the timeout.
    launcher = (
        "import subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "print(worker.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(pytest.fail.Exception, match="killed with all its processes") as failure:
        run_process_tree([sys.executable, "-c", launcher], timeout=3)
    worker = int(str(failure.value).split("--- stdout ---\n")[1].split()[0])
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:  # a SIGKILL takes effect asynchronously
        time.sleep(0.05)
    assert not _running(worker)


def _running(pid: int) -> bool:
    if Path("/proc/self/stat").exists():
        try:
            # A killed orphan is a zombie until its new parent reaps it, which in a container may be never.
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_torchrun(plot: Path, *, timeout: float) -> subprocess.CompletedProcess[str]:
    """``train_sae.py --plot`` at small size on 2 torchrun processes, under ``run_process_tree``."""
    # --standalone: torchrun's rendezvous store and the ranks' store bind port 0 and stay bound, so no port is chosen
    # here and then released for a concurrent test to take. The store is shared unless this variable opts out.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--local-addr",
        "127.0.0.1",
        "--nproc-per-node",
        "2",
        str(EXAMPLES / "train_sae.py"),
        *SMALL,
        "--plot",
        str(plot),
    ]
    # This checkout's package, not whichever one the environment has installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("CI", None)
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    return run_process_tree(command, timeout=timeout, cwd=plot.parent, env=env)


@pytest.mark.distributed
def test_torchrun_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "curves.png"
    run = run_torchrun(plot, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "2 processes (DDP, gloo)" in lines[0]
    # Only rank 0 prints: one header and one row per epoch.
    assert sum(line.split()[:1] == ["epoch"] for line in lines) == 1
    check_table(lines, epochs=3)
    assert plot.stat().st_size > 0
    assert "\r" not in run.stderr  # no progress bar outside a terminal


@pytest.mark.slow  # 20 torchrun jobs, about 6 s each on 2 cores
@pytest.mark.distributed
def test_torchrun_exits_every_time(tmp_path: Path) -> None:
    # The job used to hang at exit in about 2 runs of 10 under load: the DDP model outlived destroy_process_group, and
    # its Reducer then destroyed the group while holding the GIL that a gloo worker needed (see train_sae._leave_group).
    pytest.importorskip("matplotlib")
    for attempt in range(1, 21):
        # A hang fails the test here, after 60 s; a run takes about 6 s, 15 s on cores busy with other tests.
        run = run_torchrun(tmp_path / f"curves_{attempt}.png", timeout=60)
        assert run.returncode == 0, f"run {attempt} of 20: {run.stderr[-3000:]}"


def test_plot_with_feature_density(
    train_sae: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    drawn: list[int] = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda figure, *a, **k: drawn.append(len(figure.axes)))
    train_sae.main([*SMALL, "--epochs", "1", "--plot", str(tmp_path / "curves.png")])
    assert drawn == [2]  # loss curves and the density histogram
    assert "wrote" in capsys.readouterr().out


def test_progress_bar_only_on_a_terminal(train_sae: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with train_sae._progress(4, "epoch 1", enabled=True) as bar:
        assert bar is not None
        bar.update()
    with train_sae._progress(4, "epoch 1", enabled=False) as bar:
        assert bar is None
    monkeypatch.setenv("CI", "true")
    with train_sae._progress(4, "epoch 1", enabled=True) as bar:
        assert bar is None


@pytest.fixture(scope="module")
def resampling(train_sae: ModuleType) -> ModuleType:
    import resampling  # noqa: PLC0415  # on sys.path through the train_sae fixture

    return resampling


def test_resampling_revives_dead_features(resampling: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    small = ["--num-samples", "1024", "--d-sae", "64", "--kill", "16", "--window", "512", "--epochs", "1"]
    result = resampling.main([*small, "--batch-size", "128"])
    assert result["dead_before"] >= 16  # the killed ones at least
    assert result["dead_after"] < result["dead_before"]
    assert "features dead" in capsys.readouterr().out


def test_resample_reinitialises_exactly_the_dead_rows(resampling: ModuleType, train_sae: ModuleType) -> None:
    generator = torch.Generator().manual_seed(3)
    sae = train_sae.SparseAutoencoder(8, 16, generator)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    window = torch.randn(40, 8, generator=generator)
    _, x_hat = sae(window)
    (x_hat - window).square().sum().backward()
    optimizer.step()  # creates Adam moments for every row
    with torch.no_grad():
        sae.b_enc[[2, 5, 11]] = -1e3
    errors, dead = resampling.scan_window(sae, window, batch_size=16)
    assert dead.nonzero().squeeze(-1).tolist() == [2, 5, 11]
    torch.testing.assert_close(errors, (sae(window)[1] - window).square().sum(-1).double())
    # Items with zero error are never drawn: the probability is proportional to the squared error.
    errors[::2] = 0.0
    before = {name: value.detach().clone() for name, value in sae.named_parameters()}
    drawn = resampling.resample(sae, optimizer, dead, window, errors, generator)
    assert len(drawn) == 3
    assert all(index % 2 == 1 for index in drawn.tolist())
    directions = torch.nn.functional.normalize(window[drawn] - sae.b_dec, dim=-1)
    torch.testing.assert_close(sae.W_dec[dead], directions)
    cosine = torch.nn.functional.cosine_similarity(sae.W_enc[:, dead].T, directions, dim=-1)
    torch.testing.assert_close(cosine, torch.ones(3))
    assert sae.b_enc[dead].eq(0).all()
    # Live features are untouched, their optimiser moments too; the dead rows' moments are cleared.
    torch.testing.assert_close(sae.W_dec[~dead], before["W_dec"][~dead])
    torch.testing.assert_close(sae.W_enc[:, ~dead], before["W_enc"][:, ~dead])
    moments = optimizer.state[sae.W_dec]
    assert moments["exp_avg"][dead].eq(0).all()
    assert moments["exp_avg"][~dead].ne(0).any()
    # Each revived feature fires on the item it was drawn from.
    _, dead_after = resampling.scan_window(sae, window, batch_size=16)
    assert not dead_after[dead].any()


@pytest.fixture(scope="module")
def matryoshka(train_sae: ModuleType) -> ModuleType:
    import matryoshka  # noqa: PLC0415  # on sys.path through the train_sae fixture

    return matryoshka


@pytest.mark.parametrize("sampled", [[], ["--sampled-prefixes", "3"]])
def test_matryoshka_logs_every_prefix(
    matryoshka: ModuleType, sampled: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    small = ["--num-samples", "1024", "--batch-size", "128", "--d-sae", "64", "--epochs", "2"]
    result = matryoshka.main([*small, *sampled])
    prefixes = [f"matryoshka_prefix_{size}" for size in (8, 16, 32, 64)]
    assert set(prefixes) <= set(result)
    assert all(math.isfinite(value) for value in result.values())
    # The whole dictionary's prefix is the plain L2 loss; the smallest prefix reconstructs worst.
    assert result["matryoshka_prefix_64"] == pytest.approx(result["l2"], rel=1e-5)
    assert result["matryoshka_prefix_8"] > result["matryoshka_prefix_64"]
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[-4:] == prefixes
    assert [line.split()[0] for line in table[2:4]] == ["1", "2"]


# Lightning's own use of a torch API that torch 2.13 deprecates; nothing of ours.
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_lightning_module_logs_the_collection(train_sae: ModuleType) -> None:
    pytest.importorskip("lightning")
    import lightning_module  # noqa: PLC0415  # on sys.path through the train_sae fixture

    small = ["--num-samples", "512", "--batch-size", "128", "--d-sae", "32", "--epochs", "2"]
    logged = lightning_module.main(small)
    terms = {"loss", "l2", "l0", "l1", "sparsity"}
    assert {f"epoch/{name}" for name in terms} | {f"train/{name}" for name in terms} <= set(logged)
    assert all(math.isfinite(value) for value in logged.values())
    assert logged["epoch/loss"] == pytest.approx(logged["epoch/l2"] + logged["epoch/sparsity"], rel=1e-5)


def test_optional_parts_degrade_without_their_packages(
    train_sae: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's main command installs no extra: without tqdm there is no bar, without matplotlib --plot says why.
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with train_sae._progress(4, "epoch 1", enabled=True) as bar:
        assert bar is None
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        train_sae.plot_training(tmp_path / "curves.png", [{"loss": 1.0}], [1.0], 1)


@pytest.mark.parametrize(
    ("architecture", "terms"),
    [("topk", {"auxk"}), ("batchtopk", {"auxk", "threshold"}), ("jumprelu", {"l0_loss"})],
)
def test_architecture_trains_with_its_loss(
    train_sae: ModuleType, capsys: pytest.CaptureFixture[str], architecture: str, terms: set[str]
) -> None:
    # A short dead window: latents die, and AuxK has dead latents to revive.
    result = train_sae.main([*SMALL, "--architecture", architecture, "--dead-window", "64"])
    check_trained(result, (EPOCH_KEYS - {"sparsity"}) | terms)  # no L1 penalty but for ReLU: no "sparsity"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{architecture} SAE")
    header = lines[1].split()
    assert {"auxk": "auxk" in header, "l0_loss": "l0_loss" in header, "threshold": "threshold" in header} == {
        key: key in terms for key in ("auxk", "l0_loss", "threshold")
    }
    # The epoch loss is the sum of its terms with their coefficients.
    assert "sparsity" not in header
    if architecture == "jumprelu":
        assert result["loss"] == pytest.approx(result["l2"] + 2e-2 * result["l0_loss"], rel=1e-9)
    else:
        assert result["l0"] == pytest.approx(8.0)  # k active latents per item (on average, for BatchTopK)
        assert result["auxk"] > 0.0
        assert result["loss"] == pytest.approx(result["l2"] + result["auxk"] / 32, rel=1e-9)
    if architecture == "batchtopk":
        assert result["threshold"] > 0.0  # the running minimum positive activation


@pytest.mark.parametrize(
    "extra",
    [
        ["--k", "4"],
        ["--architecture", "topk", "--sparsity-coefficient", "0.1"],
        ["--architecture", "topk", "--k", "999"],
    ],
)
def test_architecture_options_that_cannot_apply_are_refused(train_sae: ModuleType, extra: list[str]) -> None:
    with pytest.raises(SystemExit):
        train_sae.main([*SMALL, *extra])
