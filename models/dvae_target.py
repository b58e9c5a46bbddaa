"""BEiT's target (Table 5, the 'BEiT' row): the masked positions' visual tokens, classified with
cross-entropy over the vocabulary of a frozen discrete VAE tokenizer (models/dvae.py).

One token per prediction pixel: the token grid is IMG_SIZE / DOWNSAMPLE (BEiT: 14x14 tokens of
16 px for a 224 px image), and each image is resized to token grid x the tokenizer's
down-sampling before it is tokenised (BEiT: 112 px into DALL-E's 8x encoder). Importing the module
registers `dvae_tokens` in `models.targets.TARGETS` (models/__init__.py does).

The tokenizer is deliberately not a submodule: it has no parameters in `model.parameters()` (so no
optimizer state and no gradient sync), no entries in `state_dict()` (checkpoints hold the trained
model only; resuming rebuilds the tokenizer from MODEL.SIMMIM.TARGET.TOKENIZER), and FSDP and DDP
never see it. It follows the images to their device on first use.
"""

import torch
import torch.nn.functional as F

from utils.errors import ConfigError, require

from .dvae import load_tokenizer
from .targets import TARGETS, PredictionTarget, normalized_to_rgb, rgb_to_normalized


class DVAETokens(PredictionTarget):
    """Tokens of a frozen `tokenizer` (a models.dvae.DiscreteVAE), one per `downsample` x
    `downsample` pixels; the head predicts vocab_size logits per position. Tokens are computed
    under no_grad in the precision the loop runs the model in (autocast, if on)."""

    def __init__(self, model_patch_size, tokenizer, in_chans=3, downsample=16, scope='masked'):
        super().__init__(model_patch_size, in_chans, downsample, scope)
        if tokenizer.in_chans != in_chans:
            raise ConfigError(
                f'the tokenizer reads {tokenizer.in_chans}-channel images but the encoder '
                f'{in_chans}; train a tokenizer for this input.'
            )
        self.__dict__['tokenizer'] = tokenizer.requires_grad_(False).eval()  # not a submodule
        self.prediction_channels = tokenizer.vocab_size

    @classmethod
    def from_config(cls, config, model_patch_size, in_chans):
        simmim = config.MODEL.SIMMIM
        tokenizer = load_tokenizer(simmim.TARGET.TOKENIZER, simmim.TARGET.VOCAB_SIZE)
        return cls(
            model_patch_size, tokenizer, in_chans, simmim.TARGET.DOWNSAMPLE, simmim.LOSS.SCOPE
        )

    @classmethod
    def check_config(cls, config, picked):
        target = config.MODEL.SIMMIM.TARGET
        require(
            target.VOCAB_SIZE >= 2,
            f'MODEL.SIMMIM.TARGET.VOCAB_SIZE must be >= 2, got {target.VOCAB_SIZE}.',
        )
        if not picked:
            return
        require(
            bool(target.TOKENIZER),
            'MODEL.SIMMIM.TARGET.TOKENIZER is empty but TARGET.NAME is dvae_tokens. Train a '
            'tokenizer with `python -m tools.train_dvae DATA_PATH OUT.safetensors --vocab-size '
            f"{target.VOCAB_SIZE}` (or convert DALL-E's encoder) and set the key to its path.",
        )
        mask_patch, token = config.DATA.MASK_PATCH_SIZE, target.DOWNSAMPLE
        sizes = [d for d in range(1, mask_patch + 1) if mask_patch % d == 0]
        require(
            mask_patch % token == 0,
            f'MODEL.SIMMIM.TARGET.DOWNSAMPLE {token} makes dvae_tokens tokens of {token}x{token} '
            f'px, which straddle the {mask_patch}-px mask patches (DATA.MASK_PATCH_SIZE), so a '
            f'token would be partly masked and partly visible. Use a DOWNSAMPLE that divides the '
            f'mask patch size ({sizes}; BEiT: tokens of 16 px).',
        )

    @classmethod
    def num_prediction_channels(cls, config, in_chans):
        return config.MODEL.SIMMIM.TARGET.VOCAB_SIZE

    def _tokenizer_on(self, device):
        tokenizer = self.tokenizer
        if next(tokenizer.parameters()).device != device:
            tokenizer.to(device)
        return tokenizer

    def _resize(self, rgb, size):
        if tuple(rgb.shape[-2:]) == size:
            return rgb
        return F.interpolate(rgb, size=size, mode='bilinear', align_corners=False, antialias=True)

    @torch.no_grad()
    def target(self, x):
        """(B, H/d, W/d) int64 tokens of the normalised images x (B, C, H, W)."""
        tokenizer = self._tokenizer_on(x.device)
        height, width = x.shape[-2] // self.downsample, x.shape[-1] // self.downsample
        f = tokenizer.downsample
        return tokenizer.tokens(self._resize(normalized_to_rgb(x), (height * f, width * f)))

    def element_loss(self, prediction, target):
        return F.cross_entropy(prediction, target, reduction='none').unsqueeze(1)

    def decode(self, prediction, images):
        """The argmax tokens decoded by the tokenizer, at the input size; the mean colour (zeros)
        for an encoder-only tokenizer (DALL-E's released encoder has no decoder here)."""
        tokenizer = self._tokenizer_on(images.device)
        if not tokenizer.has_decoder:
            return torch.zeros_like(images)
        rgb = tokenizer.decode_tokens(prediction.argmax(dim=1)).float()
        return rgb_to_normalized(self._resize(rgb, tuple(images.shape[-2:])))

    @torch.no_grad()
    def prediction_to_image(self, prediction, images):
        # No up-sampling of the logits to the input size first (vocab_size channels per pixel).
        return self.decode(prediction.float(), images.float())


TARGETS.register('dvae_tokens', DVAETokens)
