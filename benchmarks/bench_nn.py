"""Speed of galpipe.nn against PyTorch (CPU) on the reference galaxy CNN.

Network (channels-last 64x64x3 float32 input, batch 64)::

    conv3x3(3->16)+ReLU+maxpool2, conv3x3(16->32)+ReLU+maxpool2,
    conv3x3(32->64)+ReLU+maxpool2, flatten, dense(4096->128)+ReLU, dense(128->3)

Measured, for 1 and 2 threads (``threadpoolctl.threadpool_limits``; galpipe's
batch-chunk workers follow the BLAS thread count): training steps/s and images/s
(forward, softmax cross-entropy, backward, Adam step) and inference images/s,
each the median of ``--reps`` repetitions after warm-up.  If ``torch`` is
importable, the identical network (same weights, checked) runs in PyTorch in the
same process with ``torch.set_num_threads`` matching, in both channels-last and
NCHW memory formats; ratios galpipe/PyTorch are reported against the *faster*
PyTorch variant.  The libraries alternate in blocks of ``--steps`` calls, each block
after one untimed call of its own (the previous library's threads may still be spinning).

It also prints a *GEMM floor*: the network's matrix products alone (forward
patches x kernels, weight and input gradients), each timed as cache-sized
single-threaded ``np.dot`` pieces, i.e. the least time an im2col + BLAS
implementation spends before any copying, pooling or optimizer work; and how
much time galpipe spends beyond it, against the whole of PyTorch's step.

``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` (set by some environments, they
halve OpenBLAS matmul speed) are removed before NumPy is imported: the script
re-executes itself without them and says so.

It also prints, per run and thread count above 1, how much faster perfectly parallel
work runs on that many workers than on one (the cores really free at that moment), and
galpipe's own 1 -> n thread scaling (wall clock and CPU time per step).

It also prints the ratios of ``--runs`` whole measurements (best and median), the
share of the GEMM peak (a 2048^3 sgemm timed in the same run; galpipe's FLOPs counted
as direct convolution), and the time of every part of one training step (each
execution-plan step forward and backward, loss, optimizer) and of one inference batch
(each plan step's inference forward) at each thread count.

Usage: ``python benchmarks/bench_nn.py [--reps 7] [--steps 10] [--runs 3]
[--threads 1,2] [--no-torch] [--profile]``.
"""

from __future__ import annotations

import os

from _benchenv import cpu_note, environment_note, reexec_without_openblas_overrides

reexec_without_openblas_overrides()

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from galpipe.nn import (  # noqa: E402
    Adam,
    SoftmaxCrossEntropy,
    build_model,
    flatten_parameters,
    get_num_workers,
)
from galpipe.nn.fast.threads import compute_region, parallel_chunks  # noqa: E402

SPEC: list[dict | str] = [
    {"type": "conv2d", "filters": 16, "kernel_size": 3},
    "relu",
    {"type": "maxpool2d", "pool_size": 2},
    {"type": "conv2d", "filters": 32, "kernel_size": 3},
    "relu",
    {"type": "maxpool2d", "pool_size": 2},
    {"type": "conv2d", "filters": 64, "kernel_size": 3},
    "relu",
    {"type": "maxpool2d", "pool_size": 2},
    "flatten",
    {"type": "dense", "units": 128},
    "relu",
    {"type": "dense", "units": 3},
]
INPUT_SHAPE = (64, 64, 3)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_calls(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """Wall-clock and process-CPU seconds per call of ``fn`` over ``calls`` calls."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls, (time.process_time() - c0) / calls


def gemm_shapes(batch: int) -> dict[str, list[tuple[str, int, int, int]]]:
    """The matrix products an im2col implementation of the network must do.

    Each is ``(kind, M, K, N)``: ``"rows"`` is ``(M, K) @ (K, N)`` with ``M`` the long
    dimension (forward patches times kernel; input gradients as the correlation of
    the output gradient with the flipped kernel, ``(N*H*W, kh*kw*F) @ (kh*kw*F, C)``),
    ``"reduce"`` is ``(K, M) @ (M, N)`` summed over the long ``M`` (weight
    gradients).  ``forward`` lists one per convolution (with the bias row) and dense
    layer; ``backward`` the weight gradients of every layer and the input gradients
    of every layer but the first.
    """
    model = build_model(SPEC, INPUT_SHAPE, seed=0)
    fwd: list[tuple[str, int, int, int]] = []
    bwd: list[tuple[str, int, int, int]] = []
    shape = INPUT_SHAPE
    first = True
    for layer in model.layers:
        out = layer.output_shape
        if layer.type_name == "conv2d":
            (h, w, c), (ho, wo, f) = shape, out
            kh, kw = layer.kernel_size
            m, k = batch * ho * wo, kh * kw * c + 1
            fwd.append(("rows", m, k, f))
            bwd.append(("reduce", m, k, f))
            if not first:
                bwd.append(("rows", batch * h * w, kh * kw * f, c))
            first = False
        elif layer.type_name == "dense":
            (k,), (f,) = shape, out
            fwd.append(("rows", batch, k + 1, f))
            bwd.append(("reduce", batch, k + 1, f))
            if not first:
                bwd.append(("rows", batch, f, k))
            first = False
        shape = out
    return {"forward": fwd, "backward": bwd}


def gemm_floor_seconds(batch: int, reps: int) -> tuple[float, float]:
    """(training, inference) seconds per step of the network's GEMMs alone, 1 thread.

    Every product is timed as C-contiguous float32 ``np.dot`` calls over pieces of
    its long dimension (the whole batch, or 1k-16k rows: cache-sized pieces are
    faster), keeping the fastest piece size; median of ``reps``.  No im2col,
    pooling, activation, loss or optimizer work is included, so this estimates the
    least time any NumPy/BLAS im2col implementation of the network needs here.
    """
    rng = np.random.default_rng(1)
    shapes = gemm_shapes(batch)
    per: dict[tuple[str, int, int, int], float] = {}
    with threadpool_limits(limits=1):
        for kind, m, k, n in {s for v in shapes.values() for s in v}:
            best = float("inf")
            for rows in sorted({m, *(r for r in (1024, 2048, 4096, 8192, 16384) if r < m)}):
                count = -(-m // rows)
                if kind == "rows":
                    a = rng.standard_normal((rows, k), dtype=np.float32)
                    b = rng.standard_normal((k, n), dtype=np.float32)
                else:
                    a = rng.standard_normal((k, rows), dtype=np.float32)
                    b = rng.standard_normal((rows, n), dtype=np.float32)
                out = np.empty((a.shape[0], n), dtype=np.float32)
                np.dot(a, b, out=out)
                samples = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    np.dot(a, b, out=out)
                    samples.append(time.perf_counter() - t0)
                best = min(best, statistics.median(samples) * m / rows if count > 1 else
                           statistics.median(samples))
            per[(kind, m, k, n)] = best
    infer = sum(per[s] for s in shapes["forward"])
    return infer + sum(per[s] for s in shapes["backward"]), infer


def sgemm_peak_gflops(threads: int, size: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of a ``size``-cubed float32 ``np.matmul`` at ``threads`` BLAS threads."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    with threadpool_limits(limits=threads):
        np.matmul(a, b, out=out)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def parallel_calibration(workers: int, reps: int = 5) -> float:
    """Speed-up of ``workers`` over one worker on perfectly parallel work (independent
    single-threaded 384^3 sgemms spread by :func:`parallel_chunks`; interleaved, medians):
    how many cores the machine really gives this process now (``workers`` when all are
    free).  galpipe's and PyTorch's multi-thread numbers mean little when it is ~1."""
    a = np.random.default_rng(1).standard_normal((8, 384, 384)).astype(np.float32)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            a[i] @ a[i]

    times: dict[int, list[float]] = {1: [], workers: []}
    with threadpool_limits(limits=1):
        for _ in range(reps + 1):
            for w in times:
                t0 = time.perf_counter()
                parallel_chunks(work, len(a), workers=w)
                times[w].append(time.perf_counter() - t0)
    return statistics.median(times[1][1:]) / statistics.median(times[workers][1:])


def network_flops(batch: int) -> tuple[float, float]:
    """(training, inference) FLOPs per step counted as direct convolution / dense products
    (multiply-add = 2): forward, plus weight and input gradients (none for the first layer)."""
    shapes = gemm_shapes(batch)
    fwd = sum(2.0 * m * k * n for _, m, k, n in shapes["forward"])
    bwd = sum(2.0 * m * k * n for _, m, k, n in shapes["backward"])
    return fwd + bwd, fwd


#: Prefix of :func:`time_parts`' keys for the parts of an inference forward.
INFER = "infer: "


def time_parts(x: np.ndarray, y: np.ndarray, reps: int) -> dict[str, float]:
    """Median ms of every part: of a training step, each execution-plan step's forward
    (training mode) and backward, the loss (forward + backward) and the optimizer; of an
    inference forward (keys starting with :data:`INFER`), each plan step's forward."""
    model = build_model(SPEC, INPUT_SHAPE, seed=0)
    flatten_parameters(model)
    opt = Adam(model.params, lr=1e-3)
    loss = SoftmaxCrossEntropy()
    plan = model._plan
    assert plan is not None
    names = []
    for step, idx in plan:
        kind = getattr(step, "kind", None) if step is not model.layers[idx[0]] else None
        algo = getattr(step, "algorithm", "im2col") if kind and kind.startswith("conv") else ""
        label = kind or model.layers[idx[0]].type_name
        names.append(f"{label}{' ' + algo if algo else ''} [{idx[0]}-{idx[-1]}]")
    samples: dict[str, list[float]] = {}

    def note(key: str, t0: float) -> None:
        samples.setdefault(key, []).append(time.perf_counter() - t0)

    for rep in range(reps + 1):
        with compute_region():
            for i, layer in enumerate(model.layers):
                layer.input_grad_needed = i > 0
            h = x
            for (step, _), name in zip(plan, names, strict=True):
                t0 = time.perf_counter()
                h = step.forward(h, True)
                note(f"{name} fwd", t0)
            t0 = time.perf_counter()
            loss.forward(h, y)
            d = loss.backward()
            note("loss", t0)
            for (step, _), name in reversed(list(zip(plan, names, strict=True))):
                t0 = time.perf_counter()
                d = step.backward(d)
                note(f"{name} bwd", t0)
            t0 = time.perf_counter()
            opt.step(model.grads)
            note("optimizer (Adam)", t0)
            h = x  # the inference forward, step by step
            for (step, _), name in zip(plan, names, strict=True):
                t0 = time.perf_counter()
                h = step.forward(h, False)
                note(f"{INFER}{name}", t0)
        if rep == 0:
            samples.clear()  # warm-up
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def galpipe_impl(
    x: np.ndarray, y: np.ndarray
) -> tuple[Callable[[], None], Callable[[], None], Callable[[int], None]]:
    """(train_step, infer, profile) closures for galpipe."""
    model = build_model(SPEC, INPUT_SHAPE, seed=0)
    flatten_parameters(model)  # as galpipe.nn.training does: Adam on one flat buffer
    opt = Adam(model.params, lr=1e-3)
    loss = SoftmaxCrossEntropy()

    def train_step() -> None:
        logits = model.forward(x, training=True)
        loss.forward(logits, y)
        model.backward(loss.backward(), input_grad=False)
        opt.step(model.grads)

    def infer() -> None:
        model.forward(x, training=False)

    def profile(steps: int) -> None:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            train_step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)

    return train_step, infer, profile


def torch_net(torch: Any, weights_from: dict[str, np.ndarray]) -> Any:
    """The same network in PyTorch, with galpipe's initial weights copied in."""
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4096, 128), nn.ReLU(), nn.Linear(128, 3),
    )
    with torch.no_grad():
        for idx in (0, 3, 6):
            w = weights_from[f"{idx}.conv2d.W"].transpose(3, 2, 0, 1)
            net[idx].weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            net[idx].bias.copy_(torch.from_numpy(weights_from[f"{idx}.conv2d.b"]))
        # galpipe flattens (h, w, c); torch flattens (c, h, w)
        w1 = weights_from["10.dense.W"].reshape(8, 8, 64, 128).transpose(3, 2, 0, 1)
        net[10].weight.copy_(torch.from_numpy(np.ascontiguousarray(w1.reshape(128, 4096))))
        net[10].bias.copy_(torch.from_numpy(weights_from["10.dense.b"]))
        net[12].weight.copy_(torch.from_numpy(np.ascontiguousarray(weights_from["12.dense.W"].T)))
        net[12].bias.copy_(torch.from_numpy(weights_from["12.dense.b"]))
    return net


def torch_impl(
    torch: Any, x: np.ndarray, y: np.ndarray, channels_last: bool
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(train_step, infer) closures for the same network in PyTorch (weights checked)."""
    ref = build_model(SPEC, INPUT_SHAPE, seed=0)
    net = torch_net(torch, ref.params)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)  # NCHW view of the NHWC memory
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        xt = xt.contiguous(memory_format=torch.channels_last)
    else:
        xt = xt.contiguous()
    with torch.no_grad():
        diff = float(np.max(np.abs(net(xt).numpy() - ref.forward(x))))
    if not diff < 1e-3:
        raise SystemExit(f"PyTorch network differs from galpipe's: max |logit diff| {diff}")
    yt = torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    lossf = torch.nn.CrossEntropyLoss()

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        lossf(net(xt), yt).backward()
        opt.step()

    def infer() -> None:
        with torch.no_grad():
            net(xt)

    return train_step, infer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7, help="repetitions (median; >= 5)")
    parser.add_argument("--steps", type=int, default=10, help="calls per repetition")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--profile", action="store_true", help="cProfile galpipe training")
    parser.add_argument("--runs", type=int, default=3, help="whole measurements (best/median)")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]

    if environment_note():
        print(environment_note())
    else:
        print("environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE were not set")
    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(cpu_note())
    for info in threadpool_info():
        print(f"threadpool: {info.get('user_api')} {info.get('internal_api')} "
              f"{info.get('version')} ({info.get('architecture', '?')}, "
              f"{info.get('num_threads')} threads) {os.path.basename(info.get('filepath', ''))}")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, *INPUT_SHAPE)).astype(np.float32)
    y = rng.integers(0, 3, args.batch)

    # galpipe alone first (before PyTorch is imported) for its peak memory
    for n in threads:
        with threadpool_limits(limits=n):
            g_train, g_infer, _ = galpipe_impl(x, y)
            time_calls(g_train, 3)
            time_calls(g_infer, 3)
    rss_galpipe = peak_rss_mib()
    print(f"peak RSS with galpipe alone (before importing PyTorch): {rss_galpipe:.0f} MiB")

    torch = None
    if not args.no_torch:
        try:
            import torch  # type: ignore[no-redef]
        except ImportError:
            print("torch not importable: PyTorch comparison skipped")
    if torch is not None:
        print(f"torch {torch.__version__} (threads set with torch.set_num_threads to match)")

    # Implementations are timed in interleaved repetitions (galpipe, torch, galpipe, ...)
    # so that load from other processes affects all of them alike; the whole measurement
    # is repeated --runs times (best and median of the runs' ratios are reported).  Each
    # timed block starts with one untimed call: PyTorch's OpenMP (libgomp) threads keep
    # spinning on a core for milliseconds after its last call, so the first call of the
    # next block ran slower (measured, 2 threads: galpipe's first inference call after a
    # PyTorch block 22.3 ms against 16.2 ms; a block of 10 calls 17.2 against 16.2 ms).
    runs: list[dict[int, dict[str, dict[str, float]]]] = []
    for run in range(args.runs):
        results: dict[int, dict[str, dict[str, float]]] = {}
        runs.append(results)
        for n in threads:
            with threadpool_limits(limits=n):
                if torch is not None:
                    torch.set_num_threads(n)
                g_train, g_infer, g_profile = galpipe_impl(x, y)
                impls: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
                    "galpipe": (g_train, g_infer)
                }
                if args.profile and run == 0:
                    g_profile(args.steps)
                if torch is not None:
                    impls["torch NHWC"] = torch_impl(torch, x, y, channels_last=True)
                    impls["torch NCHW"] = torch_impl(torch, x, y, channels_last=False)
                times: dict[str, dict[str, list[float]]] = {
                    k: {"train": [], "infer": [], "train_cpu": [], "infer_cpu": []} for k in impls
                }
                for mode, idx in (("train", 0), ("infer", 1)):
                    for fns in impls.values():
                        time_calls(fns[idx], 3)  # warm-up
                    for _ in range(args.reps):
                        for name, fns in impls.items():
                            fns[idx]()  # untimed: absorbs the previous library's spinning threads
                            wall, cpu = time_calls(fns[idx], args.steps)
                            times[name][mode].append(wall)
                            times[name][f"{mode}_cpu"].append(cpu)
                results[n] = {
                    name: {m: statistics.median(v) for m, v in t.items()}
                    for name, t in times.items()
                }
                calib = (f", independent GEMMs on {n} workers ran {parallel_calibration(n):.2f}x "
                         f"faster than on 1 (ideal {n}.00)" if n > 1 else "")
                print(f"[run {run + 1}/{args.runs}, {n} thread(s): galpipe workers="
                      f"{get_num_workers()}, load average {os.getloadavg()[0]:.2f} (other "
                      f"processes compete for the CPUs when > {n}){calib}]")
    results = {n: {name: {m: statistics.median(r[n][name][m] for r in runs) for m in v}
                   for name, v in runs[0][n].items()} for n in threads}

    b = args.batch
    print()
    print(f"batch {b}, input {INPUT_SHAPE}, median of {args.reps} x {args.steps} calls, "
          f"median over {args.runs} runs")
    print(f"{'threads':>7}  {'impl':<11} {'train step/s':>12} {'train img/s':>11} "
          f"{'infer img/s':>11}   {'CPU ms/train step':>17} {'CPU ms/infer batch':>18}")
    for n, res in results.items():
        for impl, r in res.items():
            print(f"{n:>7}  {impl:<11} {1 / r['train']:>12.2f} {b / r['train']:>11.0f} "
                  f"{b / r['infer']:>11.0f}   {1e3 * r['train_cpu']:>17.1f} "
                  f"{1e3 * r['infer_cpu']:>18.1f}")
    if torch is not None:
        print()
        print(f"ratio galpipe/PyTorch (wall clock, vs the faster PyTorch layout, higher is "
              f"better), best and median of {args.runs} runs:")
        print(f"{'threads':>7}  {'train best':>10} {'train median':>12}  {'infer best':>10} "
              f"{'infer median':>12}")
        for n in threads:
            ratios: dict[str, list[float]] = {"train": [], "infer": []}
            for res in (r[n] for r in runs):
                for mode in ratios:
                    best_torch = min(res["torch NHWC"][mode], res["torch NCHW"][mode])
                    ratios[mode].append(best_torch / res["galpipe"][mode])
            print(f"{n:>7}  {max(ratios['train']):>9.2f}x {statistics.median(ratios['train']):>11.2f}x"
                  f"  {max(ratios['infer']):>9.2f}x {statistics.median(ratios['infer']):>11.2f}x")
    if 1 in results:
        for n in (t for t in threads if t > 1):
            g1, gn = results[1]["galpipe"], results[n]["galpipe"]
            print(f"galpipe scaling 1 -> {n} threads (median of runs): training "
                  f"{g1['train'] / gn['train']:.2f}x (CPU per step {gn['train_cpu'] / g1['train_cpu']:.2f}x), "
                  f"inference {g1['infer'] / gn['infer']:.2f}x (CPU per batch "
                  f"{gn['infer_cpu'] / g1['infer_cpu']:.2f}x)")
    flops_train, flops_infer = network_flops(b)
    print()
    for n in threads:
        peak = sgemm_peak_gflops(n)
        g = results[n]["galpipe"]
        eff_t, eff_i = flops_train / g["train"] / 1e9, flops_infer / g["infer"] / 1e9
        print(f"share of GEMM peak, {n} thread(s): sgemm 2048^3 peak {peak:.1f} GFLOP/s; galpipe "
              f"training {eff_t:.1f} GFLOP/s ({100 * eff_t / peak:.0f}%), inference "
              f"{eff_i:.1f} GFLOP/s ({100 * eff_i / peak:.0f}%) (FLOPs counted as direct "
              f"convolution: {flops_train / 1e9:.2f} / {flops_infer / 1e9:.2f} GFLOP per step; "
              f"Winograd does fewer)")
    for n in threads:
        with threadpool_limits(limits=n):
            parts = time_parts(x, y, max(args.reps, 5))
        for what, mine in (("one training step", lambda k: not k.startswith(INFER)),
                           ("one inference batch", lambda k: k.startswith(INFER))):
            chosen = {k.removeprefix(INFER): v for k, v in parts.items() if mine(k)}
            total = sum(chosen.values())
            print()
            print(f"time per part, {n} thread(s), {what} (median of "
                  f"{max(args.reps, 5)}; sum {total:.1f} ms):")
            for name, ms in chosen.items():
                print(f"  {name:<44} {ms:>7.2f} ms  {100 * ms / total:>4.1f}%")
    floor_train, floor_infer = gemm_floor_seconds(b, max(args.reps, 5))
    print()
    print(f"GEMM floor (1 thread; the network's matrix products alone, cache-sized np.dot pieces, "
          f"no im2col/pooling/optimizer): training {1e3 * floor_train:.1f} ms/step, inference "
          f"{1e3 * floor_infer:.1f} ms/batch")
    if 1 in results:
        g1 = results[1]["galpipe"]
        line = (f"galpipe, 1 thread: {1e3 * (g1['train'] - floor_train):.1f} ms/step and "
                f"{1e3 * (g1['infer'] - floor_infer):.1f} ms/batch beyond the GEMM floor")
        if torch is not None:
            res = results[1]
            best_train = min(res["torch NHWC"]["train"], res["torch NCHW"]["train"])
            best_infer = min(res["torch NHWC"]["infer"], res["torch NCHW"]["infer"])
            line += (f"; PyTorch's whole step takes {1e3 * best_train:.1f} ms "
                     f"({1e3 * best_infer:.1f} ms inference), so parity leaves "
                     f"{1e3 * (best_train - floor_train):.1f} ms ({1e3 * (best_infer - floor_infer):.1f} ms) "
                     f"for all im2col, pooling, activation, loss and optimizer work")
        print(line)
    print(f"peak RSS: galpipe alone {rss_galpipe:.0f} MiB; whole process at the end "
          f"{peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
