"""data/pretrain_transform.py: the planned pre-training transform equals torchvision's, the JPEG
draft decode (DATA.JPEG_DRAFT) keeps every crop and flip, only refiltering the pixels, the 8-bit
hand-over normalises to the same values, and the tensor resize stays within one level of PIL's."""

import platform

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from data.datasets import ImageFolderDataset, MaskedImageDataset
from data.device_loader import normalize_batch
from data.masking import MaskGenerator
from data.pretrain_transform import PretrainTransform, draft_jpeg, looked_up, normalize_pixels
from data.seeding import sample_seed, seeded_global_rngs, seeded_torch_rng
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


# ------------------------------------------------------------------------------------------------
# 8-bit hand-over (DATA.NORMALIZE_ON_DEVICE) and the tensor resize (DATA.RESIZE_BACKEND)
# ------------------------------------------------------------------------------------------------
def test_normalize_pixels_is_torchvision_to_tensor_and_normalize_for_every_value():
    values = np.stack([np.roll(np.arange(256, dtype=np.uint8), 85 * c) for c in range(3)], -1)
    image = Image.fromarray(values.reshape(16, 16, 3))  # each channel takes all 256 values
    expected = normalize()(T.ToTensor()(image))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    assert torch.equal(normalize_pixels(pixels), expected)
    assert torch.equal(looked_up(pixels), expected)  # the table other devices use
    batch = torch.stack([pixels, pixels.flip(-1)])  # batched: each image as on its own
    assert torch.equal(normalize_pixels(batch)[1], normalize()(T.ToTensor()(image)).flip(-1))


def grainy_photo(width, height, seed):
    """Smooth colours plus strong grain: every resize rounding case shows up."""
    noise = np.random.default_rng(seed).normal(0, 40, (height, width, 3))
    pixels = np.asarray(smooth_photo(width, height, seed), dtype=np.float64) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_tensor_resize_keeps_crops_and_flips_and_is_within_one_level_of_pil():
    images = [grainy_photo(500, 375, seed) for seed in range(4)] + [smooth_photo(90, 70)]
    pil, tensor = PretrainTransform(192), PretrainTransform(192, resize='tensor')
    differences = []
    for i, image in enumerate(images * 2):
        with seeded_global_rngs(i):
            plan = pil.plan(image.size)
        a, b = pil.pixels(image, plan), tensor.pixels(image, plan)
        assert a.shape == b.shape == (3, 192, 192) and b.dtype == torch.uint8
        differences.append((a.int() - b.int()).abs().flatten())
    difference = torch.cat(differences)
    # A wrong box or flip moves edges and grain: most values change by tens of levels.
    assert difference.max() <= 1
    # torchvision's uint8 kernel: about 0.3 % measured; x86 without AVX2 resizes in float, 14 %.
    native = torch.backends.cpu.get_cpu_capability() in ('AVX2', 'AVX512')
    native = native or platform.machine() in ('aarch64', 'arm64')
    assert 0 < (difference > 0).float().mean() < (0.01 if native else 0.2)


def test_tensor_resize_leaves_a_reduced_jpeg_decode_to_pil(tmp_path):
    image = grainy_photo(400, 300, 0)
    plan = PretrainTransform(SIZE).plan(image.size)
    pil, tensor = PretrainTransform(SIZE), PretrainTransform(SIZE, resize='tensor')
    assert torch.equal(pil.pixels(image, plan, 4), tensor.pixels(image, plan, 4))


def test_handed_over_pixels_normalise_to_the_datasets_own_samples(tmp_path):
    smooth_photo(400, 300).save(tmp_path / 'a.jpg', quality=95)
    grainy_photo(120, 90, 1).save(tmp_path / 'b.png')
    for resize in ('pil', 'tensor'):
        dataset = MaskedImageDataset(
            ImageFolderDataset(str(tmp_path)),
            PretrainTransform(SIZE, jpeg_draft=True, resize=resize),
            MaskGenerator(SIZE, 16, 4, 0.5),
            seed=3,
        )
        handed = dataset.handing_over_pixels()
        for key in [(0, 0), (1, 1), (4, 0)]:
            image, mask, label = dataset[key]
            pixels, small_mask, same_label = handed[key]
            assert pixels.dtype == small_mask.dtype == torch.uint8
            finished = normalize_batch((pixels[None], small_mask[None], label), torch.device('cpu'))
            assert torch.equal(finished[0][0], image) and torch.equal(finished[1][0], mask)
            assert finished[1].dtype == mask.dtype and same_label == label
        assert not dataset.pixels_only  # the dataset itself is unchanged


def test_seeded_torch_rng_draws_from_the_seed_and_restores_the_global_state():
    torch.manual_seed(11)
    expected_after = torch.rand(4)
    torch.manual_seed(11)
    with seeded_torch_rng(5):
        inside = torch.rand(3)
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(torch.rand(4), expected_after)  # as if the block had not run
