"""Shared pytest configuration for galpipe's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Real SDSS JPEGs with Galaxy Zoo 1 labels, provided beside the checkout (never copied in).
GZ1_DIR = REPO.parent / "shared" / "data" / "gz1-sdss-jpeg"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--remote-data",
        action="store_true",
        default=False,
        help="run tests marked remote_data against the real SDSS services (needs internet)",
    )


#: Under pytest-xdist (``make test`` runs ``-n 2``) each test file runs whole in one worker
#: (module fixtures and tests that build on each other's state stay together), and files that
#: share a session-wide result run in the same worker: the reference workflow run; the rendered
#: stand-in SDSS frames; the one-node SLURM cluster (whose two CPUs its tests would otherwise
#: fight over).  The groups below start first, longest first (measured with ``--durations``; the
#: SLURM runs mostly wait on the cluster, so the other worker's tests fill that time); the files
#: not named follow in file order.
XDIST_GROUPS: dict[str, tuple[str, ...]] = {
    "slurm": ("test_slurm_pipeline.py", "test_slurm.py"),
    "reference_run": ("test_kill.py", "test_determinism.py", "test_workflow.py"),
    "change_tracking": ("test_change_tracking.py",),
    "full_frame_sky": ("test_sdss_pipeline.py", "test_sdss_cutouts.py"),
    "models_package": ("test_models_package.py",),
    "report": ("test_report.py",),
}
_GROUP_OF = {name: group for group, names in XDIST_GROUPS.items() for name in names}
_GROUP_RANK = {group: rank for rank, group in enumerate(XDIST_GROUPS)}


def xdist_group(nodeid: str) -> str:
    """The work unit of a test under pytest-xdist: its file's group, or its file."""
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return _GROUP_OF.get(name, name)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Whole files (and the groups of :data:`XDIST_GROUPS`) as xdist's units of work.

    xdist's own ``--dist loadgroup`` cannot do this here: its ``xdist_group`` marks rewrite
    ``item._nodeid``, which pytest >= 9.2 no longer reads (xdist 3.8), so the marks are ignored.
    ``--dist each`` and ``worksteal`` are left to xdist.
    """
    if config.getvalue("dist") not in ("load", "loadscope", "loadfile", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    config.option.loadscopereorder = False  # keep the order pytest_collection_modifyitems gives
    return FileGroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        # the long groups first; a stable sort: within a group and among the others the file order stays
        items.sort(key=lambda item: _GROUP_RANK.get(xdist_group(item.nodeid), len(_GROUP_RANK)))
    if config.getoption("--remote-data"):
        return
    skip = pytest.mark.skip(
        reason="talks to the real SDSS services: pass --remote-data (needs internet access)"
    )
    for item in items:
        if "remote_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gz1_dir() -> Path:
    """The real GZ1 JPEG set; tests using it skip with a reason when it is absent."""
    if not (GZ1_DIR / "labels.csv").is_file():
        pytest.skip(f"real GZ1 SDSS JPEG set not found at {GZ1_DIR} (only on CI/dev machines)")
    return GZ1_DIR


@pytest.fixture(scope="session", autouse=True)
def _rate_budget_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Shared request budgets (galpipe.sources.ratelimit) go to a session folder, not ./resources.

    Each stand-in server has its own port, hence its own budget file; without this the
    suite would leave them in the checkout's resources/sdss/rate.  Tests that need a
    particular folder set GALPIPE_RATE_DIR themselves (monkeypatch), or pass a state_dir.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GALPIPE_RATE_DIR", str(tmp_path_factory.mktemp("rate")))
        yield


#: The full-size stand-in sky of the SDSS frame tests (test_sdss_cutouts, test_sdss_pipeline):
#: 160 objects on two fields (camera columns 1 and 2: an axis-aligned and a rotated frame), real
#: 1489 x 2048 frames.  One set of arguments, so they share one sky.
FULL_FRAME_SKY: dict[str, Any] = {"n_galaxies": 160, "seed": 3, "frame_shape": (1489, 2048),
                                  "galaxies_per_field": 80}
#: The bands its frames are served in (config/sdss.yaml's bands).
FULL_FRAME_BANDS = ("g", "r", "i")


@pytest.fixture(scope="session")
def full_frame_sky() -> dict[str, Any]:
    """Arguments of :class:`~galpipe.testing.fakeserver.FakeSkyServer` for :data:`FULL_FRAME_SKY`.

    Its six g, r, i frames (about 2 s each) are rendered here, two at a time (bz2 compression,
    most of a render, releases the GIL), before any test sends a request: every server made with
    these arguments later in the session serves them from the process-wide ``FRAME_STORE``
    (keyed by the sky's content), and no request waits for a render (a busy machine's render
    may outlast a client's timeout).

    Returns
    -------
    dict
        Keyword arguments for ``FakeSkyServer`` (a fresh copy).
    """
    from concurrent.futures import ThreadPoolExecutor

    from galpipe.testing.fakeserver import FakeSkyServer

    sky = FakeSkyServer(**FULL_FRAME_SKY)  # not started: only its sky and frames are used
    frames = [(*field, band) for field in sky.fields for band in FULL_FRAME_BANDS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda key: sky.frame_bytes(*key), frames))
    return dict(FULL_FRAME_SKY)
