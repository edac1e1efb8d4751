"""The suite's pytest-xdist grouping (tests/conftest.py) names real files and covers every file
that shares a session-wide result, so no such file runs in a worker of its own and redoes it."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import XDIST_GROUPS, xdist_group

TESTS = Path(__file__).resolve().parent
#: A session-wide result (pattern of its use in a test file) -> the group that must hold every user.
SHARED = {
    r"\breference_run\(": "reference_run",
    r"\bfull_frame_sky\b": "full_frame_sky",
    r"\b_slurm_unavailable\b|\bslurm_cluster\b": "slurm",
}


def test_every_grouped_file_exists() -> None:
    named = [name for names in XDIST_GROUPS.values() for name in names]
    assert len(named) == len(set(named)), "a file is named in two groups"
    missing = [name for name in named if not (TESTS / name).is_file()]
    assert not missing, f"XDIST_GROUPS names files that do not exist: {missing}"


def test_files_sharing_a_session_result_share_a_worker() -> None:
    for pattern, group in SHARED.items():
        users = sorted(f.name for f in TESTS.glob("test_*.py")
                       if f.name != Path(__file__).name and re.search(pattern, f.read_text(encoding="utf-8")))
        assert users, f"no test file uses {pattern!r}: update SHARED"
        strays = [name for name in users if xdist_group(f"tests/{name}::t") != group]
        assert not strays, f"{strays} use {pattern!r} but are not in the xdist group {group!r} (tests/conftest.py)"


def test_other_files_are_their_own_unit() -> None:
    assert xdist_group("tests/test_nn_fast.py::test_x[a-b]") == "test_nn_fast.py"
    assert xdist_group("tests/test_kill.py::test_x") == "reference_run"
