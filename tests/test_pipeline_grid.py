"""`image_grid`: the sample grids of model cards, readable at any sample size."""

import numpy as np
from PIL import Image

from diffusers_pd.pipeline import image_grid


def test_small_samples_are_upscaled_by_nearest_neighbour_with_a_white_gutter():
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 255, size=(8, 8), dtype=np.uint8) for _ in range(5)]  # never 255: gutters stand out
    grid = np.asarray(image_grid([Image.fromarray(s) for s in samples], cols=3))
    assert grid.shape == (2 * 64 + 2, 3 * 64 + 2 * 2)  # 8 px -> 64 px tiles, 2 px gutters, 2 rows of 3
    for i, sample in enumerate(samples):
        top, left = (i // 3) * 66, (i % 3) * 66
        np.testing.assert_array_equal(grid[top:top + 64, left:left + 64], np.kron(sample, np.ones((8, 8), np.uint8)))
    assert (grid[64:66] == 255).all() and (grid[:, 64:66] == 255).all() and (grid[:, 130:132] == 255).all()
    assert (grid[66:, 132:] == 255).all()  # the sixth place is empty


def test_large_samples_keep_their_size():
    rgb = [Image.new("RGB", (96, 80), (i, 0, 0)) for i in range(4)]
    grid = image_grid(rgb, cols=2)
    assert grid.size == (2 * 96 + 2, 2 * 80 + 2) and grid.mode == "RGB"
    assert grid.getpixel((96 + 2, 80 + 2)) == (3, 0, 0) and grid.getpixel((96, 0)) == (255, 255, 255)
