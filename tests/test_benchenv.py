"""The benchmarks' shared environment lines (``benchmarks/_benchenv.py``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def benchenv(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("_benchenv")


def test_cpu_note_names_the_cpu_of_this_machine(benchenv) -> None:
    note = benchenv.cpu_note()
    assert note.startswith("cpu: ")
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        assert "unknown CPU" in note
        return
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")]
    if names:
        assert note.split(";")[0] == f"cpu: {names[0]}"
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    assert ("avx2" in note.split(";")[1]) == ("avx2" in flags)


def test_cpu_note_without_proc_or_sysfs(benchenv, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_files(*args, **kwargs):
        raise OSError("not here")

    monkeypatch.setattr("builtins.open", no_files)
    assert benchenv.cpu_note() == "cpu: unknown CPU; flags unknown; caches unknown"


def test_environment_note_reports_what_was_unset(benchenv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(benchenv._MARK, raising=False)
    assert benchenv.environment_note() is None
    monkeypatch.setenv(benchenv._MARK, "OPENBLAS_CORETYPE=Haswell")
    assert benchenv.environment_note() == (
        "environment: unset OPENBLAS_CORETYPE=Haswell before importing numpy (re-executed)")
