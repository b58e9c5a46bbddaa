"""data/pretrain_transform.py: the planned pre-training transform equals torchvision's, and the
JPEG draft decode (DATA.JPEG_DRAFT) keeps every crop and flip, only refiltering the pixels."""

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from data.datasets import ImageFolderDataset, MaskedImageDataset
from data.masking import MaskGenerator
from data.pretrain_transform import PretrainTransform, draft_jpeg
from data.seeding import sample_seed, seeded_global_rngs
from data.transforms import ToRGB, normalize
from tests.conftest import smooth_photo

SIZE = 48


def torchvision_pipeline(size):
    """The pre-training transform as the official code writes it (before this module)."""
    return T.Compose(
        [
            ToRGB(),
            T.RandomResizedCrop(size, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize(),
        ]
    )


@pytest.mark.parametrize('mode', ['RGB', 'L', 'RGBA'])
def test_transform_is_torchvision_pipeline_bit_for_bit(mode):
    image = smooth_photo(90, 70).convert(mode)
    ours, reference = PretrainTransform(SIZE), torchvision_pipeline(SIZE)
    for seed in range(6):
        with seeded_global_rngs(seed):
            expected = reference(image)
        with seeded_global_rngs(seed):
            assert torch.equal(ours(image), expected)


@pytest.mark.parametrize('crop_side, expected', [(95, 1), (96, 2), (191, 2), (192, 4), (400, 8)])
def test_reduction_is_the_largest_scale_keeping_the_crop_at_least_the_output_size(
    crop_side, expected
):
    plan = PretrainTransform(SIZE).plan((500, 500))._replace(height=crop_side, width=crop_side + 30)
    assert PretrainTransform(SIZE, jpeg_draft=True).reduction(plan) == expected
    assert PretrainTransform(SIZE, jpeg_draft=False).reduction(plan) == 1


def test_draft_decodes_a_jpeg_at_the_reduced_size(tmp_path):
    path = tmp_path / 'big.jpg'
    smooth_photo(401, 301).save(path, quality=95)
    for reduction, size in [(1, (401, 301)), (2, (201, 151)), (4, (101, 76)), (8, (51, 38))]:
        image = Image.open(path)
        assert draft_jpeg(image, reduction) == reduction
        image.load()
        assert image.size == size
    png = tmp_path / 'big.png'
    smooth_photo(401, 301).save(png)
    image = Image.open(png)
    assert draft_jpeg(image, 4) == 1 and image.size == (401, 301)


def dataset_over(folder, jpeg_draft):
    return MaskedImageDataset(
        ImageFolderDataset(str(folder)),
        PretrainTransform(SIZE, jpeg_draft=jpeg_draft),
        MaskGenerator(SIZE, 16, 4, 0.5),
        seed=3,
    )


def test_draft_keeps_every_crop_and_flip_and_only_refilters_pixels(tmp_path):
    # 400x300 with a 48-px output: crops of 0.67-1 of the area are >= 4 x 48 px, decoded at 1/4.
    for i in range(3):
        smooth_photo(400, 300, seed=i).save(tmp_path / f'{i}.jpg', quality=95)
    full, draft = dataset_over(tmp_path, False), dataset_over(tmp_path, True)
    for key in [(0, 0), (0, 1), (1, 2), (5, 0), (7, 1)]:
        (a, mask_a, _), (b, mask_b, _) = full[key], draft[key]
        assert torch.equal(mask_a, mask_b)
        difference = (a - b).abs() * 0.225 * 255  # back to 8-bit units (std ~0.225)
        # A wrong box (off by a factor r, or flipped differently) moves the ramp: tens of units.
        assert difference.mean() < 1.5 and difference.max() < 12, (key, difference.max())
        assert torch.equal(draft[key][0], b)  # still a pure function of (seed, epoch, index)


def test_crops_too_small_to_reduce_and_other_formats_decode_in_full(tmp_path):
    # 90x70 at 48 px: no crop reaches 96 px, so the JPEG path is the full decode, bit for bit.
    smooth_photo(90, 70).save(tmp_path / 'a.jpg', quality=95)
    smooth_photo(400, 300).save(tmp_path / 'b.png')
    full, draft = dataset_over(tmp_path, False), dataset_over(tmp_path, True)
    for key in [(0, 0), (3, 0), (0, 1), (2, 1)]:
        assert torch.equal(full[key][0], draft[key][0])


def test_planned_samples_equal_the_transform_applied_after_a_full_decode(tmp_path):
    smooth_photo(400, 300).save(tmp_path / 'a.jpg', quality=95)
    (tmp_path / 'b.jpg').write_bytes(b'not a jpeg')  # replaced by the next image, drawn afresh
    dataset = dataset_over(tmp_path, False)
    transform = PretrainTransform(SIZE)
    reference = ImageFolderDataset(str(tmp_path))
    for epoch, index in [(0, 0), (1, 0), (2, 1)]:
        with seeded_global_rngs(sample_seed(3, epoch, index, 'augment')):
            expected = transform(reference[index][0])
        assert torch.equal(dataset[(epoch, index)][0], expected)
