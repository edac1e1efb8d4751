"""Per-layer summary table of a model (shapes, parameter counts, FLOPs)."""

from __future__ import annotations

from typing import Any

from galpipe.errors import ModelError
from galpipe.nn.model import Sequential


def summary_rows(model: Sequential) -> list[dict[str, Any]]:
    """One row per top-level layer of a built model.

    Returns
    -------
    list of dict
        Keys ``layer`` (``"<index>.<type>"``, the parameter-name prefix), ``type``,
        ``output_shape`` (per-sample tuple), ``params`` (trainable scalars,
        containers include their children) and ``flops`` (forward FLOPs per
        sample, multiply-add = 2).
    """
    if not isinstance(model, Sequential) or not model.built:
        raise ModelError("summary: expected a built Sequential model")
    return [
        {
            "layer": prefix,
            "type": layer.type_name,
            "output_shape": tuple(layer.output_shape or ()),
            "params": layer.n_params(),
            "flops": layer.flops(),
        }
        for prefix, layer in model.named_children()
    ]


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def summary(model: Sequential) -> str:
    """A text table of :func:`summary_rows` with the input shape and totals."""
    rows = summary_rows(model)
    header = ("layer", "type", "output shape", "params", "FLOPs")
    body = [
        (
            r["layer"],
            r["type"],
            "(" + ", ".join(str(d) for d in r["output_shape"]) + ")",
            _fmt_int(r["params"]),
            _fmt_int(r["flops"]),
        )
        for r in rows
    ]
    total_params = sum(r["params"] for r in rows)
    total_flops = sum(r["flops"] for r in rows)
    n_buffers = sum(int(b.size) for b in model.state.values())
    widths = [max(len(header[i]), *(len(row[i]) for row in body)) for i in range(5)]

    def line(cells: tuple[str, ...]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:3], widths[:3], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[3:], widths[3:], strict=True)]
        return "  ".join(left + right).rstrip()

    rule = "-" * len(line(tuple(" " * w for w in widths)).ljust(sum(widths) + 8))
    out = [
        f"input shape: ({', '.join(str(d) for d in model.input_shape or ())})",
        line(header),
        rule,
        *(line(r) for r in body),
        rule,
        f"total params: {_fmt_int(total_params)}",
        f"non-trainable buffers: {_fmt_int(n_buffers)}",
        f"forward FLOPs per sample: {_fmt_int(total_flops)}",
    ]
    return "\n".join(out)
