"""One orientation everywhere: north up, east left (galpipe.io.cutout_fits's convention).

A galaxy with a bright companion 4 arcsec to the north-east is put into the stand-in's
sky in each of its three camera columns (frames transposed and turned by 0, 20 and -35
degrees), then taken through every route: sdss-frames stamps, skyserver-jpeg cutouts, an
image-folder JPEG (SkyServer's own picture of it, north up and east left), FITS files
through ``load_external`` (a galpipe cutout, and a raw frame stamp in the frame's own
orientation) and the gallery figure.  Everywhere the companion must come out up and to
the left of the centre: in FITS row order, a higher row and a lower column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS

from galpipe.io.cutout_fits import read_cutout
from galpipe.plots import gallery_figure
from galpipe.sources.base import CutoutCache
from galpipe.sources.download import parse_frame_bz2
from galpipe.sources.images import ImagesSource, make_cutouts
from galpipe.sources.sdss import SdssSource
from galpipe.sources.sdss_cutouts import fetch_cutouts, jpeg_url
from galpipe.testing.fakeserver import FakeSkyServer

matplotlib.use("Agg")

SIZE = 32
SEP_ARCSEC = 4.0  # companion offset, along each of +RA (east) and +Dec (north): 5.7 arcsec at PA 45
FRAME = (160, 200)  # small frames (ny, nx): transposed WCS as full-size ones, rendered fast
RGB = ["red", "green", "blue"]
GRI = ["g", "r", "i"]


def _companion_offset(img: np.ndarray, exclude: float = 4.0) -> tuple[float, float]:
    """``(drow, dcol)`` of the brightest pixel at least ``exclude`` pixels from the centre.

    ``img``: shape ``(ny, nx)`` or ``(n, ny, nx)`` (planes summed), FITS row order.
    """
    plane = np.nan_to_num(np.asarray(img, dtype=float))
    if plane.ndim == 3:
        plane = plane.sum(axis=0)
    ny, nx = plane.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
    masked = np.where(np.hypot(yy - cy, xx - cx) >= exclude, plane, -np.inf)
    r, c = np.unravel_index(int(np.argmax(masked)), plane.shape)
    return float(r - cy), float(c - cx)


def _assert_north_east(img: np.ndarray, what: str) -> None:
    drow, dcol = _companion_offset(img)
    # north up (higher row in FITS order), east left (lower column), at 45 degrees give or take
    # the residual rotation of an exactly flipped frame stamp (35 degrees for camcol 3)
    assert drow > 1.5 and dcol < -1.5, f"{what}: companion at (drow, dcol) = ({drow}, {dcol}), expected NE"


@pytest.fixture(scope="module")
def sky() -> Any:
    """A stand-in server whose three galaxies (one per camcol) each have a companion to the NE."""
    with FakeSkyServer(n_galaxies=3, seed=21, frame_shape=FRAME, galaxies_per_field=1) as srv:
        rows = []
        for k, geom in enumerate(srv.fields.values()):
            main = srv.table[(srv.table["camcol"] == geom.camcol) & (srv.table["field"] == geom.field)].iloc[0]
            main = main.copy()
            main["ra"], main["dec"] = geom.ra, geom.dec  # the frame centre: the stamp is on the frame
            main["morph"], main["class"] = "elliptical", "GALAXY"
            for b in ("u", "g", "r", "i", "z"):
                main[f"petroMag_{b}"] = 17.5
            main["petroR50_r"], main["petroR90_r"], main["deVAB_r"] = 1.2, 3.0, 0.9
            comp = main.copy()
            comp["objid"] = int(main["objid"]) + 1000 + k
            comp["morph"], comp["class"] = "point", "STAR"
            comp["ra"] = geom.ra + SEP_ARCSEC / 3600.0 / np.cos(np.radians(geom.dec))
            comp["dec"] = geom.dec + SEP_ARCSEC / 3600.0
            for b in ("u", "g", "r", "i", "z"):
                comp[f"petroMag_{b}"] = 15.5
            rows += [main, comp]
        srv.table = pd.DataFrame(rows).reset_index(drop=True)
        srv.sky_digest += "+ne-companions"  # frames of this sky are not those of the unmodified one
        yield srv


@pytest.fixture(scope="module")
def catalogue(sky: Any) -> pd.DataFrame:
    cat = sky.table[sky.table["morph"] != "point"]
    return cat[["objid", "ra", "dec", "run", "rerun", "camcol", "field", "petroR90_r"]].reset_index(drop=True)


@pytest.fixture(scope="module")
def routes(sky: Any, catalogue: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("orient")
    frames = fetch_cutouts(catalogue, root / "frames", bands=GRI, size=SIZE, sdss=sky.params(),
                           frame_cache_dir=root / "fc")
    jpegs = fetch_cutouts(catalogue, root / "jpeg", bands=RGB, size=SIZE,
                          sdss=sky.params(cutouts={"provider": "skyserver-jpeg"}), frame_cache_dir=root / "fc")
    assert (frames["status"] == "ok").all(), frames["reason"].tolist()
    assert (jpegs["status"] == "ok").all(), jpegs["reason"].tolist()
    return {"root": root, "frames": frames, "jpeg": jpegs}


def test_sdss_frame_stamps_are_north_up_east_left(sky: Any, catalogue: pd.DataFrame,
                                                  routes: dict[str, Any]) -> None:
    for row, path in zip(catalogue.itertuples(), routes["frames"]["path"], strict=True):
        cut = read_cutout(path, bands=GRI)
        _assert_north_east(cut.data, f"sdss-frames camcol {row.camcol}")
        # the stored WCS agrees: the peak found is the companion's sky position (to 1.5 pixels)
        with fits.open(path) as hdul:
            w = WCS(hdul["R"].header)
        drow, dcol = _companion_offset(cut.data)
        comp = sky.table[(sky.table["morph"] == "point") & (sky.table["camcol"] == row.camcol)].iloc[0]
        x, y = w.world_to_pixel_values(comp["ra"], comp["dec"])
        centre = (SIZE - 1) / 2.0
        assert abs(float(x) - (centre + dcol)) < 1.5 and abs(float(y) - (centre + drow)) < 1.5
        # and north is within 45 degrees of +row, east within 45 degrees of -column
        here = np.array(w.world_to_pixel_values(row.ra, row.dec))
        north = np.array(w.world_to_pixel_values(row.ra, row.dec + 1 / 3600)) - here
        east = np.array(w.world_to_pixel_values(row.ra + 1 / 3600 / np.cos(np.radians(row.dec)), row.dec)) - here
        assert north[1] > abs(north[0]) and -east[0] > abs(east[1]), (row.camcol, north, east)


def test_skyserver_jpeg_cutouts_are_north_up_east_left(catalogue: pd.DataFrame, routes: dict[str, Any]) -> None:
    for row, path in zip(catalogue.itertuples(), routes["jpeg"]["path"], strict=True):
        _assert_north_east(read_cutout(path, bands=RGB).data, f"skyserver-jpeg camcol {row.camcol}")


def test_image_folder_jpeg_matches_the_skyserver_route(sky: Any, catalogue: pd.DataFrame,
                                                      routes: dict[str, Any]) -> None:
    """SkyServer's picture saved as a JPEG file (north up, first row at the top) through the images source."""
    import requests

    root: Path = routes["root"] / "folder"
    root.mkdir()
    rows = []
    for row in catalogue.itertuples():
        query = {"ra": f"{row.ra:.8f}", "dec": f"{row.dec:.8f}", "scale": "0.198", "width": "64", "height": "64"}
        body = requests.get(jpeg_url(sky.skyserver_url, 17), params=query, timeout=10).content
        (root / f"{row.objid}.jpg").write_bytes(body)
        rows.append({"objid": row.objid, "ra": np.nan, "dec": np.nan, "image_path": str(root / f"{row.objid}.jpg")})
    man = make_cutouts(pd.DataFrame(rows), CutoutCache(root / "cutouts"), size=SIZE, crop_fraction=1.0)
    assert (man["status"] == "ok").all(), man["reason"].tolist()
    for path, jpeg_path in zip(man["path"], routes["jpeg"]["path"], strict=True):
        folder = read_cutout(path, bands=RGB).data.astype(float)
        _assert_north_east(folder, "image folder")
        # the same picture by the two JPEG routes: the same orientation, nearly the same pixels
        served = read_cutout(jpeg_path, bands=RGB).data.astype(float)
        assert np.corrcoef(folder.ravel(), served.ravel())[0, 1] > 0.9


def test_fits_files_through_load_external(sky: Any, catalogue: pd.DataFrame, routes: dict[str, Any]) -> None:
    # a galpipe cutout (already north up): loaded as it is
    for path in routes["frames"]["path"]:
        _assert_north_east(SdssSource.load_external(path, size=SIZE, crop_fraction=1.0).data, "galpipe FITS")
    # a plain FITS stamp in its frame's own (transposed, rotated) orientation, with its WCS
    root: Path = routes["root"] / "raw"
    root.mkdir()
    for row in catalogue.itertuples():
        frame = parse_frame_bz2(sky.frame_bytes(int(row.run), int(row.camcol), int(row.field), "r"))
        stamp = Cutout2D(frame.data, SkyCoord(row.ra, row.dec, unit="deg"), (SIZE, SIZE), wcs=frame.wcs)
        raw = root / f"{row.objid}.fits"
        fits.PrimaryHDU(stamp.data.astype(np.float32), header=stamp.wcs.to_header()).writeto(raw)
        loaded = ImagesSource.load_external(raw, size=SIZE, crop_fraction=1.0)
        _assert_north_east(loaded.data, f"plain FITS stamp camcol {row.camcol}")


def test_gallery_draws_north_up_east_left(routes: dict[str, Any]) -> None:
    cut = read_cutout(routes["jpeg"]["path"][0], bands=RGB)
    image = cut.data.transpose(1, 2, 0).astype(np.float32) / 255.0  # as normalise gives it: (H, W, C)
    fig = gallery_figure(image[None], RGB, ["x"], ncols=1)
    (ax,) = [a for a in fig.axes if a.images]
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float).sum(axis=2)  # row 0 = top of the PNG
    x0, y0, x1, y1 = (round(v) for v in ax.get_window_extent().extents)
    height = buf.shape[0]
    tile = buf[height - y1:height - y0, x0:x1]  # display y grows upwards, buffer rows downwards
    shown = tile[::-1]  # bottom row first, like the FITS order the helper expects
    drow, dcol = _companion_offset(shown, exclude=4.0 * tile.shape[0] / SIZE)
    assert drow > 0 and dcol < 0, f"gallery: companion at ({drow}, {dcol}) in the drawn figure, expected up-left"
    assert ax.images[0].origin == "lower"
