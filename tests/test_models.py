"""models/: official sizes and state-dict names, attention paths, SimMIM encoders, head and loss."""

import glob
import os

import pytest
import torch
import torch.nn.functional as F

from config import get_defaults, load_config
from models import build_model
from models.attention import eager_attention
from models.simmim import blend_mask_token
from models.swin_transformer import SwinTransformer
from models.swin_transformer_v2 import SwinTransformerV2, WindowAttentionV2
from models.targets import MaskedPixelL1Loss, local_norm_target
from models.vision_transformer import VisionTransformer
from tests.conftest import STATE_DICT_KEYS_DIR
from utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS_DIR = STATE_DICT_KEYS_DIR


def official_config(stem):
    """The repository YAML named `stem` (pre-training or fine-tuning, from its name), with the
    1000 ImageNet classes the official fine-tuning code hard-codes."""
    path = sorted(glob.glob(os.path.join(ROOT, 'configs', '**', stem + '.yaml'), recursive=True))[0]
    is_pretrain = 'pretrain' in stem
    opts = [] if is_pretrain else ['MODEL.NUM_CLASSES', '1000']
    return load_config(path, opts, is_pretrain=is_pretrain)


def tiny_config(model_type, img_size=32, **model_keys):
    """Defaults with a tiny architecture; `model_keys` override MODEL.<ARCH> entries."""
    config = get_defaults()
    config.MODEL.TYPE = model_type
    config.DATA.IMG_SIZE = img_size
    config.MODEL.DROP_PATH_RATE = 0.0
    config.MODEL.NUM_CLASSES = 5
    if model_type == 'vit':
        arch = config.MODEL.VIT
        arch.update(PATCH_SIZE=4, EMBED_DIM=16, DEPTH=2, NUM_HEADS=2, USE_SHARED_RPB=True)
    else:
        arch = config.MODEL.SWIN if model_type == 'swin' else config.MODEL.SWINV2
        arch.update(PATCH_SIZE=2, EMBED_DIM=8, DEPTHS=[2, 2], NUM_HEADS=[1, 2], WINDOW_SIZE=4)
    arch.update(model_keys)
    return config


def random_mask(batch, side, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, side, side, generator=generator) < 0.6).long()


def randomize_(model, seed=0):
    """Random values everywhere (zero-initialised tables and post-norms would hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


# -----------------------------------------------------------------------------------------------
# Sizes and state-dict names of the official configs
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'stem, num_params',
    [
        ('simmim_pretrain__swin_base__img192_window6__800ep', 89_874_104),
        ('simmim_pretrain__vit_base__img224__800ep', 86_256_720),
        ('simmim_finetune__swin_base__img224_window7__800ep', 87_768_224),
        ('simmim_finetune__vit_base__img224__800ep', 86_530_984),
        ('simmim_pretrain__swin_large__img192_window12__800ep', 199_881_204),
    ],
)
def test_parameter_count_matches_official(stem, num_params):
    config = official_config(stem)
    with torch.device('meta'):
        model = build_model(config, is_pretrain='pretrain' in stem)
    assert sum(p.numel() for p in model.parameters()) == num_params


# The official state-dict names of these configs, one `name<TAB>shape<TAB>param|buffer<TAB>dtype`
# a line (tests/fixtures/state_dict_keys/); named here so that a missing file fails.
KEY_LISTS = [
    'simmim_pretrain__swin_base__img192_window6__800ep',
    'simmim_finetune__swin_base__img224_window7__800ep',
    'simmim_pretrain__swinv2_base__img192_window12__800ep',
    'simmim_finetune__swinv2_base__img224_window14__800ep',
    'simmim_pretrain__vit_base__img224__800ep',
    'simmim_finetune__vit_base__img224__800ep',
]


@pytest.mark.parametrize('stem', KEY_LISTS)
def test_state_dict_names_and_shapes_match_official(stem):
    path = os.path.join(KEYS_DIR, stem + '.txt')
    with torch.device('meta'):
        model = build_model(official_config(stem), is_pretrain='pretrain' in stem)
    params, buffers = {}, {}
    with open(path) as f:
        for line in f:
            name, shape, kind, _ = line.rstrip('\n').split('\t')
            (params if kind == 'param' else buffers)[name] = tuple(eval(shape))
    # Derived buffers are kept out of the state dict (non-persistent) but must be the same.
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == params
    ours = {k: tuple(v.shape) for k, v in model.named_buffers()}
    # timm's Beit attention (our ViT) also keeps its fixed zero k bias as a non-saved buffer.
    k_biases = {k for k in ours if k.endswith('.attn.k_bias')}
    assert k_biases <= {k.removesuffix('q_bias') + 'k_bias' for k in params if k.endswith('q_bias')}
    assert {k: ours[k] for k in ours.keys() - k_biases} == buffers


def test_official_checkpoint_with_derived_buffers_loads_strictly():
    model = build_model(tiny_config('swin'), is_pretrain=True)
    official = dict(model.state_dict(), **dict(model.named_buffers()))  # as official files hold
    assert any(k.endswith('attn_mask') for k in official)
    fresh = build_model(tiny_config('swin'), is_pretrain=True)
    result = fresh.load_state_dict(official, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_unknown_model_type_error_names_valid_types():
    config = tiny_config('swin')
    config.MODEL.TYPE = 'resnet'
    with pytest.raises(ValueError, match="'resnet'.*swin, swinv2, vit"):
        build_model(config)


# -----------------------------------------------------------------------------------------------
# Attention: fused SDPA == textbook softmax, shift masks, window clamping
# -----------------------------------------------------------------------------------------------
def textbook_window_attention(attn, x, mask):
    """The official formulas written out: softmax(logits + position bias + per-window mask) V."""
    b, n, c = x.shape
    heads = attn.num_heads
    if isinstance(attn, WindowAttentionV2):  # cosine similarity times a clamped temperature
        qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
        qkv = F.linear(x, attn.qkv.weight, qkv_bias).reshape(b, n, 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logits = logits * torch.clamp(attn.logit_scale, max=torch.log(torch.tensor(100.0))).exp()
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, heads)
    else:
        q, k, v = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        table = attn.relative_position_bias_table
    bias = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
    if isinstance(attn, WindowAttentionV2):
        bias = 16 * torch.sigmoid(bias)
    logits = logits + bias.unsqueeze(0)
    nw = mask.shape[0]
    logits = logits.view(b // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
    out = logits.view(-1, heads, n, n).softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_window_attention_with_shift_mask_matches_textbook(version):
    torch.manual_seed(0)
    model_cls = SwinTransformer if version == 'v1' else SwinTransformerV2
    model = randomize_(
        model_cls(
            img_size=16,
            patch_size=2,
            embed_dim=8,
            depths=(2,),
            num_heads=(2,),
            window_size=4,
            num_classes=0,
        )
    )
    block = model.layers[0].blocks[1]
    assert block.shift_size == 2 and block.attn_mask.shape == (4, 16, 16)
    assert set(block.attn_mask.unique().tolist()) == {0.0, -100.0}
    x = torch.randn(2 * 4, 16, 8)  # 2 images x 4 windows
    expected = textbook_window_attention(block.attn, x, block.attn_mask)
    with eager_attention(False):  # SDPA, which CPU training would not pick by itself
        fused = block.attn(x, block.attn_mask)
    with eager_attention():
        eager = block.attn(x, block.attn_mask)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-5)


ATTENTION_CASES = [
    ('swin', {}),
    ('swinv2', {}),
    ('vit', {'USE_SHARED_RPB': True}),
    ('vit', {'USE_SHARED_RPB': False, 'USE_RPB': True, 'USE_MEAN_POOLING': True}),
]


@pytest.mark.parametrize('model_type, keys', ATTENTION_CASES)
def test_fused_attention_matches_eager_path(model_type, keys, monkeypatch):
    model = randomize_(build_model(tiny_config(model_type, **keys), is_pretrain=False)).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sdpa, calls = F.scaled_dot_product_attention, []

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', counting_sdpa)
    with eager_attention(False):  # SDPA, which CPU training would not pick by itself
        fused = model(x)
    fused.sum().backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert calls
    calls.clear()
    with eager_attention(model=model):
        eager = model(x)
    assert not calls  # the textbook path really ran
    eager.sum().backward()
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-6)
    for g_fused, p in zip(fused_grads, model.parameters(), strict=True):
        torch.testing.assert_close(g_fused, p.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('model_type, keys', ATTENTION_CASES)
def test_attention_bias_has_unit_stride_for_fused_gpu_kernels(model_type, keys, monkeypatch):
    # A bias whose last dimension is strided makes CUDA SDPA fall back to its slow math kernel.
    sdpa, strides = F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, **kwargs):
        strides.append(attn_mask.stride(-1))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    model = build_model(tiny_config(model_type, **keys), is_pretrain=False)
    with eager_attention(False):
        model(torch.randn(1, 3, 32, 32))
    assert strides and set(strides) == {1}


def test_window_is_clamped_to_the_feature_map_and_unshifted():
    model = SwinTransformer(
        img_size=32,
        patch_size=2,
        embed_dim=8,
        depths=(2, 2, 2),
        num_heads=(1, 1, 1),
        window_size=8,
        num_classes=0,
    )
    stages = [layer.blocks[1] for layer in model.layers]  # maps 16x16, 8x8 (= window), 4x4
    assert [(b.window_size, b.shift_size) for b in stages] == [(8, 4), (8, 0), (4, 0)]
    assert stages[0].attn_mask is not None and stages[1].attn_mask is None
    assert stages[2].attn.relative_position_bias_table.shape == (7 * 7, 1)


def test_stochastic_depth_grows_linearly_over_all_blocks():
    model = SwinTransformer(
        img_size=32,
        patch_size=2,
        embed_dim=8,
        depths=(2, 3),
        num_heads=(1, 1),
        window_size=4,
        drop_path_rate=0.4,
        num_classes=0,
    )
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for layer in model.layers for b in layer.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


# -----------------------------------------------------------------------------------------------
# Initialisation
# -----------------------------------------------------------------------------------------------
def test_vit_pretraining_init_is_truncated_at_one_std():
    encoder = build_model(tiny_config('vit', EMBED_DIM=64), is_pretrain=True).encoder
    for name in ('mask_token', 'cls_token', 'blocks.0.attn.qkv.weight', 'patch_embed.proj.weight'):
        assert encoder.get_parameter(name).abs().max() <= 0.02
    finetune = build_model(tiny_config('vit', EMBED_DIM=64), is_pretrain=False)
    assert finetune.blocks[0].attn.qkv.weight.abs().max() > 0.02  # timm bounds: untruncated
    assert finetune.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.3)  # init_scale
    # fix_init_weight: block i's output projections are scaled by 1/sqrt(2i)
    assert finetune.blocks[1].mlp.fc2.weight.std().item() == pytest.approx(0.02 / 2, rel=0.1)
    # the official init of what timm's Beit leaves to PyTorch or to its own bounds
    proj = finetune.patch_embed.proj
    assert proj.weight.std().item() == pytest.approx(0.02, rel=0.1) and torch.all(proj.bias == 0)
    block = finetune.blocks[0]
    assert torch.all(block.attn.q_bias == 0) and torch.all(block.attn.k_bias == 0)
    assert torch.all(block.gamma_1 == 0.1) and torch.all(block.norm1.weight == 1)
    assert torch.all(finetune.rel_pos_bias.relative_position_bias_table == 0)


def test_vit_dropout_follows_the_official_placement():
    # drop_rate after the position embedding and on the attention and MLP outputs only (timm's
    # Beit would also drop inside the MLP and before the head).
    model = VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=16,
        depth=2,
        num_heads=2,
        num_classes=3,
        drop_rate=0.25,
        attn_drop_rate=0.125,
    )
    rates = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {
        'pos_drop': 0.25,
        'head_drop': 0.0,
        **{
            f'blocks.{i}.{part}': p
            for i in range(2)
            for part, p in (
                ('attn.attn_drop', 0.125),
                ('attn.proj_drop', 0.25),
                ('mlp.drop2', 0.25),
            )
        },
    }


def test_vit_layer_scale_of_zero_is_refused():
    # timm's Beit reads 0 as "no layer scale"; the official code as gammas fixed at 0.
    with pytest.raises(ValueError, match='MODEL.VIT.INIT_VALUES 0.0: use a positive layer scale'):
        build_model(tiny_config('vit', INIT_VALUES=0.0), is_pretrain=False)
    with pytest.raises(
        ConfigError, match=r'MODEL.VIT.INIT_VALUES must be positive \(or None\), got 0.0'
    ):
        load_config(
            os.path.join(
                ROOT, 'configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml'
            ),
            ['MODEL.VIT.INIT_VALUES', '0.0'],
        )


def test_swin_init():
    v1 = build_model(tiny_config('swin'), is_pretrain=False)
    assert torch.all(v1.layers[0].blocks[0].norm1.weight == 1)
    assert torch.all(v1.layers[0].blocks[0].attn.qkv.bias == 0)
    v2 = build_model(tiny_config('swinv2'), is_pretrain=False)
    block = v2.layers[0].blocks[0]
    # res-post-norm: every residual branch starts at zero
    assert torch.all(block.norm1.weight == 0) and torch.all(block.norm2.weight == 0)
    assert torch.allclose(block.attn.logit_scale, torch.log(torch.tensor(10.0)))


# -----------------------------------------------------------------------------------------------
# SimMIM encoders and wrapper
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'model_type, keys, stride, num_features',
    [
        ('swin', {}, 4, 16),
        ('swinv2', {'DEPTHS': [1, 1, 1], 'NUM_HEADS': [1, 1, 2], 'WINDOW_SIZE': 2}, 8, 32),
        ('vit', {}, 4, 16),  # ViT with patch 4 on 32x32 images
    ],
)
def test_simmim_end_to_end_shapes_and_gradients(model_type, keys, stride, num_features):
    model = build_model(tiny_config(model_type, **keys), is_pretrain=True)
    encoder = model.encoder
    assert (encoder.encoder_stride, encoder.num_features) == (stride, num_features)
    assert model.decoder[0].out_channels == stride**2 * 3
    x = torch.randn(2, 3, 32, 32)
    mask = random_mask(2, 32 // encoder.patch_size)
    assert encoder(x, mask).shape == (2, num_features, 32 // stride, 32 // stride)
    assert model.reconstruct(x, mask).shape == x.shape
    loss = model(x, mask)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert encoder.mask_token.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('model_type', ['swin', 'swinv2', 'vit'])
def test_mask_token_replaces_masked_patch_embeddings(model_type):
    encoder = build_model(tiny_config(model_type), is_pretrain=True).encoder
    x = torch.randn(2, 3, 32, 32)
    mask = random_mask(2, 32 // encoder.patch_size)
    seen = {}

    def stop_after_blending(tokens):
        seen['tokens'] = tokens
        raise StopIteration

    encoder.forward_tokens = stop_after_blending
    with pytest.raises(StopIteration):
        encoder(x, mask)
    embedded = encoder.patch_embed(x)  # for Swin: after the patch-embedding LayerNorm
    masked = mask.flatten(1).bool()
    tokens = seen['tokens']
    assert torch.equal(tokens[masked], encoder.mask_token[0].expand(int(masked.sum()), -1))
    assert torch.equal(tokens[~masked], embedded[~masked])


def test_loss_is_l1_over_masked_pixels_divided_by_channels():
    torch.manual_seed(0)
    patch, chans = 2, 3
    x, x_rec = torch.randn(2, chans, 4, 4), torch.randn(2, chans, 4, 4)
    mask = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 0]]])
    total, masked_pixels = 0.0, 0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                if mask[b, i // patch, j // patch]:
                    masked_pixels += 1
                    for c in range(chans):
                        total += abs(x[b, c, i, j] - x_rec[b, c, i, j]).item()
    expected = total / (masked_pixels + 1e-5) / chans
    loss = MaskedPixelL1Loss(patch, chans)(x, x_rec, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_simmim_forward_is_criterion_of_reconstruction():
    model = build_model(tiny_config('swin'), is_pretrain=True)
    x, mask = torch.randn(2, 3, 32, 32), random_mask(2, 16)
    assert torch.equal(model(x, mask), model.criterion(x, model.reconstruct(x, mask), mask))


def test_local_norm_target_matches_per_pixel_loop():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64) * 3 + 1
    window = 5
    expected = torch.empty_like(x)
    for c in range(2):
        for i in range(7):
            for j in range(6):
                patch = x[0, c, max(i - 2, 0) : i + 3, max(j - 2, 0) : j + 3].flatten()
                var = patch.var(unbiased=True)
                expected[0, c, i, j] = (x[0, c, i, j] - patch.mean()) / torch.sqrt(var + 1e-6)
    torch.testing.assert_close(local_norm_target(x, window), expected, rtol=1e-9, atol=1e-9)


def test_norm_target_config_selects_normalised_target():
    config = tiny_config('swinv2')
    config.MODEL.SIMMIM.NORM_TARGET.update(ENABLE=True, PATCH_SIZE=5)
    criterion = build_model(config, is_pretrain=True).criterion
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(criterion.target(x), local_norm_target(x, 5))


def test_blend_keeps_visible_tokens_exactly():
    tokens, token = torch.randn(1, 4, 3), torch.randn(1, 1, 3)
    out = blend_mask_token(tokens, torch.tensor([[[0, 1], [1, 0]]]), token)
    assert torch.equal(out[0, [0, 3]], tokens[0, [0, 3]]) and torch.equal(out[0, 1], token[0, 0])


# -----------------------------------------------------------------------------------------------
# Weight decay names, intermediate ViT features, gradient checkpointing, build arguments
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'model_type, names, keywords, matching',
    [
        (
            'swin',
            {'encoder.absolute_pos_embed', 'encoder.mask_token'},
            {'relative_position_bias_table'},
            {'relative_position_bias_table'},
        ),
        (
            'swinv2',
            {'encoder.absolute_pos_embed', 'encoder.mask_token'},
            {'relative_position_bias_table', 'cpb_mlp', 'logit_scale'},
            {'cpb_mlp', 'logit_scale'},
        ),
        (
            'vit',
            {'encoder.pos_embed', 'encoder.cls_token', 'encoder.mask_token'},
            {'relative_position_bias_table'},
            {'relative_position_bias_table'},
        ),
    ],
)
def test_simmim_no_weight_decay_names_match_parameters(model_type, names, keywords, matching):
    model = build_model(tiny_config(model_type), is_pretrain=True)
    assert model.no_weight_decay() == names
    assert model.no_weight_decay_keywords() == keywords
    param_names = [n for n, _ in model.named_parameters()]
    # Unprefixed keywords really match pre-training parameters (the official ones did not).
    assert {k for k in keywords if any(k in n for n in param_names)} == matching
    assert 'encoder.mask_token' in param_names


def test_vit_block_outputs_lead_to_the_pooled_features():
    model = build_model(tiny_config('vit', USE_MEAN_POOLING=True), is_pretrain=False).eval()
    x = torch.randn(2, 3, 32, 32)
    outputs = model.forward_block_outputs(x)
    assert len(outputs) == model.get_num_layers() == 2 and outputs[0].shape == (2, 65, 16)
    torch.testing.assert_close(model.pool(outputs[-1]), model.forward_features(x))


@pytest.mark.parametrize('model_type', ['swin', 'swinv2', 'vit'])
def test_gradient_checkpointing_gives_the_same_gradients(model_type):
    def grads(use_checkpoint):
        config = tiny_config(model_type)
        config.MODEL.DROP_PATH_RATE = 0.3  # the checkpoint must replay the same random drops
        config.TRAIN.USE_CHECKPOINT = use_checkpoint
        torch.manual_seed(0)
        model = build_model(config, is_pretrain=True)
        torch.manual_seed(1)
        x, mask = torch.randn(2, 3, 32, 32), random_mask(2, 32 // model.patch_size)
        model(x, mask).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-7)


def test_finetune_build_uses_config():
    config = tiny_config('swin')
    config.MODEL.NUM_CLASSES, config.MODEL.DROP_PATH_RATE = 7, 0.2
    config.TRAIN.USE_CHECKPOINT = True
    model = build_model(config, is_pretrain=False)
    assert isinstance(model, SwinTransformer) and model.head.out_features == 7
    assert model.layers[0].use_checkpoint
    assert model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    vit_config = tiny_config('vit')
    vit_config.TRAIN.USE_CHECKPOINT = True
    vit = build_model(vit_config, is_pretrain=False)
    assert isinstance(vit, VisionTransformer) and vit.grad_checkpointing
    assert vit.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 16)
