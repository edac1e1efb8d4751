"""Winograd F(4x4, 3x3) against F(2x2, 3x3): inference speed (per part) and float32 accuracy.

Layers: the two Winograd convolutions of the reference CNN of ``bench_nn.py``,
``conv3x3(16->32) @ 32x32`` and ``conv3x3(32->64) @ 16x16``, each fused with ReLU and 2x2
max-pool, batch 64, float32, inference forward (``training=False``).

Speed: in ONE process, for 1 and 2 threads (``threadpoolctl.threadpool_limits``; galpipe's
workers follow the BLAS thread count, inside ``compute_region`` as in ``Sequential.forward``),
the variants -- F(2x2) (``WinogradStep.forward``, as shipped) and F(4x4) with each piece size of
``--pieces4`` (MiB of position products) -- are timed in interleaved repetitions; each
median of ``--reps``.  Then the same per part (input transform, GEMMs, output transform,
pool/emit), from instrumented runs (F(2x2): the loop of ``WinogradStep.forward`` re-run here
with timers around the same helpers; F(4x4): ``Winograd4Forward.forward(timings=)``); with
2 workers a part's time is the sum over workers divided by 2.

Accuracy: both algorithms (and im2col ``ConvStep`` for scale) in float32 against a float64
direct convolution (the 9 shifted products summed), on the two layer shapes with post-op
None: (a) weights as galpipe initialises them (He), standard normal inputs; (b) trained
weights of the shipped ``gz1`` model's convolutions of the same shapes, applied to the
activations that model computes for real normalised images (``--images``, a normalised
Parquet file; synthetic smooth images in [0, 1] when it is missing).  Errors: max |err| /
max |y| and RMS(err) / RMS(y).

``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` are removed before NumPy is imported
(``_benchenv``).  The load average is printed with the numbers: on a shared machine the
relative A/B numbers of one process are what counts.

Usage: ``python benchmarks/bench_winograd4.py [--reps 15] [--threads 1,2]
[--pieces4 0.5,1,2] [--no-accuracy] [--no-speed] [--images PATH]``.
"""

from __future__ import annotations

import os

from _benchenv import cpu_note, environment_note, reexec_without_openblas_overrides

reexec_without_openblas_overrides()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import galpipe.nn.fast.winograd as wg  # noqa: E402
import galpipe.nn.fast.winograd4 as wg4  # noqa: E402
from galpipe.nn import build_model, get_num_workers  # noqa: E402
from galpipe.nn.conv import Conv2D  # noqa: E402
from galpipe.nn.fast.conv import ConvStep  # noqa: E402
from galpipe.nn.fast.threads import compute_region  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: (name, input shape, filters) of the two Winograd layers of bench_nn.py's network.
LAYERS = (("16->32 @32x32", (32, 32, 16), 32), ("32->64 @16x16", (16, 16, 32), 64))
BATCH = 64


def load_text() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def make_conv(shape: tuple[int, int, int], filters: int, seed: int = 0) -> Conv2D:
    """A built 3x3 'same' convolution, galpipe-initialised (He)."""
    model = build_model([{"type": "conv2d", "filters": filters, "kernel_size": 3}], shape,
                        seed=seed)
    conv = model.layers[0]
    assert isinstance(conv, Conv2D)
    return conv


# -- speed -----------------------------------------------------------------------------------
def speed(reps: int, threads: list[int], pieces4: list[float]) -> None:
    rng = np.random.default_rng(0)
    default_piece = wg4.PIECE_BYTES
    for name, shape, filters in LAYERS:
        conv = make_conv(shape, filters)
        conv.params["b"][...] = rng.standard_normal(filters).astype(np.float32) * 0.1
        x = np.abs(rng.standard_normal((BATCH, *shape))).astype(np.float32)
        f2 = wg.WinogradStep(conv, "relu_pool")
        f4 = wg4.Winograd4Forward(conv, "relu_pool")
        variants: dict[str, Callable[[], np.ndarray]] = {
            "F(2x2)": lambda f2=f2, x=x: f2.forward(x)}
        timed: dict[str, Callable[[dict[str, float]], np.ndarray]] = {
            "F(2x2)": lambda tm, f2=f2, x=x: f2.forward(x, timings=tm)}
        for mib in pieces4:
            def run4(mib: float = mib, f4: wg4.Winograd4Forward = f4,
                     x: np.ndarray = x) -> np.ndarray:
                wg4.PIECE_BYTES = int(mib * (1 << 20))
                return f4.forward(x)

            def run4_timed(tm: dict[str, float], mib: float = mib,
                           f4: wg4.Winograd4Forward = f4, x: np.ndarray = x) -> np.ndarray:
                wg4.PIECE_BYTES = int(mib * (1 << 20))
                return f4.forward(x, timings=tm)

            variants[f"F(4x4) {mib:g} MiB"] = run4
            timed[f"F(4x4) {mib:g} MiB"] = run4_timed
        for nt in threads:
            with threadpool_limits(nt), compute_region():
                workers = get_num_workers()
                ref = f2.forward(x)
                for key, fn in variants.items():  # warm-up and agreement
                    diff = float(np.abs(fn() - ref).max() / np.abs(ref).max())
                    assert diff < 1e-4, (key, diff)
                totals: dict[str, list[float]] = {k: [] for k in variants}
                parts: dict[str, dict[str, list[float]]] = {
                    k: {p: [] for p in wg4.PARTS} for k in variants}
                load0 = load_text()
                for _ in range(reps):
                    for key, fn in variants.items():
                        t0 = time.perf_counter()
                        fn()
                        totals[key].append(time.perf_counter() - t0)
                    for key, fn_t in timed.items():
                        tm: dict[str, float] = {}
                        fn_t(tm)
                        for p in wg4.PARTS:
                            parts[key][p].append(tm.get(p, 0.0) / workers)
                print(f"\nlayer {name}, batch {BATCH}, relu_pool, {nt} thread(s) "
                      f"({workers} workers), median of {reps}; load average {load0} -> "
                      f"{load_text()}")
                print(f"  {'variant':<18}{'total ms':>9}{'vs F2':>7} | "
                      + "".join(f"{p:>8}" for p in wg4.PARTS) + "  (ms, per part)")
                base = statistics.median(totals["F(2x2)"])
                for key in variants:
                    med = statistics.median(totals[key])
                    per = "".join(f"{statistics.median(parts[key][p]) * 1e3:8.2f}"
                                  for p in wg4.PARTS)
                    print(f"  {key:<18}{med * 1e3:9.2f}{base / med:6.2f}x | {per}")
        wg4.PIECE_BYTES = default_piece


# -- accuracy --------------------------------------------------------------------------------
def direct64(conv: Conv2D, x: np.ndarray) -> np.ndarray:
    """Float64 direct 3x3 'same' convolution of ``x`` ``(N, H, W, C)``: ``(N, H, W, F)``."""
    w = conv.params["W"].astype(np.float64)
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    n, h, wd, _ = x.shape
    y = np.zeros((n, h, wd, w.shape[3]))
    for i in range(3):
        for j in range(3):
            y += xp[:, i : i + h, j : j + wd] @ w[i, j]
    if conv.use_bias:
        y += conv.params["b"].astype(np.float64)
    return y


def errors(conv: Conv2D, x: np.ndarray) -> dict[str, tuple[float, float]]:
    """(max |err| / max |y|, RMS(err) / RMS(y)) of each float32 algorithm."""
    x32 = x.astype(np.float32)
    ref = direct64(conv, x32)
    outs = {
        "im2col": ConvStep(conv).forward(x32),
        "F(2x2)": wg.WinogradStep(conv).forward(x32),
        "F(4x4)": wg4.Winograd4Forward(conv).forward(x32),
    }
    scale, rms = np.abs(ref).max(), np.sqrt(np.mean(ref**2))
    return {k: (float(np.abs(v - ref).max() / scale), float(np.sqrt(np.mean((v - ref) ** 2)) / rms))
            for k, v in outs.items()}


def trained_cases(images: Path) -> list[tuple[str, Conv2D, np.ndarray]]:
    """The shipped gz1 model's convolutions of the two shapes and their real inputs."""
    from galpipe.nn.persist import load_model

    model, _ = load_model(ROOT / "galpipe" / "models" / "gz1")
    if images.is_file():
        from galpipe.stages.normalise import read_images

        x, _ = read_images(images)
        x, source = x[:BATCH].astype(np.float32), f"{images.name} ({min(len(x), BATCH)} images)"
    else:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[-1:1:64j, -1:1:64j]
        blobs = [np.exp(-((xx - rng.uniform(-.3, .3)) ** 2 + (yy - rng.uniform(-.3, .3)) ** 2)
                        / rng.uniform(.02, .2)) for _ in range(BATCH)]
        x = (np.stack(blobs)[..., None] * rng.uniform(.5, 1, (BATCH, 1, 1, 3))).astype(np.float32)
        source = "synthetic blobs (no --images file)"
    wanted = {(shape, f): name for name, shape, f in LAYERS}
    cases = []
    for layer in model.layers:
        if isinstance(layer, Conv2D) and (layer.input_shape, layer.filters) in wanted:
            key = (layer.input_shape, layer.filters)
            cases.append((f"{wanted.pop(key)} gz1 trained, {source}; input max "
                          f"{float(np.abs(x).max()):.2f}", layer, x.copy()))
        x = layer.forward(x, training=False)
    return cases


def accuracy(images: Path) -> None:
    rng = np.random.default_rng(1)
    print("\nfloat32 accuracy against a float64 direct convolution (post-op None): "
          "max|err|/max|y|, RMS(err)/RMS(y)")
    cases: list[tuple[str, Conv2D, np.ndarray]] = []
    for name, shape, filters in LAYERS:
        cases.append((f"{name} He init, N(0,1) input", make_conv(shape, filters, seed=3),
                      rng.standard_normal((16, *shape))))
    cases += trained_cases(images)
    for label, conv, x in cases:
        err = errors(conv, x)
        print(f"  {label}")
        print("    " + "   ".join(f"{k}: {a:.2e}, {r:.2e}" for k, (a, r) in err.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--pieces4", default="0.5,1,2",
                        help="F(4x4) piece sizes, MiB of position products (comma list)")
    parser.add_argument("--images", type=Path,
                        default=ROOT / "results" / "gz1-sdss-jpeg" / "normalised" / "0000.parquet")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    args = parser.parse_args()
    # "F(2x2)" below is WinogradStep itself: keep it off the F(4x4) dispatch; F(4x4) runs
    # through Winograd4Forward directly
    wg.USE_F4_INFERENCE = False
    note = environment_note()
    if note:
        print(note)
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, load average {load_text()}, "
          f"F(2x2) PIECE_BYTES {wg.PIECE_BYTES >> 10} KiB")
    print(cpu_note())
    if not args.no_accuracy:
        accuracy(args.images)
    if not args.no_speed:
        speed(args.reps, [int(t) for t in args.threads.split(",")],
              [float(p) for p in args.pieces4.split(",")])


if __name__ == "__main__":
    main()
