"""The discrete VAE tokenizer of the dvae_tokens target (BEiT's target, Table 5): images -> a grid
of visual tokens, one of `vocab_size` codes per position.

    DiscreteVAE(vocab_size, hidden_dim, num_groups, blocks_per_group, codebook_dim, in_chans)
    model.tokens(rgb) -> (B, h, w) int64         hard argmax codes, h = H / model.downsample
    model(rgb, temperature) -> (reconstruction, logits)   Gumbel-softmax relaxation (training)
    model.decode_tokens(tokens) -> (B, C, H, W)  RGB in [0, 1] (trained tokenizers only)
    save_tokenizer(model, path) / load_tokenizer(path, vocab_size=None)

The encoder has the layout of DALL-E's (Ramesh et al. 2021): a 7x7 input conv, `num_groups`
groups of residual blocks, the width doubling per group and a 2x max-pool after every group but
the last (downsample 2 ** (num_groups - 1)), then ReLU and a 1x1 conv to the code logits. DALL-E's
released encoder is (vocab 8192, hidden 256, 4 groups, 2 blocks per group, 8x down-sampling);
`load_tokenizer` also reads it, converted to a state dict (the layout BEiT and mmpretrain use:
`blocks.input.w`, `blocks.group_1.block_1.res_path.conv_1.w`, ..., `blocks.output.conv.w`). The
decoder mirrors the encoder from a learned codebook (DALL-E's one-hot 1x1 input conv is a codebook
of its width, 128) with nearest up-sampling, back to pixels. Inputs are RGB in [0, 1], mapped to
[eps, 1 - eps] as DALL-E's `map_pixels` (eps = 0.1) before the encoder.
"""

import json
import math
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from utils.checksum import check_file, read_sidecar
from utils.errors import CheckpointError, ConfigError
from utils.safe_load import load_checkpoint_file
from utils.safetensors_io import is_safetensors_file, save_safetensors

PIXEL_EPS = 0.1  # DALL-E's logit-Laplace epsilon: pixels are mapped into [eps, 1 - eps]
METADATA_KEY = 'simmim_dvae'  # the safetensors metadata entry holding the architecture (JSON)
FORMAT_VERSION = 1
ARCHITECTURE_KEYS = (
    'vocab_size',
    'hidden_dim',
    'num_groups',
    'blocks_per_group',
    'codebook_dim',
    'in_chans',
    'has_decoder',
)
DALLE_ARCHITECTURE = dict(vocab_size=8192, hidden_dim=256, num_groups=4, blocks_per_group=2)


def map_pixels(rgb):
    """RGB in [0, 1] -> [eps, 1 - eps], DALL-E's encoder input."""
    return (1 - 2 * PIXEL_EPS) * rgb + PIXEL_EPS


def unmap_pixels(x):
    """The inverse of `map_pixels`, clamped to [0, 1]."""
    return ((x - PIXEL_EPS) / (1 - 2 * PIXEL_EPS)).clamp(0, 1)


def gumbel_temperature(step, anneal_steps, start=1.0, end=1 / 16):
    """Gumbel-softmax temperature at `step`: exponential decay from `start` to `end` over
    `anneal_steps`, then `end` (DALL-E anneals 1 -> 1/16)."""
    progress = min(step / max(anneal_steps, 1), 1.0)
    return start * (end / start) ** progress


# -----------------------------------------------------------------------------------------------
# Blocks
# -----------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """DALL-E's encoder block: (B, in_dim, H, W) -> (B, out_dim, H, W), identity (or a 1x1 conv
    when the width changes) + res_path / num_layers**2, res_path = ReLU-conv3x3 (to out_dim / 4)
    x3, then ReLU-conv1x1 (to out_dim)."""

    def __init__(self, in_dim, out_dim, num_layers):
        super().__init__()
        hidden = out_dim // 4
        self.post_gain = 1 / num_layers**2
        self.id_path = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        layers = []
        for i, (a, b, k) in enumerate(
            [(in_dim, hidden, 3), (hidden, hidden, 3), (hidden, hidden, 3), (hidden, out_dim, 1)]
        ):
            layers += [
                (f'relu_{i + 1}', nn.ReLU()),
                (f'conv_{i + 1}', nn.Conv2d(a, b, k, 1, k // 2)),
            ]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group_widths(hidden_dim, num_groups):
    return [hidden_dim * 2**g for g in range(num_groups)]


def _stages(first, width, widths, blocks_per_group, between, out_dim):
    """DALL-E's stage layout: `first` as `input`, then one group of `blocks_per_group` residual
    blocks per entry of `widths` (`between` = (name, module factory) after every group but the
    last: the encoder's pooling, the decoder's up-sampling), then `output` (ReLU, 1x1 conv to
    `out_dim`)."""
    num_layers = len(widths) * blocks_per_group
    stages = [('input', first)]
    for g, out in enumerate(widths):
        group = []
        for k in range(blocks_per_group):
            group.append((f'block_{k + 1}', ResidualBlock(width, out, num_layers)))
            width = out
        if g < len(widths) - 1:
            group.append((between[0], between[1]()))
        stages.append((f'group_{g + 1}', nn.Sequential(OrderedDict(group))))
    output = OrderedDict([('relu', nn.ReLU()), ('conv', nn.Conv2d(width, out_dim, 1))])
    stages.append(('output', nn.Sequential(output)))
    return nn.Sequential(OrderedDict(stages))


class TokenEncoder(nn.Module):
    """(B, in_chans, H, W) mapped pixels -> (B, vocab_size, H/f, W/f) code logits, f = 2 **
    (num_groups - 1). State-dict names follow DALL-E's (`blocks.input`, `blocks.group_G.block_K`,
    `blocks.output.conv`), with torch's weight/bias for its w/b."""

    def __init__(self, vocab_size, hidden_dim, num_groups, blocks_per_group, in_chans=3):
        super().__init__()
        widths = _group_widths(hidden_dim, num_groups)
        self.blocks = _stages(
            nn.Conv2d(in_chans, hidden_dim, 7, 1, 3),
            hidden_dim,
            widths,
            blocks_per_group,
            ('pool', lambda: nn.MaxPool2d(2)),
            vocab_size,
        )

    def forward(self, x):
        return self.blocks(x)


class TokenDecoder(nn.Module):
    """(B, codebook_dim, h, w) code embeddings -> (B, in_chans, h*f, w*f) mapped pixels: the
    encoder's groups in reverse, 2x nearest up-sampling after every group but the last."""

    def __init__(self, codebook_dim, hidden_dim, num_groups, blocks_per_group, in_chans=3):
        super().__init__()
        widths = _group_widths(hidden_dim, num_groups)[::-1]
        self.blocks = _stages(
            nn.Conv2d(codebook_dim, widths[0], 1),
            widths[0],
            widths,
            blocks_per_group,
            ('upsample', lambda: nn.Upsample(scale_factor=2, mode='nearest')),
            in_chans,
        )

    def forward(self, z):
        return self.blocks(z)


# -----------------------------------------------------------------------------------------------
# The tokenizer
# -----------------------------------------------------------------------------------------------
class DiscreteVAE(nn.Module):
    """Encoder to code logits, a codebook, and (when `has_decoder`) a decoder back to pixels.

    Training: `forward(rgb, temperature)` samples a relaxed one-hot code per position with
    Gumbel-softmax at `temperature`, mixes the codebook with it and decodes. Inference: `tokens`
    takes the argmax code. `architecture` is what `save_tokenizer` writes to the metadata.
    """

    def __init__(
        self,
        vocab_size=8192,
        hidden_dim=256,
        num_groups=4,
        blocks_per_group=2,
        codebook_dim=128,
        in_chans=3,
        has_decoder=True,
    ):
        super().__init__()
        if vocab_size < 2 or hidden_dim < 4 or num_groups < 1 or blocks_per_group < 1:
            raise ValueError(
                f'a discrete VAE needs vocab_size >= 2, hidden_dim >= 4, num_groups >= 1 and '
                f'blocks_per_group >= 1, got {vocab_size}, {hidden_dim}, {num_groups}, '
                f'{blocks_per_group}.'
            )
        self.architecture = dict(
            vocab_size=vocab_size,
            hidden_dim=hidden_dim,
            num_groups=num_groups,
            blocks_per_group=blocks_per_group,
            codebook_dim=codebook_dim,
            in_chans=in_chans,
            has_decoder=has_decoder,
        )
        self.vocab_size, self.in_chans = vocab_size, in_chans
        self.downsample = 2 ** (num_groups - 1)  # input pixels per token
        self.encoder = TokenEncoder(vocab_size, hidden_dim, num_groups, blocks_per_group, in_chans)
        self.has_decoder = has_decoder
        if has_decoder:
            self.codebook = nn.Embedding(vocab_size, codebook_dim)
            self.decoder = TokenDecoder(
                codebook_dim, hidden_dim, num_groups, blocks_per_group, in_chans
            )

    def logits(self, rgb):
        """(B, C, H, W) RGB in [0, 1] -> (B, vocab_size, H/f, W/f) code logits."""
        return self.encoder(map_pixels(rgb))

    @torch.no_grad()
    def tokens(self, rgb):
        """(B, C, H, W) RGB in [0, 1] -> (B, H/f, W/f) int64 codes (argmax: deterministic)."""
        return self.logits(rgb).argmax(dim=1)

    def _require_decoder(self):
        if not self.has_decoder:
            raise ValueError('this tokenizer has no decoder (an encoder-only DALL-E file)')

    def forward(self, rgb, temperature=1.0):
        """Training pass: (reconstruction in mapped pixel space (B, C, H, W), logits)."""
        self._require_decoder()
        logits = self.logits(rgb)
        soft_one_hot = F.gumbel_softmax(logits, tau=temperature, hard=False, dim=1)
        z = torch.einsum('bvhw,vd->bdhw', soft_one_hot, self.codebook.weight)
        return self.decoder(z), logits

    @torch.no_grad()
    def decode_tokens(self, tokens):
        """(B, h, w) codes -> (B, C, h*f, w*f) RGB in [0, 1]."""
        self._require_decoder()
        z = self.codebook(tokens).permute(0, 3, 1, 2)
        return unmap_pixels(self.decoder(z))


def dvae_loss(model, rgb, temperature, kl_weight=0.0):
    """(loss, reconstruction MSE) of `model` on RGB in [0, 1]: the MSE of the reconstruction
    against the mapped pixels, plus `kl_weight` x the KL divergence of the code distribution from
    the uniform prior, per position (DALL-E's ELBO with a Gaussian instead of a logit-Laplace
    likelihood)."""
    reconstruction, logits = model(rgb, temperature)
    mse = F.mse_loss(reconstruction, map_pixels(rgb))
    loss = mse
    if kl_weight:
        log_q = logits.log_softmax(dim=1)
        kl = (log_q.exp() * (log_q + math.log(model.vocab_size))).sum(dim=1).mean()
        loss = loss + kl_weight * kl
    return loss, mse.detach()


# -----------------------------------------------------------------------------------------------
# Files
# -----------------------------------------------------------------------------------------------
def save_tokenizer(model, path):
    """Write `model`'s weights with its architecture in the metadata, atomically, with a checksum
    record beside the file."""
    info = {'format_version': FORMAT_VERSION, **model.architecture}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_safetensors(path, model.state_dict(), {METADATA_KEY: json.dumps(info)})


def _expected(path, purpose, problem):
    return ConfigError(
        f'{purpose}: {path or "(empty)"} {problem}. Expected either a tokenizer written by '
        f'`python -m tools.train_dvae DATA_PATH OUT.safetensors` (safetensors whose metadata '
        f"'{METADATA_KEY}' holds the architecture), or DALL-E's released encoder converted to a "
        f'state dict (safetensors, or a .pt/.pth of tensors only: keys blocks.input.w, '
        f'blocks.group_1.block_1.res_path.conv_1.w, ..., blocks.output.conv.w, optionally '
        f"prefixed 'encoder.', as BEiT and mmpretrain use). Train one with tools/train_dvae.py "
        f'or convert the DALL-E encoder to such a state dict.'
    )


def _read_tensors(path, purpose):
    """(state dict, metadata dict) of a safetensors file, or of a weights-only torch file."""
    if is_safetensors_file(path):
        record = read_sidecar(path)
        if record is not None:
            check_file(path, record, purpose)
        try:
            with safe_open(path, framework='pt', device='cpu') as f:
                return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
        except Exception as e:
            raise CheckpointError(
                f'{purpose}: {path} is not a readable safetensors file ({e}).'
            ) from None
    obj = load_checkpoint_file(path, purpose)
    for key in ('state_dict', 'model', 'encoder'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _expected(path, purpose, 'holds no state dict of tensors')
    return dict(obj), {}


def dalle_encoder_keys(num_groups=4, blocks_per_group=2):
    """The state-dict keys of DALL-E's encoder with this many groups and blocks (id_path only
    where the width changes: the first block of every group but the first)."""
    keys = ['blocks.input.w', 'blocks.input.b']
    for g in range(1, num_groups + 1):
        for k in range(1, blocks_per_group + 1):
            block = f'blocks.group_{g}.block_{k}'
            if g > 1 and k == 1:
                keys += [f'{block}.id_path.w', f'{block}.id_path.b']
            keys += [f'{block}.res_path.conv_{i}.{p}' for i in range(1, 5) for p in 'wb']
    return keys + ['blocks.output.conv.w', 'blocks.output.conv.b']


def _dalle_tokenizer(state, path, purpose):
    """An encoder-only DiscreteVAE holding a DALL-E-layout encoder state dict."""
    keys = list(state)
    num_groups = len({k.split('.')[1] for k in keys if k.startswith('blocks.group_')})
    blocks_per_group = len({k.split('.')[2] for k in keys if k.startswith('blocks.group_1.')})
    if 'blocks.output.conv.w' not in state or num_groups < 1 or blocks_per_group < 1:
        raise _expected(path, purpose, 'has DALL-E-style keys but no complete encoder')
    expected = dalle_encoder_keys(num_groups, blocks_per_group)
    missing, unexpected = sorted(set(expected) - set(keys)), sorted(set(keys) - set(expected))
    if missing or unexpected:
        raise _expected(
            path,
            purpose,
            f'does not have the DALL-E encoder layout (missing: {", ".join(missing[:4]) or "-"}; '
            f'unexpected: {", ".join(unexpected[:4]) or "-"})',
        )
    with torch.device('cpu'):
        model = DiscreteVAE(
            vocab_size=state['blocks.output.conv.w'].shape[0],
            hidden_dim=state['blocks.input.w'].shape[0],
            num_groups=num_groups,
            blocks_per_group=blocks_per_group,
            in_chans=state['blocks.input.w'].shape[1],
            has_decoder=False,
        )
    renamed = {
        'encoder.' + k[:-2] + ('.weight' if k.endswith('.w') else '.bias'): v.float()
        for k, v in state.items()
    }
    _load_strict(model, renamed, path, purpose)
    return model


def _load_strict(model, state, path, purpose):
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise _expected(
            path, purpose, f'does not fit its own architecture ({str(e)[:400]})'
        ) from None


def load_tokenizer(path, vocab_size=None, purpose='MODEL.SIMMIM.TARGET.TOKENIZER'):
    """The DiscreteVAE stored in `path` (ours, or DALL-E's converted encoder), frozen and in eval
    mode. `vocab_size`, when given, must match the file's. Problems raise errors saying what was
    expected."""
    if not path or not os.path.isfile(path):
        raise _expected(path, purpose, 'was not found')
    state, metadata = _read_tensors(path, purpose)
    if METADATA_KEY in metadata:
        try:
            info = json.loads(metadata[METADATA_KEY])
            with torch.device('cpu'):  # real weights, also where the model is built on 'meta'
                model = DiscreteVAE(**{k: info[k] for k in ARCHITECTURE_KEYS})
        except (ValueError, KeyError, TypeError) as e:
            raise _expected(path, purpose, f'has unreadable architecture metadata ({e})') from None
        _load_strict(model, state, path, purpose)
    else:
        if any(k.startswith('encoder.blocks.') for k in state):
            state = {k[len('encoder.') :]: v for k, v in state.items() if k.startswith('encoder.')}
        if 'blocks.input.w' not in state:
            raise _expected(path, purpose, 'has neither architecture metadata nor DALL-E keys')
        model = _dalle_tokenizer(state, path, purpose)
    if vocab_size is not None and model.vocab_size != vocab_size:
        raise ConfigError(
            f'{path} ({purpose}) has a vocabulary of {model.vocab_size} codes but '
            f'MODEL.SIMMIM.TARGET.VOCAB_SIZE is {vocab_size}; make them agree.'
        )
    return model.requires_grad_(False).eval()
