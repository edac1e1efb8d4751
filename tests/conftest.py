"""Shared pytest configuration for galpipe's tests."""

from __future__ import annotations

from pathlib import Path

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
