"""uvq.images: the one grid function (whole-factor enlargement, torchvision tiling, labels) and plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from uvq.images import CELL_PX, GRID_PAD, cell_scale, grid_image, save_grid


def _quantized(*shape: int, seed: int = 0) -> torch.Tensor:
    """Images whose values are k/255, so that writing them as 8-bit PNG loses nothing."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255


def _brute_grid(x: np.ndarray, nrow: int, k: int, pad: int) -> np.ndarray:
    """The expected grid by loops: each pixel a k x k block, `pad` white pixels around every cell."""
    b, c, h, w = x.shape
    rows = -(-b // nrow)
    out = np.ones((c, rows * (k * h + pad) + pad, nrow * (k * w + pad) + pad), dtype=np.float32)
    for i in range(b):
        r, col = divmod(i, nrow)
        for y in range(h):
            for xx in range(w):
                y0, x0 = pad + r * (k * h + pad) + k * y, pad + col * (k * w + pad) + k * xx
                out[:, y0:y0 + k, x0:x0 + k] = x[i, :, y, xx][:, None, None]
    return out


@pytest.mark.parametrize("shape,k", [((16, 16), 4), ((8, 32), 8), ((36, 266), 2), ((64, 64), 1), ((100, 90), 1),
                                     ((5, 5), 13)])
def test_cells_are_enlarged_by_the_smallest_whole_factor_to_the_target(shape, k):
    assert cell_scale(*shape) == k
    assert min(shape) * k >= CELL_PX and (k == 1 or min(shape) * (k - 1) < CELL_PX)


@pytest.mark.parametrize("b,nrow", [(6, 3), (5, 2), (1, None), (7, None)])
def test_grid_matches_a_brute_force_tiling(b, nrow):
    x = _quantized(b, 3, 8, 12, seed=b)
    grid = grid_image(x, nrow=nrow)
    cols = min(b, nrow or int(np.ceil(np.sqrt(b))))
    k = cell_scale(8, 12)
    expected = _brute_grid(x.numpy(), cols, k, GRID_PAD)
    assert grid.shape == expected.shape  # whole multiples: rows * (k*H + pad) + pad by cols * (k*W + pad) + pad
    assert torch.equal(grid, torch.from_numpy(expected))


def test_one_image_has_the_same_frame_as_many():
    x = _quantized(2, 3, 16, 16)
    one, two = grid_image(x[:1]), grid_image(x, nrow=2)
    assert torch.equal(one, two[:, :, : one.shape[2]])


def test_labels_are_drawn_in_margins_and_leave_the_cells_alone():
    x = _quantized(6, 3, 16, 16)
    plain = grid_image(x, nrow=3)
    labelled = grid_image(x, nrow=3, row_labels=["input", "reconstruction"], col_labels=["a", "b", "c"])
    top = labelled.shape[1] - plain.shape[1]
    left = labelled.shape[2] - plain.shape[2]
    assert top > 0 and left > 0
    assert torch.equal(labelled[:, top:, left:], plain)  # the cells are untouched, only framed
    dark = labelled.mean(0) < 0.5  # text is black on white
    cell = 16 * cell_scale(16, 16)
    for r in range(2):  # each row's band of the left margin holds text
        y0 = top + GRID_PAD + r * (cell + GRID_PAD)
        assert dark[y0:y0 + cell, :left].any()
    for c in range(3):  # each column's band of the top margin holds text
        x0 = left + GRID_PAD + c * (cell + GRID_PAD)
        assert dark[:top, x0:x0 + cell].any()
    assert not dark[:top, :left].any()  # the corner stays white


def test_a_long_column_label_is_cut_to_its_cell():
    x = _quantized(2, 3, 16, 16)
    g = grid_image(x, nrow=2, col_labels=["x" * 200, "y"])
    assert g.shape[2] == grid_image(x, nrow=2).shape[2]  # no wider than the cells


def test_label_counts_must_match_the_grid():
    x = _quantized(6, 3, 16, 16)
    with pytest.raises(ValueError, match="2 rows"):
        grid_image(x, nrow=3, row_labels=["one"])
    with pytest.raises(ValueError, match="3 columns"):
        grid_image(x, nrow=3, col_labels=["a", "b"])


def test_save_grid_writes_the_grid_exactly(tmp_path):
    x = _quantized(4, 3, 16, 16)
    path = save_grid(x, tmp_path / "g.png", nrow=2, row_labels=["#0", "#2"])
    arr = np.asarray(Image.open(path).convert("RGB"))
    grid = grid_image(x, nrow=2, row_labels=["#0", "#2"])
    assert arr.shape == (grid.shape[1], grid.shape[2], 3)
    assert np.array_equal(arr, (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # atomic: no temporary left


def test_loss_by_time_step_is_a_labelled_matplotlib_plot(tmp_path):
    from uvq.prior.train import loss_by_t_plot

    buckets = [{"t_lo": 1 + 4 * i, "t_hi": 4 + 4 * i, "loss": float(i + 1) if i != 3 else float("nan")}
               for i in range(8)]
    path = loss_by_t_plot(buckets, tmp_path / "loss.png", title="loss by t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (640, 360)
