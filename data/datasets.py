"""Image-folder dataset and the wrappers that make each training sample a pure function of
(seed, epoch, index)."""

import copy
import logging
import os

import torch
from PIL import Image

from utils.errors import BadImageError, DataError
from utils.registry import require_choice

from .pretrain_transform import draft_jpeg
from .seeding import sample_seed, seeded_global_rngs, seeded_torch_rng
from .transforms import to_rgb

IMG_EXTENSIONS = (
    '.jpg',
    '.jpeg',
    '.png',
    '.ppm',
    '.pgm',
    '.pbm',
    '.bmp',
    '.tif',
    '.tiff',
    '.webp',
    '.gif',
)
logger = logging.getLogger('simmim.data')

ON_BAD_IMAGE = ('skip', 'error')  # DATA.ON_BAD_IMAGE
_small_images = [0]  # images smaller than the crop met by this process


def check_on_bad_image(value):
    require_choice('DATA.ON_BAD_IMAGE', value, ON_BAD_IMAGE, 'choices')


def _expected_layout(root, problem):
    return (
        f'{problem}: {root}. Expected a folder of images: class sub-folders '
        f'(ROOT/CLASS/NAME.jpg, one class per sub-folder) or image files directly '
        f'(ROOT/NAME.jpg), searched recursively, with extensions {" ".join(IMG_EXTENSIONS)}. '
        f'Fix: pass the right folder with --data-path DIR (DATA.DATA_PATH), or use the built-in '
        f'dataset with --opts DATA.DATASET synthetic.'
    )


def _file_in_the_way(path):
    """The file that `path` or one of its parents is, if any (a file passed as a data folder)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path if os.path.isfile(path) else None


def _is_image(name):
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith('.')


def _scan_images(folder, seen=None):
    """Sorted paths of the image files under `folder`, recursively (hidden entries skipped).

    Symbolic links are followed, but a folder or file whose real path is in `seen` (updated here;
    share it between calls to scan a data set once) is skipped, so a link back up the tree or
    two links to one place never list a file twice.
    """
    seen = set() if seen is None else seen
    if os.path.realpath(folder) in seen:
        return []
    seen.add(os.path.realpath(folder))
    repeated = 0

    def first_visit(real):
        nonlocal repeated
        if real in seen:
            repeated += 1
            return False
        seen.add(real)
        return True

    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [
            name
            for name in sorted(d for d in dirnames if not d.startswith('.'))
            if first_visit(os.path.realpath(os.path.join(dirpath, name)))
        ]
        real_dir = os.path.realpath(dirpath)  # once per folder: realpath costs a stat per part
        for name in sorted(f for f in filenames if _is_image(f)):
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_dir, name)
            if first_visit(real):
                found.append(path)
    if repeated:
        logger.warning(
            '%s: %d linked folder(s) or file(s) lead to places already listed (a link '
            'loop or a second link); each image is listed once.',
            folder,
            repeated,
        )
    return found


def open_image_file(path):
    """A binary file object for `path`: a file path, or a sample in a tar shard (anything with an
    ``open()`` method, e.g. data.shards.ShardMember)."""
    return path.open() if hasattr(path, 'open') else open(path, 'rb')


def load_image(path, rgb_conversion='careful', before_decode=None):
    """The image at `path` (a file or a shard member, see open_image_file) as RGB
    (transforms.to_rgb), fully decoded (so a truncated file fails here, not later).
    `before_decode(image)` is called with the opened image before its pixels are decoded (size,
    mode and format are known from the header), e.g. to ask for a reduced JPEG decode."""
    with open_image_file(path) as f:
        img = Image.open(f)
        if before_decode is not None:
            before_decode(img)
        img.load()  # PIL decodes lazily; ImageFile.LOAD_TRUNCATED_IMAGES stays False
    return to_rgb(img, rgb_conversion)


class ImageFileDataset(torch.utils.data.Dataset):
    """(PIL RGB image, label) pairs read from `samples`, a sequence of (path, label) where a path
    is a file or a shard member (see open_image_file); subclasses list them.

    Files that cannot be decoded are, with on_bad_image='skip', replaced by the next readable image
    and marked in `unreadable` (shared with the DataLoader workers; see unreadable_report), or with
    'error' raise BadImageError. `rgb_conversion`: see transforms.to_rgb (DATA.RGB_CONVERSION).
    """

    def _set_samples(self, root, samples, on_bad_image, min_size, rgb_conversion):
        check_on_bad_image(on_bad_image)
        self.root, self.samples, self.on_bad_image = root, samples, on_bad_image
        self.min_size, self.rgb_conversion = min_size, rgb_conversion
        # Per file: 0 fine (or not read yet), 1 found unreadable, 2 already reported. In shared
        # memory, so what the workers find is seen by the main process.
        self.unreadable = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.load(index)[:2]

    def load(self, index, before_decode=None, reader=load_image):
        """(image, label, prepared): what __getitem__ returns, with `before_decode` (see
        load_image) applied to the file at `index`. prepared is False when that file was unreadable
        and replaced by the next readable one, which is decoded without the hook. `reader(path,
        rgb_conversion, before_decode)` reads a file (data.gpu_decode.read_encoded keeps JPEGs
        encoded)."""
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(f'index {index} out of range for {len(self.samples)} images')
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                image = reader(path, self.rgb_conversion, before_decode if offset == 0 else None)
            except Exception as err:  # PIL raises many exception types for broken files
                if self.on_bad_image == 'error':
                    raise BadImageError(
                        f'Cannot read image {path}: {type(err).__name__}: {err}. Fix or remove the '
                        f'file, or skip unreadable images with a warning: --opts DATA.ON_BAD_IMAGE '
                        f'skip.'
                    ) from err
                position = (index + offset) % len(self.samples)
                if not self.unreadable[position]:
                    self.unreadable[position] = 1
                continue
            self._warn_if_small(path, image)
            return image, label, offset == 0
        raise BadImageError(f'None of the {len(self.samples)} images in {self.root} can be read.')

    def unreadable_report(self, limit=10):
        """One paragraph naming the files found unreadable (in this process or its DataLoader
        workers) since the last report, each file once; '' if none."""
        new = (self.unreadable == 1).nonzero().flatten().tolist()
        if not new:
            return ''
        self.unreadable[new] = 2
        named = []
        for index in new[:limit]:
            path = self.samples[index][0]
            try:
                load_image(path)
                reason = 'a read error that has passed'
            except Exception as err:  # PIL raises many types; only shown here
                reason = f'{type(err).__name__}: {err}'
            named.append(f'{path} ({reason})')
        more = f'; and {len(new) - limit} more' if len(new) > limit else ''
        return (
            f'{len(new)} unreadable image file(s) found: {"; ".join(named)}{more}. Each was '
            f'replaced by the next readable image; {int((self.unreadable > 0).sum())} of the '
            f'{len(self.samples)} files listed under {self.root} are unreadable so far '
            f'(DATA.ON_BAD_IMAGE skip). Fix or remove them.'
        )

    def _warn_if_small(self, path, image):
        if min(image.size) >= self.min_size:
            return
        _small_images[0] += 1
        if _small_images[0] == 1:  # one warning per process; the crop handles them anyway
            logger.warning(
                'Image %s is %dx%d, smaller than the %d-pixel crop (DATA.IMG_SIZE): its '
                'crops are upsampled, which blurs the reconstruction targets. Further '
                'small images are not reported.',
                path,
                *image.size,
                self.min_size,
            )


class ImageFolderDataset(ImageFileDataset):
    """Images under `root`, returned as (PIL RGB image, label).

    Layouts: class sub-folders (labels = index in the sorted class list; sub-folders without images
    are left out), or images directly in `root` (every file under it gets label 0 and `classes` is
    empty; pre-training needs no classes). Unreadable files: see ImageFileDataset.
    """

    def __init__(self, root, on_bad_image='skip', min_size=0, rgb_conversion='careful'):
        check_on_bad_image(on_bad_image)
        root = os.path.expanduser(root)
        blocking = _file_in_the_way(root)
        if blocking:
            raise DataError(
                _expected_layout(
                    root, f'The data path leads through a file ({blocking}), not a folder'
                )
            )
        if not os.path.isdir(root):
            raise FileNotFoundError(_expected_layout(root, 'Data folder not found'))
        self.classes, samples = [], []
        with os.scandir(root) as entries:
            entries = sorted(entries, key=lambda e: e.name)
        seen = {os.path.realpath(root)}
        if any(e.is_file() and _is_image(e.name) for e in entries):
            samples = [(path, 0) for path in _scan_images(root)]
        else:
            for entry in entries:
                if not entry.is_dir() or entry.name.startswith('.'):
                    continue
                paths = _scan_images(entry.path, seen)
                if paths:
                    samples += [(path, len(self.classes)) for path in paths]
                    self.classes.append(entry.name)
        if not samples:
            raise FileNotFoundError(_expected_layout(root, 'No images found in data folder'))
        self._set_samples(root, samples, on_bad_image, min_size, rgb_conversion)


def _split_key(key):
    """(epoch, index) from a sampler key; a plain index means epoch 0."""
    if isinstance(key, (tuple, list)):
        epoch, index = key
        return int(epoch), int(index)
    return 0, int(key)


class SeededTransformDataset(torch.utils.data.Dataset):
    """(transform(image), label) from `base`, the random transform seeded by (seed, epoch, index).

    Keys are (epoch, index) tuples (see data.sampler) or plain indices (epoch 0), so a sample is the
    same in any worker, on any rank and after a resume; the global RNGs are left as they were.
    """

    def __init__(self, base, transform, seed=0):
        self.base, self.transform, self.seed = base, transform, seed

    @property
    def classes(self):
        return self.base.classes

    def __len__(self):
        return len(self.base)

    def unreadable_report(self):
        report = getattr(self.base, 'unreadable_report', None)
        return report() if report is not None else ''

    def _transformed(self, key):
        epoch, index = _split_key(key)
        img, label = self.base[index]
        with seeded_global_rngs(sample_seed(self.seed, epoch, index, 'augment')):
            img = self.transform(img)
        return img, label, epoch, index

    def __getitem__(self, key):
        img, label, _, _ = self._transformed(key)
        return img, label


class MaskedImageDataset(SeededTransformDataset):
    """Pre-training samples (image tensor, mask, label); the mask is drawn from its own generator
    seeded by (seed, epoch, index), independent of the image augmentation.

    `handing_over_pixels()` gives the same samples before normalisation, for DataLoader workers.
    """

    pixels_only = False

    def __init__(self, base, transform, mask_generator, seed=0):
        super().__init__(base, transform, seed)
        self.mask_generator = mask_generator

    def handing_over_pixels(self):
        """This dataset with samples (uint8 crop (3, H, W), uint8 mask, label): what DataLoader
        workers hand over under DATA.NORMALIZE_ON_DEVICE (a quarter of the bytes).
        data.device_loader.normalize_batch turns a batch of them into a batch of this dataset's own
        samples, bit for bit. Needs a PretrainTransform (its plan and pixels)."""
        if not hasattr(self.transform, 'pixels'):
            raise TypeError(f'{self.transform!r} has no 8-bit pixels to hand over (plan, pixels).')
        view = copy.copy(self)
        view.pixels_only = True
        return view

    def _transformed(self, key):
        # A PretrainTransform is drawn as a plan, then applied; for an image file the plan comes
        # from its header, so a JPEG can be decoded at reduced scale (DATA.JPEG_DRAFT,
        # data/pretrain_transform.py).
        if not hasattr(self.transform, 'plan'):
            return super()._transformed(key)
        epoch, index = _split_key(key)
        if hasattr(self.base, 'load'):
            img, label, (plan, reduction) = self.planned_load(epoch, index)
        else:  # the draws of transform(img): conversion, then the plan
            img, label = self.base[index]
            img = to_rgb(img, self.transform.rgb_conversion)
            with seeded_torch_rng(sample_seed(self.seed, epoch, index, 'augment')):
                plan, reduction = self.transform.plan(img.size), 1
        finish = self.transform.pixels if self.pixels_only else self.transform.apply
        return finish(img, plan, reduction), label, epoch, index

    def planned_load(self, epoch, index, reader=load_image, draft=True):
        """(image, label, (plan, JPEG reduction)) with the transform's plan drawn, under this
        sample's seed, from the file's header before `reader` decodes it (a JPEG at reduced scale
        if `draft` and the plan allow). An unreadable file is replaced by the next readable one,
        whose plan is drawn afresh from its own size: the draws of the full-decode path."""
        seed = sample_seed(self.seed, epoch, index, 'augment')
        planned = []

        def plan_from_header(header):
            with seeded_torch_rng(seed):
                plan = self.transform.plan(header.size)
            planned.append(
                (plan, draft_jpeg(header, self.transform.reduction(plan)) if draft else 1)
            )

        item, label, prepared = self.base.load(index, plan_from_header, reader)
        if not prepared:
            with seeded_torch_rng(seed):
                planned.append((self.transform.plan(item.size), 1))
        return item, label, planned[-1]

    def mask(self, epoch, index):
        """The mask of sample `index` in `epoch`, from its own seeded generator."""
        return self.mask_generator(
            torch.Generator().manual_seed(sample_seed(self.seed, epoch, index, 'mask'))
        )

    def __getitem__(self, key):
        img, label, epoch, index = self._transformed(key)
        mask = self.mask(epoch, index)
        return img, mask.to(torch.uint8) if self.pixels_only else mask, label
