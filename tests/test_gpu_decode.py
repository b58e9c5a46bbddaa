"""data/gpu_decode.py (DATA.DECODE gpu), run on the CPU: the same crops, flips and masks as the PIL
pipeline and close pixels, a clear error without a GPU, and a named error for a broken JPEG."""

import pytest
import torch

from config import load_config
from data import build_loader
from data.datasets import ImageFolderDataset, MaskedImageDataset
from data.gpu_decode import EncodedMaskedImageDataset, collate_encoded, decode_batch
from data.masking import MaskGenerator
from data.pretrain_transform import PretrainTransform
from tests.conftest import ROOT, smooth_photo
from utils.errors import BadImageError, ConfigError

SIZE = 48
TINY = f'{ROOT}/tests/configs/tiny_swin_pretrain.yaml'


def folder_of_images(root):
    smooth_photo(120, 90, seed=0).save(root / 'a.jpg', quality=95)
    smooth_photo(100, 130, seed=1).convert('L').save(root / 'b.jpg', quality=95)  # grey JPEG
    smooth_photo(90, 90, seed=2).save(root / 'c.png')  # decoded by PIL in the worker
    smooth_photo(160, 100, seed=3).convert('CMYK').save(root / 'd.jpg', quality=95)
    return ImageFolderDataset(str(root))


def datasets(base):
    transform, masks = PretrainTransform(SIZE), MaskGenerator(SIZE, 16, 4, 0.5)
    return (
        MaskedImageDataset(base, transform, masks, seed=5),
        EncodedMaskedImageDataset(base, transform, masks, seed=5),
    )


def test_device_pipeline_gives_the_cpu_pipelines_crops_masks_and_close_pixels(tmp_path):
    cpu, encoded = datasets(folder_of_images(tmp_path))
    keys = [(epoch, index) for epoch in (0, 3) for index in range(4)]
    datas, paths, plans, masks, labels = collate_encoded([encoded[k] for k in keys])
    # RGB and grey JPEGs go as bytes; the PNG and the CMYK JPEG as pixels decoded by PIL.
    assert [d.dim() for d in datas[:4]] == [1, 1, 3, 3]
    images = decode_batch(datas, paths, plans, SIZE, torch.device('cpu'))
    expected = torch.stack([cpu[k][0] for k in keys])
    assert images.shape == expected.shape == (8, 3, SIZE, SIZE)
    assert torch.equal(masks, torch.stack([cpu[k][1] for k in keys]))
    difference = (images - expected).abs() * 0.225 * 255  # 8-bit units
    # Same box and flip: only the decoders' and resize filters' rounding differ. (A flip or box
    # mismatch moves the colour ramp by tens of units.)
    assert difference.mean() < 1.0 and difference.max() < 8, difference.max()


def test_device_decode_needs_a_gpu_and_pretraining(tmp_path):
    folder_of_images(tmp_path)
    config = load_config(
        TINY,
        [
            'DATA.DECODE',
            'gpu',
            'DATA.DATASET',
            'folder',
            'DATA.DATA_PATH',
            str(tmp_path),
            'DATA.BATCH_SIZE',
            2,
        ],
    )
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match='DATA.DECODE cpu'):
            build_loader(config, is_pretrain=True)
    with pytest.raises(ConfigError, match='DATA.DECODE gpu is for pre-training'):
        load_config(TINY, ['DATA.DECODE', 'gpu'], is_pretrain=False)


def test_a_jpeg_no_decoder_reads_is_named(tmp_path):
    folder_of_images(tmp_path)
    data = (tmp_path / 'a.jpg').read_bytes()
    (tmp_path / 'a.jpg').write_bytes(data[: len(data) // 3])  # header intact, scan data cut
    _, encoded = datasets(ImageFolderDataset(str(tmp_path)))
    batch = collate_encoded([encoded[(0, 0)], encoded[(0, 1)]])
    with pytest.raises(BadImageError, match='a.jpg.*DATA.DECODE cpu'):
        decode_batch(*batch[:3], SIZE, torch.device('cpu'))
