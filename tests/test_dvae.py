"""models/dvae.py, models/dvae_target.py and tools/train_dvae.py: the tokenizer's shapes and
files, the DALL-E-layout loader against a hand-written DALL-E forward pass, tokenizer training and
its exact resume, and the dvae_tokens target on Swin, SwinV2 and ViT (loss at initialisation,
learning, no trainable state, config errors)."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import main_simmim
from config import get_defaults, load_config
from data.synthetic import SyntheticShapes
from engine.launch import run, run_tool
from models import build_model
from models.dvae import (
    METADATA_KEY,
    DiscreteVAE,
    dalle_encoder_keys,
    gumbel_temperature,
    load_tokenizer,
    map_pixels,
    save_tokenizer,
)
from models.dvae_target import DVAETokens
from models.targets import check_target_config, normalized_to_rgb, rgb_to_normalized
from optimizer import build_optimizer
from tests.conftest import ROOT
from tools import make_shards
from tools.train_dvae import main as train_dvae
from utils.errors import ConfigError
from utils.safe_load import load_checkpoint_file

TINY_ARCH = dict(vocab_size=16, hidden_dim=8, num_groups=3, blocks_per_group=1, codebook_dim=8)


def tiny_tokenizer(seed=0, **arch):
    torch.manual_seed(seed)
    return DiscreteVAE(**{**TINY_ARCH, **arch})


def synthetic_rgb(count=4, size=16, seed=0):
    shapes = SyntheticShapes(count, 4, size, seed=seed)
    return torch.stack([torch.from_numpy(_array(shapes[i][0])) for i in range(count)])


def _array(image):
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy() / 255.0


# -----------------------------------------------------------------------------------------------
# The tokenizer
# -----------------------------------------------------------------------------------------------
def test_encoder_and_decoder_shapes():
    model = tiny_tokenizer()
    rgb = torch.rand(2, 3, 32, 24)
    assert model.downsample == 4  # 2 ** (num_groups - 1)
    assert model.logits(rgb).shape == (2, 16, 8, 6)
    tokens = model.tokens(rgb)
    assert tokens.shape == (2, 8, 6) and tokens.dtype == torch.int64
    assert 0 <= tokens.min() and tokens.max() < 16
    reconstruction, logits = model(rgb, temperature=0.5)
    assert reconstruction.shape == rgb.shape and logits.shape == (2, 16, 8, 6)
    decoded = model.decode_tokens(tokens)
    assert decoded.shape == rgb.shape and 0 <= decoded.min() and decoded.max() <= 1


def test_gumbel_temperature_anneals_exponentially_from_one_to_a_sixteenth():
    assert gumbel_temperature(0, 100) == 1.0
    assert gumbel_temperature(50, 100) == pytest.approx(0.25)  # the geometric mean of 1 and 1/16
    assert gumbel_temperature(100, 100) == pytest.approx(1 / 16)
    assert gumbel_temperature(500, 100) == pytest.approx(1 / 16)


def test_tokens_are_the_argmax_of_the_logits_and_deterministic():
    model = tiny_tokenizer()
    rgb = synthetic_rgb()
    logits = model.logits(rgb)
    assert torch.equal(model.tokens(rgb), logits.argmax(1))
    assert torch.equal(model.tokens(rgb), model.tokens(rgb.clone()))


def test_safetensors_round_trip_keeps_weights_and_architecture(tmp_path):
    model = tiny_tokenizer(seed=3)
    path = str(tmp_path / 'tok.safetensors')
    save_tokenizer(model, path)
    assert os.path.isfile(path + '.checksum')
    with safe_open(path, framework='pt') as f:
        info = json.loads(f.metadata()[METADATA_KEY])
    assert info['vocab_size'] == 16 and info['num_groups'] == 3 and info['has_decoder'] is True
    loaded = load_tokenizer(path, vocab_size=16)
    assert loaded.architecture == model.architecture
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with pytest.raises(ConfigError, match='vocabulary of 16 codes but .*VOCAB_SIZE is 32'):
        load_tokenizer(path, vocab_size=32)


# -----------------------------------------------------------------------------------------------
# DALL-E's encoder layout
# -----------------------------------------------------------------------------------------------
def dalle_shapes(hidden, vocab, groups, blocks, in_chans=3):
    """Key -> shape of DALL-E's encoder, from its architecture (widths 1, 2, 4, 8 x hidden; each
    block: 3x3 convs to out/4, out/4, out/4, then a 1x1 to out; a 1x1 id_path where the width
    changes)."""
    shapes = {'blocks.input.w': (hidden, in_chans, 7, 7), 'blocks.input.b': (hidden,)}
    width = hidden
    for g in range(1, groups + 1):
        out = hidden * 2 ** (g - 1)
        for k in range(1, blocks + 1):
            block = f'blocks.group_{g}.block_{k}'
            if width != out:
                shapes[f'{block}.id_path.w'] = (out, width, 1, 1)
                shapes[f'{block}.id_path.b'] = (out,)
            dims = [(out // 4, width, 3), (out // 4, out // 4, 3), (out // 4, out // 4, 3)]
            for i, (o, n, kw) in enumerate([*dims, (out, out // 4, 1)], start=1):
                shapes[f'{block}.res_path.conv_{i}.w'] = (o, n, kw, kw)
                shapes[f'{block}.res_path.conv_{i}.b'] = (o,)
            width = out
    shapes['blocks.output.conv.w'] = (vocab, width, 1, 1)
    shapes['blocks.output.conv.b'] = (vocab,)
    return shapes


def random_dalle_state(hidden=8, vocab=16, groups=4, blocks=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=generator) * 0.3
        for key, shape in dalle_shapes(hidden, vocab, groups, blocks).items()
    }


def dalle_forward(state, x, groups=4, blocks=2):
    """DALL-E's encoder written out on its own state dict (mapped pixels in, logits out)."""

    def conv(h, name):
        w = state[name + '.w']
        return F.conv2d(h, w, state[name + '.b'], padding=(w.shape[-1] - 1) // 2)

    h = conv(x, 'blocks.input')
    for g in range(1, groups + 1):
        for k in range(1, blocks + 1):
            block = f'blocks.group_{g}.block_{k}'
            identity = conv(h, block + '.id_path') if block + '.id_path.w' in state else h
            r = h
            for i in range(1, 5):
                r = conv(F.relu(r), f'{block}.res_path.conv_{i}')
            h = identity + r / (groups * blocks) ** 2
        if g < groups:
            h = F.max_pool2d(h, 2)
    return conv(F.relu(h), 'blocks.output.conv')


def test_dalle_key_list_matches_the_layout_built_from_the_architecture():
    assert sorted(dalle_encoder_keys(4, 2)) == sorted(dalle_shapes(256, 8192, 4, 2))
    assert len(dalle_encoder_keys(4, 2)) == 74


@pytest.mark.parametrize('container', ['pt', 'pt_prefixed', 'safetensors'])
def test_dalle_layout_file_loads_and_computes_dalles_logits(tmp_path, container):
    state = random_dalle_state()
    path = str(tmp_path / ('dalle.safetensors' if container == 'safetensors' else 'dalle.pth'))
    if container == 'pt':
        torch.save(state, path)
    elif container == 'pt_prefixed':  # as a state dict saved with the model's attribute name
        torch.save({'state_dict': {'encoder.' + k: v for k, v in state.items()}}, path)
    else:
        save_file(state, path)
    tokenizer = load_tokenizer(path, vocab_size=16)
    assert not tokenizer.has_decoder and tokenizer.downsample == 8
    assert tokenizer.architecture['hidden_dim'] == 8 and tokenizer.architecture['num_groups'] == 4
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = dalle_forward(state, (1 - 2 * 0.1) * rgb + 0.1)
    assert torch.allclose(tokenizer.logits(rgb), expected, atol=1e-5)
    assert torch.allclose(map_pixels(rgb), 0.8 * rgb + 0.1)


def test_wrong_or_missing_tokenizer_files_name_what_was_expected(tmp_path):
    with pytest.raises(ConfigError, match='was not found.*blocks.input.w'):
        load_tokenizer(str(tmp_path / 'nothing.safetensors'))
    other = str(tmp_path / 'other.pth')
    torch.save({'fc.weight': torch.zeros(2, 2)}, other)
    with pytest.raises(ConfigError, match='neither architecture metadata nor DALL-E keys'):
        load_tokenizer(other)
    broken = random_dalle_state()
    del broken['blocks.group_2.block_1.id_path.w']
    save_file(broken, str(tmp_path / 'broken.safetensors'))
    with pytest.raises(ConfigError, match=r'missing: blocks\.group_2\.block_1\.id_path\.w'):
        load_tokenizer(str(tmp_path / 'broken.safetensors'))
    torch.save([1, 2, 3], str(tmp_path / 'list.pt'))
    with pytest.raises(ConfigError, match='no state dict of tensors'):
        load_tokenizer(str(tmp_path / 'list.pt'))
    with pytest.raises(ConfigError, match=r'\(empty\) was not found'):
        load_tokenizer('')


# -----------------------------------------------------------------------------------------------
# tools/train_dvae.py
# -----------------------------------------------------------------------------------------------
TRAIN_FLAGS = [
    '--vocab-size',
    '32',
    '--hidden-dim',
    '16',
    '--num-groups',
    '3',
    '--blocks-per-group',
    '1',
    '--codebook-dim',
    '16',
    '--image-size',
    '32',
    '--batch-size',
    '8',
    '--lr',
    '3e-3',
    '--warmup-steps',
    '2',
    '--device',
    'cpu',
    '--no-progress',
]


def hard_reconstruction_error(model, rgb):
    return F.mse_loss(model.decode_tokens(model.tokens(rgb)), rgb).item()


def shape_folder(tmp_path):
    """8 synthetic shapes of 40 px as PNGs in tmp_path/images."""
    folder = tmp_path / 'images'
    folder.mkdir()
    shapes = SyntheticShapes(8, 4, 40, seed=5)
    for i in range(8):
        shapes[i][0].save(folder / f'{i}.png')
    return folder


def test_training_on_an_image_folder_lowers_the_reconstruction_error(tmp_path):
    folder = shape_folder(tmp_path)
    out = str(tmp_path / 'tok.safetensors')
    assert train_dvae([str(folder), out, '--steps', '30', *TRAIN_FLAGS]) == 0
    rgb = torch.stack(
        [
            torch.from_numpy(_array(Image.open(folder / f'{i}.png').resize((32, 32))))
            for i in range(8)
        ]
    )
    torch.manual_seed(0)  # the tool's initialisation
    initial = DiscreteVAE(32, 16, 3, 1, 16).eval()
    trained = load_tokenizer(out, vocab_size=32)
    before, after = hard_reconstruction_error(initial, rgb), hard_reconstruction_error(trained, rgb)
    assert after < 0.6 * before, (before, after)
    assert os.path.isfile(str(tmp_path / 'tok.png'))
    assert os.path.isfile(out + '.train_state.pt')


def test_training_on_shards_gives_the_tokenizer_trained_on_their_folder(tmp_path):
    folder = shape_folder(tmp_path)
    make_shards.convert(str(folder), str(tmp_path / 'shards'), shard_size=3, log=lambda *a: None)
    tokenizers = []
    for source in (folder, tmp_path / 'shards'):
        out = str(tmp_path / f'{source.name}.safetensors')
        assert train_dvae([str(source), out, '--steps', '4', *TRAIN_FLAGS]) == 0
        tokenizers.append(load_tokenizer(out).state_dict())
    a, b = tokenizers
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_resumes_exactly(tmp_path):
    straight, split = str(tmp_path / 'a.safetensors'), str(tmp_path / 'b.safetensors')
    flags = ['--checkpoint-every', '3', *TRAIN_FLAGS]
    assert train_dvae(['synthetic', straight, '--steps', '6', *flags]) == 0
    assert train_dvae(['synthetic', split, '--steps', '6', '--stop-after', '3', *flags]) == 0
    assert not os.path.exists(split)  # no tokenizer before the schedule is done
    assert train_dvae(['synthetic', split, '--steps', '6', '--resume', *flags]) == 0
    a, b = load_tokenizer(straight).state_dict(), load_tokenizer(split).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_flags_are_checked(tmp_path, capsys):
    out = str(tmp_path / 't.safetensors')
    assert run_tool(train_dvae, ['synthetic', out, '--vocab-size', '0']) == 2
    assert 'Configuration error: --vocab-size must be at least 1' in capsys.readouterr().err
    with pytest.raises(ConfigError, match='multiple of the down-sampling'):
        train_dvae(['synthetic', out, '--image-size', '30', *TRAIN_FLAGS[:8]])
    with pytest.raises(ConfigError, match='no training state'):
        train_dvae(['synthetic', out, '--resume', *TRAIN_FLAGS])
    with pytest.raises(ConfigError, match='not a folder'):
        train_dvae([str(tmp_path / 'missing'), out, *TRAIN_FLAGS])


# -----------------------------------------------------------------------------------------------
# The dvae_tokens target
# -----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tokenizer_file(tmp_path_factory):
    """A 64-code tokenizer with 2x down-sampling: random weights of std 0.2 (torch's default
    initialisation gives 2 distinct tokens on these images, these about a dozen)."""
    path = str(tmp_path_factory.mktemp('tok') / 'tok64.safetensors')
    tokenizer = tiny_tokenizer(vocab_size=64, num_groups=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tokenizer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    save_tokenizer(tokenizer, path)
    return path


def tiny_token_config(model_type, tokenizer, downsample=4):
    """32-px images; Swin/SwinV2 (patch 2, stride 4) or ViT (patch 4); 8-px mask patches."""
    config = get_defaults()
    config.MODEL.TYPE = model_type
    config.DATA.IMG_SIZE = 32
    config.DATA.MASK_PATCH_SIZE = 8
    config.MODEL.DROP_PATH_RATE = 0.0
    if model_type == 'vit':
        config.MODEL.VIT.update(PATCH_SIZE=4, EMBED_DIM=16, DEPTH=2, NUM_HEADS=2)
    else:
        arch = config.MODEL.SWIN if model_type == 'swin' else config.MODEL.SWINV2
        arch.update(PATCH_SIZE=2, EMBED_DIM=8, DEPTHS=[2, 2], NUM_HEADS=[1, 2], WINDOW_SIZE=4)
    config.MODEL.SIMMIM.TARGET.update(
        NAME='dvae_tokens', TOKENIZER=tokenizer, VOCAB_SIZE=64, DOWNSAMPLE=downsample
    )
    return config


def token_mask(batch, seed=0, side=4, cells=2):
    """(batch, 8, 8) model-patch masks (ViT, patch 4) from a 4x4 grid of 8-px mask patches; for
    Swin (patch 2) `cells` = 4."""
    generator = torch.Generator().manual_seed(seed)
    grid = (torch.rand(batch, side, side, generator=generator) < 0.6).long()
    return grid.repeat_interleave(cells, 1).repeat_interleave(cells, 2)


def normalized_images(count=4, seed=0):
    return rgb_to_normalized(synthetic_rgb(count, 32, seed))


def test_token_target_is_the_tokenizer_on_the_resized_image_and_deterministic(tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    criterion = DVAETokens(4, load_tokenizer(tokenizer_file), downsample=4)
    x = normalized_images()
    target = criterion.target(x)
    assert target.shape == (4, 8, 8)  # 32 px / 4 px per token
    resized = F.interpolate(normalized_to_rgb(x), size=(16, 16), mode='bilinear', antialias=True)
    assert torch.equal(target, tokenizer.logits(resized).argmax(1))  # 8 tokens x 2x down-sampling
    assert torch.equal(criterion.target(x.clone()), target)


def test_token_loss_is_cross_entropy_over_masked_positions(tokenizer_file):
    criterion = DVAETokens(4, load_tokenizer(tokenizer_file), downsample=4)
    x = normalized_images(2)
    mask = token_mask(2)
    prediction = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(2))
    target = criterion.target(x)
    per_position = F.cross_entropy(prediction, target, reduction='none')
    expected = per_position[mask.bool()].mean()
    assert criterion(x, prediction, mask).item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize('model_type', ['swin', 'swinv2', 'vit'])
def test_first_loss_with_a_fresh_head_is_close_to_ln_vocab_size(tokenizer_file, model_type):
    """Averaged over 6 initialisations: one fresh head's logits have a std of about 0.6, so a
    single first loss lies within about +-1 of ln V (masked positions share their features)."""
    config = tiny_token_config(model_type, tokenizer_file)
    check_target_config(config, 4)
    cells = 2 if model_type == 'vit' else 4
    x, mask = normalized_images(), token_mask(4, cells=cells)
    losses = []
    for seed in range(6):
        torch.manual_seed(seed)
        model = build_model(config)
        with torch.no_grad():
            losses.append(model(x, mask).item())
    assert abs(sum(losses) / 6 - math.log(64)) < 0.3, losses
    assert model.predict_image(normalized_images(2), token_mask(2, cells=cells)).shape == (
        2,
        3,
        32,
        32,
    )


def test_short_pretraining_lowers_the_token_loss_and_keeps_the_tokenizer_out(tokenizer_file):
    config = tiny_token_config('vit', tokenizer_file)
    config.TRAIN.BASE_LR = 3e-3
    torch.manual_seed(0)
    model = build_model(config)
    tokenizer = model.criterion.tokenizer
    assert not any('tokenizer' in k for k in model.state_dict())
    assert all(p is not q for p in model.parameters() for q in tokenizer.parameters())
    optimizer = build_optimizer(config, model)
    in_groups = sum(p.numel() for g in optimizer.param_groups for p in g['params'])
    assert in_groups == sum(p.numel() for p in model.parameters())
    before = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    x, mask = normalized_images(), token_mask(4)
    losses = []
    for _ in range(25):
        loss = model(x, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.predict_image(x, mask).shape == x.shape  # the argmax tokens, decoded
    assert all(torch.equal(before[k], v) for k, v in tokenizer.state_dict().items())


def test_target_config_errors_name_the_key(tokenizer_file):
    config = tiny_token_config('vit', '')
    with pytest.raises(ConfigError, match='TOKENIZER is empty.*train_dvae'):
        check_target_config(config, 4)
    config = tiny_token_config('swin', tokenizer_file, downsample=4)
    config.DATA.MASK_PATCH_SIZE = 2
    with pytest.raises(ConfigError, match='straddle the 2-px mask patches'):
        check_target_config(config, 4)
    config = tiny_token_config('vit', tokenizer_file)
    config.MODEL.SIMMIM.TARGET.VOCAB_SIZE = 1
    with pytest.raises(ConfigError, match='VOCAB_SIZE must be >= 2'):
        check_target_config(config, 4)
    config = tiny_token_config('vit', tokenizer_file)
    config.MODEL.SIMMIM.TARGET.VOCAB_SIZE = 8192
    with pytest.raises(ConfigError, match='vocabulary of 64 codes'):
        build_model(config)


def pretrain_with_tokens(output, tokenizer, *opts):
    """main_simmim on the tiny Swin test config (64 px, 16-px mask patches) with 4x4 tokens."""
    argv = ['--cfg', os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_pretrain.yaml')]
    argv += ['--output', str(output), '--opts', 'MODEL.SIMMIM.TARGET.NAME', 'dvae_tokens']
    argv += ['MODEL.SIMMIM.TARGET.TOKENIZER', tokenizer, 'MODEL.SIMMIM.TARGET.VOCAB_SIZE', '64']
    argv += ['MODEL.SIMMIM.TARGET.DOWNSAMPLE', '16', 'DATA.SYNTHETIC.TRAIN_SIZE', '16']
    code = run(main_simmim.main, argv + list(map(str, opts)), is_pretrain=True)
    return code, os.path.join(str(output), 'simmim_pretrain', 'tiny')


def test_pretraining_checkpoints_hold_no_tokenizer_and_resume_exactly(tmp_path, tokenizer_file):
    _, straight = pretrain_with_tokens(tmp_path / 'straight', tokenizer_file)
    _, split = pretrain_with_tokens(tmp_path / 'split', tokenizer_file, 'TRAIN.EPOCHS', 1)
    code, split = pretrain_with_tokens(tmp_path / 'split', tokenizer_file)  # resumes epoch 1
    assert code == 0
    assert 'resumed from' in open(os.path.join(split, 'log_rank0.txt')).read()
    a = load_checkpoint_file(os.path.join(straight, 'ckpt_epoch_1.pth'))
    b = load_checkpoint_file(os.path.join(split, 'ckpt_epoch_1.pth'))
    assert not any('tokenizer' in k or k.startswith('criterion.') for k in a['model'])
    # The tiny Swin has no persistent buffers: every state-dict entry is a trainable parameter,
    # and the optimizer holds exactly those (the tokenizer's 45 tensors are in neither).
    num_params = sum(len(g['params']) for g in a['optimizer']['param_groups'])
    assert num_params == len(a['model']) == len(a['optimizer']['state'])
    assert a['model'].keys() == b['model'].keys()
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def test_pretraining_with_a_wrong_tokenizer_file_exits_2_with_one_paragraph(tmp_path, capsys):
    wrong = tmp_path / 'palette.pt'
    torch.save(torch.rand(8, 3), wrong)
    code, _ = pretrain_with_tokens(tmp_path / 'run', str(wrong))
    assert code == 2
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert 'no state dict of tensors' in output and 'blocks.input.w' in output
    assert 'Traceback' not in output


def test_beit_geometry_14x14_tokens_from_112_px_for_a_224_px_vit_b_16(tmp_path):
    """ViT-B/16 at 224 px with DOWNSAMPLE 16: one token per patch, 14x14, and an 8x tokenizer
    (DALL-E's 4 groups) sees the image at 112 px."""
    path = str(tmp_path / 'tok8x.safetensors')
    save_tokenizer(tiny_tokenizer(vocab_size=8192, hidden_dim=4, num_groups=4), path)
    cfg = os.path.join(
        ROOT, 'configs', 'vit_base__800ep', 'simmim_pretrain__vit_base__img224__800ep.yaml'
    )
    opts = ['MODEL.SIMMIM.TARGET.NAME', 'dvae_tokens', 'MODEL.SIMMIM.TARGET.TOKENIZER', path]
    config = load_config(cfg, opts + ['MODEL.SIMMIM.TARGET.DOWNSAMPLE', 16])
    criterion = DVAETokens.from_config(config, 16, 3)
    seen = []
    criterion.tokenizer.encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    target = criterion.target(torch.randn(1, 3, 224, 224))
    assert target.shape == (1, 14, 14) and seen == [(1, 3, 112, 112)]


def test_a_tokenizer_with_tied_weights_is_saved_and_reads_back(tmp_path):
    model = tiny_tokenizer(seed=4)
    blocks = 'encoder.blocks.group_1.block_1.res_path'
    tied = model.get_submodule(f'{blocks}.conv_2').weight
    model.get_submodule(f'{blocks}.conv_3').weight = tied  # two names, one storage
    path = str(tmp_path / 'tok.safetensors')
    save_tokenizer(model, path)
    loaded = load_tokenizer(path, vocab_size=16)
    for name in ('conv_2', 'conv_3'):
        assert torch.equal(loaded.get_submodule(f'{blocks}.{name}').weight, tied)
