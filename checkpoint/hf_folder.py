"""Hugging Face transformers model folders in and out (the names: checkpoint.hf_mapping).

    export_hf_folder(config, state_dict, out_dir, verify=None) -> (model, keys left out)
        OUT_DIR/config.json + model.safetensors + preprocessor_config.json: a pre-training
        checkpoint as Swin(v2)ForMaskedImageModeling (encoder and linear decoder) or, for the
        ViT, BeitModel (the encoder); a fine-tuned one as Swin(v2)ForImageClassification or
        BeitForImageClassification; staged beside OUT_DIR, verify(staging) checked, then
        published (checkpoint.folder_export)
    load_hf_model(folder)                      from_pretrained, refusing missing/unexpected keys
    output_difference(config, state_dict, hf)  ours vs transformers on a random batch (and mask)
    read_hf_checkpoint(folder, model_type)     {'model': its weights under our names}

Nothing here downloads: every folder is read with local_files_only.
"""

import json
import os

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers import (
    BeitForImageClassification,
    BeitModel,
    BitImageProcessor,
    SwinForImageClassification,
    SwinForMaskedImageModeling,
    Swinv2ForImageClassification,
    Swinv2ForMaskedImageModeling,
    ViTImageProcessor,
)
from transformers.image_utils import PILImageResampling
from transformers.utils import logging as transformers_logging

from checkpoint.folder_export import export_folder
from checkpoint.hf_mapping import (
    UnsupportedInTransformers,
    config_from_hf,
    from_hf,
    hf_config,
    to_hf,
)
from config import load_config_text
from models import build_classifier, build_simmim
from utils.errors import CheckpointError, IncompatibleCheckpointError
from utils.safetensors_io import check_safetensors_file
from utils.state_dict import REBUILT_BUFFERS, check_fits, num_classes_of

MAX_RELATIVE_DIFFERENCE = 1e-4
EVAL_RESIZE = 256 / 224  # TEST.CROP: resize the short side to 256/224 of the input, centre-crop
# What a pre-training checkpoint becomes: transformers' SimMIM classes for Swin; for the ViT the
# encoder alone (transformers' BeitForMaskedImageModeling predicts BEiT's visual tokens instead).
MIM_CLASSES = {
    'swin': SwinForMaskedImageModeling,
    'swinv2': Swinv2ForMaskedImageModeling,
    'vit': BeitModel,
}
CLASSIFIERS = {
    'swin': SwinForImageClassification,
    'swinv2': Swinv2ForImageClassification,
    'vit': BeitForImageClassification,
}
BASE_PREFIX = {'swin': 'swin.', 'swinv2': 'swinv2.', 'vit': 'beit.'}  # the base model's attribute
KNOWN_CLASSES = {cls.__name__: (t, cls) for d in (MIM_CLASSES, CLASSIFIERS) for t, cls in d.items()}


def _is_pretraining(state_dict):
    return any(k.startswith('decoder.') for k in state_dict)


def _check_mim_config(config):
    """transformers' MIM classes are the paper's recipe: a linear head predicting raw pixels."""
    simmim = config.MODEL.SIMMIM
    for key, value, wanted in (
        ('MODEL.SIMMIM.HEAD.NAME', simmim.HEAD.NAME, 'linear'),
        ('MODEL.SIMMIM.TARGET.NAME', simmim.TARGET.NAME, 'pixel'),
        ('MODEL.SIMMIM.NORM_TARGET.ENABLE', simmim.NORM_TARGET.ENABLE, False),
    ):
        if value != wanted:
            raise UnsupportedInTransformers(
                f"{key} {value}: transformers' *ForMaskedImageModeling has a linear head "
                f'predicting raw pixels ({key} {wanted}), so this model would differ there. '
                f'Export the fine-tuned model, or the encoder to timm (--to timm).'
            )


def _prefix(cls, model_type):
    """Where the base model's weights sit in `cls` ('' in the base model itself)."""
    return '' if cls is BeitModel else BASE_PREFIX[model_type]


def hf_weights(config, state_dict):
    """(transformers class, its config, its state dict, our keys left out) for our `state_dict`
    of `config`."""
    model_type = config.MODEL.TYPE
    left_out = []
    if _is_pretraining(state_dict):
        encoder = {k[len('encoder.') :]: v for k, v in state_dict.items() if k[:8] == 'encoder.'}
        rest = {k: v for k, v in state_dict.items() if not k.startswith('encoder.')}
        cls = MIM_CLASSES[model_type]
        if cls is BeitModel:
            left_out, rest = sorted(rest), {}  # the decoder: BeitModel has no place for it
        else:
            _check_mim_config(config)
        hf = hf_config(config)
    else:
        rest = {k: v for k, v in state_dict.items() if k.startswith('head.')}
        encoder = {k: v for k, v in state_dict.items() if k not in rest}
        rest = {'classifier.' + k[len('head.') :]: v for k, v in rest.items()}
        hf = hf_config(config, num_classes_of(state_dict))
        cls = CLASSIFIERS[model_type]
    prefix = _prefix(cls, model_type)
    weights = {prefix + k: v for k, v in to_hf(encoder, model_type).items()} | rest
    return cls, hf, weights, left_out


def _loaded_fully(result, what):
    missing = [k for k in result.missing_keys if not k.endswith(REBUILT_BUFFERS)]
    if missing or result.unexpected_keys:
        raise UnsupportedInTransformers(
            f"{what}: transformers' model has no place for {sorted(result.unexpected_keys)[:5]} "
            f'and no value from ours for {missing[:5]}; this model cannot be exported.'
        )


def image_processor(config):
    """transformers' image processor for our evaluation transform (data/transforms.py)."""
    size = config.DATA.IMG_SIZE
    resample = (
        PILImageResampling.BICUBIC
        if config.DATA.INTERPOLATION == 'bicubic'
        else PILImageResampling.BILINEAR
    )
    common = dict(
        resample=resample, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD
    )
    if config.TEST.CROP and size > 32:
        return BitImageProcessor(
            size={'shortest_edge': int(EVAL_RESIZE * size)},
            crop_size={'height': size, 'width': size},
            do_center_crop=True,
            do_convert_rgb=True,
            **common,
        )
    return ViTImageProcessor(size={'height': size, 'width': size}, **common)


def export_hf_folder(config, state_dict, out_dir, verify=None):
    """Write `state_dict` (ours) as a transformers folder in `out_dir`; return (the model, our
    keys it has no place for)."""

    def write(folder):
        transformers_logging.disable_progress_bar()
        cls, hf, weights, left_out = hf_weights(config, state_dict)
        model = cls(hf).eval()
        _loaded_fully(model.load_state_dict(weights, strict=False), 'The export')
        model.save_pretrained(folder)
        image_processor(config).save_pretrained(folder)
        return model, left_out

    return export_folder(out_dir, 'transformers', write, verify)


def load_hf_model(folder):
    """The transformers model of `folder` (one of KNOWN_CLASSES), with every weight from it."""
    path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path):
        raise CheckpointError(
            f'hf:{folder} has no config.json, so it is not a transformers model folder '
            f'(tools/export.py --to hf writes one).'
        )
    with open(path) as f:
        architectures = json.load(f).get('architectures') or ['(none)']
    if architectures[0] not in KNOWN_CLASSES:
        raise IncompatibleCheckpointError(
            f"hf:{folder} holds transformers' {architectures[0]}; readable here: "
            f'{", ".join(KNOWN_CLASSES)}.'
        )
    cls = KNOWN_CLASSES[architectures[0]][1]
    weights = os.path.join(folder, 'model.safetensors')
    if os.path.isfile(weights):
        check_safetensors_file(weights, f'hf:{folder}: the weights file')
    transformers_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f'hf:{folder} could not be loaded by transformers: {e}') from None
    lacking = [k for k in info['missing_keys'] if not k.endswith(REBUILT_BUFFERS)]
    if lacking or info['unexpected_keys'] or info['mismatched_keys']:
        raise CheckpointError(
            f'hf:{folder}: transformers found missing {sorted(lacking)[:5]}, unexpected '
            f'{sorted(info["unexpected_keys"])[:5]} or mismatched '
            f'{sorted(info["mismatched_keys"])[:5]} weights; the folder is damaged or of '
            f'another model. Export it again.'
        )
    return model.eval()


def _our_model(config, state_dict):
    config = config.clone()
    config.defrost()
    config.MODEL.NUM_CLASSES = num_classes_of(state_dict)
    model = (build_simmim if _is_pretraining(state_dict) else build_classifier)(config).eval()
    check_fits(
        state_dict,
        model.state_dict(),
        'This state dict',
        model_name=f'our {config.MODEL.TYPE} model',
    )
    model.load_state_dict(state_dict)
    return model


def output_difference(config, state_dict, hf_model, batch_size=2, seed=0):
    """max |ours - transformers| / max |ours|: the reconstructions of a random batch and mask for
    a pre-training model, else the logits."""
    ours = _our_model(config, state_dict)
    size, generator = config.DATA.IMG_SIZE, torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, hf_model.config.num_channels, size, size, generator=generator)
    with torch.no_grad():
        if _is_pretraining(state_dict):
            grid = size // hf_model.config.patch_size
            mask = (torch.rand(batch_size, grid, grid, generator=generator) < 0.6).float()
            output = hf_model(pixel_values=x, bool_masked_pos=mask.flatten(1).bool())
            if isinstance(hf_model, BeitModel):  # the patch tokens, as our encoder gives them
                expected = ours.encoder(x, mask).flatten(2).transpose(1, 2)
                got = output.last_hidden_state[:, 1:]
            else:
                expected, got = ours.reconstruct(x, mask), output.reconstruction
        else:
            expected, got = ours(x), hf_model(pixel_values=x).logits
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def hf_config_yaml(hf_model):
    """Our config (YAML text) for a transformers model."""
    overrides = config_from_hf(hf_model.config)
    overrides['MODEL']['NAME'] = 'hf_import'
    return load_config_text(json.dumps(overrides)).dump()


def read_hf_checkpoint(folder, model_type=None):
    """{'model': weights under our names} for MODEL.PRETRAINED hf:FOLDER: a MIM model gives our
    pre-training names (encoder.*, decoder.*), a classifier our classifier's (head.*)."""
    hf_model = load_hf_model(folder)
    found = {'beit': 'vit'}.get(hf_model.config.model_type, hf_model.config.model_type)
    if model_type is not None and found != model_type:
        raise IncompatibleCheckpointError(
            f"hf:{folder} is transformers' {type(hf_model).__name__} (our MODEL.TYPE {found}), "
            f'but the config has MODEL.TYPE {model_type}. Use a config of that architecture.'
        )
    try:
        config = load_config_text(hf_config_yaml(hf_model))
    except UnsupportedInTransformers as e:
        raise IncompatibleCheckpointError(f'hf:{folder}: {e}') from None
    prefix = _prefix(type(hf_model), found)
    sd = hf_model.state_dict()
    base = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    rest = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    if isinstance(hf_model, tuple(MIM_CLASSES.values())):
        encoder_keys = build_simmim(config).encoder.state_dict().keys()
        weights, left = from_hf(base, encoder_keys, found)
        out = {'encoder.' + k: v for k, v in weights.items()} | rest
    else:
        encoder_keys = [
            k for k in build_classifier(config).state_dict() if not k.startswith('head.')
        ]
        weights, left = from_hf(base, encoder_keys, found)
        out = weights | {'head.' + k[len('classifier.') :]: v for k, v in rest.items()}
    if left:
        raise IncompatibleCheckpointError(f'hf:{folder}: no place here for {", ".join(left[:5])}.')
    return {'model': {k: v.detach().clone() for k, v in out.items()}}
