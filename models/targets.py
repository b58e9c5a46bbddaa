"""Prediction targets and losses (section 3.4, Tables 3-5): what the head predicts, at which
resolution, the loss against it over which pixels, and the way from a prediction back to an image.

Every target is a module called as ``criterion(x, prediction, mask) -> scalar`` with
x: normalised images (B, C, H, W); prediction: the head's output (B, prediction_channels, H/d, W/d)
for DOWNSAMPLE d; mask: (B, H/p, W/p) at the model patch size p, 1 = masked. The loss is averaged
over the pixels in scope (masked only, or all) and over the prediction's channels, pooled over the
batch, as the official ℓ1 loss (Eq. 1). ``prediction_to_image(prediction, images)`` gives the
prediction as a normalised (B, C, H, W) image for visualisation.

A new target is a subclass of `PredictionTarget` (with `check_config` for its own keys) plus an
entry in `TARGETS`; MODEL.SIMMIM.TARGET.NAME picks it, and the config validation asks
`check_target_config`.
"""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from yacs.config import CfgNode

from utils.errors import ConfigError, require
from utils.mask_grid import upsample_mask
from utils.registry import Registry, require_choice
from utils.safe_load import load_checkpoint_file


# -----------------------------------------------------------------------------------------------
# Pixel spaces
# -----------------------------------------------------------------------------------------------
def _channel_stats(images):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device, dtype=images.dtype)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device, dtype=images.dtype)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def normalized_to_rgb(images):
    """ImageNet-normalised (B, 3, H, W) -> RGB in [0, 1]."""
    mean, std = _channel_stats(images)
    return (images * std + mean).clamp(0, 1)


def rgb_to_normalized(rgb):
    """RGB in [0, 1] (B, 3, H, W) -> ImageNet-normalised."""
    mean, std = _channel_stats(rgb)
    return (rgb - mean) / std


def box_mean(x, window, count_include_pad):
    """F.avg_pool2d(x, window, stride 1, padding window // 2) as a row pass then a column pass:
    2 * window reads per pixel instead of window ** 2 (the 47x47 SwinV2 window took 80% of a CPU
    step), and the same mean, since a window's part inside the image is a rectangle."""
    half = window // 2
    rows = F.avg_pool2d(
        x, (window, 1), stride=1, padding=(half, 0), count_include_pad=count_include_pad
    )
    return F.avg_pool2d(
        rows, (1, window), stride=1, padding=(0, half), count_include_pad=count_include_pad
    )


def local_mean_std(x, window):
    """Per-pixel, per-channel mean and std (unbiased, + 1e-6 inside the root) of the `window` x
    `window` neighbourhood, zero padding excluded (Swin-repo SwinV2 target normalisation, reference
    3.4). (B, C, H, W) -> two (B, C, H, W); `window` must be odd."""
    assert window % 2 == 1, f'the target normalisation window must be odd, got {window}'
    mean = box_mean(x, window, count_include_pad=False)
    mean_of_squares = box_mean(x**2, window, count_include_pad=False)
    count = box_mean(torch.ones_like(x), window, count_include_pad=True) * window**2
    var = ((mean_of_squares - mean**2) * (count / (count - 1))).clamp(min=0.0)
    return mean, (var + 1e-6) ** 0.5


def local_norm_target(x, window):
    """Each pixel and channel normalised by its neighbourhood's `local_mean_std`."""
    mean, std = local_mean_std(x, window)
    return (x - mean) / std


# -----------------------------------------------------------------------------------------------
# Targets
# -----------------------------------------------------------------------------------------------
# Which pixels the loss covers (Table 4): the masked ones (prediction) or all (reconstruction too).
LOSS_SCOPES = ('masked', 'all')


def _check_scope(scope):
    require_choice('MODEL.SIMMIM.LOSS.SCOPE', scope, LOSS_SCOPES, 'scopes')


class PredictionTarget(nn.Module):
    """Base: the loss over the pixels in scope at the prediction resolution, and the way back to an
    image. Subclasses define `target`, `element_loss` and `decode`.

    model_patch_size: pixels per mask cell; downsample: input pixels per prediction pixel;
    scope: 'masked' (predict masked pixels only, the default of Table 4) or 'all'.
    """

    prediction_channels = None  # channels the head predicts per prediction pixel (set in __init__)

    def __init__(self, model_patch_size, in_chans=3, downsample=1, scope='masked'):
        super().__init__()
        _check_scope(scope)
        self.patch_size, self.in_chans = model_patch_size, in_chans
        self.downsample, self.scope = downsample, scope

    @classmethod
    def from_config(cls, config, model_patch_size, in_chans):
        raise NotImplementedError

    @classmethod
    def check_config(cls, config, picked):
        """Raise ConfigError for a bad value among this target's own config keys. Asked for every
        registered target, `picked` telling whether MODEL.SIMMIM.TARGET.NAME names this one, so a
        mistake in any section surfaces when the config loads."""

    @classmethod
    def num_prediction_channels(cls, config, in_chans):
        """`prediction_channels` from the config alone, so the head can be sized first."""
        raise NotImplementedError

    def pool(self, images):
        """(B, C, H, W) -> (B, C, H/d, W/d): the image at the prediction resolution (area mean)."""
        return images if self.downsample == 1 else F.avg_pool2d(images, self.downsample)

    def target(self, x):
        raise NotImplementedError

    def element_loss(self, prediction, target):
        """Loss per prediction pixel and channel: (B, k, h, w)."""
        raise NotImplementedError

    def decode(self, prediction, images):
        """Prediction at input resolution -> normalised image (B, C, H, W)."""
        raise NotImplementedError

    def loss_weights(self, mask, size):
        """(B, 1, size, size) weight of each prediction pixel: 1 in scope, 0 outside; the fraction
        of masked pixels where a prediction pixel spans several mask cells."""
        if self.scope == 'all':
            return torch.ones(mask.shape[0], 1, size, size, device=mask.device)
        if self.patch_size % self.downsample == 0:
            return upsample_mask(mask, self.patch_size // self.downsample).unsqueeze(1).float()
        return F.avg_pool2d(mask.unsqueeze(1).float(), self.downsample // self.patch_size)

    def forward(self, x, prediction, mask):
        # fp32 even under autocast: a bf16 sum of ~1e6 masked pixels would be off by ~0.4%.
        error = self.element_loss(prediction.float(), self.target(x.float()))
        weights = self.loss_weights(mask, error.shape[-1])
        return (error * weights).sum() / (weights.sum() + 1e-5) / error.shape[1]

    @torch.no_grad()
    def prediction_to_image(self, prediction, images):
        """The prediction as a normalised (B, C, H, W) image at the input resolution."""
        prediction = prediction.float()
        if self.downsample > 1:
            prediction = F.interpolate(prediction, scale_factor=self.downsample, mode='nearest')
        return self.decode(prediction, images.float())


def _l1(prediction, target, beta):
    return (target - prediction).abs()


def _l2(prediction, target, beta):
    return (target - prediction) ** 2


def _smooth_l1(prediction, target, beta):
    return F.smooth_l1_loss(prediction, target, reduction='none', beta=beta)


REGRESSION_LOSSES = Registry(
    'MODEL.SIMMIM.LOSS.TYPE', 'losses', {'l1': _l1, 'l2': _l2, 'smooth_l1': _smooth_l1}
)


def _check_loss_type(loss):
    REGRESSION_LOSSES.lookup(loss)


class PixelRegression(PredictionTarget):
    """Raw pixel values regressed with ℓ1 (default), ℓ2 or smooth-ℓ1 (Table 5), optionally locally
    normalised (MODEL.SIMMIM.NORM_TARGET: normalise at full resolution, then pool).

    norm_target_window: None for raw pixels, or the odd window of `local_norm_target`.
    """

    def __init__(
        self,
        model_patch_size,
        in_chans=3,
        norm_target_window=None,
        loss='l1',
        downsample=1,
        scope='masked',
        smooth_l1_beta=1.0,
    ):
        super().__init__(model_patch_size, in_chans, downsample, scope)
        _check_loss_type(loss)
        self.norm_target_window = norm_target_window
        self.loss, self.smooth_l1_beta = loss, smooth_l1_beta
        self.prediction_channels = in_chans

    @classmethod
    def from_config(cls, config, model_patch_size, in_chans):
        simmim = config.MODEL.SIMMIM
        norm = simmim.NORM_TARGET
        return cls(
            model_patch_size,
            in_chans,
            norm_target_window=norm.PATCH_SIZE if norm.ENABLE else None,
            loss=simmim.LOSS.TYPE,
            downsample=simmim.TARGET.DOWNSAMPLE,
            scope=simmim.LOSS.SCOPE,
            smooth_l1_beta=simmim.LOSS.SMOOTH_L1_BETA,
        )

    @classmethod
    def check_config(cls, config, picked):
        simmim = config.MODEL.SIMMIM
        _check_loss_type(simmim.LOSS.TYPE)
        require(simmim.LOSS.SMOOTH_L1_BETA > 0, 'MODEL.SIMMIM.LOSS.SMOOTH_L1_BETA must be > 0.')
        norm = simmim.NORM_TARGET
        require(
            not norm.ENABLE or norm.PATCH_SIZE % 2 == 1,
            f'MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE must be odd, got {norm.PATCH_SIZE}.',
        )
        require(
            picked or not norm.ENABLE,
            f'MODEL.SIMMIM.NORM_TARGET normalises pixel values; it cannot be combined with '
            f'TARGET.NAME {simmim.TARGET.NAME}. Turn NORM_TARGET.ENABLE off or use the pixel '
            f'target.',
        )

    @classmethod
    def num_prediction_channels(cls, config, in_chans):
        return in_chans

    def target(self, x):
        if self.norm_target_window is not None:
            x = local_norm_target(x, self.norm_target_window)
        return self.pool(x)

    def element_loss(self, prediction, target):
        return REGRESSION_LOSSES[self.loss](prediction, target, self.smooth_l1_beta)

    def decode(self, prediction, images):
        if self.norm_target_window is None:
            return prediction
        mean, std = local_mean_std(images, self.norm_target_window)  # the input's own statistics
        return prediction * std + mean


class ColorBins(PredictionTarget):
    """Channel-wise colour discretisation (Table 5): each RGB channel classified into `num_bins`
    equal-width bins of [0, 1] with cross-entropy. The head predicts in_chans * num_bins logits per
    pixel, channel-major (all bins of R, then G, then B)."""

    def __init__(self, model_patch_size, in_chans=3, num_bins=8, downsample=1, scope='masked'):
        super().__init__(model_patch_size, in_chans, downsample, scope)
        self.num_bins = num_bins
        self.prediction_channels = in_chans * num_bins

    @classmethod
    def from_config(cls, config, model_patch_size, in_chans):
        simmim = config.MODEL.SIMMIM
        return cls(
            model_patch_size,
            in_chans,
            simmim.TARGET.NUM_BINS,
            simmim.TARGET.DOWNSAMPLE,
            simmim.LOSS.SCOPE,
        )

    @classmethod
    def check_config(cls, config, picked):
        num_bins = config.MODEL.SIMMIM.TARGET.NUM_BINS
        require(num_bins >= 2, f'MODEL.SIMMIM.TARGET.NUM_BINS must be >= 2, got {num_bins}.')

    @classmethod
    def num_prediction_channels(cls, config, in_chans):
        return in_chans * config.MODEL.SIMMIM.TARGET.NUM_BINS

    def target(self, x):
        """(B, C, h, w) int64 bin index of each channel value."""
        rgb = self.pool(normalized_to_rgb(x))
        return (rgb * self.num_bins).floor().long().clamp(max=self.num_bins - 1)

    def _logits(self, prediction):
        """(B, C * bins, h, w) -> (B, bins, C, h, w), the class axis where cross_entropy wants
        it."""
        return prediction.unflatten(1, (self.in_chans, self.num_bins)).transpose(1, 2)

    def element_loss(self, prediction, target):
        return F.cross_entropy(self._logits(prediction), target, reduction='none')

    def decode(self, prediction, images):
        """The expected colour of each channel under the predicted bin distribution."""
        probs = self._logits(prediction).softmax(dim=1)
        centres = (torch.arange(self.num_bins, device=probs.device) + 0.5) / self.num_bins
        return rgb_to_normalized(torch.einsum('bkchw,k->bchw', probs, centres))


def nearest_color_index(colors, palette, chunk=1 << 16):
    """(..., C) colours and a (K, C) palette -> (...) int64 index of the nearest palette colour
    (Euclidean), computed in chunks of `chunk` colours to bound memory."""
    flat = colors.reshape(-1, colors.shape[-1])
    index = torch.cat([torch.cdist(part, palette).argmin(dim=1) for part in flat.split(chunk)])
    return index.view(colors.shape[:-1])


def load_palette(path, num_colors=None):
    """A (K, 3) float32 RGB palette in [0, 1] from a .npy or .pt file (a tensor); centres in [-1, 1]
    (as iGPT publishes them) are mapped to [0, 1]. Problems raise errors saying how to fix them."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'Colour palette not found: {path} (MODEL.SIMMIM.TARGET.PALETTE). Build one with '
            f'`python -m tools.build_color_palette --cfg FILE --output {path}`.'
        )
    if path.endswith('.npy'):
        palette = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        palette = load_checkpoint_file(path, 'MODEL.SIMMIM.TARGET.PALETTE')
    if not isinstance(palette, torch.Tensor) or palette.ndim != 2 or palette.shape[1] != 3:
        raise ConfigError(
            f'{path} (MODEL.SIMMIM.TARGET.PALETTE) must hold one (K, 3) tensor or '
            f'array of RGB colours; rebuild it with `python -m tools.build_color_palette`.'
        )
    palette = palette.to('cpu', torch.float32)
    if num_colors is not None and palette.shape[0] != num_colors:
        raise ConfigError(
            f'{path} holds {palette.shape[0]} colours but MODEL.SIMMIM.TARGET.'
            f'NUM_CLUSTERS is {num_colors}; make them agree.'
        )
    if palette.min() < 0:
        palette = (palette + 1) / 2
    if palette.min() < 0 or palette.max() > 1:
        raise ConfigError(
            f'{path}: palette values must lie in [0, 1] (or [-1, 1]), got '
            f'[{palette.min():.3g}, {palette.max():.3g}].'
        )
    return palette


class ColorClusters(PredictionTarget):
    """Colour clustering as in iGPT (Table 5): each pixel is classified as its nearest palette
    colour (K colours, e.g. 512 from k-means) with cross-entropy. The head predicts K logits per
    pixel."""

    def __init__(self, model_patch_size, palette, in_chans=3, downsample=1, scope='masked'):
        super().__init__(model_patch_size, in_chans, downsample, scope)
        self.register_buffer('palette', palette, persistent=False)  # rebuilt from the config
        self.prediction_channels = palette.shape[0]

    @classmethod
    def from_config(cls, config, model_patch_size, in_chans):
        simmim = config.MODEL.SIMMIM
        palette = load_palette(simmim.TARGET.PALETTE, simmim.TARGET.NUM_CLUSTERS)
        return cls(model_patch_size, palette, in_chans, simmim.TARGET.DOWNSAMPLE, simmim.LOSS.SCOPE)

    @classmethod
    def check_config(cls, config, picked):
        target = config.MODEL.SIMMIM.TARGET
        require(
            target.NUM_CLUSTERS >= 2,
            f'MODEL.SIMMIM.TARGET.NUM_CLUSTERS must be >= 2, got {target.NUM_CLUSTERS}.',
        )
        require(
            not picked or target.PALETTE,
            'MODEL.SIMMIM.TARGET.PALETTE is empty but TARGET.NAME is color_clusters. Build a '
            'palette with `python -m tools.build_color_palette --cfg FILE --output PATH` and set '
            'the key to PATH.',
        )

    @classmethod
    def num_prediction_channels(cls, config, in_chans):
        return config.MODEL.SIMMIM.TARGET.NUM_CLUSTERS

    def target(self, x):
        """(B, h, w) int64 palette index."""
        rgb = self.pool(normalized_to_rgb(x))
        return nearest_color_index(rgb.permute(0, 2, 3, 1), self.palette.to(x))

    def element_loss(self, prediction, target):
        return F.cross_entropy(prediction, target, reduction='none').unsqueeze(1)

    def decode(self, prediction, images):
        """The expected colour under the predicted palette distribution."""
        probs = prediction.softmax(dim=1)
        return rgb_to_normalized(torch.einsum('bkhw,kc->bchw', probs, self.palette.to(probs)))


# The paper's default target under its original name (ℓ1 on masked raw pixels).
MaskedPixelL1Loss = PixelRegression


# -----------------------------------------------------------------------------------------------
# Building from the config
# -----------------------------------------------------------------------------------------------
TARGETS = Registry(
    'MODEL.SIMMIM.TARGET.NAME',
    'targets',
    {'pixel': PixelRegression, 'color_bins': ColorBins, 'color_clusters': ColorClusters},
)


def _target_class(config):
    return TARGETS.lookup(config.MODEL.SIMMIM.TARGET.NAME)


def check_target_config(config, encoder_stride):
    """Raise ConfigError for a bad MODEL.SIMMIM.TARGET / LOSS / NORM_TARGET section, for an encoder
    of `encoder_stride` pixels per feature-map position."""
    picked = _target_class(config)
    _check_scope(config.MODEL.SIMMIM.LOSS.SCOPE)
    downsample = config.MODEL.SIMMIM.TARGET.DOWNSAMPLE
    divisors = [d for d in range(1, encoder_stride + 1) if encoder_stride % d == 0]
    require(
        downsample in divisors,
        f'MODEL.SIMMIM.TARGET.DOWNSAMPLE {downsample} must divide the encoder stride '
        f'{encoder_stride}: the head up-samples the feature map by stride / DOWNSAMPLE. Use one '
        f'of {divisors}.',
    )
    for target_class in TARGETS.values():
        target_class.check_config(config, picked=target_class is picked)


def prediction_channels(config, in_chans):
    """Channels per prediction pixel of MODEL.SIMMIM.TARGET."""
    return _target_class(config).num_prediction_channels(config, in_chans)


def build_criterion(config: CfgNode, encoder: nn.Module) -> 'PredictionTarget':
    """The target/loss unit of MODEL.SIMMIM.TARGET and MODEL.SIMMIM.LOSS for `encoder`."""
    return _target_class(config).from_config(config, encoder.patch_size, encoder.in_chans)
