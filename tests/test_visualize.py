"""engine/figures.py and tools/visualize_reconstruction.py: reconstruction grids for every target,
random, box and hand-drawn masks."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from config import load_config
from engine.figures import reconstruction_grid, save_png
from models import build_model
from models.targets import normalized_to_rgb, rgb_to_normalized
from tools.visualize_reconstruction import main as visualize

TINY = (
    'MODEL:\n  SWIN:\n    EMBED_DIM: 8\n    DEPTHS: [1, 1, 1]\n    NUM_HEADS: [1, 1, 1]\n'
    '    WINDOW_SIZE: 2\n  SIMMIM:\n    TARGET:\n      NAME: color_bins\n      DOWNSAMPLE: 2\n'
    'DATA:\n  DATASET: synthetic\n  IMG_SIZE: 32\n  MASK_PATCH_SIZE: 8\n  SYNTHETIC:\n'
    '    NUM_CLASSES: 3\n'
)


def grid_size(num_images, image_size):
    """(width, height) of a 4-column grid with make_grid's 2-px padding."""
    return 4 * (image_size + 2) + 2, num_images * (image_size + 2) + 2


def test_grid_columns_original_masked_prediction_pasted():
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images, prediction = rgb_to_normalized(rgb), rgb_to_normalized(torch.zeros(2, 3, 8, 8))
    mask = torch.tensor([[1, 0], [0, 0]]).expand(2, -1, -1)  # top-left 4x4 pixels masked
    grid = reconstruction_grid(images, mask, prediction)
    assert grid.shape == (3, 2 * 10 + 2, 4 * 10 + 2) and grid.dtype == torch.uint8

    def cell(row, col):
        return grid[:, 2 + row * 10 : 10 + row * 10, 2 + col * 10 : 10 + col * 10]

    expected = (rgb[0] * 255).round().to(torch.uint8)
    assert torch.equal(cell(0, 0), expected)
    assert torch.equal(cell(0, 3)[:, 4:, :], expected[:, 4:, :])  # visible pixels: the original
    assert (cell(0, 3)[:, :4, :4] == 0).all() and (cell(0, 2) == 0).all()  # masked: the prediction
    assert (cell(0, 1)[:, :4, :4] == 128).all()  # masked input shown mid-grey


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp('ckpt')
    (folder / 'tiny.yaml').write_text(TINY)
    config = load_config(str(folder / 'tiny.yaml'))
    model = build_model(config)
    path = folder / 'ckpt_epoch_0.pth'
    torch.save({'model': model.state_dict(), 'config': config.dump()}, path)
    return str(path)


def test_predicted_image_of_a_bins_target_is_a_valid_image(checkpoint):
    config = load_config(os.path.join(os.path.dirname(checkpoint), 'tiny.yaml'))
    model = build_model(config)
    x = rgb_to_normalized(torch.rand(2, 3, 32, 32))
    image = model.predict_image(x, torch.zeros(2, 8, 8, dtype=torch.long))
    assert image.shape == x.shape
    rgb = rgb_to_normalized(normalized_to_rgb(image))  # inside [0, 1] before clamping
    torch.testing.assert_close(rgb, image, rtol=0, atol=1e-5)


def test_tool_random_masks_one_grid_per_patch_size(checkpoint, tmp_path):
    out = tmp_path / 'out'
    assert (
        visualize(
            [
                '--checkpoint',
                checkpoint,
                '--num-images',
                '3',
                '--mask-patch-size',
                '8',
                '16',
                '--mask-ratio',
                '0.5',
                '--output',
                str(out),
            ]
        )
        == 0
    )
    for name in ('random_mask8_ratio0.5.png', 'random_mask16_ratio0.5.png'):
        assert Image.open(out / name).size == grid_size(3, 32)


def test_tool_box_and_mask_image(checkpoint, tmp_path):
    out = tmp_path / 'out'
    assert (
        visualize(
            [
                '--checkpoint',
                checkpoint,
                '--num-images',
                '2',
                '--box',
                '0',
                '0',
                '16',
                '16',
                '--output',
                str(out),
            ]
        )
        == 0
    )
    box = np.asarray(Image.open(out / 'box.png'))
    assert box.shape[:2] == grid_size(2, 32)[::-1]
    masked_cell = box[2:34, 34 + 2 : 34 + 34]  # row 0, "masked input" column
    assert (masked_cell[:16, :16] == 128).all() and not (masked_cell[16:, 16:] == 128).all()

    drawn = np.zeros((64, 64), dtype=np.uint8)
    drawn[32:, :] = 255  # white = masked: the bottom half, drawn at another resolution
    Image.fromarray(drawn).save(tmp_path / 'mask.png')
    assert (
        visualize(
            [
                '--checkpoint',
                checkpoint,
                '--num-images',
                '2',
                '--mask-image',
                str(tmp_path / 'mask.png'),
                '--output',
                str(out),
            ]
        )
        == 0
    )
    image = np.asarray(Image.open(out / 'mask_image.png'))
    assert image.shape[:2] == grid_size(2, 32)[::-1]
    masked_cell = image[2:34, 36:68]
    assert (masked_cell[16:] == 128).all() and not (masked_cell[:16] == 128).all()


def test_tool_reads_images_from_a_folder(checkpoint, tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 50, 3), 60 * i, dtype=np.uint8)).save(folder / f'{i}.png')
    out = tmp_path / 'out'
    assert (
        visualize(['--checkpoint', checkpoint, '--images', str(folder), '--output', str(out)]) == 0
    )
    assert Image.open(out / 'random_mask8_ratio0.6.png').size == grid_size(2, 32)


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory, checkpoint):
    """Files a user might pass by mistake."""
    folder = tmp_path_factory.mktemp('bad')
    config = load_config(os.path.join(os.path.dirname(checkpoint), 'tiny.yaml'), is_pretrain=False)
    torch.save({'model': build_model(config, is_pretrain=False).state_dict()}, folder / 'ft.pth')
    (folder / 'truncated.pth').write_bytes(open(checkpoint, 'rb').read()[:2000])
    (folder / 'text.png').write_text('not an image')
    (folder / 'a_file').write_text('x')
    return folder


@pytest.mark.parametrize(
    'args, expected',
    [
        (['--checkpoint', '{bad}/ft.pth'], 'it has no decoder (a fine-tuned'),
        (['--checkpoint', '{bad}/truncated.pth'], 'is not a readable PyTorch checkpoint'),
        (['--mask-patch-size', '24'], 'is not divisible by DATA.MASK_PATCH_SIZE 24'),
        (['--mask-ratio', '1.5'], 'MASK_RATIO must lie in (0, 1), got 1.5'),
        (['--output', '{bad}/a_file/out'], 'Cannot write to the output folder'),
        (['--mask-image', '{bad}/text.png'], 'cannot be read as an image'),
        (['--box', '40', '40', '10', '10'], 'is empty: it needs x0 < x1 and y0 < y1'),
        (['--box', '0', '0', '2', '2'], 'masks no model patch'),
    ],
)
def test_tool_bad_input_gets_one_paragraph_and_exit_code_2(
    checkpoint, bad_inputs, tmp_path, capsys, args, expected
):
    from engine.launch import run_tool

    argv = ['--checkpoint', checkpoint, '--output', str(tmp_path / 'out')]
    argv += [a.format(bad=bad_inputs) for a in args]
    assert run_tool(visualize, argv) == 2
    err = capsys.readouterr().err
    assert expected in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / 'out' / 'box.png')


def test_labelled_png_names_the_columns_above_the_unchanged_grid(tmp_path):
    grid = (
        torch.rand(3, 2 * 34 + 2, 4 * 34 + 2, generator=torch.Generator().manual_seed(0)) * 255
    ).to(torch.uint8)
    save_png(grid, str(tmp_path / 'plain.png'), min_cell=64)
    save_png(grid, str(tmp_path / 'labelled.png'), min_cell=64, labels=True)
    plain = np.asarray(Image.open(tmp_path / 'plain.png'))
    labelled = np.asarray(Image.open(tmp_path / 'labelled.png'))
    strip = labelled.shape[0] - plain.shape[0]
    assert strip > 8 and labelled.shape[1] == plain.shape[1]
    assert np.array_equal(labelled[strip:], plain)  # the grid itself is untouched
    header = labelled[:strip]
    column = plain.shape[1] // 4
    for i in range(4):  # each column's header holds dark text on white
        assert header[:, i * column : (i + 1) * column].min() < 100
    assert (header[:, :2] == 255).all()
