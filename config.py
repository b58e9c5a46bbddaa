"""Configuration: yacs defaults with the official SimMIM key names, YAML inheritance, command-line
overrides and validation.

Precedence (later wins): defaults < YAML ``BASE`` files (recursively, paths relative to the YAML)
< the YAML itself < ``--opts KEY VALUE ...`` < the dedicated flags (``--batch-size`` ...).
Official SimMIM and Swin-Transformer YAML files load unchanged.

Public entry points:
    get_config(args)                      the config a script builds from parsed arguments
    load_config(cfg_path, opts=(), ...)   the same from a path, for notebooks and tools
    build_arg_parser(finetune=False)      the official command-line flags
"""
import argparse
import difflib
import os

import yaml
from yacs.config import CfgNode as CN

_C = CN()

# Base YAML files merged before the file that names them (relative paths: to that file's folder).
_C.BASE = ['']

# -----------------------------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------------------------
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per GPU (per process)
# Pre-training: an image folder (class sub-folders, or a flat folder of images).
# Fine-tuning: a folder holding train/ and val/ image folders.
_C.DATA.DATA_PATH = ''
# 'imagenet' (official name) or 'folder': read DATA_PATH; 'synthetic': the built-in dataset.
_C.DATA.DATASET = 'imagenet'
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = 'bicubic'  # fine-tune transforms: random, bilinear, bicubic
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
_C.DATA.PERSISTENT_WORKERS = True
# What to do with a file that cannot be decoded: 'skip' (warn with its path, count it, use the next
# readable image) or 'error' (stop with its path).
_C.DATA.ON_BAD_IMAGE = 'skip'
# [SimMIM] masking
_C.DATA.MASK_PATCH_SIZE = 32  # side of one mask patch in pixels (Table 1)
_C.DATA.MASK_RATIO = 0.6  # fraction of mask patches masked (Table 1)
# Which mask patches are masked (Table 1, Figure 2; data/masking.py): random | square | blockwise.
_C.DATA.MASK_STRATEGY = 'random'
# BEiT block-wise masking (MASK_STRATEGY blockwise); block sizes count mask patches.
_C.DATA.BLOCKWISE = CN()
_C.DATA.BLOCKWISE.MIN_PATCHES_PER_BLOCK = 0  # 0 = BEiT's minimum block, 16 patches of 16x16 px
_C.DATA.BLOCKWISE.MAX_PATCHES_PER_BLOCK = 0  # 0 = no cap but the patches still to mask (BEiT)
_C.DATA.BLOCKWISE.ASPECT_RATIO_RANGE = [0.3, 1 / 0.3]  # block height / width, drawn log-uniformly
# Accepted for Swin-Transformer YAML compatibility; not used by the SimMIM loaders.
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = 'part'
# The built-in synthetic dataset (coloured shapes on textured backgrounds, one class per shape).
_C.DATA.SYNTHETIC = CN()
_C.DATA.SYNTHETIC.TRAIN_SIZE = 2048  # number of training images
_C.DATA.SYNTHETIC.VAL_SIZE = 512  # number of validation images
_C.DATA.SYNTHETIC.NUM_CLASSES = 8
_C.DATA.SYNTHETIC.SEED = 0  # the images are a pure function of (SEED, split, index)

# -----------------------------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.TYPE = 'swin'  # swin | swinv2 | vit
_C.MODEL.NAME = 'swin_tiny_patch4_window7_224'  # logger name and output sub-folder
_C.MODEL.PRETRAINED = ''  # checkpoint to fine-tune from (Swin-Transformer key)
_C.MODEL.RESUME = ''  # checkpoint to resume from
# Fine-tuning classes. 0 = the number of class sub-folders found in the data (the official code
# hard-coded 1000 for ImageNet); a non-zero value that disagrees with the data is an error.
_C.MODEL.NUM_CLASSES = 0
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1

_C.MODEL.SWIN = CN()
_C.MODEL.SWIN.PATCH_SIZE = 4
_C.MODEL.SWIN.IN_CHANS = 3
_C.MODEL.SWIN.EMBED_DIM = 96
_C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN.WINDOW_SIZE = 7
_C.MODEL.SWIN.MLP_RATIO = 4.
_C.MODEL.SWIN.QKV_BIAS = True
_C.MODEL.SWIN.QK_SCALE = None
_C.MODEL.SWIN.APE = False
_C.MODEL.SWIN.PATCH_NORM = True

_C.MODEL.SWINV2 = CN()
_C.MODEL.SWINV2.PATCH_SIZE = 4
_C.MODEL.SWINV2.IN_CHANS = 3
_C.MODEL.SWINV2.EMBED_DIM = 96
_C.MODEL.SWINV2.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWINV2.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWINV2.WINDOW_SIZE = 7
_C.MODEL.SWINV2.MLP_RATIO = 4.
_C.MODEL.SWINV2.QKV_BIAS = True
_C.MODEL.SWINV2.APE = False
_C.MODEL.SWINV2.PATCH_NORM = True
_C.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]

_C.MODEL.VIT = CN()
_C.MODEL.VIT.PATCH_SIZE = 16
_C.MODEL.VIT.IN_CHANS = 3
_C.MODEL.VIT.EMBED_DIM = 768
_C.MODEL.VIT.DEPTH = 12
_C.MODEL.VIT.NUM_HEADS = 12
_C.MODEL.VIT.MLP_RATIO = 4
_C.MODEL.VIT.QKV_BIAS = True
_C.MODEL.VIT.INIT_VALUES = 0.1  # layer scale; None turns it off
_C.MODEL.VIT.USE_APE = False
_C.MODEL.VIT.USE_RPB = False
_C.MODEL.VIT.USE_SHARED_RPB = True
_C.MODEL.VIT.USE_MEAN_POOLING = False

_C.MODEL.SIMMIM = CN()
# Local target normalisation of the SwinV2 configs (Swin-Transformer repo, section 3.4 of the
# reference): per-pixel mean/std over an odd PATCH_SIZE window.
_C.MODEL.SIMMIM.NORM_TARGET = CN()
_C.MODEL.SIMMIM.NORM_TARGET.ENABLE = False
_C.MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE = 47
# Prediction head (section 3.3, Table 2; models/heads.py): linear | mlp | inverse_swin.
_C.MODEL.SIMMIM.HEAD = CN()
_C.MODEL.SIMMIM.HEAD.NAME = 'linear'
_C.MODEL.SIMMIM.HEAD.MLP_HIDDEN_DIM = 0  # mlp: hidden width; 0 = the encoder's output width
# inverse_swin: Swin stages from the encoder's feature map up, coarsest first, each but the last
# followed by patch expanding (2x resolution, half the width); defaults: inverse Swin-T.
_C.MODEL.SIMMIM.HEAD.INVERSE_SWIN = CN()
_C.MODEL.SIMMIM.HEAD.INVERSE_SWIN.EMBED_DIM = 96  # width of the last (finest) stage
_C.MODEL.SIMMIM.HEAD.INVERSE_SWIN.DEPTHS = [2, 6, 2, 2]
_C.MODEL.SIMMIM.HEAD.INVERSE_SWIN.NUM_HEADS = [24, 12, 6, 3]
_C.MODEL.SIMMIM.HEAD.INVERSE_SWIN.WINDOW_SIZE = 6
_C.MODEL.SIMMIM.HEAD.INVERSE_SWIN.MLP_RATIO = 4.
# Prediction target (section 3.4, Tables 3 and 5; models/targets.py): pixel | color_bins |
# color_clusters.
_C.MODEL.SIMMIM.TARGET = CN()
_C.MODEL.SIMMIM.TARGET.NAME = 'pixel'
# Prediction resolution IMG_SIZE / DOWNSAMPLE (Table 3: 1 ... 32): the target image is average-pooled
# by DOWNSAMPLE and the head predicts at that resolution.
_C.MODEL.SIMMIM.TARGET.DOWNSAMPLE = 1
_C.MODEL.SIMMIM.TARGET.NUM_BINS = 8  # color_bins: equal-width bins per RGB channel (8 or 256)
_C.MODEL.SIMMIM.TARGET.NUM_CLUSTERS = 512  # color_clusters: palette size (iGPT's 512)
# color_clusters: the palette file, (NUM_CLUSTERS, 3) RGB in [0, 1] (.pt or .npy; iGPT's [-1, 1]
# centres are accepted too), written by tools/build_color_palette.py.
_C.MODEL.SIMMIM.TARGET.PALETTE = ''
# Loss (Tables 4 and 5). TYPE is for the pixel target; the colour targets use cross-entropy.
_C.MODEL.SIMMIM.LOSS = CN()
_C.MODEL.SIMMIM.LOSS.TYPE = 'l1'  # l1 | l2 | smooth_l1
_C.MODEL.SIMMIM.LOSS.SMOOTH_L1_BETA = 1.0  # smooth_l1: quadratic below this error
_C.MODEL.SIMMIM.LOSS.SCOPE = 'masked'  # masked: masked pixels only (prediction); all: whole image

# -----------------------------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
# BASE_LR, WARMUP_LR and MIN_LR are given for a total batch of 512 and are multiplied by
# total_batch / 512 (and by ACCUMULATION_STEPS when > 1) when the config is loaded.
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0  # 0 or None: no clipping (the norm is still measured and logged)
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 0  # <= 1: off
_C.TRAIN.USE_CHECKPOINT = False  # gradient checkpointing, per block
# How ranks share the model (utils/sharding.py): 'ddp' (each holds everything) or 'fsdp' (PyTorch
# FSDP2: parameters, gradients and optimizer state sharded, one unit per block; checkpoints become
# sharded directories, tools/convert_checkpoint.py makes single files of them).
_C.TRAIN.SHARDING = 'ddp'
_C.TRAIN.LAYER_DECAY = 1.0  # [SimMIM] layer-wise LR decay for fine-tuning
# Consecutive optimizer steps with a non-finite loss or gradient norm that are skipped (parameters
# untouched) before the run stops with an error.
_C.TRAIN.MAX_NONFINITE_STEPS = 20

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'  # cosine | linear | step | multistep
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30  # step
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1  # step
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1  # multistep
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []  # multistep, in epochs
# True: the decay phase starts after the warmup (Swin-Transformer repo); False: the decay is timed
# from step 0 and the warmup overwrites its start (SimMIM repo, which produced the paper's runs).
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = False

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'  # adamw | sgd | lars
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# Swin-Transformer YAML compatibility; not used.
_C.TRAIN.MOE = CN()
_C.TRAIN.MOE.SAVE_MASTER = False

# -----------------------------------------------------------------------------------------------
# Fine-tuning augmentation (timm)
# -----------------------------------------------------------------------------------------------
_C.AUG = CN()
# Area range of the training RandomResizedCrop (timm's default, which the official code used).
# Small images of small objects may want a larger minimum.
_C.AUG.CROP_SCALE = (0.08, 1.0)
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'  # 'none' turns it off
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = 'batch'

# Linear probing (fine-tuning script): freeze the encoder and train BatchNorm(affine=False) + Linear
# on pooled features, as in MAE's protocol (use TRAIN.OPTIMIZER.NAME lars or sgd).
_C.LINEAR_PROBE = CN()
_C.LINEAR_PROBE.ENABLE = False
# ViT: features of this block (1-based), average-pooled over patch tokens; the paper's authors used
# block 8 of ViT-B (SimMIM issue #14). 0 = the last block. Swin: always the last stage.
_C.LINEAR_PROBE.BLOCK = 0

_C.TEST = CN()
_C.TEST.CROP = True  # resize to 256/224 * IMG_SIZE then centre-crop; False: resize to IMG_SIZE
_C.TEST.SEQUENTIAL = False  # Swin-Transformer YAML compatibility; evaluation is always exact
_C.TEST.SHUFFLE = False

# -----------------------------------------------------------------------------------------------
# Checkpoints, logging, visualisation
# -----------------------------------------------------------------------------------------------
_C.CHECKPOINT = CN()
# Also save every N optimizer steps (0 = only every SAVE_FREQ epochs). These step checkpoints hold
# the position inside the epoch, so a resume continues with the very next batch.
_C.CHECKPOINT.STEP_FREQ = 0
_C.CHECKPOINT.KEEP_STEP_CKPTS = 2  # how many of the newest step checkpoints to keep

_C.TENSORBOARD = True  # TensorBoard scalars on rank 0, in OUTPUT/tensorboard
# Reconstruction grid (original | masked | prediction | prediction pasted into the visible pixels)
# of a fixed batch, written as PNG and to TensorBoard every VIS_FREQ epochs (0 = never) and at the
# end of pre-training when > 0.
_C.VIS_FREQ = 0
_C.VIS_NUM_IMAGES = 8

# -----------------------------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------------------------
# Mixed precision. ENABLE_AMP (Swin-Transformer repo) or AMP_OPT_LEVEL O1/O2 (SimMIM repo) turn
# torch.amp autocast on; AMP_OPT_LEVEL O0 or ENABLE_AMP False turn it off. Autocast is only used on
# CUDA. AMP_DTYPE: 'bfloat16' (no loss scaling), 'float16' (with a GradScaler), or 'auto' (bf16
# where the GPU supports it, else fp16).
_C.AMP_OPT_LEVEL = ''
_C.ENABLE_AMP = True
_C.AMP_DTYPE = 'auto'
_C.AMP_ENABLE = True  # Swin-Transformer classification key; accepted, not used
_C.FUSED_WINDOW_PROCESS = False  # Swin-Transformer YAML compatibility; not used
_C.FUSED_LAYERNORM = False  # Swin-Transformer YAML compatibility; not used
_C.OUTPUT = ''  # becomes OUTPUT/MODEL.NAME/TAG ('output' when empty)
_C.TAG = 'default'
_C.SAVE_FREQ = 1  # checkpoint every N epochs (and at the last)
_C.PRINT_FREQ = 10  # log line every N steps
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.LOCAL_RANK = 0
_C.PRETRAINED = ''  # SimMIM-repo spelling of MODEL.PRETRAINED; either works

MODEL_TYPES = ('swin', 'swinv2', 'vit')
DATASETS = ('imagenet', 'folder', 'synthetic')
SCHEDULERS = ('cosine', 'linear', 'step', 'multistep')
OPTIMIZERS = ('adamw', 'sgd', 'lars')
SHARDINGS = ('ddp', 'fsdp')


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


# -----------------------------------------------------------------------------------------------
# Merging with checks
# -----------------------------------------------------------------------------------------------
def _all_keys(node, prefix=''):
    keys = []
    for k, v in node.items():
        full = prefix + k
        keys.append(full)
        if isinstance(v, CN):
            keys.extend(_all_keys(v, full + '.'))
    return keys


def _unknown_key_error(full_key, source):
    candidates = _all_keys(_C)
    close = difflib.get_close_matches(full_key, candidates, n=3, cutoff=0.6)
    leaf = full_key.split('.')[-1]
    close += [k for k in candidates if k.split('.')[-1] == leaf and k not in close][:3]
    hint = f" Did you mean {' or '.join(close)}?" if close else ''
    return ConfigError(f"Unknown config key '{full_key}' (from {source}).{hint} "
                       f"Valid keys are the defaults in config.py; fix or remove the key.")


def _coerce(value, default, full_key, source):
    """Return `value` converted to the type of `default`, or raise a ConfigError."""
    if isinstance(value, str) and not isinstance(default, str):
        value = CN._decode_cfg_value(value)  # YAML reads 1e-4 (no dot) as a string, as yacs does
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif type(value) is type(default):
        return value
    raise ConfigError(f"Config key '{full_key}' (from {source}) expects a value like "
                      f"{default!r} ({type(default).__name__}), got {value!r} "
                      f"({type(value).__name__}). Fix the value's type.")


def _merge_dict(node, data, source, prefix=''):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys at '{prefix or 'top level'}', "
                          f"got {type(data).__name__}.")
    for key, value in data.items():
        full_key = prefix + str(key)
        if key not in node:
            raise _unknown_key_error(full_key, source)
        if isinstance(node[key], CN):
            if not isinstance(value, dict):
                raise ConfigError(f"Config key '{full_key}' (from {source}) is a group; give it a "
                                  f"mapping of sub-keys, not {value!r}.")
            _merge_dict(node[key], value, source, full_key + '.')
        else:
            node[key] = _coerce(value, node[key], full_key, source)


def _merge_yaml(config, cfg_file, _stack=()):
    cfg_file = os.path.abspath(cfg_file)
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"Config file not found: {cfg_file}. Check the --cfg path (or a BASE "
                          f"entry, which is relative to the YAML that lists it).")
    if cfg_file in _stack:
        raise ConfigError(f"BASE inheritance cycle: {' -> '.join(_stack + (cfg_file,))}")
    with open(cfg_file) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Cannot parse YAML {cfg_file}: {e}") from None
    for base in data.get('BASE', ['']) or []:
        if base:
            _merge_yaml(config, os.path.join(os.path.dirname(cfg_file), base), _stack + (cfg_file,))
    data.pop('BASE', None)
    _merge_dict(config, data, cfg_file)


def _merge_opts(config, opts):
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs; got an odd number of items: {opts}")
    for full_key, raw in zip(opts[0::2], opts[1::2]):
        value = CN._decode_cfg_value(raw) if isinstance(raw, str) else raw
        node, parts = config, full_key.split('.')
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], CN):
                raise _unknown_key_error(full_key, '--opts')
            node = node[part]
        data = value
        for part in reversed(parts[1:]):
            data = {part: data}
        _merge_dict(config, {parts[0]: data}, '--opts')


# -----------------------------------------------------------------------------------------------
# Derived values and validation
# -----------------------------------------------------------------------------------------------
def model_patch_size(config):
    """Side, in pixels, of one patch of the encoder's patch embedding."""
    return config.MODEL[_arch_key(config)].PATCH_SIZE


def encoder_stride(config):
    """Side, in pixels, of one position of the encoder's output feature map."""
    if config.MODEL.TYPE == 'vit':
        return config.MODEL.VIT.PATCH_SIZE
    arch = config.MODEL[_arch_key(config)]
    return arch.PATCH_SIZE * 2 ** (len(arch.DEPTHS) - 1)


def _arch_key(config):
    return {'swin': 'SWIN', 'swinv2': 'SWINV2', 'vit': 'VIT'}[config.MODEL.TYPE]


def amp_enabled(config):
    """Whether the config asks for autocast (on CUDA); see AMP_OPT_LEVEL / ENABLE_AMP."""
    return config.ENABLE_AMP and config.AMP_OPT_LEVEL != 'O0'


def _check(cond, message):
    if not cond:
        raise ConfigError(message)


def _validate_swin(config, key):
    arch = config.MODEL[key]
    img, patch, depths = config.DATA.IMG_SIZE, arch.PATCH_SIZE, arch.DEPTHS
    _check(len(depths) == len(arch.NUM_HEADS),
           f"MODEL.{key}.DEPTHS {list(depths)} and MODEL.{key}.NUM_HEADS {list(arch.NUM_HEADS)} "
           f"must have the same length (one entry per stage).")
    down = patch * 2 ** (len(depths) - 1)
    _check(img % down == 0,
           f"DATA.IMG_SIZE {img} must be divisible by {down} (PATCH_SIZE {patch} x 2^{len(depths) - 1} "
           f"patch merges) for MODEL.TYPE {config.MODEL.TYPE}; use e.g. {max(down, img // down * down)}.")
    for i, heads in enumerate(arch.NUM_HEADS):
        dim = arch.EMBED_DIM * 2 ** i
        _check(dim % heads == 0, f"Stage {i} width {dim} (MODEL.{key}.EMBED_DIM x 2^{i}) is not "
                                 f"divisible by MODEL.{key}.NUM_HEADS[{i}] = {heads}.")
        resolution = img // patch // 2 ** i
        window = min(arch.WINDOW_SIZE, resolution)
        _check(resolution % window == 0,
               f"MODEL.{key}.WINDOW_SIZE {arch.WINDOW_SIZE} does not fit stage {i}: its feature map "
               f"is {resolution}x{resolution} (DATA.IMG_SIZE {img} / {patch * 2 ** i}), which a "
               f"{window}x{window} window does not tile. Pick a window that divides every stage's "
               f"map (e.g. 6 at 192, 7 at 224, 12 at 384) or change DATA.IMG_SIZE.")
    if key == 'SWINV2':
        _check(len(arch.PRETRAINED_WINDOW_SIZES) == len(depths),
               f"MODEL.SWINV2.PRETRAINED_WINDOW_SIZES needs one entry per stage ({len(depths)}), "
               f"got {list(arch.PRETRAINED_WINDOW_SIZES)}.")


def _validate_vit(config):
    vit, img = config.MODEL.VIT, config.DATA.IMG_SIZE
    _check(img % vit.PATCH_SIZE == 0, f"DATA.IMG_SIZE {img} must be divisible by "
                                      f"MODEL.VIT.PATCH_SIZE {vit.PATCH_SIZE}.")
    _check(vit.EMBED_DIM % vit.NUM_HEADS == 0, f"MODEL.VIT.EMBED_DIM {vit.EMBED_DIM} must be "
                                               f"divisible by MODEL.VIT.NUM_HEADS {vit.NUM_HEADS}.")


def validate_config(config, is_pretrain=True):
    """Raise ConfigError naming the key and the fix for any inconsistent value."""
    _check(config.MODEL.TYPE in MODEL_TYPES,
           f"MODEL.TYPE '{config.MODEL.TYPE}' is not one of {MODEL_TYPES}.")
    _check(config.DATA.DATASET in DATASETS,
           f"DATA.DATASET '{config.DATA.DATASET}' is not one of {DATASETS}.")
    _check(config.DATA.ON_BAD_IMAGE in ('skip', 'error'),
           f"DATA.ON_BAD_IMAGE must be 'skip' or 'error', got '{config.DATA.ON_BAD_IMAGE}'.")
    _check(config.TRAIN.LR_SCHEDULER.NAME in SCHEDULERS,
           f"TRAIN.LR_SCHEDULER.NAME '{config.TRAIN.LR_SCHEDULER.NAME}' is not one of {SCHEDULERS}.")
    _check(config.TRAIN.OPTIMIZER.NAME in OPTIMIZERS,
           f"TRAIN.OPTIMIZER.NAME '{config.TRAIN.OPTIMIZER.NAME}' is not one of {OPTIMIZERS}.")
    _check(config.TRAIN.SHARDING in SHARDINGS,
           f"TRAIN.SHARDING '{config.TRAIN.SHARDING}' is not one of {SHARDINGS}.")
    _check(config.AMP_OPT_LEVEL in ('', 'O0', 'O1', 'O2'),
           f"AMP_OPT_LEVEL must be '', O0, O1 or O2, got '{config.AMP_OPT_LEVEL}'.")
    _check(config.AMP_DTYPE in ('auto', 'bfloat16', 'float16'),
           f"AMP_DTYPE must be auto, bfloat16 or float16, got '{config.AMP_DTYPE}'.")
    for key in ('DATA.BATCH_SIZE', 'TRAIN.EPOCHS', 'PRINT_FREQ', 'SAVE_FREQ', 'DATA.IMG_SIZE'):
        value = config
        for part in key.split('.'):
            value = value[part]
        _check(value > 0, f"{key} must be positive, got {value}.")
    # A warmup longer than the run is allowed (e.g. an official YAML with --opts TRAIN.EPOCHS 1).
    _check(config.TRAIN.WARMUP_EPOCHS >= 0, "TRAIN.WARMUP_EPOCHS must be >= 0.")
    if config.TRAIN.LR_SCHEDULER.NAME == 'multistep':
        steps = config.TRAIN.LR_SCHEDULER.MULTISTEPS
        _check(all(config.TRAIN.WARMUP_EPOCHS <= e for e in steps),
               f"TRAIN.LR_SCHEDULER.MULTISTEPS {list(steps)} must not fall inside the warmup "
               f"(TRAIN.WARMUP_EPOCHS {config.TRAIN.WARMUP_EPOCHS}).")
    _check(config.CHECKPOINT.STEP_FREQ >= 0 and config.CHECKPOINT.KEEP_STEP_CKPTS >= 1,
           "CHECKPOINT.STEP_FREQ must be >= 0 and CHECKPOINT.KEEP_STEP_CKPTS >= 1.")
    _check(config.TRAIN.MAX_NONFINITE_STEPS >= 1, "TRAIN.MAX_NONFINITE_STEPS must be >= 1.")
    crop = list(config.AUG.CROP_SCALE)
    _check(len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1,
           f"AUG.CROP_SCALE must be [low, high] with 0 < low <= high <= 1, got {crop}.")

    if config.MODEL.TYPE == 'vit':
        _validate_vit(config)
    else:
        _validate_swin(config, _arch_key(config))

    if is_pretrain:
        img, mask_patch = config.DATA.IMG_SIZE, config.DATA.MASK_PATCH_SIZE
        patch = model_patch_size(config)
        _check(0 < config.DATA.MASK_RATIO < 1,
               f"DATA.MASK_RATIO must lie in (0, 1), got {config.DATA.MASK_RATIO} (the paper's "
               f"default is 0.6).")
        _check(mask_patch > 0 and img % mask_patch == 0,
               f"DATA.IMG_SIZE {img} is not divisible by DATA.MASK_PATCH_SIZE {mask_patch}; the mask "
               f"grid must tile the image. Use a mask patch size that divides {img}.")
        _check(mask_patch % patch == 0,
               f"DATA.MASK_PATCH_SIZE {mask_patch} is not divisible by the model patch size {patch} "
               f"(MODEL.{_arch_key(config)}.PATCH_SIZE); a mask patch must cover whole model patches.")
        norm = config.MODEL.SIMMIM.NORM_TARGET
        _check(not norm.ENABLE or norm.PATCH_SIZE % 2 == 1,
               f"MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE must be odd, got {norm.PATCH_SIZE}.")
        _validate_mask_strategy(config)
        _validate_head_and_target(config)


def _validate_mask_strategy(config):
    from data.masking import MASK_GENERATORS  # the registry is the one list of names
    data = config.DATA
    _check(data.MASK_STRATEGY in MASK_GENERATORS,
           f"DATA.MASK_STRATEGY '{data.MASK_STRATEGY}' is not one of {sorted(MASK_GENERATORS)}.")
    if data.MASK_STRATEGY == 'square':
        _check(data.IMG_SIZE // data.MASK_PATCH_SIZE >= 2,
               f"DATA.MASK_STRATEGY square needs a mask grid of at least 2x2; DATA.IMG_SIZE "
               f"{data.IMG_SIZE} / DATA.MASK_PATCH_SIZE {data.MASK_PATCH_SIZE} is 1. Use a smaller "
               f"mask patch size.")
    block = data.BLOCKWISE
    aspect = list(block.ASPECT_RATIO_RANGE)
    _check(block.MIN_PATCHES_PER_BLOCK >= 0 and block.MAX_PATCHES_PER_BLOCK >= 0,
           "DATA.BLOCKWISE.MIN_PATCHES_PER_BLOCK and MAX_PATCHES_PER_BLOCK must be >= 0 (0: the "
           "default).")
    _check(len(aspect) == 2 and 0 < aspect[0] <= aspect[1],
           f"DATA.BLOCKWISE.ASPECT_RATIO_RANGE must be [low, high] with 0 < low <= high, got "
           f"{aspect}.")


def _validate_head_and_target(config):
    from models.heads import HEADS  # the registries are the one list of names
    from models.targets import LOSS_SCOPES, REGRESSION_LOSSES, TARGETS
    simmim = config.MODEL.SIMMIM
    head, target, loss = simmim.HEAD, simmim.TARGET, simmim.LOSS
    for key, value, known in (('HEAD.NAME', head.NAME, HEADS), ('TARGET.NAME', target.NAME, TARGETS),
                              ('LOSS.TYPE', loss.TYPE, REGRESSION_LOSSES),
                              ('LOSS.SCOPE', loss.SCOPE, LOSS_SCOPES)):
        _check(value in known, f"MODEL.SIMMIM.{key} '{value}' is not one of {sorted(known)}.")
    stride = encoder_stride(config)
    divisors = [d for d in range(1, stride + 1) if stride % d == 0]
    _check(target.DOWNSAMPLE in divisors,
           f"MODEL.SIMMIM.TARGET.DOWNSAMPLE {target.DOWNSAMPLE} must divide the encoder stride "
           f"{stride}: the head up-samples the feature map by stride / DOWNSAMPLE. Use one of "
           f"{divisors}.")
    _check(target.NUM_BINS >= 2 and target.NUM_CLUSTERS >= 2,
           "MODEL.SIMMIM.TARGET.NUM_BINS and NUM_CLUSTERS must be >= 2.")
    _check(target.NAME != 'color_clusters' or target.PALETTE,
           "MODEL.SIMMIM.TARGET.PALETTE is empty but TARGET.NAME is color_clusters. Build a palette "
           "with `python tools/build_color_palette.py --cfg FILE --output PATH` and set the key to "
           "PATH.")
    _check(not simmim.NORM_TARGET.ENABLE or target.NAME == 'pixel',
           f"MODEL.SIMMIM.NORM_TARGET normalises pixel values; it cannot be combined with "
           f"TARGET.NAME {target.NAME}. Turn NORM_TARGET.ENABLE off or use the pixel target.")
    _check(loss.SMOOTH_L1_BETA > 0, "MODEL.SIMMIM.LOSS.SMOOTH_L1_BETA must be > 0.")
    if head.NAME == 'inverse_swin':
        _validate_inverse_swin(config, upscale=stride // target.DOWNSAMPLE)


def _validate_inverse_swin(config, upscale):
    inv = config.MODEL.SIMMIM.HEAD.INVERSE_SWIN
    num_stages = len(inv.DEPTHS)
    key = 'MODEL.SIMMIM.HEAD.INVERSE_SWIN'
    _check(num_stages >= 1 and len(inv.NUM_HEADS) == num_stages,
           f"{key}.DEPTHS {list(inv.DEPTHS)} and NUM_HEADS {list(inv.NUM_HEADS)} must have the same "
           f"length (one entry per stage).")
    _check(upscale % 2 ** (num_stages - 1) == 0,
           f"The inverse_swin head doubles the resolution {num_stages - 1} times, but the prediction "
           f"is only {upscale}x finer than the encoder's feature map (encoder stride / "
           f"MODEL.SIMMIM.TARGET.DOWNSAMPLE). Lower TARGET.DOWNSAMPLE, use fewer stages in "
           f"{key}.DEPTHS, or use the linear head.")
    feature_map = config.DATA.IMG_SIZE // encoder_stride(config)
    for i, heads in enumerate(inv.NUM_HEADS):
        dim = inv.EMBED_DIM * 2 ** (num_stages - 1 - i)
        resolution = feature_map * 2 ** i
        window = min(inv.WINDOW_SIZE, resolution)
        _check(dim % heads == 0, f"{key} stage {i} width {dim} is not divisible by NUM_HEADS[{i}] "
                                 f"= {heads}.")
        _check(resolution % window == 0,
               f"{key}.WINDOW_SIZE {inv.WINDOW_SIZE} does not tile stage {i}'s {resolution}x"
               f"{resolution} map; pick a window that divides every stage's map.")


def _scale_learning_rates(config, world_size):
    """Linear scaling rule: LRs are given for a total batch of 512 (section 5.4 of the reference)."""
    factor = config.DATA.BATCH_SIZE * world_size / 512.0
    if config.TRAIN.ACCUMULATION_STEPS > 1:
        factor *= config.TRAIN.ACCUMULATION_STEPS
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor


def _finalize(config, world_size, is_pretrain):
    if config.PRETRAINED and not config.MODEL.PRETRAINED:
        config.MODEL.PRETRAINED = config.PRETRAINED
    config.OUTPUT = os.path.join(config.OUTPUT or 'output', config.MODEL.NAME, config.TAG)
    validate_config(config, is_pretrain)
    _scale_learning_rates(config, world_size)
    config.freeze()
    return config


# -----------------------------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------------------------
class _ArgumentParser(argparse.ArgumentParser):
    """argparse that suggests the closest known flag for a mistyped one."""

    def error(self, message):
        if 'unrecognized arguments' in message:
            flags = [s for a in self._actions for s in a.option_strings]
            for bad in message.split(':', 1)[1].split():
                close = difflib.get_close_matches(bad.split('=')[0], flags, n=2)
                if close:
                    message += f" (did you mean {' or '.join(close)}?)"
        super().error(message)


def build_arg_parser(finetune=False):
    """The official SimMIM flags (plus the Swin-Transformer repo's --enable-amp/--disable-amp)."""
    name = 'SimMIM fine-tuning' if finetune else 'SimMIM pre-training'
    parser = _ArgumentParser(name, allow_abbrev=False)
    parser.add_argument('--cfg', type=str, required=True, metavar='FILE', help='path to config file')
    parser.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                        help="override config keys, e.g. --opts TRAIN.EPOCHS 1 DATA.NUM_WORKERS 0")
    parser.add_argument('--batch-size', type=int, help='batch size per GPU (DATA.BATCH_SIZE)')
    parser.add_argument('--data-path', type=str, help='path to the dataset (DATA.DATA_PATH)')
    parser.add_argument('--resume', help='resume from this checkpoint (MODEL.RESUME)')
    parser.add_argument('--accumulation-steps', type=int, help='gradient accumulation steps')
    parser.add_argument('--use-checkpoint', action='store_true',
                        help='gradient checkpointing to save memory (TRAIN.USE_CHECKPOINT)')
    parser.add_argument('--amp-opt-level', type=str, choices=['O0', 'O1', 'O2'], default=None,
                        help='O0 turns mixed precision off; O1/O2 turn torch.amp autocast on')
    parser.add_argument('--enable-amp', action='store_true', default=None, dest='enable_amp',
                        help='turn torch.amp autocast on (ENABLE_AMP True)')
    parser.add_argument('--disable-amp', action='store_false', dest='enable_amp',
                        help='turn mixed precision off (ENABLE_AMP False)')
    parser.add_argument('--output', default=None, type=str, metavar='PATH',
                        help='root of the output folder (OUTPUT; default "output")')
    parser.add_argument('--tag', help='tag of experiment (TAG)')
    # torch.distributed.launch passes one of these; torchrun sets LOCAL_RANK, which wins.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None, dest='local_rank',
                        help=argparse.SUPPRESS)
    if finetune:
        parser.add_argument('--pretrained', type=str,
                            help='SimMIM checkpoint to fine-tune from (MODEL.PRETRAINED)')
        parser.add_argument('--eval', action='store_true', help='evaluate only')
        parser.add_argument('--throughput', action='store_true', help='measure throughput only')
    return parser


def _apply_args(config, args):
    # Like the official update_config: each flag applies only when given.
    given = lambda name: getattr(args, name, None)  # noqa: E731
    if given('batch_size'):
        config.DATA.BATCH_SIZE = args.batch_size
    if given('data_path'):
        config.DATA.DATA_PATH = args.data_path
    if given('resume'):
        config.MODEL.RESUME = args.resume
    if given('pretrained'):
        config.MODEL.PRETRAINED = args.pretrained
    if given('accumulation_steps'):
        config.TRAIN.ACCUMULATION_STEPS = args.accumulation_steps
    if given('use_checkpoint'):
        config.TRAIN.USE_CHECKPOINT = True
    if given('amp_opt_level'):
        config.AMP_OPT_LEVEL = args.amp_opt_level
        config.ENABLE_AMP = args.amp_opt_level != 'O0'
    if given('enable_amp') is not None:
        config.ENABLE_AMP = args.enable_amp
    if given('output'):
        config.OUTPUT = args.output
    if given('tag'):
        config.TAG = args.tag
    if given('eval'):
        config.EVAL_MODE = True
    if given('throughput'):
        config.THROUGHPUT_MODE = True
    local_rank = os.environ.get('LOCAL_RANK', given('local_rank'))
    config.LOCAL_RANK = int(local_rank) if local_rank is not None else 0


def get_config(args, is_pretrain=True):
    """The frozen config for parsed command-line `args` (official name and signature)."""
    config = _C.clone()
    config.defrost()
    _merge_yaml(config, args.cfg)
    _merge_opts(config, args.opts)
    _apply_args(config, args)
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    return _finalize(config, world_size, is_pretrain)


def load_config(cfg_path, opts=(), is_pretrain=True, **flags):
    """The frozen config a script would use for `--cfg cfg_path --opts *opts` (plus any flag given
    by its argparse name, e.g. ``batch_size=8``), for notebooks and tools."""
    args = argparse.Namespace(cfg=cfg_path, opts=list(opts), **flags)
    return get_config(args, is_pretrain)


def get_defaults():
    """A mutable copy of the defaults."""
    return _C.clone()
