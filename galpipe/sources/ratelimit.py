"""Request budgets: token buckets for one process, or shared by every process of a run.

A run of the pipeline fetches with several jobs at once (one per catalogue
shard): separate processes under Snakemake's local executor, separate SLURM
jobs on different nodes of a cluster.  A limit kept in each process's memory
would let ``n`` jobs send ``n`` times the configured rate, so the live SDSS
source keeps its budget in a small state file instead:

* :class:`RateLimiter` -- a token bucket in this process's memory, shared by
  its threads (unit tests and callers without a state folder);
* :class:`SharedRateLimiter` -- the same bucket kept in
  ``{state_dir}/{host}.json`` (:func:`budget_path`) behind an exclusive
  ``fcntl.flock`` on ``{host}.json.lock``; every thread of every process that
  uses the same state folder draws from it.  The pipeline's state folder is
  ``resources/sdss/rate/`` (beside the frame cache), so every job of a run --
  and any other run started in the same working directory -- shares one
  budget per service host (the SAS and SkyServer have separate buckets, and
  SkyServer's SQL queries have their own, :data:`SQL_SCOPE`).

Acquiring a token: take the lock, read the state (``tokens`` and ``last``, the
wall-clock time ``time.time()`` they refer to, shared by processes and, through
NTP, by nodes), refill ``rate`` tokens per second up to ``burst``, take one
token or compute how long until one is due, write the state back (temporary
file + :func:`os.replace`, so a writer killed mid-write leaves the previous
state), release the lock, and sleep *outside* the lock before trying again.

Robustness:

* an unreadable or corrupt state file (a crash on a filesystem without atomic
  rename, a hand edit) is reset to an *empty* bucket with a warning: the safe
  choice, it can only delay requests;
* the clock going backwards never yields tokens (elapsed time is clamped at
  0, and ``last`` never moves back), and a jump back of more than
  :data:`MAX_CLOCK_SKEW_S` (or a node whose clock is that far behind) resets
  ``last`` with a warning instead of stalling every job until the clock
  catches up (smaller differences between nodes' clocks: see below);
* a filesystem that cannot lock (Lustre mounted without ``-o flock``, NFS
  without lock support) is a clear :class:`RateBudgetError`, never a silent
  fall-back to per-process limits.

Within a process, threads wait for a token in turn (a process-local lock per
state file), so each job has at most one thread polling the file: every
request costs one lock/read/replace cycle, plus one per job per refill
interval while jobs wait.  A job killed while it holds the lock releases it
(the kernel closes its files); the ``rate`` and ``burst`` are each caller's
own (the jobs of one run share one configuration).

Shared filesystems: ``flock`` is coherent across nodes on NFSv4 (Linux
emulates it with NFS byte-range locks; a crashed client's lock lasts until
its lease expires, about 90 s), on Lustre mounted with ``-o flock``, on GPFS
and on BeeGFS (with its global locks enabled); Lustre's ``localflock`` locks
only within one node (the budget is then per node).  Where ``resources/``
cannot be locked, point :data:`STATE_DIR_ENV` (``GALPIPE_RATE_DIR``, inherited
by local and SLURM jobs) at a folder that every job sees and that can be
locked; or let Snakemake run one fetching job at a time
(``--set-resources cutouts:sdss_fetch=1 --resources sdss_fetch=1``) with the
variable pointing at a node-local folder.  Node clocks are assumed to agree
to well within a refill interval (NTP); a node whose clock is ahead by ``d``
seconds can get up to ``d * rate`` tokens early, one behind only waits longer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from galpipe.errors import SourceError

try:  # POSIX only; the pipeline runs on Linux
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("galpipe")

PathLike = str | os.PathLike[str]

#: Environment variable that moves every shared budget's state folder (a deployment setting:
#: it changes when requests leave, never what is fetched).
STATE_DIR_ENV = "GALPIPE_RATE_DIR"

#: Scope of the file downloads of a host (SAS frames, ImgCutout JPEGs): ``{host}.json``.
HTTP_SCOPE = "http"
#: Scope of SkyServer's SQL queries (its own, per-minute limit): ``{host}.sql.json``.
SQL_SCOPE = "sql"

#: A ``last`` timestamp further ahead of this process's clock than this (seconds) means the
#: clock jumped back (or another node's clock is that far ahead): ``last`` is reset, with a warning.
MAX_CLOCK_SKEW_S = 2.0

_STATE_VERSION = 1
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9.-]+")

# The threads of one process queue on a process-local lock per state file, so that only one of
# them at a time polls the file (and sleeps for the next token): the file lock alone would also be
# correct (each attempt opens its own file description), but every waiting thread of every job
# would then wake up and contend for each token.
_PATH_LOCKS: dict[str, threading.Lock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def _reset_locks_after_fork() -> None:
    """A forked child starts with fresh process-local locks (a parent's thread may have held one)."""
    global _PATH_LOCKS_GUARD
    _PATH_LOCKS_GUARD = threading.Lock()
    _PATH_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_after_fork)


class RateBudgetError(SourceError):
    """The shared request budget cannot be used (state folder not writable, no file locks)."""


# --------------------------------------------------------------------------- one process
class RateLimiter:
    """A thread-safe token bucket in this process's memory (generic cell rate algorithm).

    Every call of :meth:`acquire` takes one token, sleeping until one is
    available.  Tokens arrive at ``rate`` per second and at most ``burst`` are
    stored, so in any time window of length ``W`` at most ``burst + rate * W``
    acquisitions return -- in this process.  Jobs running in parallel need
    :class:`SharedRateLimiter` (see :meth:`for_service`).

    Parameters
    ----------
    rate : float
        Tokens per second; ``0`` (or less) means unlimited.
    burst : int
        Bucket capacity (>= 1).
    """

    def __init__(self, rate: float, burst: int = 1) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self._lock = threading.Lock()
        self._tat = 0.0  # theoretical arrival time of the next token (monotonic seconds)

    def acquire(self) -> float:
        """Take one token; return the seconds slept waiting for it."""
        if self.rate <= 0:
            return 0.0
        interval = 1.0 / self.rate
        with self._lock:
            now = time.monotonic()
            tat = max(self._tat, now)
            earliest = tat - (self.burst - 1) * interval
            start = max(now, earliest)
            self._tat = tat + interval
        delay = start - now
        if delay > 0:
            time.sleep(delay)
        return max(delay, 0.0)

    @staticmethod
    def for_service(
        rate: float,
        burst: int = 1,
        *,
        url: str,
        state_dir: PathLike | None,
        scope: str = HTTP_SCOPE,
    ) -> RateLimiter:
        """The limiter of one service: shared through ``state_dir`` if given, else in-process.

        Parameters
        ----------
        rate, burst : float, int
            As for :class:`RateLimiter` (``rate <= 0``: unlimited, no state file is touched).
        url : str
            Any URL of the service; its host (and port) names the budget.
        state_dir : path-like or None
            Folder of the shared state files (the pipeline: ``resources/sdss/rate``),
            replaced by ``$GALPIPE_RATE_DIR`` when that is set (:data:`STATE_DIR_ENV`);
            None gives a :class:`RateLimiter` of this process only.
        scope : str
            :data:`HTTP_SCOPE` (file downloads) or :data:`SQL_SCOPE` (SQL queries).
        """
        if state_dir is None:
            return RateLimiter(rate, burst)
        return SharedRateLimiter(budget_path(shared_state_dir(state_dir), url, scope=scope), rate, burst)


def shared_state_dir(default: PathLike) -> Path:
    """The folder of the shared budgets: ``$GALPIPE_RATE_DIR`` if set (and not empty), else ``default``."""
    override = os.environ.get(STATE_DIR_ENV, "").strip()
    return Path(override).expanduser() if override else Path(default)


# --------------------------------------------------------------------------- every process
def host_key(url: str) -> str:
    """The budget name of ``url``'s service: its lower-case host and port, as a safe file name.

    >>> host_key("https://data.sdss.org/sas/dr17/eboss")
    'data.sdss.org'
    >>> host_key("http://127.0.0.1:8642/sas")
    '127.0.0.1_8642'
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host:
        raise RateBudgetError(f"request budget: URL {url!r} has no host name")
    try:
        port = parts.port
    except ValueError as exc:
        raise RateBudgetError(f"request budget: URL {url!r} has an invalid port") from exc
    key = _SAFE_CHARS.sub("_", host if port is None else f"{host}_{port}").strip("._") or "_"
    return key[:120]


def budget_path(state_dir: PathLike, url: str, *, scope: str = HTTP_SCOPE) -> Path:
    """State file of the budget of ``url``'s host: ``{state_dir}/{host}.json`` (``{host}.sql.json`` for SQL)."""
    if scope not in (HTTP_SCOPE, SQL_SCOPE):
        raise ValueError(f"request budget scope {scope!r}: expected {HTTP_SCOPE!r} or {SQL_SCOPE!r}")
    suffix = ".json" if scope == HTTP_SCOPE else f".{scope}.json"
    return Path(state_dir) / f"{host_key(url)}{suffix}"


def _path_lock(path: Path) -> threading.Lock:
    key = os.path.abspath(path)
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(key, threading.Lock())


class SharedRateLimiter(RateLimiter):
    """A token bucket kept in a state file, shared by every thread and process that names it.

    In any time window of length ``W`` at most ``burst + rate * W`` acquisitions
    return, summed over every process using ``path`` (with the same ``rate`` and
    ``burst``), on this machine or on any node whose clock agrees to within the
    NTP skew and whose filesystem gives coherent ``flock`` locks (see the module
    docstring).

    Parameters
    ----------
    path : path-like
        The state file (``{state_dir}/{host}.json``, :func:`budget_path`); its
        folder is created.  The lock file is ``path`` + ``.lock``.
    rate : float
        Tokens per second; ``0`` (or less) means unlimited (no file is touched).
    burst : int
        Bucket capacity (>= 1): requests that may leave back to back after an idle period.
    clock, sleep : callable
        Wall clock and sleep (tests replace them).

    Raises
    ------
    RateBudgetError
        On :meth:`acquire`: the folder cannot be written or locked.
    """

    def __init__(
        self,
        path: PathLike,
        rate: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(rate, burst)
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._tmp_path = self.path.with_name(f".{self.path.name}.tmp")
        self._clock = clock
        self._sleep = sleep

    def acquire(self) -> float:
        """Take one token from the shared bucket; return the seconds slept waiting for it."""
        if self.rate <= 0:
            return 0.0
        waited = 0.0
        with _path_lock(self.path):  # this process's threads wait in turn; other processes contend
            while True:
                wait = self._take()
                if wait <= 0.0:
                    return waited
                self._sleep(wait)  # outside the file lock: other jobs may take, refill or wait meanwhile
                waited += wait

    def _take(self) -> float:
        """One attempt under the lock: 0.0 when a token was taken, else the seconds until one is due."""
        with self._locked():
            now = self._clock()
            tokens, last = self._read(now)
            if last > now + MAX_CLOCK_SKEW_S:
                log.warning(
                    "request budget %s: its last use is %.1f s ahead of this clock (the clock went "
                    "back, or another node's clock is ahead); restarting the refill from now",
                    self.path, last - now,
                )
                last = now
            tokens = min(float(self.burst), tokens + max(0.0, now - last) * self.rate)
            last = max(last, now)
            if tokens >= 1.0:
                self._write(tokens - 1.0, last)
                return 0.0
            self._write(tokens, last)
            # `tokens` is the level at `last`, which may be slightly ahead of `now` (clock skew)
            return max(last - now, 0.0) + (1.0 - tokens) / self.rate

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover - Windows
            raise RateBudgetError(
                f"request budget {self.path}: file locks (fcntl) are not available on this platform"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RateBudgetError(
                f"request budget: cannot create {self.lock_path} ({exc.strerror or exc})"
            ) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                hint = ""
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    hint = (
                        "; this filesystem does not support file locks (Lustre needs the "
                        f"'flock' mount option): set {STATE_DIR_ENV} to a folder every job "
                        "sees that can be locked, or run one fetching job at a time "
                        "(snakemake --set-resources cutouts:sdss_fetch=1 --resources sdss_fetch=1) "
                        f"with {STATE_DIR_ENV} on a local disk"
                    )
                raise RateBudgetError(
                    f"request budget: cannot lock {self.lock_path} ({exc.strerror or exc}){hint}"
                ) from exc
            yield
        finally:
            os.close(fd)  # releases the flock (as does the end of a killed process)

    def _read(self, now: float) -> tuple[float, float]:
        """``(tokens, last)`` from the state file; a new bucket is full, a bad one empty."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return float(self.burst), now
        except (OSError, UnicodeDecodeError) as exc:
            return self._reset(now, f"unreadable ({exc})")
        try:
            state = json.loads(text)
            tokens, last = float(state["tokens"]), float(state["last"])
        except (ValueError, TypeError, KeyError) as exc:
            return self._reset(now, f"corrupt ({type(exc).__name__}: {exc}; content {text[:80]!r})")
        if not (math.isfinite(tokens) and math.isfinite(last)) or tokens < 0 or last <= 0:
            return self._reset(now, f"invalid (tokens={tokens!r}, last={last!r})")
        return min(tokens, float(self.burst)), last

    def _reset(self, now: float, why: str) -> tuple[float, float]:
        log.warning("request budget %s is %s; starting again from an empty bucket", self.path, why)
        return 0.0, now

    def _write(self, tokens: float, last: float) -> None:
        state = {
            "version": _STATE_VERSION,
            "tokens": tokens,
            "last": last,
            "rate": self.rate,
            "burst": self.burst,
            "pid": os.getpid(),
        }
        try:
            # only the holder of the lock writes, so one fixed temporary name suffices
            self._tmp_path.write_text(json.dumps(state), encoding="utf-8")
            os.replace(self._tmp_path, self.path)
        except OSError as exc:
            raise RateBudgetError(f"request budget: cannot write {self.path} ({exc.strerror or exc})") from exc
