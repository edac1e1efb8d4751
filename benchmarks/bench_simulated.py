"""Speed of the simulated survey's catalogue (galpipe.sources.simulated.simulate_catalogue).

Times ``simulate_catalogue({"n_galaxies": N}, seed=4, bands=["g", "r", "i"])`` for each
``--sizes`` entry (default 10,000 and 100,000 galaxies), the median of ``--reps``
repetitions, and prints galaxies per second.  The 100,000-galaxy catalogue has a
budget of 20 s, the bound ``tests/test_simulated.py`` used to assert.

``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` (set by some environments, they slow
OpenBLAS down) are removed before NumPy is imported: the script re-executes itself
without them and says so, as ``benchmarks/bench_nn.py`` does.

Usage: ``python benchmarks/bench_simulated.py [--sizes 10000,100000] [--reps 3]``.
Exit status 1 if the 100,000-galaxy catalogue is over its budget.
"""

from __future__ import annotations

import os
import sys

from _benchenv import environment_note, reexec_without_openblas_overrides

reexec_without_openblas_overrides()

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from galpipe.sources.simulated import simulate_catalogue  # noqa: E402

#: Seconds for 100,000 galaxies that tests/test_simulated.py asserted.
BUDGET_100K_S = 20.0
BANDS = ["g", "r", "i"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated catalogue sizes")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    if environment_note():
        print(environment_note())
    else:
        print("environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE were not set")
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    simulate_catalogue({"n_galaxies": 100}, seed=4, bands=BANDS)  # warm-up (imports, caches)
    failed = False
    for n in sizes:
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            cat = simulate_catalogue({"n_galaxies": n}, seed=4, bands=BANDS)
            times.append(time.perf_counter() - t0)
        assert len(cat) == n
        t = statistics.median(times)
        verdict = ""
        if n == 100_000:
            ok = t < BUDGET_100K_S
            failed |= not ok
            verdict = f"  (budget {BUDGET_100K_S:.0f} s: {'PASS' if ok else 'FAIL'})"
        print(f"simulate_catalogue {n:>9,} galaxies {t:8.3f} s  {n / t:12,.0f} galaxies/s{verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
