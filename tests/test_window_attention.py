"""models/window_attention.py: the fast Swin window attention equals the textbook formula (fp32,
with and without the shift mask, Swin and SwinV2), and MODEL.WINDOW_ATTENTION reaches every
layer."""

import pytest
import torch

from config import load_config
from models import build_model
from models.attention import attention, eager_attention
from models.swin_transformer import SwinTransformer
from models.swin_transformer_v2 import SwinTransformerV2
from models.window_attention import set_window_attention
from tests.conftest import ROOT
from utils.errors import ConfigError

TINY = f'{ROOT}/tests/configs/tiny_swin_pretrain.yaml'


def textbook_blocks(x, blocks):
    """The blocks with every attention computed as softmax(q k^T * scale + bias + mask) v."""
    with eager_attention():
        for block in blocks:
            x = block(x)
    return x


def stage(model_class, seed=0, dtype=torch.float64):
    """One stage of two blocks (unshifted, then shifted) on an 8x8 map with 4x4 windows, random
    weights everywhere (zero-initialised tables and post-norms would hide bugs)."""
    torch.manual_seed(seed)
    model = model_class(
        img_size=16,
        patch_size=2,
        embed_dim=16,
        depths=(2,),
        num_heads=(2,),
        window_size=4,
        num_classes=0,
        drop_path_rate=0.0,
    ).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    blocks = model.layers[0].blocks
    assert blocks[0].attn_mask is None and blocks[1].attn_mask is not None
    return blocks


@pytest.mark.parametrize('model_class', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('shifted', [False, True])
def test_sdpa_window_attention_equals_textbook_values_and_gradients(model_class, shifted):
    block = stage(model_class)[int(shifted)]
    x = torch.randn(3, 64, 16, dtype=torch.float64, requires_grad=True)
    with eager_attention(False):  # SDPA even where CPU training would pick the textbook formula
        fast = block(x)
    fast_grads = torch.autograd.grad(fast.square().sum(), [x, *block.parameters()])
    expected = textbook_blocks(x, [block])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(fast, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(fast_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cpu_training_uses_the_textbook_formula_and_inference_sdpa(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        'scaled_dot_product_attention',
        lambda *a, **k: calls.append(1) or sdpa(*a, **k),
    )
    q = torch.randn(2, 2, 5, 4, requires_grad=True)
    attention(q, q, q)
    assert not calls
    with torch.no_grad():
        attention(q, q, q)
    assert len(calls) == 1


def test_flex_window_attention_equals_textbook_forward_on_cpu():
    # FlexAttention compiles (inductor) and has neither float64 nor a backward on a CPU: fp32
    # forward here; on CUDA, benchmarks/attention_speed.py checks it forward and backward in bf16.
    blocks = stage(SwinTransformer, seed=1, dtype=torch.float32)
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        expected = textbook_blocks(x, blocks)
        set_window_attention(blocks, 'flex')
        with eager_attention(False):
            flex = blocks[1](blocks[0](x))
    torch.testing.assert_close(flex, expected, rtol=1e-5, atol=1e-5)


def test_window_attention_key_reaches_every_window_attention_layer():
    config = load_config(
        TINY,
        [
            'MODEL.WINDOW_ATTENTION',
            'flex',
            'MODEL.SIMMIM.HEAD.NAME',
            'inverse_swin',
            'MODEL.SIMMIM.HEAD.INVERSE_SWIN.WINDOW_SIZE',
            4,
        ],
    )
    model = build_model(config)
    kernels = [m.window_kernel for m in model.modules() if hasattr(m, 'window_kernel')]
    assert len(kernels) == 4 + 12 and set(kernels) == {'flex'}  # encoder + inverse Swin-T head
    with pytest.raises(ConfigError, match='MODEL.WINDOW_ATTENTION'):
        load_config(TINY, ['MODEL.WINDOW_ATTENTION', 'fast'])
