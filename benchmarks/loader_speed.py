"""Pre-training data path speed: DataLoader images/s per worker against the official SimMIM
pipeline in the same run, each worker stage timed, and CPU cores per GPU.

    python -m benchmarks.loader_speed --out loader.md [--workers 2] [--model-rate 1400] \
        [--official-dir ../shared/reference/official_code/SimMIM]

Writes a folder of generated JPEGs (no download): `--num-images` ImageNet-sized photos (500x375,
smooth colour fields, shapes, edges and grain, so that JPEG sizes are realistic) and a quarter as
many large ones (1600x1200, the large tail of ImageNet). Pipelines, all on the same files:

- official: microsoft/SimMIM's SimMIMTransform, mask generator and collate_fn, imported from
  `--official-dir` (its data/data_simmim.py, loaded as a file; never imported by the project);
- ours before the 8-bit hand-over: float32 samples from the workers, PIL resize;
- ours, uint8 samples (DATA.NORMALIZE_ON_DEVICE, normalised in the main process), PIL resize;
- ours now (the defaults): uint8 samples, torchvision's uint8 resize (DATA.RESIZE_BACKEND tensor);
- DATA.DECODE gpu: the workers' share (read, header, plan, mask).

Per image, in this process (= one worker), every stage is timed; then the real DataLoaders run
with --workers workers, in alternating rounds, and their images/s per worker are compared. What a
worker hands over is what is timed (ours: the uint8 batch; the main process's normalisation is
timed apart, on the CPU and on the GPU when there is one). Decoders that were tried are timed too
(torchvision.io.decode_jpeg on the CPU; simplejpeg, with and without libjpeg-turbo's DCT scaling,
when it is installed; it is not a dependency).

Cores per GPU = the model's images/s (--model-rate; 1400 is Swin-B/192 bf16 on one H100,
benchmarks/RESULTS.md) / images/s of one worker.
"""

import argparse
import atexit
import importlib.util
import io
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, DistributedSampler, default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from benchmarks.report import machine_description, write_report
from config import load_config
from data import build_loader
from data.datasets import ImageFolderDataset, load_image
from data.device_loader import DeviceLoader, normalize_batch
from data.gpu_decode import EncodedMaskedImageDataset, collate_encoded, decode_batch
from data.masking import MaskGenerator
from data.pretrain_transform import PretrainTransform, draft_jpeg, normalize_pixels
from data.seeding import sample_seed, seeded_torch_rng
from data.transforms import to_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWIN_B = 'configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml'
STAGES = ('read', 'decode', 'crop+resize+flip', 'to float+normalise', 'mask', 'collate')
# label: DATA.NORMALIZE_ON_DEVICE, DATA.RESIZE_BACKEND
OURS = {
    'ours before: float32 from the workers, PIL resize': (False, 'pil'),
    'ours, uint8 from the workers, PIL resize': (True, 'pil'),
    'ours now: uint8 from the workers, tensor resize': (True, 'tensor'),
}
OFFICIAL = 'official SimMIM'


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
    """`count` JPEGs in folder/photos/ (one class folder, the layout torchvision's ImageFolder
    needs); their sorted paths."""
    images = os.path.join(folder, 'photos')
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        synthetic_photo(rng, *size).save(os.path.join(images, f'{i:05d}.jpg'), quality=90)
    return sorted(os.path.join(images, f) for f in os.listdir(images))


def load_official(official_dir):
    """microsoft/SimMIM's data/data_simmim.py as a module of its own name (it imports only
    torch, torchvision, timm and numpy)."""
    path = os.path.join(official_dir, 'data', 'data_simmim.py')
    spec = importlib.util.spec_from_file_location('official_data_simmim', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Clock:
    """Seconds per stage, summed over the images of one pass."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.last = time.perf_counter()

    def lap(self, stage):
        now = time.perf_counter()
        self.seconds[stage] += now - self.last
        self.last = now


def time_official(paths, official, config, batch_size):
    """Seconds per image of each stage of the official transform, mask and collate."""
    transform = official.SimMIMTransform(config)
    steps = transform.transform_img.transforms  # RGB, RandomResizedCrop, flip, ToTensor, Normalize
    clock, samples = Clock(), []
    for path in paths:
        with open(path, 'rb') as f:
            data = f.read()
        clock.lap('read')
        image = Image.open(io.BytesIO(data)).convert('RGB')  # ImageFolder's loader, pil_loader
        clock.lap('decode')
        image = steps[0](image)
        image = steps[2](steps[1](image))
        clock.lap('crop+resize+flip')
        image = steps[4](steps[3](image))
        clock.lap('to float+normalise')
        mask = transform.mask_generator()
        clock.lap('mask')
        samples.append(((image, mask), 0))
    for start in range(0, len(samples) - batch_size + 1, batch_size):
        clock.last = time.perf_counter()
        official.collate_fn(samples[start : start + batch_size])
        clock.lap('collate')
    return per_image(clock, len(paths), batch_size)


def time_ours(paths, transform, mask_generator, handover, batch_size, gpu_share=False):
    """Seconds per image of each stage of our worker (MaskedImageDataset's steps, or with
    `gpu_share` those of DATA.DECODE gpu), `handover` = uint8 samples."""
    clock, samples = Clock(), []
    for index, path in enumerate(paths):
        with open(path, 'rb') as f:
            data = f.read()
        clock.lap('read')
        image = Image.open(io.BytesIO(data))
        with seeded_torch_rng(sample_seed(0, 0, index, 'augment')):
            plan = transform.plan(image.size)
        if gpu_share:  # bytes and plan, no pixels
            sample = (torch.frombuffer(bytearray(data), dtype=torch.uint8), plan)
            clock.lap('decode')
        else:
            reduction = draft_jpeg(image, transform.reduction(plan))
            image.load()
            image = to_rgb(image)
            clock.lap('decode')
            sample = transform.pixels(image, plan, reduction)
            clock.lap('crop+resize+flip')
            if not handover:
                sample = normalize_pixels(sample)
                clock.lap('to float+normalise')
        mask = mask_generator(torch.Generator().manual_seed(sample_seed(0, 0, index, 'mask')))
        samples.append((sample, mask.to(torch.uint8) if handover else mask, 0))
        clock.lap('mask')
    if not gpu_share:
        for start in range(0, len(samples) - batch_size + 1, batch_size):
            clock.last = time.perf_counter()
            default_collate(samples[start : start + batch_size])
            clock.lap('collate')
    return per_image(clock, len(paths), batch_size)


def per_image(clock, count, batch_size):
    """Seconds per image of each stage; collate ran on the whole batches among `count` images."""
    collated = max(count - count % batch_size, 1)
    return {
        stage: value / (collated if stage == 'collate' else count)
        for stage, value in clock.seconds.items()
    }


def decoder_rates(paths, img_size):
    """ms per image of each JPEG decoder tried, on the files of `paths` (best of 3 passes)."""
    datas = [open(p, 'rb').read() for p in paths]
    crops = []  # the smallest side of each crop, for the DCT-scaled decode
    for index, data in enumerate(datas):
        with seeded_torch_rng(sample_seed(0, 0, index, 'augment')):
            plan = PretrainTransform(img_size).plan(Image.open(io.BytesIO(data)).size)
        crops.append(min(plan.width, plan.height))

    def pil(data, _):
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    decoders = {
        'PIL (libjpeg-turbo), full': pil,
        'torchvision.io.decode_jpeg, CPU': lambda data, _: decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
        ),
    }
    if importlib.util.find_spec('simplejpeg'):  # optional: not a dependency
        simplejpeg = importlib.import_module('simplejpeg')
        decoders['simplejpeg, full'] = lambda data, _: simplejpeg.decode_jpeg(data)

        def scaled(data, crop_side):  # the smallest M/8 scale keeping the crop >= img_size
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            factor = crop_side / img_size
            return simplejpeg.decode_jpeg(
                data,
                min_height=int(np.ceil(height / factor)),
                min_width=int(np.ceil(width / factor)),
            )

        decoders['simplejpeg, DCT-scaled to the crop (M/8)'] = scaled
    rates = {}
    for name, decode in decoders.items():
        passes = []
        for _ in range(3):
            start = time.perf_counter()
            for data, crop_side in zip(datas, crops, strict=True):
                decode(data, crop_side)
            passes.append((time.perf_counter() - start) / len(datas))
        rates[name] = 1000 * min(passes)
    return rates


def resize_difference(paths, img_size):
    """(largest |PIL - tensor| difference, fraction of values that differ) of the resized crops."""
    pil, tensor = PretrainTransform(img_size), PretrainTransform(img_size, resize='tensor')
    differences = []
    for index, path in enumerate(paths):
        image = load_image(path)
        with seeded_torch_rng(sample_seed(0, 0, index, 'augment')):
            plan = pil.plan(image.size)
        differences.append(
            (pil.pixels(image, plan).int() - tensor.pixels(image, plan).int()).abs().flatten()
        )
    values = torch.cat(differences)
    return int(values.max()), float((values > 0).float().mean())


def draft_difference(paths, transform):
    """Mean and 99th percentile |full decode - draft decode| of the resized crops, 8-bit units."""
    differences = []
    for index, path in enumerate(paths):
        with seeded_torch_rng(sample_seed(0, 0, index, 'augment')):
            plan = transform.plan(Image.open(path).size)
        full = transform.pixels(load_image(path), plan).double()
        reduced = []
        image = load_image(
            path,
            before_decode=lambda header, reduced=reduced, plan=plan: reduced.append(
                draft_jpeg(header, transform.reduction(plan))
            ),
        )
        draft = transform.pixels(image, plan, reduced[0]).double()
        differences.append((full - draft).abs().flatten().numpy())
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


def normalise_ms(batch, device):
    """ms per batch of the main process's share under DATA.NORMALIZE_ON_DEVICE on `device`."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if device.type == 'cuda':
        batch = [t.pin_memory() for t in batch]
    normalize_batch(batch, device)
    sync()
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        normalize_batch(batch, device)
    sync()
    return 1000 * (time.perf_counter() - start) / repeats


def loader_config(root, args, normalize_on_device=True, resize='tensor', decode='cpu'):
    opts = {
        'DATA.DATA_PATH': root,
        'DATA.DATASET': 'folder',
        'DATA.BATCH_SIZE': args.batch_size,
        'DATA.IMG_SIZE': args.img_size,
        'MODEL.SWIN.WINDOW_SIZE': 6,
        'DATA.NUM_WORKERS': args.workers,
        'DATA.PERSISTENT_WORKERS': False,
        'DATA.NORMALIZE_ON_DEVICE': normalize_on_device,
        'DATA.RESIZE_BACKEND': resize,
        'DATA.DECODE': decode,
    }
    return load_config(os.path.join(ROOT, SWIN_B), [v for kv in opts.items() for v in kv])


def official_loader(official, config):
    """The official build_loader_simmim's DataLoader (one rank of one), without its logger."""
    dataset = torchvision.datasets.ImageFolder(
        config.DATA.DATA_PATH, official.SimMIMTransform(config)
    )
    return DataLoader(
        dataset,
        config.DATA.BATCH_SIZE,
        sampler=DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True),
        num_workers=config.DATA.NUM_WORKERS,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        collate_fn=official.collate_fn,
    )


def loader_rate(loader):
    """Images/s of a DataLoader's batches after the first one (worker start-up excluded); for a
    DeviceLoader, the batches its workers hand over."""
    loader = loader.loader if isinstance(loader, DeviceLoader) else loader
    iterator = iter(loader)
    next(iterator)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += batch[0].shape[0] if torch.is_tensor(batch[0]) else batch[0][0].shape[0]
    return count / (time.perf_counter() - start)


def stage_table(name, paths, args, official, mask_generator):
    lines = [
        f'{name}: {len(paths)} JPEGs, mean '
        f'{statistics.mean(os.path.getsize(p) for p in paths) / 1024:.0f} KiB; ms per image in '
        f'one process (= one worker), mean over the images; the fastest of {args.rounds} '
        f'alternating rounds.',
        '',
        f'| pipeline | {" | ".join(STAGES)} | ms/image | images/s per worker | vs official |',
        '|---|' + '---|' * (len(STAGES) + 3),
    ]
    runs = {}
    if official is not None:
        config = loader_config(os.path.dirname(os.path.dirname(paths[0])), args)
        runs[OFFICIAL] = lambda p: time_official(p, official, config, args.batch_size)
    for label, (handover, resize) in OURS.items():
        transform = PretrainTransform(args.img_size, jpeg_draft=True, resize=resize)
        runs[label] = lambda p, t=transform, h=handover: time_ours(
            p, t, mask_generator, h, args.batch_size
        )
    runs['DATA.DECODE gpu: the workers share'] = lambda p: time_ours(
        p, PretrainTransform(args.img_size), mask_generator, True, args.batch_size, True
    )
    for run in runs.values():  # warm-up
        run(paths[:8])
    best = {}
    for _ in range(args.rounds):  # alternating rounds; each pipeline's fastest is kept
        for label, run in runs.items():
            stages = run(paths)
            if label not in best or sum(stages.values()) < sum(best[label].values()):
                best[label] = stages
    for label, stages in best.items():
        total = sum(stages.values())
        ratio = f'{sum(best[OFFICIAL].values()) / total:.2f}x' if OFFICIAL in best else '-'
        cells = ' | '.join(f'{1000 * v:.2f}' for v in stages.values())
        lines.append(f'| {label} | {cells} | {1000 * total:.2f} | {1 / total:.0f} | {ratio} |')
    return lines + ['']


def dataloader_table(imagenet, args, official):
    """The DataLoaders of every pipeline on the folder `imagenet`, in rotating rounds (run before
    anything else, so the workers fork from a small process)."""
    loaders = {label: loader_config(imagenet, args, *setting) for label, setting in OURS.items()}
    if official is not None:
        loaders = {OFFICIAL: loader_config(imagenet, args)} | loaders
    rates = {label: [] for label in loaders}
    for round_ in range(args.rounds):  # alternating rounds, each starting one pipeline later
        labels = list(loaders)[round_ % len(loaders) :] + list(loaders)[: round_ % len(loaders)]
        for label in labels:
            config = loaders[label]
            loader = (
                official_loader(official, config)
                if label == OFFICIAL
                else build_loader(config, is_pretrain=True)[1]
            )
            rates[label].append(loader_rate(loader))
            print(f'{label}: {rates[label][-1]:.0f} images/s', flush=True)
    lines = [
        f'DataLoader on the ImageNet-sized set ({args.num_images} images, batch {args.batch_size}, '
        f'{args.workers} workers, {args.rounds} rounds in rotating order; the batches as the '
        f'workers hand them over): images/s, median of the rounds (fastest in brackets).',
        '',
        f'| pipeline | images/s | per worker | vs official | each round vs official | cores per '
        f'GPU at {args.model_rate:.0f} img/s |',
        '|---|---|---|---|---|---|',
    ]
    official_rate = statistics.median(rates[OFFICIAL]) if official is not None else None
    for label, values in rates.items():
        rate = statistics.median(values)
        per_worker = rate / args.workers
        ratios = '- | -'  # without --official-dir
        if official is not None:
            rounds = [v / o for v, o in zip(values, rates[OFFICIAL], strict=True)]
            ratios = f'{rate / official_rate:.2f}x | {min(rounds):.2f}-{max(rounds):.2f}x'
        lines.append(
            f'| {label} | {rate:.0f} ({max(values):.0f}) | {per_worker:.0f} | {ratios} | '
            f'{args.model_rate / per_worker:.1f} |'
        )
    batch = next(iter(build_loader(loaders[list(OURS)[-1]], is_pretrain=True)[1].loader))
    finish = f'{normalise_ms(batch, torch.device("cpu")):.1f} ms on the CPU (1 thread)'
    if torch.cuda.is_available():
        finish += f', {normalise_ms(batch, torch.device("cuda")):.2f} ms on the GPU'
    lines += [
        '',
        f'The main process finishing a uint8 batch of {args.batch_size} (to the device, '
        f'normalise, masks to int64; data.device_loader.normalize_batch): {finish}.',
        '',
    ]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--num-images', type=int, default=512)
    parser.add_argument('--img-size', type=int, default=192)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument('--rounds', type=int, default=3, help='rounds per pipeline')
    parser.add_argument(
        '--model-rate',
        type=float,
        default=1400.0,
        help='images/s one GPU trains at (Swin-B/192 bf16 on an H100: 1400)',
    )
    parser.add_argument(
        '--official-dir',
        default=None,
        help='a microsoft/SimMIM checkout (e.g. ../shared/reference/official_code/SimMIM): its '
        'pipeline is timed beside ours',
    )
    parser.add_argument('--data-dir', default=None, help='where to write the JPEGs (default: temp)')
    parser.add_argument('--out', default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    official = load_official(args.official_dir) if args.official_dir else None
    root = args.data_dir
    if root is None:  # generated JPEGs (about 100 MB) go away with the run
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
        f'Machine: {machine_description()}, Pillow {Image.__version__}, torchvision '
        f'{torchvision.__version__}. Output {args.img_size} px (Swin-B pre-training), 1 thread per '
        f'worker, DATA.JPEG_DRAFT on in our rows.',
        '',
    ]
    lines += dataloader_table(os.path.join(root, 'imagenet'), args, official)
    for name, paths in sets.items():
        lines += stage_table(name, paths, args, official, mask_generator)
        mean, p99 = draft_difference(paths[:32], PretrainTransform(args.img_size, jpeg_draft=True))
        largest, fraction = resize_difference(paths[:32], args.img_size)
        lines += [
            f'Pixels: JPEG draft vs full decode of the resized crops: mean {mean:.2f}, 99th '
            f'percentile {p99:.1f} (8-bit units); tensor vs PIL resize: at most {largest} apart, '
            f'on {100 * fraction:.2f} % of the values.',
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
    decoders = decoder_rates(sets['ImageNet-sized 500x375'][:128], args.img_size)
    lines += [
        'JPEG decoders tried on the ImageNet-sized set (ms per image, best of 3 passes): '
        + '; '.join(f'{name} {ms:.3f}' for name, ms in decoders.items())
        + '.',
        '',
    ]
    write_report(lines, args.out)


if __name__ == '__main__':
    main()
