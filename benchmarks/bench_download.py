"""Speed-up of the SDSS downloader from concurrency, against the stand-in SkyServer.

A :class:`galpipe.testing.fakeserver.FakeSkyServer` runs in a separate process
(``python -m galpipe.testing.fakeserver``, so its threads do not compete with
the client for the GIL) with ``--latency`` seconds (default 0.05) added to every
request.  After a warm-up pass (the server renders and caches every JPEG and
frame), :func:`galpipe.sources.sdss_cutouts.fetch_cutouts` runs with
concurrency 1 and then 8 (request-rate limit off, fresh output and cache
directories each time) for both providers:

* ``skyserver-jpeg``: one request per galaxy;
* ``sdss-frames``: one request per field and band (3 bands), then stamps cut
  from the frames (CPU work that does not overlap as well).

Printed: wall time of each run, requests, and the speed-up concurrency 8 vs 1
(target >= 6x for the JPEG provider).  ``OPENBLAS_CORETYPE`` /
``OPENBLAS_L2_SIZE`` are removed before NumPy is imported (the script
re-executes itself without them and says so).

Usage: ``python benchmarks/bench_download.py [--galaxies 64] [--latency 0.05]
[--reps 3]``.
"""

from __future__ import annotations

import os
import sys

_BAD_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_MARK = "_GALPIPE_BENCH_UNSET_ENV"
if any(k in os.environ for k in _BAD_ENV) and "numpy" not in sys.modules:
    removed = [f"{k}={os.environ.pop(k)}" for k in _BAD_ENV if k in os.environ]
    os.environ[_MARK] = " ".join(removed)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from galpipe.sources.sdss_cutouts import fetch_cutouts  # noqa: E402
from galpipe.testing.fakeserver import make_sky  # noqa: E402

FRAME_SHAPE = (372, 512)
COLUMNS = ["objid", "ra", "dec", "run", "rerun", "camcol", "field", "petroR90_r"]


def _run(cat, provider: str, concurrency: int, base: str, work: Path, tag: str) -> float:
    bands = ["red", "green", "blue"] if provider == "skyserver-jpeg" else ["g", "r", "i"]
    params = {
        "skyserver_url": base,
        "sas_url": base + "/sas",
        "cutouts": {"provider": provider, "frame_shape": list(FRAME_SHAPE)},
        "download": {"concurrency": concurrency, "requests_per_second": 0.0, "timeout_s": 30.0},
    }
    t0 = time.perf_counter()
    man = fetch_cutouts(cat, work / f"out-{tag}", bands=bands, size=48, sdss=params,
                        frame_cache_dir=work / f"cache-{tag}")
    elapsed = time.perf_counter() - t0
    if not (man["status"] == "ok").all():
        raise SystemExit(f"{provider}: {int((man['status'] != 'ok').sum())} galaxies failed")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--galaxies", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    if os.environ.get(_MARK):
        print(f"note: removed {os.environ[_MARK]} from the environment before importing numpy")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [sys.executable, "-m", "galpipe.testing.fakeserver", "--port", "0", "--galaxies",
         str(args.galaxies), "--latency", str(args.latency), "--frame-shape",
         f"{FRAME_SHAPE[0]},{FRAME_SHAPE[1]}", "--seed", "0"],
        stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        base = line.split()[2]
        cat = make_sky(args.galaxies, seed=0, frame_shape=FRAME_SHAPE)[0][COLUMNS]
        n_fields = cat[["run", "camcol", "field"]].drop_duplicates().shape[0]
        print(f"fake SkyServer {base}: {args.galaxies} galaxies, {n_fields} fields, "
              f"latency {args.latency * 1000:.0f} ms/request, frames {FRAME_SHAPE}")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for provider, n_req in (("skyserver-jpeg", len(cat)), ("sdss-frames", 3 * n_fields)):
                _run(cat, provider, 8, base, work, f"{provider}-warm")  # server renders, caches
                times: dict[int, list[float]] = {1: [], 8: []}
                for rep in range(args.reps):
                    for conc in (1, 8):
                        times[conc].append(_run(cat, provider, conc, base, work,
                                                f"{provider}-{conc}-{rep}"))
                t1, t8 = statistics.median(times[1]), statistics.median(times[8])
                print(f"{provider:15s} {n_req:4d} requests: concurrency 1 {t1:6.2f} s, "
                      f"concurrency 8 {t8:6.2f} s, speed-up {t1 / t8:4.1f}x "
                      f"(median of {args.reps})")
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
