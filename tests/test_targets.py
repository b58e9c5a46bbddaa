"""models/targets.py: every loss against a hand computation, colour targets on known pixels, the
way back to an image, palettes, and the palette tool."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import get_defaults
from models.targets import (
    ColorBins,
    ColorClusters,
    PixelRegression,
    box_mean,
    build_criterion,
    load_palette,
    local_norm_target,
    nearest_color_index,
    normalized_to_rgb,
    rgb_to_normalized,
)
from tools.build_color_palette import kmeans
from tools.build_color_palette import main as build_palette
from utils.errors import ConfigError

MASK = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 0]]])  # (B=2, 2x2 cells of 2x2 pixels)


def hand_loss(x, y, mask, patch, per_element, channels=3):
    """Eq. 1 written out: the loss summed over masked pixel-channels / masked pixels / channels."""
    total, count = 0.0, 0
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                if mask is None or mask[b, i // patch, j // patch]:
                    count += 1
                    total += sum(
                        per_element(y[b, c, i, j].item(), x[b, c, i, j].item())
                        for c in range(channels)
                    )
    return total / (count + 1e-5) / channels


def smooth_l1(beta):
    return lambda p, t: 0.5 * (p - t) ** 2 / beta if abs(p - t) < beta else abs(p - t) - 0.5 * beta


@pytest.mark.parametrize(
    'loss, per_element',
    [
        ('l1', lambda p, t: abs(p - t)),
        ('l2', lambda p, t: (p - t) ** 2),
        ('smooth_l1', smooth_l1(0.5)),
    ],
)
@pytest.mark.parametrize('scope', ['masked', 'all'])
def test_regression_losses_match_hand_computation(loss, per_element, scope):
    torch.manual_seed(0)
    x, y = (
        torch.randn(2, 3, 4, 4, dtype=torch.float64),
        torch.randn(2, 3, 4, 4, dtype=torch.float64),
    )
    criterion = PixelRegression(2, 3, loss=loss, scope=scope, smooth_l1_beta=0.5)
    expected = hand_loss(x, y, MASK if scope == 'masked' else None, 2, per_element)
    assert criterion(x, y, MASK).item() == pytest.approx(expected, rel=1e-6)


def test_lower_resolution_target_is_average_pooled_and_weighted_by_masked_fraction():
    """Down-sampling 4 on an 8x8 image with 2-px mask cells: each prediction pixel covers 2x2 cells,
    and weighs by the fraction of them that is masked."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    mask = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]])
    y = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    criterion = PixelRegression(2, 3, downsample=4)
    target = criterion.target(x)
    assert torch.allclose(target[0, :, 1, 0], x[0, :, 4:8, 0:4].mean(dim=(1, 2)))
    weights = torch.tensor([[0.75, 0.0], [0.0, 0.5]], dtype=torch.float64)
    error = (target - y).abs().sum(dim=1)[0]
    expected = (error * weights).sum() / (weights.sum() + 1e-5) / 3
    assert criterion(x, y, mask).item() == pytest.approx(expected.item(), rel=1e-6)  # fp32 loss


@pytest.mark.parametrize(
    'window, count_include_pad', [(5, False), (5, True), (47, False), (47, True)]
)
def test_box_mean_equals_the_two_dimensional_average_pool(window, count_include_pad):
    x = torch.randn(2, 3, 30, 52, dtype=torch.float64)
    expected = F.avg_pool2d(
        x, window, stride=1, padding=window // 2, count_include_pad=count_include_pad
    )
    torch.testing.assert_close(
        box_mean(x, window, count_include_pad), expected, rtol=1e-12, atol=1e-12
    )


def test_norm_target_then_pool():
    x = torch.randn(1, 3, 8, 8)
    criterion = PixelRegression(2, 3, norm_target_window=3, downsample=2)
    torch.testing.assert_close(criterion.target(x), F.avg_pool2d(local_norm_target(x, 3), 2))


def rgb_image(values):
    """(1, 3, 1, N) normalised image whose pixel n has the RGB value values[n] in every channel."""
    rgb = torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    return rgb_to_normalized(rgb)


@pytest.mark.parametrize(
    'num_bins, expected', [(8, [0, 0, 1, 3, 7, 7]), (256, [0, 31, 32, 127, 224, 255])]
)
def test_color_bins_of_known_8bit_pixels(num_bins, expected):
    values = [v / 255 for v in (0, 31, 32, 127, 224, 255)]
    target = ColorBins(1, 3, num_bins).target(rgb_image(values))
    assert target.shape == (1, 3, 1, 6)
    assert target[0, 0, 0].tolist() == expected and torch.equal(target[0, 0], target[0, 2])


def test_color_bins_loss_is_cross_entropy_per_channel_over_masked_pixels():
    torch.manual_seed(0)
    x = rgb_image([0.1, 0.9, 0.5, 0.3])  # 1x4 image, patch 1
    mask = torch.tensor([[[1, 0, 1, 1]]])
    logits = torch.randn(1, 3 * 4, 1, 4)
    criterion = ColorBins(1, 3, num_bins=4)
    bins = [0, 3, 2, 1]
    total = 0.0
    for j in (0, 2, 3):
        for c in range(3):
            scores = logits[0, 4 * c : 4 * c + 4, 0, j]
            total += -(scores.log_softmax(0)[bins[j]]).item()
    assert criterion(x, logits, mask).item() == pytest.approx(total / (3 + 1e-5) / 3, rel=1e-5)


def test_color_clusters_target_and_loss():
    palette = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rgb = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.1], [0.8, 0.7, 0.9]]).T.reshape(1, 3, 1, 3)
    x = rgb_to_normalized(rgb)
    criterion = ColorClusters(1, palette)
    assert criterion.target(x).tolist() == [[[0, 2, 1]]]
    logits = torch.randn(1, 3, 1, 3)
    mask = torch.tensor([[[0, 1, 1]]])
    expected = -(
        logits[0, 2, 0, 1].item()
        - logits[0, :, 0, 1].logsumexp(0).item()
        + logits[0, 1, 0, 2].item()
        - logits[0, :, 0, 2].logsumexp(0).item()
    ) / (2 + 1e-5)
    assert criterion(x, logits, mask).item() == pytest.approx(expected, rel=1e-5)


# -----------------------------------------------------------------------------------------------
# prediction_to_image
# -----------------------------------------------------------------------------------------------
def images(batch=2, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return rgb_to_normalized(torch.rand(batch, 3, size, size, generator=generator))


@pytest.mark.parametrize('window', [None, 5])
def test_perfect_pixel_prediction_gives_back_the_image(window):
    x = images()
    criterion = PixelRegression(4, 3, norm_target_window=window)
    torch.testing.assert_close(
        criterion.prediction_to_image(criterion.target(x), x), x, rtol=1e-5, atol=1e-5
    )


def test_lower_resolution_prediction_is_upsampled_to_the_input():
    blocky = images(size=4).repeat_interleave(4, 2).repeat_interleave(4, 3)  # constant 4x4 blocks
    criterion = PixelRegression(4, 3, downsample=4)
    torch.testing.assert_close(
        criterion.prediction_to_image(criterion.target(blocky), blocky), blocky
    )


def confident_logits(index, num_classes, confidence=60.0):
    """Logits with `confidence` at `index` along a new class axis 1."""
    return F.one_hot(index, num_classes).movedim(-1, 1).float() * confidence


def test_color_bins_prediction_of_the_right_bins_gives_bin_centres():
    x = images()
    criterion = ColorBins(4, 3, num_bins=8)
    bins = criterion.target(x)  # (B, 3, H, W)
    logits = confident_logits(bins, 8).transpose(1, 2).flatten(1, 2)  # (B, 3 * 8, H, W)
    rgb = normalized_to_rgb(criterion.prediction_to_image(logits, x))
    torch.testing.assert_close(rgb, (bins + 0.5) / 8, rtol=0, atol=1e-5)
    assert (rgb - normalized_to_rgb(x)).abs().max() <= 1 / 16 + 1e-5


def test_color_clusters_prediction_of_the_right_cluster_gives_its_colour():
    palette = torch.rand(16, 3, generator=torch.Generator().manual_seed(1))
    x = images()
    criterion = ColorClusters(4, palette, downsample=2)
    index = criterion.target(x)
    image = criterion.prediction_to_image(confident_logits(index, 16), x)
    assert image.shape == x.shape
    expected = palette[index].permute(0, 3, 1, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(normalized_to_rgb(image), expected, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------------------------
# Palettes
# -----------------------------------------------------------------------------------------------
def test_nearest_color_index_in_chunks():
    palette = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    colors = torch.tensor([[[0.2, 0.2, 0.2], [0.6, 0.7, 0.8], [0.4, 0.4, 0.4]]])
    assert nearest_color_index(colors, palette, chunk=2).tolist() == [[0, 1, 0]]


def test_load_palette_formats_ranges_and_errors(tmp_path):
    palette = torch.rand(4, 3)
    torch.save(palette, tmp_path / 'p.pt')
    np.save(tmp_path / 'igpt.npy', palette.numpy() * 2 - 1)  # iGPT's centres are in [-1, 1]
    torch.testing.assert_close(load_palette(str(tmp_path / 'p.pt'), 4), palette)
    torch.testing.assert_close(load_palette(str(tmp_path / 'igpt.npy')), palette)
    with pytest.raises(FileNotFoundError, match='python -m tools.build_color_palette'):
        load_palette(str(tmp_path / 'missing.pt'))
    with pytest.raises(ConfigError, match='NUM_CLUSTERS is 512'):
        load_palette(str(tmp_path / 'p.pt'), 512)


def test_build_criterion_reads_target_and_loss_keys(tmp_path):
    class Encoder:
        patch_size, in_chans = 4, 3

    config = get_defaults()
    config.MODEL.SIMMIM.LOSS.update(TYPE='smooth_l1', SCOPE='all', SMOOTH_L1_BETA=0.25)
    config.MODEL.SIMMIM.TARGET.DOWNSAMPLE = 2
    criterion = build_criterion(config, Encoder)
    assert isinstance(criterion, PixelRegression)
    assert (criterion.loss, criterion.scope, criterion.smooth_l1_beta, criterion.downsample) == (
        'smooth_l1',
        'all',
        0.25,
        2,
    )
    torch.save(torch.rand(7, 3), tmp_path / 'palette.pt')
    config.MODEL.SIMMIM.TARGET.update(
        NAME='color_clusters', NUM_CLUSTERS=7, PALETTE=str(tmp_path / 'palette.pt')
    )
    clusters = build_criterion(config, Encoder)
    assert isinstance(clusters, ColorClusters) and clusters.prediction_channels == 7
    assert 'palette' not in clusters.state_dict()  # rebuilt from the config, not checkpointed


def test_kmeans_finds_well_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.1, 0.1], [0.1, 0.9, 0.9]])
    points = centres.repeat(100, 1) + 0.02 * torch.randn(300, 3, generator=generator)
    found = kmeans(points, 3, generator=torch.Generator().manual_seed(1))
    found = found[found.sum(1).argsort()]
    torch.testing.assert_close(found, centres[centres.sum(1).argsort()], rtol=0, atol=0.01)


def test_palette_tool_on_a_tiny_synthetic_set(tmp_path):
    cfg = tmp_path / 'clusters.yaml'
    cfg.write_text(
        'DATA:\n  DATASET: synthetic\n  IMG_SIZE: 32\n  MASK_PATCH_SIZE: 8\n'
        '  SYNTHETIC:\n    TRAIN_SIZE: 8\nMODEL:\n  SWIN:\n    WINDOW_SIZE: 1\n'
        '  SIMMIM:\n    TARGET:\n      NAME: color_clusters\n      NUM_CLUSTERS: 6\n'
        f'      PALETTE: {tmp_path / "palette.npy"}\n'
    )
    assert (
        build_palette(
            [
                '--cfg',
                str(cfg),
                '--num-images',
                '4',
                '--pixels-per-image',
                '32',
                '--iterations',
                '5',
            ]
        )
        == 0
    )
    palette = load_palette(str(tmp_path / 'palette.npy'), 6)
    assert palette.shape == (6, 3) and 0 <= palette.min() and palette.max() <= 1
    assert (palette.sum(1).diff() >= 0).all()  # sorted by brightness


@pytest.mark.parametrize(
    'setup, args, expected',
    [
        (
            'synthetic',
            ['--num-images', '1', '--pixels-per-image', '2'],
            'need at least as many sampled',
        ),
        ('empty folder', [], 'No images found in data folder'),
    ],
)
def test_palette_tool_bad_input_gets_one_paragraph_and_exit_code_2(
    tmp_path, capsys, setup, args, expected
):
    from engine.launch import run_tool

    cfg = tmp_path / 'clusters.yaml'
    cfg.write_text(
        'DATA:\n  DATASET: synthetic\n  IMG_SIZE: 32\n  MASK_PATCH_SIZE: 8\n'
        '  SYNTHETIC:\n    TRAIN_SIZE: 8\nMODEL:\n  SWIN:\n    WINDOW_SIZE: 1\n'
        '  SIMMIM:\n    TARGET:\n      NAME: color_clusters\n      NUM_CLUSTERS: 6\n'
        f'      PALETTE: {tmp_path / "palette.npy"}\n'
    )
    if setup == 'empty folder':
        (tmp_path / 'images').mkdir()
        args = ['--data-path', str(tmp_path / 'images'), '--opts', 'DATA.DATASET', 'folder']
    code = run_tool(build_palette, ['--cfg', str(cfg), *args])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and 'Traceback' not in err
    assert not (tmp_path / 'palette.npy').exists()
