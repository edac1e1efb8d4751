"""Frames fetched per field and bytes per galaxy when sdss-frames cutouts run in shards.

A :class:`galpipe.testing.fakeserver.FakeSkyServer` serves full-size SDSS frames
(1489 x 2048, bz2, 4 HDUs: about 5 MB each) for ``--fields`` fields holding
``--galaxies-per-field`` galaxies each.  The catalogue is dealt into N shards
(N = 2 and 4) by :func:`galpipe.catalogue.shard_catalogue`, once per galaxy
(round-robin by ``objid``: the old dealing) and once grouped by field (what the
catalogue stage now does for ``sdss-frames``, ``SdssSource.shard_group_columns``).
Each shard runs :func:`galpipe.sources.sdss_cutouts.fetch_cutouts` with its own
frame cache, as shard jobs on different machines do (jobs sharing one cache
but running at the same time race to the same frames the same way).  The
server's log gives, per run:

* frames per field: frame downloads / (distinct fields x bands); goal <= 1.05;
* MB per galaxy: frame bytes downloaded / galaxies.

``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` are removed before NumPy is
imported (the script re-executes itself without them and says so).

Usage: ``python benchmarks/bench_sdss_frames.py [--fields 16] [--galaxies-per-field 2]
[--bands r] [--shards 2 4]``.  Rendering a frame takes about 2-3 s (once per frame,
before the timed runs), decoding one about 1 s per shard that fetches it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _benchenv import environment_note, reexec_without_openblas_overrides

reexec_without_openblas_overrides()

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from galpipe.catalogue import shard_catalogue  # noqa: E402
from galpipe.sources.sdss_cutouts import fetch_cutouts  # noqa: E402
from galpipe.testing.fakeserver import FakeSkyServer  # noqa: E402

FIELD = ("run", "rerun", "camcol", "field")
COLUMNS = ["objid", "ra", "dec", *FIELD]


def run_shards(srv: FakeSkyServer, cat: pd.DataFrame, n_shards: int, group: tuple[str, ...], bands: list[str],
               work: Path, size: int) -> dict[str, float]:
    """Fetch the cutouts of ``cat`` shard by shard (own frame cache each); the server log's figures."""
    srv.clear_log()
    t0 = time.perf_counter()
    parts = shard_catalogue(cat, n_shards, group_columns=group)
    ok = 0
    for i, part in enumerate(parts):
        man = fetch_cutouts(part, work / "cutouts", bands=bands, size=size,
                            sdss=srv.params(download={"concurrency": 4}, cutouts={"max_fill_fraction": 1.0}),
                            frame_cache_dir=work / f"frames-{i}")
        ok += int((man["status"] == "ok").sum())
    wall = time.perf_counter() - t0
    frames = [e for e in srv.log if e["endpoint"] == "frame" and e["status"] == 200]
    n_fields = len(cat[list(FIELD)].drop_duplicates())
    return {
        "frames": len(frames),
        "per_field": len(frames) / (n_fields * len(bands)),
        "mb_per_galaxy": sum(e["bytes"] for e in frames) / len(cat) / 1e6,
        "ok": ok,
        "wall": wall,
        "largest_shard": max(len(p) for p in parts),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fields", type=int, default=16, help="fields of the stand-in sky")
    parser.add_argument("--galaxies-per-field", type=int, default=2)
    parser.add_argument("--bands", nargs="+", default=["r"], help="SDSS bands fetched (each a frame per field)")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--size", type=int, default=64, help="stamp side (pixels)")
    args = parser.parse_args()
    note = environment_note()
    if note:
        print(note)
    n_gal = args.fields * args.galaxies_per_field
    with FakeSkyServer(n_galaxies=n_gal, seed=11, galaxies_per_field=args.galaxies_per_field) as srv:
        cat = srv.table[COLUMNS].copy()
        t0 = time.perf_counter()
        srv.warm(args.bands)
        print(f"{n_gal} galaxies on {args.fields} fields ({args.galaxies_per_field} per field), bands "
              f"{','.join(args.bands)}, frames {srv.frame_shape[1]}x{srv.frame_shape[0]}; "
              f"rendered {len(srv.fields) * len(args.bands)} frames in {time.perf_counter() - t0:.0f} s")
        print(f"{'dealing':<12} {'shards':>6} {'largest':>7} {'frames':>6} {'frames/field':>12} "
              f"{'MB/galaxy':>9} {'ok':>4} {'wall s':>7}")
        for n_shards in args.shards:
            for name, group in (("per galaxy", ()), ("by field", FIELD)):
                with tempfile.TemporaryDirectory(prefix="bench-frames-") as tmp:
                    r = run_shards(srv, cat, n_shards, group, list(args.bands), Path(tmp), args.size)
                print(f"{name:<12} {n_shards:>6} {r['largest_shard']:>7} {r['frames']:>6} {r['per_field']:>12.2f} "
                      f"{r['mb_per_galaxy']:>9.2f} {r['ok']:>4} {r['wall']:>7.1f}")
    print("frames/field: frame downloads per distinct field and band (goal <= 1.05); "
          "each shard job has its own frame cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
