"""What a result follows from: code, inputs, configuration and the numerical environment.

* :func:`code_digest` - a hash of the galpipe source a stage runs: the stage's
  module and every galpipe module it imports, transitively (imports inside
  functions included), plus the package data it reads (schemas, templates,
  presets).  The Snakemake rules carry it as a param, so a change to that code
  reruns that stage and everything after it, and nothing else.
* :func:`shard_input_digests` - per catalogue shard, a hash of the content of the
  local files the source makes that shard's cutouts from (images), so that a
  replaced image reruns exactly its shard.
* :func:`environment` - NumPy and the BLAS library, its kernel and thread count,
  galpipe's worker count: the conditions under which outputs are bit-identical.
* :func:`provenance` - all of it, stored in every ``model.json`` and
  ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import re
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from galpipe import __version__

PathLike = str | os.PathLike[str]
PACKAGE_ROOT = Path(__file__).resolve().parent
#: Package data every stage may read (the config schemas, the report templates, the presets).
PACKAGE_DATA = ("schemas", "templates", "architectures")


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of galpipe module ``name`` under ``root`` (a package's ``__init__.py``)."""
    parts = name.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _galpipe_imports(path: Path, name: str) -> set[str]:
    """Every ``galpipe...`` module ``path`` imports (top level or inside functions), parents included."""
    st = path.stat()
    return set(_imports_of(path, name, st.st_mtime_ns, st.st_size))


_FROM = re.compile(r"^[ \t]*from[ \t]+(galpipe(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]*)", re.M)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+([^\n#]*)", re.M)


@cache
def _imports_of(path: Path, name: str, mtime_ns: int, size: int) -> frozenset[str]:
    """:func:`_galpipe_imports`, read once per file version (a Snakefile asks for every stage).

    A line-based scan of ``from galpipe... import ...`` and ``import galpipe...`` statements,
    indented ones (inside functions) included: ten times faster than parsing the file, which
    matters because the Snakefile computes it on every start.  galpipe uses no relative imports.
    """
    text = path.read_text(encoding="utf-8")
    found: set[str] = set()
    for mod, names in _FROM.findall(text):
        found.add(mod)
        for item in names.strip("()").replace("\n", ",").split(","):
            item = item.split("#")[0].strip().split(" as ")[0].strip()
            if item.isidentifier():
                found.add(f"{mod}.{item}")  # `from galpipe.stages import train` may name a module
    for names in _IMPORT.findall(text):
        for item in names.split(","):
            mod = item.strip().split(" as ")[0].strip()
            if mod.split(".")[0] == "galpipe":
                found.add(mod)
    with_parents = set()
    for mod in found:
        parts = mod.split(".")
        with_parents |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)}
    return frozenset(with_parents)


def module_closure(modules: Iterable[str], root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """The galpipe modules ``modules`` import, transitively, with their files (parent packages included)."""
    todo: list[str] = []
    for name in modules:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = name.split(".")
        todo += [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name, root)
        if path is None:
            continue  # a name imported from a module, not a module
        seen[name] = path
        todo.extend(_galpipe_imports(path, name) - set(seen))
    return seen


@cache
def code_digest(modules: tuple[str, ...], root: Path = PACKAGE_ROOT) -> str:
    """SHA-256 (16 hex digits) of the source of ``modules``, what they import, and the package data.

    Parameters
    ----------
    modules : tuple of str
        Entry modules, e.g. ``("galpipe.stages.train",)``.
    root : path
        The ``galpipe`` package folder (tests point it at a copy).
    """
    h = hashlib.sha256()
    for name, path in sorted(module_closure(modules, root).items()):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    for folder in PACKAGE_DATA:
        for path in sorted((root / folder).glob("*")):
            if path.is_file():
                h.update(f"{folder}/{path.name}".encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stage_code_digest(stage: str, source_module: str | None = None) -> str:
    """:func:`code_digest` of a pipeline stage (and, for catalogue/cutouts, the configured source's module)."""
    mods = [f"galpipe.stages.{stage}", "galpipe.smk"]
    if source_module:
        mods.append(source_module)
    return code_digest(tuple(mods))


def shard_input_digests(files_by_shard: Iterable[Iterable[PathLike]]) -> list[str]:
    """Per shard, SHA-256 (16 hex digits) over the names and contents of its input files ("" for none)."""
    from galpipe.io.atomic import file_sha256

    out = []
    for files in files_by_shard:
        files = sorted(str(f) for f in files)
        if not files:
            out.append("")
            continue
        h = hashlib.sha256()
        for f in files:
            try:
                content = file_sha256(f)
            except OSError as exc:  # the cutouts stage reports the file; the digest only has to differ
                content = f"unreadable: {exc.strerror}"
            h.update(f"{f}\0{content}\0".encode())
        out.append(h.hexdigest()[:16])
    return out


def files_digest(paths: Iterable[PathLike]) -> str:
    """SHA-256 (16 hex digits) of the contents of ``paths`` in order (e.g. a model's split files)."""
    from galpipe.io.atomic import file_sha256

    h = hashlib.sha256()
    for p in paths:
        h.update(file_sha256(p).encode())
    return h.hexdigest()[:16]


def environment() -> dict[str, Any]:
    """NumPy, the BLAS library (name, version, kernel, threads) and galpipe's worker count.

    Outputs are bit-identical across runs with the same code, config, data and
    these values; another BLAS kernel or worker count rounds differently.
    """
    import numpy as np
    from threadpoolctl import threadpool_info

    from galpipe.nn.fast.threads import get_num_workers

    keys = ("internal_api", "version", "architecture", "threading_layer", "num_threads")
    loaded = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    # NumPy's own BLAS (a wheel bundles it in numpy.libs): the one galpipe.nn's products use.
    # Other BLAS copies (SciPy's, loaded on first use) would make the record depend on what the
    # process happened to import before; only when none is NumPy's are all of them listed.
    numpy_dir = os.path.dirname(os.path.realpath(np.__file__))
    prefixes = (numpy_dir + os.sep, numpy_dir + ".libs" + os.sep)
    own = [info for info in loaded if os.path.realpath(str(info.get("filepath", ""))).startswith(prefixes)]
    blas = sorted(({k: info.get(k) for k in keys} for info in (own or loaded)),
                  key=lambda b: json.dumps(b, sort_keys=True, default=str))  # load order varies between runs
    return {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
            "blas": blas, "galpipe_workers": get_num_workers(),
            "openblas_env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                             if os.environ.get(k)}}


def provenance(stage: str, params: Mapping[str, Any], data_files: Iterable[PathLike]) -> dict[str, Any]:
    """The provenance block of a model or metrics file.

    Parameters
    ----------
    stage : str
        ``"train"`` or ``"evaluate"``.
    params : mapping
        The stage's params (what its rule tracks); hashed as the config hash.
    data_files : iterable of path-like
        The data the stage read (split files); hashed as the data hash.
    """
    return {
        "galpipe_version": __version__,
        "code_digest": stage_code_digest(stage),
        "config_digest": hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "data_digest": files_digest(data_files),
        "environment": environment(),
    }


def source_module(name: str) -> str | None:
    """The module defining source ``name`` (built in or registered), for :func:`stage_code_digest`."""
    from galpipe.sources import BUILTIN_SOURCES, source_class

    if name in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[name]
    module = source_class(name).__module__
    return module if importlib.util.find_spec(module) and module.startswith("galpipe.") else None
