"""The Snakemake HTML report of a tiny simulated run, checked statically and rendered in Chromium.

A tiny simulated workflow (two experiments: an image CNN and the catalogue-feature
baseline) runs in a temporary directory; ``snakemake --report`` then writes the
self-contained ``report.html`` and the ``report.zip`` form.  The static test reads
the report's embedded data: one category per experiment plus ``Comparison``, every
evaluation PNG as its own labelled entry, captions rendered from RST.  The browser
tests open both forms in headless Chromium with no network (driven over the
DevTools protocol through ``--remote-debugging-pipe``), click through every
category, show every figure and check that it decoded (``naturalWidth`` equals the
PNG's width), that the captions render, and that the leaderboard shows as a table
naming the experiments.  They skip, saying so, only when Chromium is not installed
(``scripts/test-services.sh`` installs it on CI).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium")
EXPERIMENTS = ("tiny_cnn", "baseline")
#: Figures every experiment's evaluation must show; image experiments add galleries.
CORE_FIGURES = {"confusion_matrix", "learning_curves", "reliability", "roc"}
HISTORY_LABEL = "training history (CSV download)"

TINY = {
    "source": "simulated",
    "seed": 11,
    "cutout_size": 32,
    "shards": 1,
    "simulated": {"n_galaxies": 60},
    "split": {"row_group_size": 16},
    "training": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 0},
    "experiments": {
        "tiny_cnn": {"description": "one conv layer <b>&</b> pooling",
                     "architecture": [{"type": "conv2d", "filters": 4}, "relu", "maxpool2d", "global_avg_pool"]},
        "baseline": {"architecture": "features_mlp", "inputs": "features", "training": {"augment": False}},
    },
    "evaluate": {"n_bootstrap": 20, "gallery_size": 4},
}


# --------------------------------------------------------------------------- the leaderboard page
class _Table(HTMLParser):
    """Header texts and body cells ``(class, text)`` of the ``<table id="leaderboard">``."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[str | None] = []
        self.head: list[str] = []
        self.rows: list[list[tuple[str | None, str]]] = []
        self._cell: list[str] | None = None
        self._cls: str | None = None
        self._in_head = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append(dict(attrs).get("id"))
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr" and not self._in_head:
            self.rows.append([])
        elif tag in ("th", "td"):
            self._cell, self._cls = [], dict(attrs).get("class")

    def handle_endtag(self, tag: str) -> None:
        if tag == "thead":
            self._in_head = False
        elif tag in ("th", "td") and self._cell is not None:
            text = "".join(self._cell)
            if tag == "th":
                self.head.append(text)
            else:
                self.rows[-1].append((self._cls, text))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse_table(page: str) -> _Table:
    table = _Table()
    table.feed(page)
    table.close()
    assert table.tables == ["leaderboard"], table.tables
    return table


def test_leaderboard_html_columns_cells_and_escaping() -> None:
    from galpipe.stages.leaderboard import leaderboard_html

    df = pd.DataFrame({
        "rank": [1, 2], "experiment": ["wide_cnn", "<script>alert(1)</script>"], "inputs": ["image", "features"],
        "balanced_accuracy": [0.8766, 0.5], "balanced_accuracy_ci_low": [0.85, np.nan],
        "balanced_accuracy_ci_high": [0.9, np.nan], "ece": [np.nan, 0.25], "n_params": [123456, 99],
        "train_seconds": [12.345, 1.0], "description": ['one conv <b>&</b> "pool"', ""],
    })
    page = leaderboard_html(df)
    assert page.startswith("<!DOCTYPE html>\n") and page.endswith("</html>\n")
    table = _parse_table(page)
    # only the known columns present in the frame, in the fixed order
    assert table.head == ["rank", "experiment", "inputs", "balanced accuracy", "ECE", "parameters",
                          "training time (s)", "description"]
    assert table.rows == [
        [("num", "1"), (None, "wide_cnn"), (None, "image"), ("num", "0.877[0.850, 0.900]"), ("num", "\u2013"),
         ("num", "123,456"), ("num", "12.35"), ("text", 'one conv <b>&</b> "pool"')],
        [("num", "2"), (None, "<script>alert(1)</script>"), (None, "features"), ("num", "0.500"), ("num", "0.250"),
         ("num", "99"), ("num", "1.00"), ("text", "")],
    ]
    # the text came back as text because it was escaped (autoescaping), not as markup
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "one conv &lt;b&gt;&amp;&lt;/b&gt;" in page and "<b>" not in page
    assert "0.877<br><small>[0.850, 0.900]</small>" in page


# --------------------------------------------------------------------------- the tiny run
def _snakemake(workdir: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir),
           "--cores", "2", "--configfile", str(workdir / "config" / "config.yaml"), *args]
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(args) or 'run'} failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("report")
    (wd / "config").mkdir()
    (wd / "config" / "config.yaml").write_text(yaml.safe_dump(TINY))
    _snakemake(wd)
    _snakemake(wd, "--report", "results/report.html")
    _snakemake(wd, "--report", "results/report.zip")
    return wd


def _figures(run_dir: Path, experiment: str) -> dict[str, Path]:
    """The evaluation PNGs of one experiment, by stem."""
    return {p.stem: p for p in sorted((run_dir / "results" / "evaluation" / experiment / "figures").glob("*.png"))}


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def _embedded(html: str, var: str) -> Any:
    """The JSON value of ``var <name> = {...};`` embedded in the report."""
    m = re.search(rf"<script id=\"[\w-]+\">\s*var {var} = (\{{.*?\}});\s*</script>", html, re.S)
    assert m, f"report has no embedded '{var}'"
    return json.loads(m.group(1))


def test_run_writes_every_figure_and_the_html_leaderboard(run_dir: Path) -> None:
    for exp in EXPERIMENTS:
        assert CORE_FIGURES <= set(_figures(run_dir, exp)), exp
    galleries = {s for s in _figures(run_dir, "tiny_cnn") if s.startswith("gallery_")}
    assert galleries, "the image experiment has no gallery"
    assert not any(s.startswith("gallery_") for s in _figures(run_dir, "baseline"))
    html = (run_dir / "results" / "leaderboard.html").read_text()
    lb = pd.read_csv(run_dir / "results" / "leaderboard.csv")
    cells = re.findall(r"<tr><td class=\"num\">(\d+)</td><td>([^<]*)</td>", html)
    assert [(int(r), e) for r, e in cells] == list(zip(lb["rank"], lb["experiment"], strict=True))
    assert "one conv layer &lt;b&gt;&amp;&lt;/b&gt; pooling" in html  # descriptions are escaped
    table = _parse_table(html)
    ba = table.head.index("balanced accuracy")
    for row, rec in zip(table.rows, lb.to_dict("records"), strict=True):
        expected = (f"{rec['balanced_accuracy']:.3f}[{rec['balanced_accuracy_ci_low']:.3f}, "
                    f"{rec['balanced_accuracy_ci_high']:.3f}]")
        assert row[ba] == ("num", expected), (row, rec)
    assert ("text", "one conv layer <b>&</b> pooling") in table.rows[list(lb["experiment"]).index("tiny_cnn")]


def test_report_declares_categories_labels_and_rendered_captions(run_dir: Path) -> None:
    html = (run_dir / "results" / "report.html").read_text()
    categories = _embedded(html, "categories")
    results = _embedded(html, "results")
    assert set(categories) == {*EXPERIMENTS, "Comparison", "Data"}
    assert [p for sub in categories["Data"].values() for p in sub] == ["results/dataset.html"]
    assert results["results/dataset.html"]["mime_type"] == "text/html"
    for exp in EXPERIMENTS:
        paths = [p for sub in categories[exp].values() for p in sub]
        figures = _figures(run_dir, exp)
        expected = {f"results/evaluation/{exp}/figures/{s}.png" for s in figures}
        expected.add(f"results/models/{exp}/history.csv")
        assert set(paths) == expected and len(paths) == len(expected)
        for stem in figures:
            entry = results[f"results/evaluation/{exp}/figures/{stem}.png"]
            assert entry["labels"] == {"experiment": exp, "artifact": stem}
            assert entry["mime_type"] == "image/png"
            assert base64.b64decode(entry["data_uri"].split("base64,", 1)[1]) == figures[stem].read_bytes()
            caption = entry["caption"]
            assert f"<strong>{exp}</strong>" in caption, caption  # RST rendered, Jinja expanded
            assert "**" not in caption and "{{" not in caption and "{%" not in caption
        assert "Confusion matrix" in results[f"results/evaluation/{exp}/figures/confusion_matrix.png"]["caption"]
        assert "ROC" in results[f"results/evaluation/{exp}/figures/roc.png"]["caption"]
        assert results[f"results/models/{exp}/history.csv"]["labels"]["artifact"] == HISTORY_LABEL
    comparison = {p for sub in categories["Comparison"].values() for p in sub}
    assert comparison == {"results/leaderboard.csv", "results/leaderboard.html", "results/comparison.png"}
    assert results["results/leaderboard.html"]["mime_type"] == "text/html"
    assert "<strong>Comparison</strong>" in _embedded_desc(html)


def test_data_page_counts_every_split_and_class(run_dir: Path) -> None:
    summary = json.loads((run_dir / "results" / "split" / "summary.json").read_text())
    html = (run_dir / "results" / "dataset.html").read_text()
    body = re.search(r'<table id="counts">.*?</table>', html, re.S).group(0)
    rows = {m[0]: [int(v) for v in re.findall(r'<td class="num">(\d+)</td>', m[1])]
            for m in re.findall(r"<tr[^>]*><td>(\w+)</td>(.*?)</tr>", body)}
    for cls in summary["classes"]:
        per_split = [summary["counts"][s][cls] for s in ("train", "validation", "test")]
        assert rows[cls] == [*per_split, sum(per_split)], (cls, rows)
    assert rows["total"][-1] == sum(sum(c.values()) for c in summary["counts"].values())
    assert "<th>source</th><td>simulated</td>" in html


def _embedded_desc(html: str) -> str:
    m = re.search(r"var workflow_desc = (\".*?\");\s*</script>", html, re.S)
    assert m, "report has no workflow description"
    return json.loads(m.group(1))


# --------------------------------------------------------------------------- Chromium over CDP
class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4).

    Started offline: a dead proxy and a resolver that resolves nothing, plus the
    flags that stop background traffic.  Every request the page makes is recorded.
    """

    def __init__(self, executable: str, user_dir: Path) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # Keep the child's ends well above 4, so the dup2 onto 3 and 4 cannot clobber them.
        hi_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
        hi_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
        os.close(to_child_r)
        os.close(from_child_w)

        def child_fds() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                f"--user-data-dir={user_dir}", "--remote-debugging-pipe", "--proxy-server=127.0.0.1:9",
                "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1400,1000", "about:blank"]
        self.log = user_dir / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=child_fds, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        os.close(hi_r)
        os.close(hi_w)
        self._w, self._r = to_child_w, from_child_r
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        #: Every URL the page requested and every uncaught page exception, over the whole session.
        self.requests: list[str] = []
        self.exceptions: list[dict[str, Any]] = []
        self.session = ""

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        sid = self.session if session is None else session
        if sid:
            msg["sessionId"] = sid
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline, method)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise AssertionError(f"CDP {method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._next(deadline, method))

    def _next(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"Chromium did not answer {what} in time; log: {self._log_tail()}")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise AssertionError(f"Chromium exited during {what}; log: {self._log_tail()}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        msg = json.loads(raw)
        if msg.get("method") == "Network.requestWillBeSent":
            self.requests.append(msg["params"]["request"]["url"])
        elif msg.get("method") == "Runtime.exceptionThrown":
            self.exceptions.append(msg["params"]["exceptionDetails"])
        return msg

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no log)"

    def open_page(self) -> None:
        """Attach to the start page and enable the domains the checks use."""
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True},
                                 session="")["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable")

    def js(self, expression: str, *, context: int | None = None, timeout: float = 30.0) -> Any:
        params: dict[str, Any] = {"expression": expression, "awaitPromise": True, "returnByValue": True}
        if context is not None:
            params["contextId"] = context
        res = self.call("Runtime.evaluate", params, timeout=timeout)
        if "exceptionDetails" in res:
            detail = res["exceptionDetails"]
            text = detail.get("exception", {}).get("description") or detail.get("text")
            raise AssertionError(f"in the page: {text}")
        return res["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close", session="", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._w, self._r):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture(scope="module")
def chromium_path() -> str:
    for cand in CHROMIUM_CANDIDATES:
        found = shutil.which(cand)
        if found:
            return found
    pytest.skip("Chromium not installed (Debian: apt-get install chromium; CI: scripts/test-services.sh), "
                "so the report cannot be rendered")


@pytest.fixture
def browser(chromium_path: str, tmp_path: Path) -> Iterator[Chromium]:
    user_dir = tmp_path / "chromium-profile"
    user_dir.mkdir()
    b = Chromium(chromium_path, user_dir)
    try:
        b.open_page()
        yield b
    finally:
        b.close()


#: Helpers injected into the report page: wait for a condition, click through the menu.
PAGE_HELPERS = r"""
window.__g = {
  async waitFor(fn, what, timeout = 10000) {
    const t0 = performance.now();
    for (;;) {
      const v = fn();
      if (v) return v;
      if (performance.now() - t0 > timeout) throw new Error("timed out waiting for " + what);
      await new Promise(r => setTimeout(r, 25));
    }
  },
  text(el) { return el.textContent.trim(); },
  navLink(text) {
    return [...document.querySelectorAll("nav a")].find(a => this.text(a) === text);
  },
  rows() { return [...document.querySelectorAll("nav table tbody tr")]; },
  async openCategory(name) {
    const link = await this.waitFor(() => this.navLink(name), "menu entry " + name);
    link.click();
    await this.waitFor(() => this.rows().length > 0, "result rows of " + name);
    return this.rows().map(tr => {
      const cells = [...tr.children];
      const eye = cells[cells.length - 1].querySelector("a");
      return {labels: cells.slice(0, -1).map(td => this.text(td)),
              download: eye.getAttribute("download"), href: eye.getAttribute("href").slice(0, 64)};
    });
  },
  content() { return [...document.querySelectorAll("img, iframe")].filter(el => !el.closest("nav")); },
  async showImage(row, filename) {
    this.rows()[row].lastElementChild.querySelectorAll("a")[0].click();
    const img = await this.waitFor(() => this.content().find(el => el.tagName === "IMG"
        && (el.getAttribute("src") || "").includes(filename) && el.complete), "image " + filename);
    const box = img.getBoundingClientRect();
    return {src: img.getAttribute("src").slice(0, 40), naturalWidth: img.naturalWidth,
            naturalHeight: img.naturalHeight, shownWidth: box.width, shownHeight: box.height};
  },
  async showFrame(row) {
    this.rows()[row].lastElementChild.querySelectorAll("a")[0].click();
    const f = await this.waitFor(() => this.content().find(el => el.tagName === "IFRAME"), "iframe");
    return (f.getAttribute("src") || "").slice(0, 40);
  },
  async caption(row, category) {
    this.rows()[row].lastElementChild.querySelectorAll("a")[1].click();
    const li = await this.waitFor(() => document.querySelector("nav li.prose"), "caption");
    const html = li.innerHTML;
    (await this.waitFor(() => this.navLink(category), "breadcrumb " + category)).click();
    await this.waitFor(() => this.rows().length > 0, "result rows of " + category);
    return html;
  },
};
true
"""


def _load(b: Chromium, url: str) -> None:
    b.events.clear()
    b.call("Page.navigate", {"url": url})
    b.wait_event("Page.loadEventFired")
    assert b.js(PAGE_HELPERS) is True
    b.js("__g.waitFor(() => !!__g.navLink('Comparison'), 'the report menu')")


def _frame_table(b: Chromium) -> list[list[str]]:
    """Cell texts of the table inside the report's (data: URL or file) iframe."""
    tree = b.call("Page.getFrameTree")["frameTree"]
    children = tree.get("childFrames", [])
    assert len(children) == 1, f"expected one iframe, got {len(children)}"
    frame_id = children[0]["frame"]["id"]
    ctx = b.call("Page.createIsolatedWorld", {"frameId": frame_id, "worldName": "galpipe-check"})["executionContextId"]
    script = r"""
    (async () => {
      const t0 = performance.now();
      while (!document.querySelector("table tbody tr")) {
        if (performance.now() - t0 > 10000) throw new Error("no table in the leaderboard frame");
        await new Promise(r => setTimeout(r, 25));
      }
      const head = [...document.querySelectorAll("table thead th")].map(th => th.textContent.trim());
      return [head, ...[...document.querySelectorAll("table tbody tr")].map(
        tr => [...tr.children].map(td => td.textContent.trim()))];
    })()
    """
    return b.js(script, context=ctx)


def _screenshot(b: Chromium, path: Path) -> np.ndarray:
    data = base64.b64decode(b.call("Page.captureScreenshot", {"format": "png"})["data"])
    path.write_bytes(data)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _check_report(b: Chromium, url: str, run_dir: Path, shots: Path, *, zipped: bool) -> None:
    lb = pd.read_csv(run_dir / "results" / "leaderboard.csv")
    for exp in EXPERIMENTS:
        _load(b, url)
        rows = b.js(f"__g.openCategory({json.dumps(exp)})")
        figures = _figures(run_dir, exp)
        by_label = {r["labels"][1]: i for i, r in enumerate(rows)}
        assert all(r["labels"][0] == exp for r in rows), rows
        assert set(by_label) == {*figures, HISTORY_LABEL}, rows
        history = rows[by_label[HISTORY_LABEL]]
        assert history["download"] == "history.csv"
        for stem, png in figures.items():
            shown = b.js(f"__g.showImage({by_label[stem]}, {json.dumps(stem + '.png')})")
            width, height = _png_size(png)
            assert (shown["naturalWidth"], shown["naturalHeight"]) == (width, height), (exp, stem, shown)
            assert shown["shownWidth"] > 0 and shown["shownHeight"] > 0, (exp, stem, shown)
            prefix = "data/raw/" if zipped else "data:image/png"
            assert shown["src"].startswith(prefix), shown
            if stem == "confusion_matrix":
                pixels = _screenshot(b, shots / f"{'zip' if zipped else 'html'}-{exp}-{stem}.png")
                content = pixels[:, pixels.shape[1] // 3:]  # right of the navigation bar
                assert content.std() > 20, "the figure area of the screenshot is blank"
        caption = b.js(f"__g.caption({by_label['confusion_matrix']}, {json.dumps(exp)})")
        assert f"<strong>{exp}</strong>" in caption and "Confusion matrix" in caption, caption
    _load(b, url)
    rows = b.js("__g.openCategory('Comparison')")
    by_label = {r["labels"][0]: i for i, r in enumerate(rows)}
    assert set(by_label) == {"leaderboard", "leaderboard (CSV download)", "comparison chart"}, rows
    assert rows[by_label["leaderboard (CSV download)"]]["download"] == "leaderboard.csv"
    shown = b.js(f"__g.showImage({by_label['comparison chart']}, 'comparison.png')")
    assert (shown["naturalWidth"], shown["naturalHeight"]) == _png_size(run_dir / "results" / "comparison.png")
    src = b.js(f"__g.showFrame({by_label['leaderboard']})")
    assert src.startswith("data/raw/" if zipped else "data:text/html"), src
    table = _frame_table(b)
    head, body = table[0], table[1:]
    assert head[:4] == ["rank", "experiment", "inputs", "balanced accuracy"], head
    assert [r[1] for r in body] == lb["experiment"].tolist()
    assert [int(r[0]) for r in body] == lb["rank"].tolist()
    for r, value in zip(body, lb["balanced_accuracy"], strict=True):
        assert r[3].startswith(f"{value:.3f}") and "[" in r[3], r  # value and its interval
    pixels = _screenshot(b, shots / f"{'zip' if zipped else 'html'}-leaderboard.png")
    assert pixels[:, pixels.shape[1] // 3:].std() > 5, "the leaderboard area of the screenshot is blank"
    assert not b.exceptions, b.exceptions
    assert b.requests, "no request was recorded: the network log is not working"
    remote = [u[:80] for u in b.requests if not u.startswith(("file:", "data:", "about:", "blob:"))]
    assert not remote, f"the report requested non-local resources: {remote}"


def test_html_report_renders_in_chromium(run_dir: Path, browser: Chromium, tmp_path: Path) -> None:
    _check_report(browser, (run_dir / "results" / "report.html").as_uri(), run_dir, tmp_path, zipped=False)


def test_zip_report_renders_in_chromium(run_dir: Path, browser: Chromium, tmp_path: Path) -> None:
    out = tmp_path / "unzipped"
    with zipfile.ZipFile(run_dir / "results" / "report.zip") as zf:
        names = zf.namelist()
        assert "report/report.html" in names
        assert sum(n.endswith(".png") for n in names) == sum(len(_figures(run_dir, e)) for e in EXPERIMENTS) + 1
        zf.extractall(out)
    _check_report(browser, (out / "report" / "report.html").as_uri(), run_dir, tmp_path, zipped=True)
