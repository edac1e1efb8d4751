"""Gallery tiles say which galaxy they show (id, RA/Dec) and carry an angular scale bar."""

from __future__ import annotations

import numpy as np
import pandas as pd

from galpipe.plots import _scale_bar_arcsec, gallery_figure
from galpipe.stages.evaluate import gallery_caption


def test_caption_names_the_galaxy_and_its_position() -> None:
    frame = pd.DataFrame({"objid": [1237648720693755918], "ra": [180.123456], "dec": [-0.5678]})
    assert gallery_caption(frame.to_dict("records")[0]) == "1237648720693755918\n180.12346 -0.56780"
    assert gallery_caption(pd.Series({"objid": -5, "name": "NGC1000", "ra": np.nan, "dec": np.nan})) == "NGC1000"
    assert gallery_caption({"objid": 7}) == "7"


def test_scale_bar_length_and_labels() -> None:
    assert _scale_bar_arcsec(64, 0.396) == 10.0  # a quarter of 25.3 arcsec, rounded up to a round length
    imgs = np.random.default_rng(0).random((3, 64, 64, 3)).astype(np.float32)
    fig = gallery_figure(imgs, ["g", "r", "i"], ["a", "b", "c"], pixel_scale=0.396)
    first = fig.axes[0]
    (xs, ys) = first.lines[0].get_data()
    assert np.isclose(xs[1] - xs[0], 10.0 / 0.396) and ys[0] == ys[1]
    texts = [t.get_text() for t in first.texts]
    assert "10\u2033" in texts and "N\u2191 E\u2190" in texts
    assert not fig.axes[1].lines  # one bar per gallery
    plain = gallery_figure(imgs, ["g", "r", "i"], ["a", "b", "c"])
    assert not plain.axes[0].lines and not plain.axes[0].texts
