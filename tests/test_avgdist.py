"""data/avgdist.py and tools/avgdist.py: AvgDist on masks whose answer is known by hand, and the
trend of Figure 3a."""

import os

import numpy as np
import pytest
from PIL import Image

from data.avgdist import avg_dist, masked_pixel_distances, mean_avg_dist
from data.masking import BlockwiseMaskGenerator, MaskGenerator, SquareMaskGenerator
from tools import avgdist as avgdist_tool


def square_mask(k, size=32, top=10, left=10):
    mask = np.zeros((size, size), dtype=np.int64)
    mask[top : top + k, left : left + k] = 1
    return mask


# A k x k masked square inside a visible image: the pixel in ring d (1 = the border ring) is d
# pixels from the visible pixel straight across the nearest side; ring d holds
# (k - 2d + 2)^2 - max(k - 2d, 0)^2 pixels. k = 3: 8 pixels at 1, 1 at 2 -> 10 / 9.
@pytest.mark.parametrize(
    'k, expected', [(1, 1.0), (2, 1.0), (3, 10 / 9), (4, 20 / 16), (5, 35 / 25), (6, 56 / 36)]
)
def test_masked_square_in_visible_image(k, expected):
    assert avg_dist(square_mask(k)) == pytest.approx(expected, abs=1e-12)


def test_all_visible_mask_has_zero_avgdist_and_all_masked_is_undefined():
    assert avg_dist(np.zeros((8, 8))) == 0.0
    with pytest.raises(ValueError, match='no visible|without visible'):
        avg_dist(np.ones((8, 8)))


def test_masked_half_plane_counts_distance_to_the_visible_half_not_the_border():
    mask = np.zeros((8, 16))
    mask[:, :8] = 1  # column c is 8 - c pixels from column 8, the first visible one
    assert avg_dist(mask) == pytest.approx(np.mean(np.arange(1, 9)))


def test_distances_are_euclidean():
    mask = np.ones((5, 5))
    mask[0, 0] = 0  # the only visible pixel
    distances = masked_pixel_distances(mask)
    assert distances.max() == pytest.approx(np.hypot(4, 4))


def test_mean_avg_dist_pools_masks_of_a_generator():
    """One 4x4 corner square of an 8x8 image (2x2 grid, ratio 0.25): pixel (i, j) of the top-left
    corner is min(4 - i, 4 - j) from the visible pixels -> 7, 5, 3, 1 pixels at 1, 2, 3, 4 = 30 /
    16, and every corner is the same by symmetry."""
    dist, fraction = mean_avg_dist(SquareMaskGenerator(8, 4, 1, 0.25), num_masks=6)
    assert dist == pytest.approx(30 / 16) and fraction == 0.25


def test_figure_3a_trend():
    """Random masking: AvgDist grows with the ratio and with the mask patch size; square and
    block-wise masks sit high, near random masking of 64-px patches."""

    def measure(generator_class, mask_patch, ratio):
        return mean_avg_dist(generator_class(192, mask_patch, 4, ratio), num_masks=4)[0]

    random = {(p, r): measure(MaskGenerator, p, r) for p in (4, 16, 32) for r in (0.2, 0.6)}
    for p in (4, 16, 32):
        assert random[(p, 0.2)] < random[(p, 0.6)]
    for r in (0.2, 0.6):
        assert random[(4, r)] < random[(16, r)] < random[(32, r)]
    random_64 = measure(MaskGenerator, 64, 0.2)
    for generator_class, mask_patch in ((SquareMaskGenerator, 32), (BlockwiseMaskGenerator, 16)):
        dist = measure(generator_class, mask_patch, 0.25)
        assert random[(32, 0.2)] < dist and random_64 / 1.5 < dist < random_64 * 1.5


def test_tool_prints_table_and_saves_plot(tmp_path, capsys):
    out = tmp_path / 'plots' / 'avgdist.png'
    code = avgdist_tool.main(
        [
            '--settings',
            'random:8',
            'square:16',
            'random:32',
            '--ratios',
            '0.3',
            '0.9',
            '--img-size',
            '64',
            '--num-masks',
            '2',
            '--output',
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert 'random:8' in printed and 'square:16' in printed and '0.9' in printed
    row = next(line for line in printed.splitlines() if line.startswith('random:32'))
    assert row.split()[-1] == '-'  # at 0.9 on a 2x2 grid every patch is masked: undefined
    assert os.path.isfile(out) and Image.open(out).size == (900, 560)


@pytest.mark.parametrize(
    'args, expected',
    [
        (['--ratios', '0', '1'], 'must lie in (0, 1), got 0.0'),
        (['--num-masks', '0'], '--num-masks must be at least 1'),
        (['--settings', 'random:24'], 'is not divisible by DATA.MASK_PATCH_SIZE 24'),
        (['--settings', 'random:64', '--ratios', '0.95'], 'nothing to plot'),
    ],
)
def test_tool_bad_input_gets_one_paragraph_and_exit_code_2(tmp_path, capsys, args, expected):
    from engine.launch import run_tool

    out = tmp_path / 'avgdist.png'
    code = run_tool(
        avgdist_tool.main, ['--img-size', '64', '--num-masks', '2', '--output', str(out), *args]
    )
    err = capsys.readouterr().err
    assert code == 2 and expected in err and 'Traceback' not in err
    assert not out.exists()
