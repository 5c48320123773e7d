"""Figures: every function writes a PNG that Pillow opens, atomically, and refuses bad input
with a ConfigError that names the problem and the fix."""

import numpy as np
import pytest
from PIL import Image

from recon_jax import figures
from recon_jax.errors import ConfigError


def _open_png(path) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 0
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    assert image.mode == "RGBA"  # what matplotlib's Agg canvas writes
    return image


def _no_temporaries(folder):
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid(tmp_path, channels):
    rng = np.random.default_rng(0)
    columns = {name: rng.random((3, 8, 8, channels)) for name in ("ground truth", "init", "reconstruction")}
    out = figures.image_grid(tmp_path / "grid.png", columns, row_labels=["a", "b", "c"], title="digits")
    image = _open_png(out)
    assert image.width > 100 and image.height > 100
    _no_temporaries(tmp_path)


def test_image_grid_overwrites_atomically(tmp_path):
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")
    figures.image_grid(path, {"x": np.zeros((1, 4, 4, 1))})
    _open_png(path)
    _no_temporaries(tmp_path)


def test_image_grid_bad_input(tmp_path):
    good = np.zeros((2, 4, 4, 1))
    with pytest.raises(ConfigError, match=r"outside \[0, 1\].*to_unit"):
        figures.image_grid(tmp_path / "a.png", {"x": good - 0.5})
    with pytest.raises(ConfigError, match=r"\(n, h, w, c\).*c = 1.*c = 3"):
        figures.image_grid(tmp_path / "a.png", {"x": np.zeros((2, 4, 4))})
    with pytest.raises(ConfigError, match=r"\(n, h, w, c\)"):
        figures.image_grid(tmp_path / "a.png", {"x": np.zeros((2, 4, 4, 2))})
    with pytest.raises(ConfigError, match="same number of images"):
        figures.image_grid(tmp_path / "a.png", {"x": good, "y": np.zeros((3, 4, 4, 1))})
    with pytest.raises(ConfigError, match="row_labels has 3 entries.*2 images"):
        figures.image_grid(tmp_path / "a.png", {"x": good}, row_labels=["a", "b", "c"])
    with pytest.raises(ConfigError, match="non-finite"):
        figures.image_grid(tmp_path / "a.png", {"x": np.full((2, 4, 4, 1), np.nan)})
    with pytest.raises(ConfigError, match="at least one column"):
        figures.image_grid(tmp_path / "a.png", {})
    assert not (tmp_path / "a.png").exists()


def test_scatter(tmp_path):
    rng = np.random.default_rng(1)
    x = np.repeat([0.01, 0.1, 1.0], 8)
    y = rng.random(24)
    y[3] = np.nan  # dropped, not an error
    groups = np.tile(["bilevel/affine", "kkt/mlp"], 12)
    _open_png(figures.scatter(tmp_path / "s.png", x, y, groups, "init distance", "membership AUC",
                              title="AUC", logx=True, hline=0.5))


def test_scatter_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="lengths 3, 2 and 3"):
        figures.scatter(tmp_path / "s.png", [1, 2, 3], [1, 2], ["a", "a", "b"], "x", "y")
    with pytest.raises(ConfigError, match="logx=True needs x > 0"):
        figures.scatter(tmp_path / "s.png", [0, 1], [1, 2], ["a", "b"], "x", "y", logx=True)
    with pytest.raises(ConfigError, match="1-D"):
        figures.scatter(tmp_path / "s.png", np.ones((2, 2)), [1, 2], ["a", "b"], "x", "y")


def test_sorted_curves(tmp_path):
    rng = np.random.default_rng(2)
    _open_png(figures.sorted_curves(tmp_path / "c.png", {"bilevel": rng.random(20), "kkt": rng.random(12)},
                                    "SSIM", threshold=0.4))
    with pytest.raises(ConfigError, match="at least one curve"):
        figures.sorted_curves(tmp_path / "c.png", {}, "SSIM")
    with pytest.raises(ConfigError, match="1-D"):
        figures.sorted_curves(tmp_path / "c.png", {"a": np.ones((2, 2))}, "SSIM")


def test_slice_1d_plot(tmp_path):
    t = np.linspace(-0.25, 1.25, 13)
    values = (t - 1.0) ** 2  # an exact 0 at t = 1: drawn at the floor of the log axis
    slices = {"bilevel": {"t": t, "values": values}, "kkt": {"t": t, "values": 0.5 + t ** 2}}
    _open_png(figures.slice_1d_plot(tmp_path / "l.png", slices, "reconstruction → truth"))
    with pytest.raises(ConfigError, match="13 t values but 12"):
        figures.slice_1d_plot(tmp_path / "l.png", {"a": {"t": t, "values": values[:-1]}}, "x")
    with pytest.raises(ConfigError, match="keys 't' and 'values'"):
        figures.slice_1d_plot(tmp_path / "l.png", {"a": {"t": t}}, "x")


def test_slice_2d_plot(tmp_path):
    u, v = np.linspace(-0.5, 1.5, 7), np.linspace(-0.3, 1.3, 5)
    uu, vv = np.meshgrid(u, v)
    values = (uu - 1.0) ** 2 + vv ** 2
    values[1, 3] = 0.0
    slice2d = {"u": u, "v": v, "values": values, "points": np.array([[0.0, 0.0], [1.0, 0.0], [0.4, 1.0]]),
               "names": ("recon", "truth", "recon 2")}
    _open_png(figures.slice_2d_plot(tmp_path / "p.png", slice2d, "plane"))
    with pytest.raises(ConfigError, match=r"expected \(len\(v\), len\(u\)\)"):
        figures.slice_2d_plot(tmp_path / "p.png", {**slice2d, "values": values.T}, "plane")
    with pytest.raises(ConfigError, match="landscape.slice_2d"):
        figures.slice_2d_plot(tmp_path / "p.png", {"u": u}, "plane")
    with pytest.raises(ConfigError, match="no positive"):
        figures.slice_2d_plot(tmp_path / "p.png", {**slice2d, "values": np.zeros_like(values)}, "plane")


def test_figures_from_a_real_landscape(tmp_path):
    """landscape.slice_1d / slice_2d outputs plot as they are (a quadratic, no victim needed)."""
    import jax.numpy as jnp

    from recon_jax import landscape

    rng = np.random.default_rng(3)
    origin, a, b = (rng.normal(size=(2, 3, 3, 1)) for _ in range(3))
    f = lambda x: jnp.sum((x - a) ** 2)  # 0 at a, the "ground truth"
    line = landscape.slice_1d(f, origin, a, n=13)
    plane = landscape.slice_2d(f, origin, a, b, n=6, names=("recon", "truth", "recon 2"))
    _open_png(figures.slice_1d_plot(tmp_path / "l.png", {"quadratic": line}, "line"))
    _open_png(figures.slice_2d_plot(tmp_path / "p.png", plane, "plane"))
