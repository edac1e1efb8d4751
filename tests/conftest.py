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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
