"""Pre-training data path speed: images/s per worker, split into stages, and CPU cores per GPU.

    python -m benchmarks.loader_speed --out loader.md [--workers 2] [--model-rate 1400]

Writes a folder of generated JPEGs (no download): `--num-images` ImageNet-sized photos (500x375,
smooth colour fields, shapes, edges and grain, so that JPEG sizes are realistic) and a quarter as
many large ones (1600x1200, like the large tail of ImageNet and most camera photos). For each set
it times, in this process (= one worker), every stage of data/datasets.MaskedImageDataset:
read (file bytes), decode (header, crop plan, PIL decode, RGB), crop/resize, flip + tensor +
normalise, mask (data/masking.py), collate (default_collate of --batch-size samples, per image);
once as before this change (full decode, torch mask upsampling) and once as now (DATA.JPEG_DRAFT,
numpy masks). The GPU-decode hand-over (DATA.DECODE gpu: read, header and plan only, the rest on
the GPU) is timed too. Then the real DataLoader (build_loader) runs with --workers workers.

Cores per GPU = the model's images/s (--model-rate; 1400 is Swin-B/192 bf16 on one H100,
benchmarks/RESULTS.md) / images/s of one worker.
"""

import argparse
import atexit
import io
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import default_collate

from benchmarks.report import machine_description, write_report
from config import load_config
from data import build_loader
from data.datasets import ImageFolderDataset, load_image
from data.gpu_decode import EncodedMaskedImageDataset, collate_encoded, decode_batch
from data.masking import MaskGenerator
from data.pretrain_transform import PretrainTransform, draft_jpeg
from data.seeding import sample_seed, seeded_global_rngs
from data.transforms import to_rgb
from utils.mask_grid import upsample_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWIN_B = 'configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml'


def synthetic_photo(rng, width, height):
    """A JPEG-able RGB image with photo-like statistics: a smooth colour field, shapes with sharp
    edges, blur in places and sensor grain."""
    field = rng.random((height // 32 + 2, width // 32 + 2, 3)) * 255
    image = Image.fromarray(field.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(5, 15)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    grain = rng.normal(0, 16, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_photos(folder, count, size, seed):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        synthetic_photo(rng, *size).save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


def old_mask(generator, mask_generator):
    """The mask as drawn before numpy upsampling (torch ops), for the 'before' timing."""
    order = torch.randperm(mask_generator.num_mask_patches, generator=generator)
    grid = torch.zeros(mask_generator.num_mask_patches, dtype=torch.int64)
    grid[order[: mask_generator.num_masked]] = 1
    side = mask_generator.mask_grid_size
    return upsample_mask(grid.view(side, side), mask_generator.scale)


def time_stages(paths, transform, mask_generator, new_masks, batch_size, gpu_handover=False):
    """Seconds per image of each stage, medians over `paths` (collate: per image of a batch)."""
    stages = {
        name: [] for name in ('read', 'decode', 'crop/resize', 'flip+normalise', 'mask', 'collate')
    }
    samples = []
    for index, path in enumerate(paths):
        seed = sample_seed(0, 0, index, 'augment')
        t0 = time.perf_counter()
        with open(path, 'rb') as f:
            data = f.read()
        t1 = time.perf_counter()
        image = Image.open(io.BytesIO(data))
        with seeded_global_rngs(seed):
            plan = transform.plan(image.size)
        if gpu_handover:  # the worker's share of DATA.DECODE gpu: bytes and plan, no pixels
            sample = (torch.frombuffer(bytearray(data), dtype=torch.uint8), plan)
            t2 = t3 = t4 = time.perf_counter()
        else:
            reduction = draft_jpeg(image, transform.reduction(plan))
            image.load()
            image = to_rgb(image)
            t2 = time.perf_counter()
            image = transform.crop_resize(image, plan, reduction)
            t3 = time.perf_counter()
            sample = transform.to_tensor(image, plan)
            t4 = time.perf_counter()
        generator = torch.Generator().manual_seed(sample_seed(0, 0, index, 'mask'))
        mask = mask_generator(generator) if new_masks else old_mask(generator, mask_generator)
        t5 = time.perf_counter()
        per_sample = list(stages)[:5]  # 'collate' is timed per batch below
        for name, seconds in zip(
            per_sample, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True
        ):
            stages[name].append(seconds)
        samples.append((sample, mask, 0))
    if not gpu_handover:
        for start in range(0, len(samples) - batch_size + 1, batch_size):
            t0 = time.perf_counter()
            default_collate(samples[start : start + batch_size])
            stages['collate'].append((time.perf_counter() - t0) / batch_size)
    return {name: statistics.mean(values) if values else 0.0 for name, values in stages.items()}


def draft_difference(paths, transform):
    """Mean and 99th percentile |full decode - draft decode| of the resized crops, 8-bit units."""
    differences = []
    for index, path in enumerate(paths):
        with seeded_global_rngs(sample_seed(0, 0, index, 'augment')):
            plan = transform.plan(Image.open(path).size)
        full = np.asarray(transform.crop_resize(load_image(path), plan), dtype=np.float64)
        reduced = []
        image = load_image(
            path,
            before_decode=lambda header, reduced=reduced, plan=plan: reduced.append(
                draft_jpeg(header, transform.reduction(plan))
            ),
        )
        draft = np.asarray(transform.crop_resize(image, plan, reduced[0]), dtype=np.float64)
        differences.append(np.abs(full - draft).ravel())
    values = np.concatenate(differences)
    return values.mean(), np.percentile(values, 99)


def device_decode_rate(folder, img_size, batch_size, mask_generator, device):
    """Images/s of data.gpu_decode.decode_batch on `device` (the main process's share of
    DATA.DECODE gpu), over batches of the images in `folder`."""
    dataset = EncodedMaskedImageDataset(
        ImageFolderDataset(folder), PretrainTransform(img_size), mask_generator
    )
    count = min(batch_size, len(dataset))
    batch = collate_encoded([dataset[(0, i)] for i in range(count)])
    datas = [d.pin_memory() for d in batch[0]]
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    decode_batch(datas, batch[1], batch[2], img_size, device)
    sync()
    start, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        decode_batch(datas, batch[1], batch[2], img_size, device)
    sync()
    return count * repeats / (time.perf_counter() - start)


def loader_rate(config_opts, workers, batches):
    """Images/s of build_loader's DataLoader with `workers` workers (after one warm-up batch)."""
    config = load_config(os.path.join(ROOT, SWIN_B), config_opts + ['DATA.NUM_WORKERS', workers])
    _, loader = build_loader(config, is_pretrain=True)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    count = 0
    for _ in range(min(batches, len(loader) - 1)):
        count += next(iterator)[0].shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--num-images', type=int, default=256)
    parser.add_argument('--img-size', type=int, default=192)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument(
        '--model-rate',
        type=float,
        default=1400.0,
        help='images/s one GPU trains at (Swin-B/192 bf16 on an H100: 1400)',
    )
    parser.add_argument('--data-dir', default=None, help='where to write the JPEGs (default: temp)')
    parser.add_argument('--out', default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    root = args.data_dir
    if root is None:  # generated JPEGs (about 80 MB) go away with the run
        root = tempfile.mkdtemp(prefix='loader_speed_')
        atexit.register(shutil.rmtree, root, True)
    sets = {
        'ImageNet-sized 500x375': write_photos(
            os.path.join(root, 'imagenet'), args.num_images, (500, 375), 0
        ),
        'large 1600x1200': write_photos(
            os.path.join(root, 'large'), args.num_images // 4, (1600, 1200), 1
        ),
    }
    mask_generator = MaskGenerator(args.img_size, 32, 4, 0.6)
    lines = [
        f'Machine: {machine_description()}, Pillow {Image.__version__}. Output '
        f'{args.img_size} px (Swin-B pre-training), 1 thread per worker.',
        '',
    ]
    for name, paths in sets.items():
        sizes = [os.path.getsize(p) / 1024 for p in paths]
        lines += [
            f'{name}: {len(paths)} JPEGs, mean {statistics.mean(sizes):.0f} KiB.',
            '',
            '| pipeline | read | decode | crop/resize | flip+normalise | mask | collate | '
            'ms/image | images/s per worker | cores per GPU at '
            f'{args.model_rate:.0f} img/s |',
            '|---|---|---|---|---|---|---|---|---|---|',
        ]
        runs = [
            ('before (full decode, torch masks)', PretrainTransform(args.img_size), False, False),
            (
                'now (JPEG draft, numpy masks)',
                PretrainTransform(args.img_size, jpeg_draft=True),
                True,
                False,
            ),
            ('DATA.DECODE gpu: worker share', PretrainTransform(args.img_size), True, True),
        ]
        for label, transform, new_masks, handover in runs:
            time_stages(paths[:8], transform, mask_generator, new_masks, args.batch_size, handover)
            stages = time_stages(
                paths, transform, mask_generator, new_masks, args.batch_size, handover
            )
            total = sum(stages.values())
            cells = ' | '.join(f'{1000 * v:.2f}' for v in stages.values())
            lines.append(
                f'| {label} | {cells} | {1000 * total:.2f} | {1 / total:.0f} | '
                f'{args.model_rate * total:.1f} |'
            )
            print(lines[-1], flush=True)
        reductions = [
            PretrainTransform(args.img_size, jpeg_draft=True).reduction(
                PretrainTransform(args.img_size).plan(Image.open(p).size)
            )
            for p in paths[:64]
        ]
        mean, p99 = draft_difference(paths[:32], PretrainTransform(args.img_size, jpeg_draft=True))
        lines += [
            '',
            'Decode scale with JPEG draft: '
            + ', '.join(
                f'1/{r}: {reductions.count(r)}' for r in (1, 2, 4, 8) if reductions.count(r)
            )
            + f' of {len(reductions)} crops; |full - draft| pixel difference of the resized crops: '
            f'mean {mean:.2f}, 99th percentile {p99:.1f} (8-bit units).',
            '',
        ]
        if torch.cuda.is_available():
            rate = device_decode_rate(
                os.path.dirname(paths[0]), args.img_size, 128, mask_generator, torch.device('cuda')
            )
            lines += [
                f'DATA.DECODE gpu, main-process share on {torch.cuda.get_device_name(0)}: '
                f'decode + crop + resize + flip + normalise of batches of 128 at {rate:.0f} '
                f'images/s ({1000 * 128 / rate:.1f} ms of GPU time per batch of 128).',
                '',
            ]
            print(lines[-2], flush=True)
    lines += [
        f'DataLoader (build_loader, ImageNet-sized set, batch {args.batch_size}, '
        f'{args.workers} workers, pin_memory on a GPU machine): images/s for the whole loader '
        f'and per worker.',
        '',
        '| DATA.DECODE | DATA.JPEG_DRAFT | images/s | per worker |',
        '|---|---|---|---|',
    ]
    settings = [('cpu', False), ('cpu', True)] + (
        [('gpu', False)] if torch.cuda.is_available() else []
    )
    for decode, draft in settings:
        opts = [
            'DATA.DATA_PATH',
            os.path.join(root, 'imagenet'),
            'DATA.DATASET',
            'folder',
            'DATA.BATCH_SIZE',
            args.batch_size,
            'DATA.IMG_SIZE',
            args.img_size,
            'MODEL.SWIN.WINDOW_SIZE',
            6,
            'DATA.JPEG_DRAFT',
            draft,
            'DATA.DECODE',
            decode,
        ]
        rate = loader_rate(opts, args.workers, batches=args.num_images // args.batch_size)
        lines.append(f'| {decode} | {draft} | {rate:.0f} | {rate / args.workers:.0f} |')
        print(lines[-1], flush=True)
    write_report(lines, args.out)


if __name__ == '__main__':
    main()
