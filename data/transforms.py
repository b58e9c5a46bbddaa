"""Image transforms: any PIL mode to RGB, the SimMIM pre-training pipeline and the fine-tuning
pipelines (§3.2 and §3.3 of the reference)."""

import numpy as np
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms as T
from yacs.config import CfgNode

from utils.registry import require_choice

# Transparent pixels are shown on white, as image viewers do; their stored colour is arbitrary.
ALPHA_BACKGROUND = (255, 255, 255)


def _grey_to_8bit(img):
    """8-bit grey values for the high-bit-depth modes, which PIL's own convert clips to white."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64))
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if img.mode.startswith('I;16') or (img.mode == 'I' and low >= 0 and 255 < high <= 65535):
        values = values / 257.0  # 16-bit: 65535 -> 255
    elif img.mode == 'F' and low >= 0 and high <= 1:
        values = values * 255.0  # float images in [0, 1]
    elif low < 0 or high > 255:
        # No known range (32-bit integers, unbounded floats): stretch this image's range.
        values = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), 'L')


RGB_CONVERSIONS = ('careful', 'official')


def check_rgb_conversion(value):
    require_choice('DATA.RGB_CONVERSION', value, RGB_CONVERSIONS, 'conversions')


def to_rgb(img, conversion='careful'):
    """A PIL image of any mode as RGB. 'careful': 16/32-bit and float grey scaled to 8 bits,
    transparency composited onto white, palette/CMYK/grey converted by PIL. 'official': PIL's
    convert('RGB') for every mode, as the official loaders (alpha dropped, 16-bit grey clipped)."""
    if img.mode == 'RGB':
        return img
    if conversion == 'official':
        return img.convert('RGB')
    if img.mode in ('I', 'F') or img.mode.startswith('I;16'):
        return _grey_to_8bit(img).convert('RGB')
    if img.mode in ('LA', 'La', 'PA', 'RGBa') or (img.mode == 'P' and 'transparency' in img.info):
        img = img.convert('RGBA')
    if img.mode == 'RGBA':
        canvas = Image.new('RGB', img.size, ALPHA_BACKGROUND)
        canvas.paste(img, mask=img.getchannel('A'))
        return canvas
    return img.convert('RGB')


class ToRGB:
    """`to_rgb` as a transform step (with a readable repr)."""

    def __init__(self, conversion='careful'):
        self.conversion = conversion

    def __call__(self, img):
        return to_rgb(img, self.conversion)

    def __repr__(self):
        return f'ToRGB({self.conversion!r})'


def normalize():
    """ImageNet mean/std normalisation, the input space of every model here."""
    return T.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def _eval_interpolation(name):
    # 'random' (train only) and unknown names fall back to bilinear, as the official _pil_interp.
    try:
        return str_to_interp_mode(name)
    except KeyError:
        return T.InterpolationMode.BILINEAR


def build_finetune_transform(config: CfgNode, is_train: bool):
    """The official fine-tuning transform (Swin-repo build_transform): timm RandAugment, random
    erasing ... for training; resize (+ centre crop when TEST.CROP) for evaluation."""
    img_size = config.DATA.IMG_SIZE
    resize_im = img_size > 32  # tiny (CIFAR-sized) images are padded and cropped, not resized
    if is_train:
        aug = config.AUG
        transform = create_transform(
            input_size=img_size,
            is_training=True,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT != 'none' else None,
            re_prob=aug.REPROB,
            re_mode=aug.REMODE,
            re_count=aug.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
            scale=tuple(aug.CROP_SCALE),
        )
        transform.transforms.insert(0, ToRGB(config.DATA.RGB_CONVERSION))
        if not resize_im:
            transform.transforms[1] = T.RandomCrop(img_size, padding=4)
        return transform

    steps = [ToRGB(config.DATA.RGB_CONVERSION)]
    if resize_im:
        interpolation = _eval_interpolation(config.DATA.INTERPOLATION)
        if config.TEST.CROP:
            # 256 for 224: the standard ImageNet evaluation crop ratio
            steps += [
                T.Resize(int(256 / 224 * img_size), interpolation=interpolation),
                T.CenterCrop(img_size),
            ]
        else:
            steps.append(T.Resize((img_size, img_size), interpolation=interpolation))
    steps += [T.ToTensor(), normalize()]
    return T.Compose(steps)
