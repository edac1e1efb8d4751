"""The downloader: rate limit, retries/backoff, Retry-After, verification, failures, restarts."""

from __future__ import annotations

import bz2
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from PIL import Image

from galpipe.config import build_section
from galpipe.errors import ConfigError, DataError
from galpipe.io.cutout_fits import read_cutout
from galpipe.sources.download import (
    Downloader,
    FetchError,
    RateLimiter,
    VerificationError,
    backoff_delay,
    looks_like_html,
    parse_frame_bz2,
    parse_jpeg,
    parse_retry_after,
)
from galpipe.sources.sdss_cutouts import FrameCache, fetch_cutouts
from galpipe.testing.fakeserver import FAULT_KINDS, FakeSkyServer, FaultSpec

REPO = Path(__file__).resolve().parents[1]
BANDS = ["g", "r"]
CAT_COLUMNS = ["objid", "ra", "dec", "run", "rerun", "camcol", "field", "petroR90_r"]
#: These tests are about fetching: keep every stamp that touches its frame (edge rules: test_sdss_cutouts).
EVERY_STAMP = {"max_fill_fraction": 1.0}


def _catalogue(srv: FakeSkyServer) -> pd.DataFrame:
    return srv.table[CAT_COLUMNS].copy()


def _max_in_window(times: list[float], window: float) -> int:
    t = np.sort(np.asarray(times))
    return int(max(np.searchsorted(t, t + window, side="left") - np.arange(len(t))))


def _frame_bytes(shape: tuple[int, int] = (20, 30), n_hdus: int = 4) -> bytes:
    from galpipe.io.cutout_fits import tan_wcs

    hdus: list[Any] = [fits.PrimaryHDU(np.ones(shape, np.float32), header=tan_wcs(
        10.0, 1.0, shape, 0.396).to_header())]
    hdus += [fits.ImageHDU(np.zeros(4, np.float32)) for _ in range(n_hdus - 1)]
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- units
def test_rate_limiter_never_exceeds_its_rate() -> None:
    limiter = RateLimiter(rate=40.0, burst=1)
    stamps: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            limiter.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 >= 39 / 40.0 - 0.01
    assert _max_in_window(stamps, 0.5) <= 40 * 0.5 + 1
    burst = RateLimiter(rate=10.0, burst=5)
    t0 = time.monotonic()
    for _ in range(5):
        burst.acquire()
    assert time.monotonic() - t0 < 0.05  # the bucket starts full
    assert RateLimiter(rate=0).acquire() == 0.0


def test_retry_after_and_backoff() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    when = datetime.now(UTC) + timedelta(seconds=30)
    assert 25 < parse_retry_after(format_datetime(when, usegmt=True)) <= 30  # type: ignore[operator]
    rng = random.Random(0)
    delays = [backoff_delay(a, base=1.0, cap=8.0, rng=rng) for a in range(6)]
    assert 0.5 <= delays[0] < 1.5 and 4.0 <= delays[5] < 12.0
    assert backoff_delay(0, base=0.01, cap=1, rng=rng, retry_after=3.0) == 3.0
    assert backoff_delay(0, base=0.01, cap=1, rng=rng, retry_after=900.0,
                         retry_after_max=10.0) == 10.0


def test_verification_rejects_bad_bodies() -> None:
    good = _frame_bytes()
    frame = parse_frame_bz2(bz2.compress(good), expected_shape=(20, 30))
    assert frame.data.shape == (20, 30) and frame.wcs.has_celestial
    html = b"<!DOCTYPE html>\n<html><body>Error</body></html>"
    assert looks_like_html(html) and looks_like_html(b"\n  <HTML>") and not looks_like_html(good)
    cases = {
        "HTML": html,
        "bz2": bz2.compress(good)[:-40],
        "bz2 ": b"BZh9" + bytes(range(200)),
        "truncated": bz2.compress(good[: len(good) - 2880]),
        "HDU": bz2.compress(_frame_bytes(n_hdus=2)),
        "shape": bz2.compress(_frame_bytes(shape=(21, 30))),
    }
    for what, body in cases.items():
        with pytest.raises(VerificationError, match=what.strip()):
            parse_frame_bz2(body, expected_shape=(20, 30))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    assert parse_jpeg(jpeg, expected_size=(12, 10)).shape == (3, 10, 12)
    for body, match in [(html, "HTML"), (jpeg[: len(jpeg) // 2], "truncated"),
                        (b"GIF89a....", "not a JPEG")]:
        with pytest.raises(VerificationError, match=match):
            parse_jpeg(body)
    with pytest.raises(DataError, match="expected 10x10") as info:  # a whole image: not retried
        parse_jpeg(jpeg, expected_size=(10, 10))
    assert not isinstance(info.value, VerificationError)


def test_permanent_http_errors_are_not_retried() -> None:
    with FakeSkyServer(n_galaxies=4, seed=0, frame_shape=(64, 64)) as srv:
        dl = Downloader(build_section("sdss", {"download": {"max_retries": 5, "backoff_base_s": 0.01,
                                                             "timeout_s": 5}}).download)
        with pytest.raises(FetchError, match="HTTP 404"):
            dl.fetch(f"{srv.sas_url}/dr17/eboss/nothing.fits.bz2", lambda b: b)
        assert len(srv.log) == 1
        # the User-Agent names galpipe
        import requests

        seen: dict[str, str] = {}

        class Probe(requests.adapters.HTTPAdapter):
            def send(self, request: Any, **kw: Any) -> Any:
                seen.update(request.headers)
                return super().send(request, **kw)

        session = dl._session()
        session.mount("http://", Probe())
        with pytest.raises(FetchError):
            dl.fetch(f"{srv.sas_url}/x", lambda b: b)
        assert seen["User-Agent"].startswith("galpipe/")


# --------------------------------------------------------------------------- against the stand-in
def test_twenty_percent_faults_of_every_kind_still_fetch_everything(tmp_path: Path) -> None:
    # decisions hash (seed, path+query, attempt): deterministic, and with this seed every
    # kind of fault occurs
    faults = FaultSpec(rate=0.2, seed=21, slow_s=0.8, retry_after_s=0.05, max_per_path=3)
    with FakeSkyServer(n_galaxies=40, seed=3, frame_shape=(80, 96), faults=faults) as srv:
        cat = _catalogue(srv)
        dl = {"concurrency": 4, "timeout_s": 0.4, "max_retries": 4}
        man = fetch_cutouts(cat, tmp_path / "frames", bands=BANDS, size=24,
                            sdss=srv.params(download=dl, cutouts=EVERY_STAMP), frame_cache_dir=tmp_path / "cache")
        params = srv.params(cutouts={"provider": "skyserver-jpeg"}, download=dl)
        man_j = fetch_cutouts(cat, tmp_path / "jpeg", bands=["red", "green", "blue"], size=24,
                              sdss=params, frame_cache_dir=tmp_path / "cache")
        log = srv.log
    faults_seen = Counter(e["fault"] for e in log if e["fault"])
    assert set(faults_seen) == set(FAULT_KINDS), faults_seen
    n_faults = sum(faults_seen.values())
    assert 0.1 < n_faults / len(log) < 0.35
    for m, bands in ((man, BANDS), (man_j, ["red", "green", "blue"])):
        assert (m["status"] == "ok").all(), m[m["status"] != "ok"]
        for p in m["path"]:
            read_cutout(p, bands=bands)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert leftovers == []
    frames = list((tmp_path / "cache").rglob("*.fits.bz2"))
    assert len(frames) == len({(r, c, f) for r, c, f in zip(cat["run"], cat["camcol"],
                                                             cat["field"], strict=True)}) * 2
    for f in frames:  # nothing corrupt was kept
        parse_frame_bz2(f.read_bytes(), expected_shape=(80, 96))


def test_request_rate_is_never_exceeded(tmp_path: Path) -> None:
    with FakeSkyServer(n_galaxies=30, seed=2, frame_shape=(64, 64)) as srv:
        params = srv.params(cutouts={"provider": "skyserver-jpeg"},
                            download={"concurrency": 6, "requests_per_second": 25.0})
        t0 = time.monotonic()
        man = fetch_cutouts(_catalogue(srv), tmp_path, bands=["red", "green", "blue"], size=16,
                            sdss=params, frame_cache_dir=tmp_path / "c")
        elapsed = time.monotonic() - t0
        times = [e["t"] for e in srv.log]
    assert (man["status"] == "ok").all() and len(times) == 30
    assert elapsed >= 29 / 25.0 - 0.02
    # sliding windows over the server's arrival times; a request is stamped when a server
    # thread gets to it, so allow 0.1 s of scheduling jitter between sending and stamping
    # (without the limiter all 30 requests arrive within a fraction of a second)
    for window in (0.2, 0.5, 1.0):
        assert _max_in_window(times, window) <= 25.0 * (window + 0.1) + 1, window
    assert max(times) - min(times) >= 29 / 25.0 - 0.1


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    faults = FaultSpec(rate=1.0, kinds=("503",), retry_after_s=0.6, max_per_path=1)
    with FakeSkyServer(n_galaxies=6, seed=1, frame_shape=(64, 64), faults=faults) as srv:
        params = srv.params(cutouts={"provider": "skyserver-jpeg"},
                            download={"concurrency": 3, "backoff_base_s": 0.001,
                                      "backoff_max_s": 0.002})
        man = fetch_cutouts(_catalogue(srv), tmp_path, bands=["red", "green", "blue"], size=16,
                            sdss=params, frame_cache_dir=tmp_path / "c")
        log = srv.log
    assert (man["status"] == "ok").all()
    by_query: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in log:
        by_query[e["query"]].append(e)
    assert len(by_query) == 6
    for entries in by_query.values():
        assert [e["status"] for e in entries] == [503, 200]
        assert entries[1]["t"] - entries[0]["t"] >= 0.6 - 0.005


def test_failed_galaxies_are_listed_and_never_fail_the_call(tmp_path: Path) -> None:
    # one threshold knob: the cutouts stage applies max_reject_fraction to the manifest
    faults = FaultSpec(rate=0.3, kinds=("500",), sticky=True, max_per_path=None, seed=5)
    with FakeSkyServer(n_galaxies=20, seed=1, frame_shape=(64, 64), faults=faults) as srv:
        cat = _catalogue(srv)
        params = srv.params(cutouts={"provider": "skyserver-jpeg"}, download={"max_retries": 1})
        man = fetch_cutouts(cat, tmp_path / "a", bands=["red", "green", "blue"], size=16,
                            sdss=params, frame_cache_dir=tmp_path / "c")
        failing = {e["query"] for e in srv.log if e["fault"]}
        failed = man[man["status"] == "failed"]
        assert 0 < len(failed) == len(failing) < len(cat)
        assert len(failed) / len(cat) > 0.05  # more than the default max_reject_fraction: still no error here
        assert failed["reason"].str.contains("failed after 2 attempt").all()
        assert failed["reason"].str.contains("HTTP 500").all()
        assert (failed["n_filled"] == -1).all()
        assert not any(Path(p).exists() for p in failed["path"])
        # a rerun retries only the failed ones and lists them again
        srv.clear_log()
        again = fetch_cutouts(cat, tmp_path / "a", bands=["red", "green", "blue"], size=16,
                              sdss=params, frame_cache_dir=tmp_path / "c")
        assert again["status"].tolist() == man["status"].tolist()
        assert {e["query"] for e in srv.log} == failing
    with pytest.raises(ConfigError, match=r"config key 'sdss\.download'.*max_failure_fraction"):
        build_section("sdss", {"download": {"max_failure_fraction": 0.5}})


_CHILD = """
import json, sys
import pandas as pd
from galpipe.sources.sdss_cutouts import fetch_cutouts
cfg = json.load(open(sys.argv[1]))
cat = pd.read_csv(cfg["catalogue"])
fetch_cutouts(cat, cfg["out"], bands=cfg["bands"], size=24, sdss=cfg["params"],
              frame_cache_dir=cfg["cache"])
print("finished")
"""


def test_sigkill_then_rerun_fetches_only_what_is_missing(tmp_path: Path) -> None:
    with FakeSkyServer(n_galaxies=32, seed=6, frame_shape=(64, 80), latency=0.12) as srv:
        cat = _catalogue(srv)
        cat.to_csv(tmp_path / "cat.csv", index=False)
        out, cache = tmp_path / "out", tmp_path / "cache"
        params = srv.params(download={"concurrency": 1}, cutouts=EVERY_STAMP)
        cfg = {"catalogue": str(tmp_path / "cat.csv"), "out": str(out), "cache": str(cache),
               "bands": BANDS, "params": params}
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "cfg.json")],
                                 env=env, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and child.poll() is None:
                if out.is_dir() and len(list(out.glob("*.fits"))) >= 6:
                    break
                time.sleep(0.01)
            assert child.poll() is None, child.communicate()
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.fits")}
        cached_before = {p.name for p in cache.rglob("*.fits.bz2")}
        assert 6 <= len(done_before) < len(cat)
        srv.latency = 0.0
        srv.clear_log()
        man = fetch_cutouts(cat, out, bands=BANDS, size=24, sdss=srv.params(cutouts=EVERY_STAMP),
                            frame_cache_dir=cache)
        log = srv.log
    assert (man["status"] == "ok").all()
    assert man.attrs["stats"]["skipped_existing"] == len(done_before)
    requested = [e["path"].rsplit("/", 1)[1] for e in log]
    assert requested and len(requested) == len(set(requested))
    assert not set(requested) & cached_before  # nothing already cached was fetched again
    # only frames of fields that still had galaxies without a cutout were requested
    missing = cat[~cat["objid"].map(lambda o: f"{o}.fits" in done_before)]
    needed = {f"frame-{b}-{r:06d}-{c}-{f:04d}.fits.bz2" for r, c, f in
              zip(missing["run"], missing["camcol"], missing["field"], strict=True) for b in BANDS}
    assert set(requested) <= needed
    assert needed - cached_before == set(requested)
    for name, mtime in done_before.items():  # finished cutouts were not rewritten
        assert (out / name).stat().st_mtime_ns == mtime
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for p in man["path"]:
        read_cutout(p, bands=BANDS)
    assert FrameCache(cache, None).total_bytes > 0
