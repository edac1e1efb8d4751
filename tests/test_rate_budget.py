"""One request budget per run: a token bucket in resources/sdss/rate shared by every job's process.

The headline test starts one stand-in server in this process, runs the ``cutouts`` stage of 4
shards as 4 separate ``galpipe`` processes at once (as Snakemake's local executor does; SLURM
jobs on other nodes share the folder the same way) and reads the server's request log.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from galpipe.config import build_section
from galpipe.io.parquet import write_table
from galpipe.sources import ratelimit
from galpipe.sources.download import Downloader
from galpipe.sources.ratelimit import (
    MAX_CLOCK_SKEW_S,
    STATE_DIR_ENV,
    RateBudgetError,
    RateLimiter,
    SharedRateLimiter,
    budget_path,
    host_key,
)
from galpipe.sources.sdss import query_catalogue
from galpipe.sources.sdss_cutouts import fetch_cutouts
from galpipe.testing.fakeserver import FakeSkyServer, FaultSpec

RATE = 10.0  # requests per second of the multi-process run
BURST = 1
N_SHARDS = 4
BANDS = ["g", "r"]
#: Seconds a request may spend between taking its token and being stamped by the server (the
#: client's send, the server's accept and parse, thread scheduling on a busy machine); the same
#: allowance as tests/test_download.py.  Stamps are then at most rate * JITTER_S late or early,
#: i.e. one extra request per window at 10/s.
JITTER_S = 0.1


@pytest.fixture(scope="module", autouse=True)
def _default_state_folder() -> Any:
    """These tests place the budgets themselves: a GALPIPE_RATE_DIR of the caller's shell is ignored."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(STATE_DIR_ENV, raising=False)
        yield


def _max_in_window(times: list[float], window: float) -> int:
    """Most requests stamped in any half-open window ``[t, t + window)``; ``times`` of shape (n,)."""
    t = np.sort(np.asarray(times))
    return int(max(np.searchsorted(t, t + window, side="left") - np.arange(len(t))))


class FakeClock:
    """A wall clock that only moves when told to (sleeping moves it)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _shared(path: Path, clock: FakeClock, rate: float = 2.0, burst: int = 1) -> SharedRateLimiter:
    return SharedRateLimiter(path, rate, burst, clock=clock, sleep=clock.sleep)


# --------------------------------------------------------------------------- the bucket
def test_budget_files_are_named_by_host_and_scope(tmp_path: Path) -> None:
    assert host_key("https://data.sdss.org/sas") == "data.sdss.org"
    assert host_key("HTTP://SkyServer.SDSS.org:8080/x?y=1") == "skyserver.sdss.org_8080"
    assert host_key("http://[::1]:8642/") == "1_8642"
    with pytest.raises(RateBudgetError, match="no host"):
        host_key("/just/a/path")
    assert budget_path(tmp_path, "https://data.sdss.org/sas") == tmp_path / "data.sdss.org.json"
    assert budget_path(tmp_path, "https://skyserver.sdss.org", scope="sql") == tmp_path / "skyserver.sdss.org.sql.json"
    assert type(RateLimiter.for_service(5, 1, url="https://x.org", state_dir=None)) is RateLimiter
    shared = RateLimiter.for_service(5, 1, url="https://x.org", state_dir=tmp_path)
    assert isinstance(shared, SharedRateLimiter) and shared.path == tmp_path / "x.org.json"


def test_the_state_folder_can_be_moved_for_the_whole_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # e.g. onto a filesystem that can be locked, when resources/ is on one that cannot
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "lockable"))
    moved = RateLimiter.for_service(5, 1, url="https://x.org", state_dir=tmp_path / "resources", scope="sql")
    assert isinstance(moved, SharedRateLimiter) and moved.path == tmp_path / "lockable" / "x.org.sql.json"
    with Downloader(build_section("sdss", {}).download, rate_state_dir=tmp_path / "resources") as dl:
        assert dl.limiter_for("https://x.org/a").path == tmp_path / "lockable" / "x.org.json"  # type: ignore[attr-defined]
    monkeypatch.setenv(STATE_DIR_ENV, " ")
    assert RateLimiter.for_service(5, 1, url="https://x.org", state_dir=tmp_path).path == tmp_path / "x.org.json"


def test_shared_bucket_refills_at_its_rate_and_holds_its_burst(tmp_path: Path) -> None:
    clock = FakeClock()
    bucket = _shared(tmp_path / "h.json", clock, rate=2.0, burst=3)
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]  # a new bucket is full
    assert bucket.acquire() == pytest.approx(0.5)  # then one token every 1/rate s
    assert bucket.acquire() == pytest.approx(0.5)
    clock.now += 100.0  # idle: refilled, but never beyond the burst
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.acquire() == pytest.approx(0.5)
    state = json.loads((tmp_path / "h.json").read_text())
    assert state["tokens"] == pytest.approx(0.0) and state["last"] == pytest.approx(clock.now)
    assert RateLimiter.for_service(0, 1, url="https://x.org", state_dir=tmp_path / "off").acquire() == 0.0
    assert not (tmp_path / "off").exists()  # an unlimited budget touches no file


def test_two_limiters_on_one_file_share_one_budget(tmp_path: Path) -> None:
    # two processes' limiters, simulated by two objects on the same file and clock
    clock = FakeClock()
    a, b = _shared(tmp_path / "h.json", clock), _shared(tmp_path / "h.json", clock)
    assert a.acquire() == 0.0
    assert b.acquire() == pytest.approx(0.5)  # b waits for the token a took
    assert a.acquire() == pytest.approx(0.5)
    # an in-process limiter per object (the old behaviour) would have let both go at once
    old_a, old_b = RateLimiter(2.0), RateLimiter(2.0)
    t0 = time.monotonic()
    old_a.acquire(), old_b.acquire()
    assert time.monotonic() - t0 < 0.1


def test_threads_of_two_limiters_never_exceed_the_rate(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    limiters = [SharedRateLimiter(path, 50.0, 1), SharedRateLimiter(path, 50.0, 1)]
    stamps: list[float] = []
    lock = threading.Lock()

    def worker(limiter: SharedRateLimiter) -> None:
        for _ in range(5):
            limiter.acquire()
            with lock:
                stamps.append(time.time())

    threads = [threading.Thread(target=worker, args=(limiters[k % 2],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stamps) == 20
    assert max(stamps) - min(stamps) >= 19 / 50.0 - 0.01  # 19 refills after the first token
    assert _max_in_window(stamps, 0.2) <= 50.0 * (0.2 + 0.02) + 1


@pytest.mark.parametrize("content", ["", "{", "null", '{"tokens": "many", "last": 1}', '{"tokens": 1}',
                                     '{"tokens": NaN, "last": 1e9}', '{"tokens": -3, "last": 1e9}', "\xff"])
def test_a_corrupt_state_file_is_reset_to_an_empty_bucket_with_a_warning(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "h.json"
    path.write_bytes(content.encode("latin-1"))  # "\xff" is not UTF-8
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger="galpipe"):
        waited = _shared(path, clock, rate=2.0, burst=5).acquire()
    assert waited == pytest.approx(0.5)  # empty, not full: a reset never adds requests
    assert any(str(path) in r.getMessage() and "empty bucket" in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text())["tokens"] == pytest.approx(0.0)  # repaired


def test_a_writer_killed_mid_write_leaves_the_previous_state(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    clock = FakeClock()
    bucket = _shared(path, clock)
    bucket.acquire()
    before = path.read_text()
    (tmp_path / ".h.json.tmp").write_text('{"tokens": 0.')  # what a killed writer leaves
    assert path.read_text() == before  # the state itself is replaced whole (os.replace)
    assert bucket.acquire() == pytest.approx(0.5)  # and the leftover is simply overwritten
    assert not (tmp_path / ".h.json.tmp").exists()


def test_the_clock_going_backwards_never_yields_tokens_nor_stalls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    bucket = _shared(tmp_path / "h.json", clock, rate=2.0, burst=1)
    bucket.acquire()
    clock.now -= 0.3  # a small step back (or another node 0.3 s ahead): only more waiting
    assert bucket.acquire() == pytest.approx(0.3 + 0.5)
    clock.now -= 3600.0  # a jump back of an hour: restart the refill instead of waiting an hour
    with caplog.at_level(logging.WARNING, logger="galpipe"):
        waited = bucket.acquire()
    assert 0.0 < waited <= 0.5 + MAX_CLOCK_SKEW_S
    assert any("ahead of this clock" in r.getMessage() for r in caplog.records)


def test_unusable_state_folders_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RateBudgetError, match=r"cannot create .*file"):
        SharedRateLimiter(blocker / "h.json", 5.0).acquire()

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(ratelimit.fcntl, "flock", no_locks)
    with pytest.raises(RateBudgetError, match=r"cannot lock .*h\.json\.lock .*does not support file locks"):
        SharedRateLimiter(tmp_path / "h.json", 5.0).acquire()


def test_downloader_keeps_one_budget_per_host(tmp_path: Path) -> None:
    cfg = build_section("sdss", {}).download
    with Downloader(cfg, rate_state_dir=tmp_path) as dl:
        sas = dl.limiter_for("https://data.sdss.org/sas/dr17/eboss/photoObj/frames/301/1/1/a.fits.bz2")
        assert dl.limiter_for("https://data.sdss.org/sas/other") is sas
        sky = dl.limiter_for("https://skyserver.sdss.org/dr17/SkyServerWS/ImgCutout/getjpeg")
        assert isinstance(sas, SharedRateLimiter) and isinstance(sky, SharedRateLimiter)
        assert (sas.path.name, sky.path.name) == ("data.sdss.org.json", "skyserver.sdss.org.json")
        assert (sas.rate, sas.burst) == (cfg.requests_per_second, cfg.burst)
    with Downloader(cfg) as dl:  # no state folder: the in-process bucket for every host
        assert dl.limiter_for("https://data.sdss.org/x") is dl.limiter_for("https://skyserver.sdss.org/y")
        assert type(dl.limiter) is RateLimiter


def test_retries_take_tokens_from_the_shared_budget(tmp_path: Path) -> None:
    # every frame's first answer is a 500: 4 frames -> 8 requests, each of which takes a token
    faults = FaultSpec(rate=1.0, kinds=("500",), max_per_path=1)
    with FakeSkyServer(n_galaxies=4, seed=5, frame_shape=(64, 64), galaxies_per_field=2, faults=faults) as srv:
        srv.warm(BANDS)
        params = srv.params(download={"requests_per_second": RATE, "concurrency": 4, "backoff_base_s": 0.001,
                                      "backoff_max_s": 0.002})
        man = fetch_cutouts(srv.table, tmp_path / "out", sdss=params, bands=BANDS, size=8,
                            frame_cache_dir=tmp_path / "cache")
        times = sorted(e["t"] for e in srv.log)
        key = host_key(srv.sas_url)
    assert (man["status"] == "ok").all() and len(times) == 8
    # 8 tokens need 0.7 s; had the retries (sent ~1 ms after their failure) taken none, 0.3 s
    assert times[-1] - times[0] >= 7 / RATE - JITTER_S
    assert json.loads((tmp_path / "cache" / "rate" / f"{key}.json").read_text())["rate"] == RATE


# --------------------------------------------------------------------------- SQL queries
def test_sql_queries_draw_from_the_shared_skyserver_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the catalogue stage runs in the workflow's folder
    with FakeSkyServer(n_galaxies=8, seed=4, frame_shape=(64, 64)) as srv:
        pytest.importorskip("astroquery.sdss")  # imported now, so that the wait below is the budget's
        state = budget_path(Path("resources/sdss/rate"), srv.skyserver_url, scope="sql")
        state.parent.mkdir(parents=True)
        params = srv.params(query={"max_queries_per_minute": 60.0},
                            labels={"scheme": "spec_class", "classes": ["galaxy"]})
        # another process has just spent the budget (60 queries a minute: the next in 1 s)
        state.write_text(json.dumps({"tokens": 0.0, "last": time.time()}))
        t0 = time.monotonic()
        query_catalogue(params, seed=0, bands=BANDS)
        first = min(e["t"] for e in srv.log if e["endpoint"] == "sql")
    assert first - t0 >= 1.0 - 0.1  # it waited for the other process's token
    saved = json.loads(state.read_text())
    assert saved["rate"] == pytest.approx(1.0) and saved["burst"] == 1
    assert not (state.parent / f"{host_key(srv.skyserver_url)}.json").exists()  # downloads: own budget


# --------------------------------------------------------------------------- 4 processes
#: Modules the 4 jobs need, imported once in the fork server instead of 4 times (2 s each).
_PRELOAD = ["galpipe.cli", "galpipe.stages.cutouts", "galpipe.sources.sdss", "galpipe.sources.sdss_cutouts"]


def _shard_job(argv: list[str], log_path: str, ready: Any, go: Any) -> None:
    """One ``galpipe cutouts`` job in its own process: say ready, wait for the start, run, exit with its code."""
    import galpipe.cli

    with open(log_path, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        ready.set()
        if not go.wait(120):
            raise SystemExit("no start signal")
        code = galpipe.cli.main(argv)
    raise SystemExit(code)


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """4 ``galpipe cutouts`` processes, one per shard, started together against one stand-in; its log."""
    wd = tmp_path_factory.mktemp("budget")
    # one galaxy per field and round-robin shards: 16 fields x 2 bands, each frame fetched by
    # exactly one job -> 32 requests, 8 per job
    with FakeSkyServer(n_galaxies=16, seed=11, frame_shape=(64, 64), galaxies_per_field=1) as srv:
        # every frame rendered before the start (meanwhile the jobs start): the server answers at once
        warm = threading.Thread(target=srv.warm, args=(BANDS,))
        warm.start()
        cat = srv.table[["objid", "ra", "dec", "run", "rerun", "camcol", "field", "petroR90_r"]].copy()
        cat["label"] = srv.table["class"].str.lower()
        for i in range(N_SHARDS):
            write_table(cat.iloc[i::N_SHARDS].reset_index(drop=True), wd / f"shard-{i}.parquet",
                        {"shard": [i, N_SHARDS]})
        config = {
            "source": "sdss", "seed": 1, "bands": BANDS, "cutout_size": 8, "shards": N_SHARDS,
            "max_reject_fraction": 1.0,
            "sdss": srv.params(download={"requests_per_second": RATE, "burst": BURST, "concurrency": 4}),
        }
        (wd / "config.yaml").write_text(yaml.safe_dump(config))
        # separate processes, as Snakemake runs the jobs (forked from a server that has imported
        # galpipe; each runs in the process's working directory, where resources/ is)
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        go = ctx.Event()
        jobs = []
        cwd = os.getcwd()
        os.chdir(wd)  # the children take the parent's working directory when they start
        try:
            for i in range(N_SHARDS):
                argv = ["cutouts", "--config", "config.yaml", "--shard", f"shard-{i}.parquet",
                        "--output", f"manifest-{i}.parquet"]
                ready = ctx.Event()
                proc = ctx.Process(target=_shard_job, args=(argv, str(wd / f"job-{i}.log"), ready, go))
                proc.start()
                jobs.append((proc, ready))
        finally:
            os.chdir(cwd)
        try:
            warm.join()
            for proc, ready in jobs:
                assert ready.wait(120), f"job {proc.name} did not start"
            srv.clear_log()
            go.set()
            for proc, _ in jobs:
                proc.join(120)
        finally:
            for proc, _ in jobs:
                if proc.is_alive():
                    proc.kill()
        log = srv.log
        port_key = host_key(srv.sas_url)
    logs = [(wd / f"job-{i}.log").read_text()[-2000:] for i in range(N_SHARDS)]
    assert [proc.exitcode for proc, _ in jobs] == [0] * N_SHARDS, logs
    manifests = [pd.read_parquet(wd / f"manifest-{i}.parquet") for i in range(N_SHARDS)]
    return {"wd": wd, "log": log, "manifests": manifests, "port_key": port_key}


def test_four_parallel_jobs_stay_within_one_budget(four_shards: dict) -> None:
    log = four_shards["log"]
    assert sum(len(m) for m in four_shards["manifests"]) == 16
    # every frame requested exactly once and answered (stamps may still be refused, e.g. at an edge)
    assert len(log) == len({e["path"] for e in log}) == 16 * len(BANDS)
    assert {(e["endpoint"], e["status"]) for e in log} == {("frame", 200)}
    times = sorted(e["t"] for e in log)
    # every sliding window of the server's log: at most rate * W + burst requests, with
    # JITTER_S of stamping jitter (measured with per-process limiters instead: 4 jobs x 10/s,
    # all 32 requests within ~0.9 s, so the 1 s window held 32)
    for window in (0.5, 1.0, 2.0):
        assert _max_in_window(times, window) <= RATE * (window + JITTER_S) + BURST, (window, np.diff(times))
    # the mean rate: n requests need at least (n - burst) / rate seconds after the first token
    # (less JITTER_S), so the mean rate is at most RATE * (n - 1) / (n - burst - RATE * JITTER_S)
    n = len(times)
    mean_rate = (n - 1) / (times[-1] - times[0])
    assert mean_rate <= RATE * (n - 1) / (n - BURST - RATE * JITTER_S), mean_rate


def test_the_budget_lives_under_resources_sdss(four_shards: dict) -> None:
    state_dir = four_shards["wd"] / "resources" / "sdss" / "rate"
    names = sorted(p.name for p in state_dir.iterdir())
    key = four_shards["port_key"]
    assert names == [f"{key}.json", f"{key}.json.lock"]  # no temporary file left behind
    state = json.loads((state_dir / f"{key}.json").read_text())
    assert state["rate"] == RATE and state["burst"] == BURST and 0.0 <= state["tokens"] <= BURST
    assert abs(state["last"] - time.time()) < 600
    assert os.path.getsize(state_dir / f"{key}.json") < 300
