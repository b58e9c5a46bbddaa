"""models/linear_probe.py: frozen encoder, features of the chosen ViT block, only the head
trains."""

import torch
import torch.nn.functional as F

from checkpoint.weights import load_pretrained
from models.linear_probe import build_linear_probe
from tests.fixture_rule import config_from_yaml, official_data
from tests.test_models import tiny_config


def probe_config(block):
    config = tiny_config(
        'vit', USE_APE=True, USE_SHARED_RPB=False, USE_RPB=True, USE_MEAN_POOLING=True
    )
    config.LINEAR_PROBE.update(ENABLE=True, BLOCK=block)
    return config


def test_vit_probe_features_are_the_mean_patch_token_of_the_block():
    torch.manual_seed(0)
    probe = build_linear_probe(probe_config(block=1))
    encoder, x = probe.encoder, torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the blocks by hand: cls token first, then position embedding
        tokens = torch.cat([encoder.cls_token.expand(2, -1, -1), encoder.patch_embed(x)], dim=1)
        tokens = encoder.blocks[0](tokens + encoder.pos_embed)
    torch.testing.assert_close(probe.features(x), tokens[:, 1:].mean(dim=1))
    last = build_linear_probe(probe_config(block=0))
    last.encoder.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(last.features(x), encoder.forward_features(x))


def test_probe_trains_only_the_head_with_the_encoder_in_eval_mode():
    probe = build_linear_probe(probe_config(block=2)).train()
    assert not probe.encoder.training and probe.head.training
    probe(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in probe.encoder.parameters())
    assert all(p.grad is not None for p in probe.head.parameters())


def test_vit_probe_of_an_official_checkpoint_reaches_the_official_logits(tmp_path):
    # The probe's encoder loads the official-name pre-training weights; its last-block features,
    # through the fine-tuning model's fc_norm and head, give the official fine-tuning logits.
    data = official_data('vit')
    checkpoint = tmp_path / 'pretrained.pth'
    torch.save({'model': data['pretrain_state_dict']}, checkpoint)
    config = config_from_yaml(
        data['finetune_yaml'],
        False,
        [
            'MODEL.PRETRAINED',
            str(checkpoint),
            'LINEAR_PROBE.ENABLE',
            'True',
            'LINEAR_PROBE.BLOCK',
            '2',
        ],
    )
    probe = build_linear_probe(config)
    report = load_pretrained(config, probe.encoder)
    assert sorted(report.missing_keys) == ['fc_norm.bias', 'fc_norm.weight']
    official = data['finetune_state_dict']
    features = probe.eval().features(data['x_ft'])
    features = F.layer_norm(
        features,
        features.shape[-1:],
        official['fc_norm.weight'],
        official['fc_norm.bias'],
        eps=1e-6,
    )
    logits = F.linear(features, official['head.weight'], official['head.bias'])
    torch.testing.assert_close(logits, data['logits'], rtol=1e-5, atol=1e-5)
