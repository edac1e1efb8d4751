"""A robust, polite HTTP downloader shared by the live SDSS sources.

One :class:`Downloader` serves both cutout providers (calibrated SDSS frames
from the SAS and SkyServer JPEG cutouts):

* bounded concurrency (a thread pool, see :func:`run_tasks`);
* a request rate that is never exceeded: every attempt -- retries included --
  takes a token before it is sent, from one token bucket per service host
  shared by every thread and, given a state folder, by every process of the
  run (:mod:`galpipe.sources.ratelimit`);
* a (connect, read) timeout on every request;
* retries with exponential backoff and jitter on connection errors, timeouts,
  truncated bodies, HTTP 5xx and 429, honouring ``Retry-After`` (seconds or an
  HTTP date, capped by ``retry_after_max_s``); other 4xx answers fail at once;
* every body is verified by a caller-supplied parser before it is kept
  (:func:`parse_frame_bz2`, :func:`parse_jpeg`), and an HTML error page served
  with status 200 is rejected by :func:`looks_like_html`; a body that fails
  verification counts as a failed attempt and is retried;
* a User-Agent that names galpipe.

Writing is left to the callers, which use :func:`galpipe.io.atomic.atomic_path`.
"""

from __future__ import annotations

import bz2
import email.utils
import io
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import requests
from astropy.io import fits
from astropy.wcs import WCS

from galpipe import __version__
from galpipe.errors import DataError, SourceError
from galpipe.settings import SdssDownload
from galpipe.sources.ratelimit import HTTP_SCOPE, RateLimiter, host_key  # RateLimiter: also imported from here

T = TypeVar("T")

#: HTTP statuses worth retrying (server overload, gateway trouble, throttling).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

#: User-Agent sent with every galpipe download.
USER_AGENT = f"galpipe/{__version__} (+https://github.com/galpipe/galpipe) python-requests/" + (requests.__version__)

#: Minimum number of HDUs in an SDSS calibrated frame (image, calib vector, sky, astrometry).
FRAME_MIN_HDUS = 4

# Astropy's FITS reader warns (instead of raising) on truncated files; the warning
# filters are process-global, so parsing that silences them is serialised.
_FITS_LOCK = threading.Lock()


class FetchError(SourceError):
    """A URL could not be fetched and verified within the allowed attempts."""


class VerificationError(DataError):
    """A response body is not what was requested (corrupt, truncated, HTML page, ...)."""


# --------------------------------------------------------------------------- configuration
#: Largest accepted response body (bytes); an SDSS frame is about 3-13 MB.
MAX_BYTES = 200 * 1024 * 1024


# --------------------------------------------------------------------------- backoff
def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date).

    Returns None when the header is absent or unparsable; never negative.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ref = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - ref)


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    rng: random.Random,
    retry_after: float | None = None,
    retry_after_max: float = 300.0,
) -> float:
    """Seconds to sleep before retry number ``attempt`` (0-based).

    Exponential backoff ``min(cap, base * 2**attempt)`` with multiplicative
    jitter uniform in ``[0.5, 1.5)``; a server's ``Retry-After`` (capped at
    ``retry_after_max``) is a lower bound.
    """
    delay = min(cap, base * (2.0**attempt)) * (0.5 + rng.random())
    if retry_after is not None:
        delay = max(delay, min(retry_after, retry_after_max))
    return delay


class RetryableError(Exception):
    """Internal: an attempt failed in a way worth retrying."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def call_with_retries(
    func: Callable[[], T],
    *,
    what: str,
    max_retries: int,
    backoff_base_s: float,
    backoff_max_s: float,
    retry_after_max_s: float = 300.0,
    rng: random.Random | None = None,
    before_attempt: Callable[[], object] | None = None,
) -> tuple[T, int]:
    """Call ``func`` until it succeeds, retrying on :class:`RetryableError`.

    Parameters
    ----------
    func : callable
        Performs one attempt; raises :class:`RetryableError` for a transient
        failure, anything else is propagated at once.
    what : str
        Description used in the final error message (a URL, a query).
    before_attempt : callable, optional
        Called before every attempt (e.g. ``RateLimiter.acquire``).

    Returns
    -------
    result, attempts : object, int
        The value returned by ``func`` and the number of attempts made.

    Raises
    ------
    FetchError
        Every attempt failed; the message gives the number of attempts and the
        last reason.
    """
    rng = rng or random.Random()
    reasons: list[str] = []
    for attempt in range(max_retries + 1):
        if before_attempt is not None:
            before_attempt()
        try:
            return func(), attempt + 1
        except RetryableError as exc:
            reasons.append(exc.reason)
            if attempt == max_retries:
                break
            time.sleep(
                backoff_delay(
                    attempt,
                    base=backoff_base_s,
                    cap=backoff_max_s,
                    rng=rng,
                    retry_after=exc.retry_after,
                    retry_after_max=retry_after_max_s,
                )
            )
    raise FetchError(
        f"{what}: failed after {len(reasons)} attempt(s); last error: {reasons[-1]}"
        + (f" (earlier: {'; '.join(reasons[:-1][-3:])})" if len(reasons) > 1 else "")
    )


# --------------------------------------------------------------------------- verification
def looks_like_html(data: bytes) -> bool:
    """True if ``data`` starts like an HTML (or XML error) document."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or b"<html" in head


def _html_snippet(data: bytes, n: int = 120) -> str:
    text = data[:2000].decode("utf-8", "replace")
    return " ".join(text.split())[:n]


@dataclass
class Frame:
    """A decoded SDSS calibrated frame.

    Attributes
    ----------
    data : numpy.ndarray
        HDU 0 pixels in nanomaggies, float32, shape ``(ny, nx)``.
    wcs : astropy.wcs.WCS
        Celestial WCS of HDU 0.
    header : astropy.io.fits.Header
        HDU 0 header.
    """

    data: np.ndarray
    wcs: WCS
    header: fits.Header


def parse_frame_bz2(data: bytes, *, expected_shape: Sequence[int] | None = None) -> Frame:
    """Decompress and verify a ``frame-*.fits.bz2`` body; return its HDU 0.

    The SDSS frame layout (data model of ``frame``, DR8-DR17): HDU 0 the image
    (float32, ``NAXIS1`` = 2048 columns, ``NAXIS2`` = 1489 rows, nanomaggies,
    a TAN WCS whose axes are transposed on drift-scan frames), HDU 1 the
    calibration vector, HDU 2 the sky table, HDU 3 the astrometric trace.  Only
    HDU 0 is taken; the others are checked to be present and complete, not read.

    Checks: not an HTML page, a complete bz2 stream, a FITS file with at least
    :data:`FRAME_MIN_HDUS` HDUs none of which is truncated, a 2-D HDU 0 (of
    ``expected_shape`` = ``(ny, nx)`` if given, e.g. ``(1489, 2048)``) with a
    celestial WCS and, when it says, ``BUNIT`` nanomaggy.

    Returns
    -------
    Frame
        ``data`` of shape ``(ny, nx)``, float32.

    Raises
    ------
    VerificationError
        Any check failed (the message says which).
    """
    if looks_like_html(data):
        raise VerificationError(f"got an HTML page instead of a bz2 frame: {_html_snippet(data)!r}")
    try:
        raw = bz2.decompress(data)
    except (OSError, ValueError, EOFError) as exc:
        raise VerificationError(f"not a complete bz2 stream ({exc})") from exc
    with _FITS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with fits.open(io.BytesIO(raw), lazy_load_hdus=False, memmap=False) as hdul:
                n_hdus = len(hdul)
                if n_hdus < FRAME_MIN_HDUS:
                    raise VerificationError(f"frame has {n_hdus} HDU(s), expected at least {FRAME_MIN_HDUS}")
                info = hdul[-1].fileinfo()
                if info is None or info["datLoc"] + info["datSpan"] > len(raw):
                    raise VerificationError(f"FITS frame is truncated ({len(raw)} bytes decompressed)")
                primary = hdul[0]
                header = primary.header.copy()
                image = primary.data
                if image is None or image.ndim != 2:
                    shape = None if image is None else image.shape
                    raise VerificationError(f"frame HDU 0 is not a 2-D image (shape {shape})")
                if expected_shape is not None and tuple(image.shape) != tuple(expected_shape):
                    raise VerificationError(f"frame HDU 0 has shape {image.shape}, expected {tuple(expected_shape)}")
                pixels = np.array(image, dtype=np.float32)
                wcs = WCS(header, naxis=2)
        except VerificationError:
            raise
        except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise VerificationError(f"not a readable FITS frame ({exc})") from exc
    if not wcs.has_celestial:
        raise VerificationError("frame HDU 0 has no celestial WCS")
    bunit = str(header.get("BUNIT", "nanomaggy")).strip().lower()
    if bunit not in ("nanomaggy", "nanomaggies", "nmgy"):
        raise VerificationError(f"frame HDU 0 has BUNIT {header['BUNIT']!r}, expected nanomaggy")
    return Frame(data=pixels, wcs=wcs.celestial, header=header)


def parse_jpeg(data: bytes, *, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode and verify a JPEG body.

    Parameters
    ----------
    data : bytes
        Response body.
    expected_size : (width, height), optional
        Required image size in pixels.

    Returns
    -------
    numpy.ndarray
        uint8 array of shape ``(3, height, width)`` (red, green, blue planes).

    Raises
    ------
    VerificationError
        HTML page, not a JPEG, truncated or undecodable (the downloader retries).
    DataError
        A whole, valid JPEG of another size than ``expected_size``: a deliberate
        answer (ImgCutout clamps width and height to [64, 2048] pixels), so the
        request is not retried.
    """
    from PIL import Image, UnidentifiedImageError

    if looks_like_html(data):
        raise VerificationError(f"got an HTML page instead of a JPEG: {_html_snippet(data)!r}")
    if not data.startswith(b"\xff\xd8"):
        raise VerificationError(f"not a JPEG (starts with {data[:8]!r})")
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise VerificationError("JPEG is truncated (no end-of-image marker)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                raise VerificationError(f"expected a JPEG, got {img.format}")
            img.load()
            rgb = img.convert("RGB")
    except VerificationError:
        raise
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as exc:
        raise VerificationError(f"JPEG does not decode ({exc})") from exc
    if expected_size is not None and rgb.size != tuple(expected_size):
        raise DataError(f"JPEG is {rgb.size[0]}x{rgb.size[1]} pixels, expected {expected_size[0]}x{expected_size[1]} "
                        "(ImgCutout serves 64..2048 pixels a side and clamps other sizes; not retried)")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


# --------------------------------------------------------------------------- the downloader
class Downloader:
    """Rate-limited, retrying HTTP GETs with verification.

    Thread-safe: every thread gets its own :class:`requests.Session`, and all
    share the request budget.  With ``rate_state_dir`` (the pipeline passes
    ``resources/sdss/rate``) the budget of each service host is a
    :class:`~galpipe.sources.ratelimit.SharedRateLimiter`, shared with every
    other process using that folder (the parallel shard jobs of a run);
    without it, one in-process :class:`RateLimiter` serves every host.

    Parameters
    ----------
    config : SdssDownload
        The validated ``sdss.download`` section: ``concurrency`` (threads of
        :func:`run_tasks`), ``requests_per_second`` and ``burst`` (the token
        bucket; 0 disables the limit), ``timeout_s`` (connect and read),
        ``max_retries`` (so ``max_retries + 1`` attempts), ``backoff_base_s``
        and ``backoff_max_s`` (retry ``k`` waits ``min(max, base * 2**k)``
        times a jitter factor in ``[0.5, 1.5)``) and ``retry_after_max_s``
        (the largest server ``Retry-After`` honoured).
    seed : int, optional
        Seed of the jitter generator (jitter only changes timing, never outputs).
    max_bytes : int
        Largest accepted response body (:data:`MAX_BYTES`).
    rate_state_dir : path-like, optional
        Folder of the shared request budgets, one state file per host
        (:func:`~galpipe.sources.ratelimit.budget_path`; ``$GALPIPE_RATE_DIR``
        replaces it when set); None keeps the budget in this process.
    """

    def __init__(
        self,
        config: SdssDownload,
        *,
        seed: int | None = None,
        max_bytes: int = MAX_BYTES,
        rate_state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = config
        self.max_bytes = int(max_bytes)
        self.rate_state_dir = None if rate_state_dir is None else Path(rate_state_dir)
        #: The in-process budget shared by every host (used when there is no ``rate_state_dir``).
        self.limiter = RateLimiter(config.requests_per_second, config.burst)
        self._limiters: dict[str, RateLimiter] = {}
        self._limiters_lock = threading.Lock()
        self._local = threading.local()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self.n_requests = 0
        self._count_lock = threading.Lock()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def limiter_for(self, url: str) -> RateLimiter:
        """The request budget ``url`` draws from: its host's shared bucket, or the in-process one."""
        if self.rate_state_dir is None or self.config.requests_per_second <= 0:
            return self.limiter
        key = host_key(url)
        with self._limiters_lock:
            limiter = self._limiters.get(key)
            if limiter is None:
                limiter = RateLimiter.for_service(self.config.requests_per_second, self.config.burst, url=url,
                                                  state_dir=self.rate_state_dir, scope=HTTP_SCOPE)
                self._limiters[key] = limiter
        return limiter

    def close(self) -> None:
        """Close every session opened by the worker threads."""
        with self._sessions_lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _attempt(self, url: str, params: Mapping[str, Any] | None, parse: Callable[[bytes], T]) -> tuple[bytes, T]:
        cfg = self.config
        with self._count_lock:
            self.n_requests += 1
        try:
            with self._session().get(url, params=params, timeout=(cfg.timeout_s, cfg.timeout_s), stream=True) as resp:
                status = resp.status_code
                if status != 200:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    if status in RETRY_STATUSES:
                        raise RetryableError(f"HTTP {status} {resp.reason}", retry_after)
                    raise FetchError(f"{url}: HTTP {status} {resp.reason} (not retried)")
                chunks: list[bytes] = []
                total = 0
                for chunk in resp.iter_content(chunk_size=1 << 16):
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise FetchError(f"{url}: response larger than {self.max_bytes} bytes")
                    chunks.append(chunk)
                body = b"".join(chunks)
        except (requests.Timeout, requests.ConnectionError) as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
        except requests.exceptions.ChunkedEncodingError as exc:
            raise RetryableError(f"truncated body ({exc})") from exc
        except requests.exceptions.ContentDecodingError as exc:
            raise RetryableError(f"undecodable body ({exc})") from exc
        except requests.RequestException as exc:  # invalid URL, redirect loop, ...: permanent
            raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            parsed = parse(body)
        except VerificationError as exc:
            raise RetryableError(f"bad content: {exc}") from exc
        return body, parsed

    def fetch(
        self,
        url: str,
        parse: Callable[[bytes], T],
        *,
        params: Mapping[str, Any] | None = None,
    ) -> tuple[bytes, T, int]:
        """GET ``url`` until its body passes ``parse``.

        Parameters
        ----------
        url : str
            Address to fetch.
        parse : callable
            ``parse(body) -> value``; raises :class:`VerificationError` when the
            body is not acceptable (then the request is retried).
        params : mapping, optional
            Query-string parameters.

        Returns
        -------
        body, value, attempts : bytes, object, int

        Raises
        ------
        FetchError
            Permanent HTTP error (4xx other than 429) or retries exhausted.
        """
        cfg = self.config
        with self._rng_lock:
            rng = random.Random(self._rng.random())
        (body, value), attempts = call_with_retries(
            lambda: self._attempt(url, params, parse),
            what=url,
            max_retries=cfg.max_retries,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            retry_after_max_s=cfg.retry_after_max_s,
            rng=rng,
            before_attempt=self.limiter_for(url).acquire,  # every attempt, retries included, takes a token
        )
        return body, value, attempts


# --------------------------------------------------------------------------- task runner
def run_tasks(
    tasks: Iterable[T],
    func: Callable[[T], Any],
    *,
    concurrency: int,
    weight: Callable[[T], int] | None = None,
    progress: bool = False,
    desc: str = "download",
    unit: str = "galaxy",
) -> list[Any]:
    """Run ``func`` on every task with at most ``concurrency`` threads.

    Results are returned in task order.  ``func`` is expected to handle its
    own per-task failures (return a failure record); an unexpected exception
    cancels the queued tasks and is re-raised.

    Parameters
    ----------
    tasks : iterable
        Work items.
    func : callable
        ``func(task) -> result``.
    concurrency : int
        Worker threads.
    weight : callable, optional
        Progress-bar units per task (e.g. galaxies in a field); default 1.
    progress : bool
        Report progress (:mod:`galpipe.progress`: a bar on a terminal, else a log line every 10 s
        with count, rate and ETA).
    """
    from galpipe.progress import progress as progress_reporter

    items = list(tasks)
    results: list[Any] = [None] * len(items)
    total = sum(weight(t) for t in items) if weight else len(items)
    with (
        progress_reporter(total, desc, unit, enabled=progress) as bar,
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="galpipe-dl") as pool,
    ):
        pending: dict[Future[Any], int] = {}
        try:
            for i, item in enumerate(items):
                pending[pool.submit(func, item)] = i
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    results[i] = fut.result()
                    bar.update(weight(items[i]) if weight else 1)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return results
