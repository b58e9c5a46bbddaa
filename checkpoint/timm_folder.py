"""timm model folders and timm models, in and out (the name mappings are in models.timm_mapping).

    export_timm_folder(config, state_dict, out_dir, info=None, verify=None) -> the timm model
        OUT_DIR/config.json (timm's format) + OUT_DIR/model.safetensors, loadable offline with
        timm.create_model('local-dir:OUT_DIR', pretrained=True); staged beside OUT_DIR,
        verify(staging) checked, then published
    load_timm_model(spec, cache_dir=None)        spec: such a folder, or a timm model name whose
                                                 weights are already in the local HF cache
    read_timm_checkpoint(spec, model_type=None)  {'model': its weights under our names}
    output_difference(config, state_dict, timm_model)   ours vs timm on a random batch
    timm_config_yaml(timm_model)                 our config (YAML text) for a timm model

Nothing here downloads: a model name is only looked up in the local Hugging Face cache.
"""

import difflib
import json
import os

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg, save_for_hf

from checkpoint.folder_export import export_folder
from config import load_config_text
from models import ARCHITECTURES, build_classifier
from models.timm_mapping import UnsupportedInTimm
from utils.errors import CheckpointError, ConfigError, IncompatibleCheckpointError
from utils.safetensors_io import check_safetensors_file
from utils.state_dict import check_fits, num_classes_of

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')  # timm's names on the Hugging Face hub
EVAL_CROP_PCT = 224 / 256  # TEST.CROP: resize to 256/224 of the input size, centre-crop
MAX_RELATIVE_DIFFERENCE = 1e-4  # float32 round-off between two attention implementations
INTERPOLATIONS = ('bilinear', 'bicubic')  # DATA.INTERPOLATION at evaluation ('random' is bilinear)


def _timm_types():
    return {name: arch.timm for name, arch in ARCHITECTURES.items() if arch.timm is not None}


def interop_for(model_type):
    """The timm mapping of MODEL.TYPE `model_type` (its registry entry's `timm`)."""
    known = _timm_types()
    if model_type not in known:
        raise ConfigError(
            f"MODEL.TYPE '{model_type}' has no timm mapping; known: "
            f'{", ".join(known)} (the `timm` field of models/architectures.py).'
        )
    return known[model_type]


def model_type_of(timm_model):
    """Our MODEL.TYPE for a timm model instance (exact class match: timm subclasses such as
    EVA or DeiT distillation add tensors ours cannot hold)."""
    known = _timm_types()
    for model_type, interop in known.items():
        if type(timm_model) in interop.timm_classes:
            return model_type
    supported = ', '.join(f'{c.__name__} ({t})' for t, i in known.items() for c in i.timm_classes)
    raise UnsupportedInTimm(
        f"timm's {type(timm_model).__name__} has no counterpart here; "
        f'supported timm classes: {supported}.'
    )


def eval_data_config(config, in_chans):
    """timm's preprocessing fields for our evaluation transform (data.transforms)."""
    crop = config.TEST.CROP and config.DATA.IMG_SIZE > 32
    interpolation = config.DATA.INTERPOLATION
    return dict(
        input_size=(in_chans, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE),
        interpolation=interpolation if interpolation in INTERPOLATIONS else 'bilinear',
        crop_pct=EVAL_CROP_PCT if crop else 1.0,
        crop_mode='center' if crop else 'squash',
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


def build_timm_model(config, state_dict):
    """The timm model equal to ours for `config`, holding `state_dict` (our names)."""
    interop = interop_for(config.MODEL.TYPE)
    architecture, model_args = interop.timm_model(config)
    model = timm.create_model(
        architecture, pretrained=False, num_classes=num_classes_of(state_dict), **model_args
    )
    weights = interop.to_timm(state_dict, config)
    check_fits(
        weights,
        model.state_dict(),
        'The checkpoint',
        hint='Pass the config the checkpoint was trained with (--cfg FILE).',
        model_name=f"timm's {architecture} built from the config (MODEL.TYPE {config.MODEL.TYPE})",
    )
    model.load_state_dict(weights)
    return model.eval(), model_args


def export_timm_folder(config, state_dict, out_dir, info=None, verify=None):
    """Write `state_dict` (our names) as a timm folder in `out_dir`; return the timm model.

    timm's own save_for_hf writes the files (so config.json is exactly its format) into a staging
    folder beside `out_dir` (checkpoint.folder_export): `verify(staging)` checks them there, and
    whatever it raises leaves `out_dir` as it was. `info` goes into config.json's 'simmim' entry,
    which timm ignores."""

    def write(folder):
        model, model_args = build_timm_model(config, state_dict)
        _write_timm_files(model, model_args, config, folder, info)
        return model

    return export_folder(out_dir, 'timm', write, verify)


def _write_timm_files(model, model_args, config, folder, info):
    save_for_hf(
        model,
        folder,
        model_args=model_args,
        safe_serialization=True,
        data_config=eval_data_config(config, model.in_chans),
    )
    path = os.path.join(folder, 'config.json')
    with open(path) as f:
        hf_config = json.load(f)
    # The named variant's tag and licence describe timm's weights, not these.
    hf_config['pretrained_cfg'].update(tag='simmim')
    hf_config['pretrained_cfg'].pop('license', None)
    hf_config['simmim'] = dict(info or {})
    with open(path, 'w') as f:
        json.dump(hf_config, f, indent=2)


def output_difference(config, state_dict, timm_model, batch_size=2, seed=0):
    """max |ours - timm| / max |ours| of the models' outputs (logits, or pooled features when there
    is no head) on a random batch: ours built from `config` with `state_dict` (our names)."""
    config = config.clone()
    config.defrost()
    config.MODEL.NUM_CLASSES = num_classes_of(state_dict)
    ours = build_classifier(config).eval()
    try:
        check_fits(
            state_dict,
            ours.state_dict(),
            'This state dict',
            model_name=f'our {config.MODEL.TYPE} model',
        )
    except IncompatibleCheckpointError as e:
        raise UnsupportedInTimm(str(e)) from None
    ours.load_state_dict(state_dict)
    size = config.DATA.IMG_SIZE
    x = torch.randn(
        batch_size, timm_model.in_chans, size, size, generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        expected, got = ours(x), timm_model(x)
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


# -----------------------------------------------------------------------------------------------
# Import
# -----------------------------------------------------------------------------------------------
def _cached_weights(name, cache_dir):
    """Path of `name`'s weights in the local Hugging Face cache, or raise naming the fix."""
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise CheckpointError(
            f'timm:{name}: timm has no released weights under this name. Pass '
            f'a name with weights (timm.list_pretrained()) or a timm folder.'
        )
    cache_dir = cache_dir or os.environ.get('HF_HUB_CACHE')
    for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else WEIGHT_FILES:
        path = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=cache_dir)
        if isinstance(path, str):
            return path
    raise CheckpointError(
        f'timm:{name}: the weights ({cfg.hf_hub_id}) are not in the local Hugging Face cache'
        f'{" " + cache_dir if cache_dir else ""}, and nothing is downloaded here. Fetch them once '
        f"(`hf download {cfg.hf_hub_id} {WEIGHT_FILES[0]}`, or timm.create_model('{name}', "
        f'pretrained=True) with network), or pass a timm folder: timm:/path/to/folder.'
    )


def load_timm_model(spec, cache_dir=None):
    """A timm model with weights from a folder (config.json + weights) or, for a timm model name,
    from the local Hugging Face cache only."""
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, 'config.json')):
            raise CheckpointError(
                f'timm:{spec} has no config.json, so it is not a timm model '
                f'folder (tools/export.py --to timm writes one).'
            )
        name, kwargs = f'local-dir:{spec}', {}
        weights = os.path.join(spec, WEIGHT_FILES[0])
    elif os.sep in spec or not timm.is_model(spec.split('.')[0]):
        close = difflib.get_close_matches(spec, timm.list_models(), n=3)
        hint = f' Did you mean {" or ".join(close)}?' if close else ''
        raise CheckpointError(f'timm:{spec} is neither a folder nor a timm model name.{hint}')
    else:
        weights = _cached_weights(spec, cache_dir)
        name, kwargs = spec, {'pretrained_cfg_overlay': {'file': weights}}
    if weights.endswith('.safetensors') and os.path.isfile(weights):
        check_safetensors_file(weights, f'timm:{spec}: the weights file')
    try:
        return timm.create_model(name, pretrained=True, **kwargs).eval()
    except (RuntimeError, ValueError, OSError, KeyError, SafetensorError) as e:  # timm's loading
        raise CheckpointError(f'timm:{spec} could not be loaded by timm: {e}') from None


def timm_weights(timm_model, model_type=None, spec='the timm model'):
    """(MODEL.TYPE, state dict under our names) of a timm model; `model_type` must match."""
    found = model_type_of(timm_model)
    if model_type is not None and found != model_type:
        raise IncompatibleCheckpointError(
            f"{spec} is timm's {type(timm_model).__name__}, our MODEL.TYPE {found}, but the config "
            f'has MODEL.TYPE {model_type}. Use a config of that architecture.'
        )
    return found, interop_for(found).from_timm(timm_model.state_dict())


def read_timm_checkpoint(spec, model_type=None, cache_dir=None):
    """{'model': weights under our names} for MODEL.PRETRAINED timm:SPEC."""
    model = load_timm_model(spec, cache_dir)
    try:
        return {'model': timm_weights(model, model_type, f'timm:{spec}')[1]}
    except UnsupportedInTimm as e:
        raise IncompatibleCheckpointError(f'timm:{spec}: {e}') from None


def timm_config_yaml(timm_model):
    """Our full config (YAML text) describing `timm_model` and its evaluation preprocessing."""
    overrides = interop_for(model_type_of(timm_model)).config_from_timm(timm_model)
    cfg = timm_model.pretrained_cfg
    interpolation = cfg.get('interpolation', 'bicubic')
    overrides['DATA']['INTERPOLATION'] = (
        interpolation if interpolation in INTERPOLATIONS else 'bicubic'
    )
    overrides['TEST'] = {'CROP': cfg.get('crop_pct', EVAL_CROP_PCT) < 1}
    overrides['MODEL']['NAME'] = 'timm_import'
    text = json.dumps(overrides)  # JSON is YAML, and keeps the types the config checks
    return load_config_text(text).dump()
