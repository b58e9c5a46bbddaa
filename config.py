"""Configuration: every key with its default (yacs, the official SimMIM key names), and the
functions that turn a YAML file and a command line into the frozen config of a run.

Precedence (later wins): defaults < YAML ``BASE`` files (recursively, paths relative to the YAML)
< the YAML itself < ``--opts KEY VALUE ...`` < the dedicated flags (``--batch-size`` ...).
Official SimMIM and Swin-Transformer YAML files load unchanged.

Public entry points:
    get_config(args, task=PRETRAIN)           the config a script builds from parsed arguments
    load_config(cfg_path, opts=(), task=...)  the same from a path, for notebooks and tools
    get_defaults()                            a mutable copy of the defaults
    load_config_text(yaml_text, opts=(), ...) the same from YAML text (a checkpoint's config)
    validate_config(config, task)             every key checked, the error naming key and fix
    config_warnings(config)                   what a valid config may not mean (logged at start)

Validation (`validate_config`) is here too: every numeric key's range first (NUMERIC_RANGES), then
it asks each registered unit to check its own keys and checks the keys no unit owns. YAML/--opts
merging (utils/config_merge.py) and the command line (utils/arguments.py) are leaves beside it.
"""

import argparse
import os
from collections.abc import Sequence

from yacs.config import CfgNode as CN

from data.datasets import check_on_bad_image
from data.loader import check_loader_config
from data.masking import check_mask_config
from data.transforms import check_rgb_conversion
from lr_scheduler import check_scheduler_config
from models.heads import check_head_config
from models.registry import architecture_of, encoder_stride, model_patch_size
from models.targets import check_target_config
from models.window_attention import check_window_attention
from optimizer import check_optimizer_config
from utils.arguments import apply_args
from utils.config_merge import merge_opts, merge_yaml, merge_yaml_text
from utils.errors import require
from utils.registry import require_choice
from utils.tasks import FINETUNE, PRETRAIN, Task, as_task
from utils.value_ranges import Range, require_in_range

_C = CN()

# Base YAML files merged before the file that names them (relative paths: to that file's folder).
_C.BASE = ['']

# -----------------------------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------------------------
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per GPU (per process)
# Pre-training: an image folder (class sub-folders, or a flat folder of images), or tar shards (a
# folder of .tar files, or a brace pattern such as train-{0000..1023}.tar; docs/data.md).
# Fine-tuning: a folder holding train/ and val/ image or shard folders, or timm/HF-named shards.
_C.DATA.DATA_PATH = ''
# Tar shards: the epoch order. 'global' is the permutation an image folder gets (each sample from
# any shard); 'window' shuffles the shards and then the samples within SHARD_WINDOW shards at a
# time (fewer files open at once, for cluster storage). Both deterministic and resumable.
_C.DATA.SHARD_SHUFFLE = 'global'
_C.DATA.SHARD_WINDOW = 16
# Where shard indexes go when the shards' folder is read-only ('' = ~/.cache/simmim/shard-index).
_C.DATA.SHARD_INDEX_CACHE = ''
# 'imagenet' (official name) or 'folder': read DATA_PATH; 'synthetic': the built-in dataset.
_C.DATA.DATASET = 'imagenet'
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = 'bicubic'  # fine-tune transforms: random, bilinear, bicubic
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
_C.DATA.PERSISTENT_WORKERS = True
_C.DATA.PREFETCH_FACTOR = 2  # batches each DataLoader worker prepares ahead (torch's default)
# Pre-training: decode a JPEG at 1/2, 1/4 or 1/8 scale when its random crop is at least that many
# times the output size (same crop and flip, pixels resized from the smaller decode; see
# data/pretrain_transform.py). Only large photos qualify; ImageNet's ~500x375 do not at 192.
_C.DATA.JPEG_DRAFT = True
# Pre-training: 'cpu' decodes and augments in the DataLoader workers (PIL); 'gpu' hands the encoded
# JPEGs and the drawn crops to the main process, which decodes (nvJPEG) and augments on the GPU
# (data/gpu_decode.py): far fewer CPU cores per GPU. Same crops, flips and masks either way.
_C.DATA.DECODE = 'cpu'
# Pre-training, DATA.DECODE cpu: workers hand over 8-bit crops and masks (a quarter of the bytes
# through shared and pinned memory) and the main process normalises them on the training device;
# bit-identical to normalising in the workers (False), which is what the official loader does.
_C.DATA.NORMALIZE_ON_DEVICE = True
# Pre-training, DATA.DECODE cpu: who resizes the random crop. 'tensor': torchvision's antialiased
# bilinear uint8 kernel, about 4x faster than 'pil', PIL's resize as in torchvision's and the
# official transforms (bit for bit); the two differ by at most 1/255 on under 1 % of the values.
_C.DATA.RESIZE_BACKEND = 'tensor'
# What to do with a file that cannot be decoded: 'skip' (use the next readable image; the log
# names each such file once, after the epoch that found it) or 'error' (stop with its path).
_C.DATA.ON_BAD_IMAGE = 'skip'
# How images that are not 8-bit RGB become RGB: 'careful' composites transparency onto white and
# scales 16-bit / float grey to 8 bits; 'official' is PIL's convert('RGB') as the official loaders
# (alpha dropped, so transparent pixels keep their stored colour, usually black; 16-bit grey
# clipped, mostly to white).
_C.DATA.RGB_CONVERSION = 'careful'
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
_C.MODEL.TYPE = 'swin'  # a registered architecture (models/architectures.py): swin | swinv2 | vit
_C.MODEL.NAME = 'swin_tiny_patch4_window7_224'  # logger name and output sub-folder
# Weights to start from (Swin-Transformer key): fine-tuning's model, or pre-training's encoder. A
# checkpoint (.pth or .safetensors), timm:NAME_OR_FOLDER for a timm model
# (checkpoint/timm_folder.py), or hf:FOLDER for a transformers Swin / SwinV2 folder
# (checkpoint/hf_folder.py).
_C.MODEL.PRETRAINED = ''
_C.MODEL.RESUME = ''  # checkpoint to resume from
# Fine-tuning classes. 0 = the number of class sub-folders found in the data (the official code
# hard-coded 1000 for ImageNet); a non-zero value that disagrees with the data is an error.
_C.MODEL.NUM_CLASSES = 0
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1
# Swin/SwinV2 window attention (models/window_attention.py): 'sdpa' (torch's fused attention, any
# device) or 'flex' (FlexAttention with the bias inside the kernel; CUDA training, compiled).
_C.MODEL.WINDOW_ATTENTION = 'sdpa'

_C.MODEL.SWIN = CN()
_C.MODEL.SWIN.PATCH_SIZE = 4
_C.MODEL.SWIN.IN_CHANS = 3
_C.MODEL.SWIN.EMBED_DIM = 96
_C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN.WINDOW_SIZE = 7
_C.MODEL.SWIN.MLP_RATIO = 4.0
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
_C.MODEL.SWINV2.MLP_RATIO = 4.0
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
_C.MODEL.SIMMIM.HEAD.INVERSE_SWIN.MLP_RATIO = 4.0
# Prediction target (section 3.4, Tables 3 and 5; models/targets.py): pixel | color_bins |
# color_clusters | dvae_tokens (models/dvae_target.py).
_C.MODEL.SIMMIM.TARGET = CN()
_C.MODEL.SIMMIM.TARGET.NAME = 'pixel'
# Prediction resolution IMG_SIZE / DOWNSAMPLE (Table 3: 1 ... 32): the target image is
# average-pooled by DOWNSAMPLE and the head predicts at that resolution.
_C.MODEL.SIMMIM.TARGET.DOWNSAMPLE = 1
_C.MODEL.SIMMIM.TARGET.NUM_BINS = 8  # color_bins: equal-width bins per RGB channel (8 or 256)
_C.MODEL.SIMMIM.TARGET.NUM_CLUSTERS = 512  # color_clusters: palette size (iGPT's 512)
# color_clusters: the palette file, (NUM_CLUSTERS, 3) RGB in [0, 1] (.pt or .npy; iGPT's [-1, 1]
# centres are accepted too), written by tools/build_color_palette.py.
_C.MODEL.SIMMIM.TARGET.PALETTE = ''
# dvae_tokens (BEiT's target): the frozen tokenizer file, written by tools/train_dvae.py
# (safetensors with its architecture) or DALL-E's encoder converted to a state dict; one token per
# DOWNSAMPLE x DOWNSAMPLE pixels, so DOWNSAMPLE must divide DATA.MASK_PATCH_SIZE (BEiT: 16).
_C.MODEL.SIMMIM.TARGET.TOKENIZER = ''
_C.MODEL.SIMMIM.TARGET.VOCAB_SIZE = 8192  # dvae_tokens: the tokenizer's vocabulary (BEiT: 8192)
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
# How ranks share the model (engine/sharding.py): 'ddp' (each holds everything) or 'fsdp' (PyTorch
# FSDP2: parameters, gradients and optimizer state sharded, one unit per block; checkpoints become
# sharded directories, tools/convert_checkpoint.py makes single files of them).
_C.TRAIN.SHARDING = 'ddp'
_C.TRAIN.LAYER_DECAY = 1.0  # [SimMIM] layer-wise LR decay for fine-tuning
# Which parameters get no weight decay (optimizer.py): 'ours' = 1-D, biases, position tables (all
# architectures, pre-training and fine-tuning), mask tokens, SwinV2 logit_scale / cpb_mlp;
# 'official' = the official code's membership, bugs included (Swin-Transformer #369, SimMIM #26).
_C.TRAIN.WEIGHT_DECAY_RULES = 'ours'
# Consecutive optimizer steps with a non-finite loss or gradient norm that are skipped (parameters
# untouched) before the run stops with an error.
_C.TRAIN.MAX_NONFINITE_STEPS = 20
# torch.compile (engine/compilation.py): '' off, 'blocks' each transformer block on its own (short
# compile, graphs shared by blocks of one shape), 'model' the whole model in one graph.
_C.TRAIN.COMPILE = ''
_C.TRAIN.COMPILE_BACKEND = (
    'inductor'  # aot_eager / eager: trace without code generation (debugging)
)

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'  # cosine | linear | step | multistep
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30  # step
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1  # step
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1  # multistep
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []  # multistep, in epochs
# cosine only, as in the Swin-Transformer repo: True = the cosine starts after the warmup (that
# repo's default, set in configs/simmim/*.yaml); False = it is timed from step 0 and the warmup
# overwrites its start (SimMIM repo, which produced the paper's runs). step is never shifted.
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
# Weights & Biases (engine/tracking.py), rank 0: the same scalars and reconstruction images as
# TensorBoard. The run id is kept in OUTPUT/wandb_run_id, so an auto-resume continues the W&B run.
# WANDB_MODE=offline (environment) keeps everything on the machine. OUTPUT/metrics.jsonl is
# written by every run regardless.
_C.LOGGING = CN()
_C.LOGGING.WANDB = False  # also --wandb
_C.LOGGING.WANDB_PROJECT = 'simmim'
_C.LOGGING.WANDB_ENTITY = ''  # '' = the account's default entity
_C.LOGGING.WANDB_NAME = ''  # display name; '' = MODEL.NAME/TAG
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

# True in a config a run has finished deriving (OUTPUT joined with MODEL.NAME and TAG, learning
# rates scaled to the batch): what checkpoints and OUTPUT/config.yaml store. Loading such a dump
# checks it and derives nothing again, so a stored config reads back as itself.
_C.FINALIZED = False

# Values of keys no registered unit owns (the units check their own: see validate_config).
DATASETS = ('imagenet', 'folder', 'synthetic')
AMP_OPT_LEVELS = ('', 'O0', 'O1', 'O2')
AMP_DTYPES = ('auto', 'bfloat16', 'float16')
SHARDINGS = ('ddp', 'fsdp')  # TRAIN.SHARDING (engine/sharding.py)
COMPILE_MODES = ('', 'blocks', 'model')  # TRAIN.COMPILE (engine/compilation.py)
COMPILE_BACKENDS = ('inductor', 'aot_eager', 'eager')  # the last two: tracing only (debugging)
# The allowed range of every numeric key (each element of a list); validate_config checks them
# first, so nothing starts with a value outside its range (a YAML .nan or .inf included). A new
# numeric key goes here or in UNCONSTRAINED_NUMERIC_KEYS (tests/test_config.py checks both).
_POSITIVE = Range(0, low_open=True)
_AT_LEAST_0, _AT_LEAST_1 = Range(0), Range(1)
_FRACTION = Range(0, 1, high_open=True)  # [0, 1)
_PROBABILITY = Range(0, 1)
_SIZE_OR_DEFAULT = Range(0, note='0 picks the default.')
_ARCH_RANGES = {
    'PATCH_SIZE': _AT_LEAST_1,
    'IN_CHANS': _AT_LEAST_1,
    'EMBED_DIM': _AT_LEAST_1,
    'DEPTHS': _AT_LEAST_1,
    'NUM_HEADS': _AT_LEAST_1,
    'WINDOW_SIZE': _AT_LEAST_1,
    'MLP_RATIO': _POSITIVE,
}
NUMERIC_RANGES = {
    'DATA.BATCH_SIZE': _POSITIVE,
    'DATA.IMG_SIZE': _POSITIVE,
    'DATA.NUM_WORKERS': _AT_LEAST_0,
    'DATA.PREFETCH_FACTOR': _AT_LEAST_1,
    'DATA.SHARD_WINDOW': _AT_LEAST_1,
    'DATA.MASK_PATCH_SIZE': _AT_LEAST_1,
    'DATA.MASK_RATIO': Range(0, 1, True, True, note="(The paper's default is 0.6.)"),
    'DATA.BLOCKWISE.MIN_PATCHES_PER_BLOCK': _SIZE_OR_DEFAULT,
    'DATA.BLOCKWISE.MAX_PATCHES_PER_BLOCK': _SIZE_OR_DEFAULT,
    'DATA.BLOCKWISE.ASPECT_RATIO_RANGE': _POSITIVE,
    'DATA.SYNTHETIC.TRAIN_SIZE': _AT_LEAST_1,
    'DATA.SYNTHETIC.VAL_SIZE': _AT_LEAST_1,
    'DATA.SYNTHETIC.NUM_CLASSES': _AT_LEAST_1,
    'DATA.SYNTHETIC.SEED': _AT_LEAST_0,
    'MODEL.NUM_CLASSES': Range(0, note='0: the number of class folders in the data.'),
    'MODEL.DROP_RATE': _FRACTION,
    'MODEL.DROP_PATH_RATE': _FRACTION,
    'MODEL.LABEL_SMOOTHING': _FRACTION,
    **{f'MODEL.SWIN.{key}': allowed for key, allowed in _ARCH_RANGES.items()},
    'MODEL.SWIN.QK_SCALE': Range(0, low_open=True, none_ok=True, note='None: head_dim ** -0.5.'),
    **{f'MODEL.SWINV2.{key}': allowed for key, allowed in _ARCH_RANGES.items()},
    'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES': _AT_LEAST_0,
    **{
        f'MODEL.VIT.{key}': allowed
        for key, allowed in _ARCH_RANGES.items()
        if key not in ('DEPTHS', 'WINDOW_SIZE')
    },
    'MODEL.VIT.DEPTH': _AT_LEAST_1,
    'MODEL.VIT.INIT_VALUES': Range(
        0,
        low_open=True,
        none_ok=True,
        note='None: no layer scale (0 would be read as none by timm and as gammas fixed at 0, '
        'which silence every block, by the official code; the official configs use 0.1).',
    ),
    'MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE': _AT_LEAST_1,
    'MODEL.SIMMIM.HEAD.MLP_HIDDEN_DIM': _SIZE_OR_DEFAULT,
    **{
        f'MODEL.SIMMIM.HEAD.INVERSE_SWIN.{key}': _ARCH_RANGES[key]
        for key in ('EMBED_DIM', 'DEPTHS', 'NUM_HEADS', 'WINDOW_SIZE', 'MLP_RATIO')
    },
    'MODEL.SIMMIM.TARGET.DOWNSAMPLE': _AT_LEAST_1,
    'MODEL.SIMMIM.TARGET.NUM_BINS': Range(2),
    'MODEL.SIMMIM.TARGET.NUM_CLUSTERS': Range(2),
    'MODEL.SIMMIM.TARGET.VOCAB_SIZE': Range(2),
    'MODEL.SIMMIM.LOSS.SMOOTH_L1_BETA': _POSITIVE,
    'TRAIN.START_EPOCH': _AT_LEAST_0,
    'TRAIN.EPOCHS': _POSITIVE,
    'TRAIN.WARMUP_EPOCHS': _AT_LEAST_0,
    'TRAIN.WEIGHT_DECAY': _AT_LEAST_0,
    'TRAIN.BASE_LR': Range(0, note='(0 trains nothing: a check of what was loaded.)'),
    'TRAIN.WARMUP_LR': _AT_LEAST_0,
    'TRAIN.MIN_LR': _AT_LEAST_0,
    'TRAIN.CLIP_GRAD': Range(0, none_ok=True, note='0 or None: no clipping.'),
    'TRAIN.ACCUMULATION_STEPS': Range(0, note='0 or 1: no accumulation.'),
    'TRAIN.LAYER_DECAY': Range(0, 1, low_open=True, note='1: no layer decay.'),
    'TRAIN.MAX_NONFINITE_STEPS': _AT_LEAST_1,
    'TRAIN.LR_SCHEDULER.DECAY_EPOCHS': _POSITIVE,
    'TRAIN.LR_SCHEDULER.DECAY_RATE': _POSITIVE,
    'TRAIN.LR_SCHEDULER.GAMMA': _POSITIVE,
    'TRAIN.LR_SCHEDULER.MULTISTEPS': _AT_LEAST_0,
    'TRAIN.OPTIMIZER.EPS': _POSITIVE,
    'TRAIN.OPTIMIZER.BETAS': _FRACTION,
    'TRAIN.OPTIMIZER.MOMENTUM': _FRACTION,
    'AUG.CROP_SCALE': Range(0, 1, low_open=True),
    'AUG.COLOR_JITTER': Range(0, note='0: off.'),
    'AUG.REPROB': _PROBABILITY,
    'AUG.RECOUNT': _AT_LEAST_1,
    'AUG.MIXUP': Range(0, note='A Beta distribution alpha; 0: off.'),
    'AUG.CUTMIX': Range(0, note='A Beta distribution alpha; 0: off.'),
    'AUG.CUTMIX_MINMAX': Range(0, 1, low_open=True, none_ok=True),
    'AUG.MIXUP_PROB': _PROBABILITY,
    'AUG.MIXUP_SWITCH_PROB': _PROBABILITY,
    'LINEAR_PROBE.BLOCK': Range(0, note='0: the last block.'),
    'CHECKPOINT.STEP_FREQ': Range(0, note='0: only epoch checkpoints.'),
    'CHECKPOINT.KEEP_STEP_CKPTS': _AT_LEAST_1,
    'VIS_FREQ': Range(0, note='0: never.'),
    'VIS_NUM_IMAGES': _AT_LEAST_1,
    'SAVE_FREQ': _POSITIVE,
    'PRINT_FREQ': _POSITIVE,
    'SEED': _AT_LEAST_0,
}
# Numeric keys any value of their type suits: set by the launcher, or never read.
UNCONSTRAINED_NUMERIC_KEYS = ('LOCAL_RANK',)


# -----------------------------------------------------------------------------------------------
# Validation
# -----------------------------------------------------------------------------------------------
def _get(config, key):
    value = config
    for part in key.split('.'):
        value = value[part]
    return value


def check_common_keys(config: CN) -> None:
    """Every numeric key's range (NUMERIC_RANGES), then the keys that no registered unit owns."""
    for key, allowed in NUMERIC_RANGES.items():
        require_in_range(key, _get(config, key), allowed)
    data = config.DATA
    require_choice('DATA.DATASET', data.DATASET, DATASETS, 'datasets')
    check_on_bad_image(data.ON_BAD_IMAGE)
    check_rgb_conversion(data.RGB_CONVERSION)
    require_choice('AMP_OPT_LEVEL', config.AMP_OPT_LEVEL, AMP_OPT_LEVELS, 'levels')
    require_choice('AMP_DTYPE', config.AMP_DTYPE, AMP_DTYPES, 'dtypes')
    require_choice('TRAIN.SHARDING', config.TRAIN.SHARDING, SHARDINGS, 'shardings')
    require_choice('TRAIN.COMPILE', config.TRAIN.COMPILE, COMPILE_MODES, 'modes')
    require_choice(
        'TRAIN.COMPILE_BACKEND', config.TRAIN.COMPILE_BACKEND, COMPILE_BACKENDS, 'backends'
    )
    require(
        not config.LOGGING.WANDB or bool(config.LOGGING.WANDB_PROJECT),
        'LOGGING.WANDB is on but LOGGING.WANDB_PROJECT is empty; name the W&B project.',
    )
    crop = list(config.AUG.CROP_SCALE)
    require(
        len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1,
        f'AUG.CROP_SCALE must be [low, high] with 0 < low <= high <= 1, got {crop}.',
    )


def check_masked_image_modeling(config: CN) -> None:
    """The sections only SimMIM reads: masking, then the target (it fixes the head's upscale), then
    the head."""
    check_mask_config(config, model_patch_size(config))
    stride = encoder_stride(config)
    check_target_config(config, stride)
    check_head_config(config, stride)


def validate_config(config: CN, task: Task) -> None:
    """Raise ConfigError naming the key and the fix for any inconsistent value; `task` (a
    utils.tasks.Task) says which sections the run reads."""
    architecture = architecture_of(config)
    check_common_keys(config)
    check_scheduler_config(config)
    check_optimizer_config(config)
    architecture.check_config(config)
    check_loader_config(config, task)
    check_window_attention(config.MODEL.WINDOW_ATTENTION)
    if task.masked_image_modeling:
        check_masked_image_modeling(config)


# -----------------------------------------------------------------------------------------------
# Loading
# -----------------------------------------------------------------------------------------------
def _scale_learning_rates(config, world_size):
    """Linear scaling rule: LRs are given for a total batch of 512 (section 5.4 of the
    reference)."""
    factor = config.DATA.BATCH_SIZE * world_size / 512.0
    if config.TRAIN.ACCUMULATION_STEPS > 1:
        factor *= config.TRAIN.ACCUMULATION_STEPS
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor


def _validate_and_derive(config, world_size, task):
    """Check the merged `config`; unless it is FINALIZED already, derive the run's values (the
    MODEL.PRETRAINED alias, OUTPUT/MODEL.NAME/TAG, the learning rates for the total batch);
    freeze."""
    if not config.FINALIZED:
        if config.PRETRAINED and not config.MODEL.PRETRAINED:
            config.MODEL.PRETRAINED = config.PRETRAINED
        config.OUTPUT = os.path.join(config.OUTPUT or 'output', config.MODEL.NAME, config.TAG)
    validate_config(config, task)
    if not config.FINALIZED:
        _scale_learning_rates(config, world_size)
        config.FINALIZED = True
    config.freeze()
    return config


def _batch(config):
    """(DATA.BATCH_SIZE, accumulation steps): what the learning rates were scaled for."""
    return config.DATA.BATCH_SIZE, max(1, config.TRAIN.ACCUMULATION_STEPS)


def _follow_a_finalized_config(config, stored):
    """A FINALIZED config (a run's own config.yaml) continues its run; after --opts and the flags,
    --tag / --output (or MODEL.NAME) given anew take effect: OUTPUT becomes ROOT/MODEL.NAME/TAG
    again, ROOT the --output given or the stored one. Returns notes for the log."""
    old_output, old_name, old_tag, old_batch = stored
    notes = []
    if (config.OUTPUT, config.MODEL.NAME, config.TAG) != (old_output, old_name, old_tag):
        root = config.OUTPUT
        if root == old_output:  # only TAG or MODEL.NAME changed: the stored root
            head, tag = os.path.split(os.path.normpath(old_output))
            root, name = os.path.split(head)
            require(
                (name, tag) == (old_name, old_tag),
                f"This finalized config (a run's config.yaml) has OUTPUT {old_output}, which "
                f'does not end in MODEL.NAME/TAG ({old_name}/{old_tag}), so the folder of the new '
                f'TAG cannot be derived from it. Pass --output ROOT as well.',
            )
        config.OUTPUT = os.path.join(root, config.MODEL.NAME, config.TAG)
        notes.append(
            f'The config is the finalized config of the run in {old_output}; with the TAG / '
            f'OUTPUT given, this run uses {config.OUTPUT} instead (same settings, learning rates '
            f'as stored).'
        )
    batch = _batch(config)
    if batch != old_batch:
        notes.append(
            f'DATA.BATCH_SIZE x ACCUMULATION_STEPS is {batch[0]} x {batch[1]} here and '
            f"{old_batch[0]} x {old_batch[1]} in this finalized config (a run's config.yaml): its "
            f'learning rates (TRAIN.BASE_LR {config.TRAIN.BASE_LR:g}) were scaled for the batch '
            f'of its run and are used as they are, not scaled again. For rates scaled to the new '
            f'batch, start from the original YAML.'
        )
    return notes


def config_warnings(config: CN) -> list[str]:
    """Warnings about a valid `config` that may not do what was meant (logged at the start)."""
    train = config.TRAIN
    warnings = []
    if train.WARMUP_EPOCHS >= train.EPOCHS and not (config.EVAL_MODE or config.THROUGHPUT_MODE):
        warnings.append(
            f'TRAIN.WARMUP_EPOCHS {train.WARMUP_EPOCHS} is not shorter than TRAIN.EPOCHS '
            f'{train.EPOCHS}: the whole run is warm-up, so the learning rate only rises from '
            f"TRAIN.WARMUP_LR towards TRAIN.BASE_LR and the schedule's decay never starts. Lower "
            f'TRAIN.WARMUP_EPOCHS below TRAIN.EPOCHS unless that is what you meant.'
        )
    return warnings


def _merged(merge_source, args, task, is_pretrain, notes=None):
    config = _C.clone()
    config.defrost()
    merge_source(config)
    stored = None
    if config.FINALIZED:
        stored = (
            config.OUTPUT,
            config.MODEL.NAME,
            config.TAG,
            _batch(config),
        )
    merge_opts(config, args.opts)
    found = apply_args(config, args)
    if stored is not None:
        found += _follow_a_finalized_config(config, stored)
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    config = _validate_and_derive(config, world_size, as_task(task, is_pretrain))
    if notes is not None:
        notes.extend(found + config_warnings(config))
    return config


def get_config(
    args: argparse.Namespace,
    task: Task | bool = PRETRAIN,
    *,
    is_pretrain: bool | None = None,
    notes: list | None = None,
) -> CN:
    """The frozen config for parsed command-line `args` (official name; `get_config(args)` is the
    official call). `task` (or the official `is_pretrain` flag) says which sections are checked.
    `notes`, a list, receives the warnings to log when the run starts (what a flag changed besides
    its key, `config_warnings`)."""
    return _merged(lambda config: merge_yaml(config, args.cfg), args, task, is_pretrain, notes)


def load_config(
    cfg_path: str,
    opts: Sequence = (),
    task: Task | bool = PRETRAIN,
    *,
    is_pretrain: bool | None = None,
    notes: list | None = None,
    **flags,
) -> CN:
    """The frozen config a script would use for `--cfg cfg_path --opts *opts` (plus any flag given
    by its argparse name, e.g. ``batch_size=8``), for notebooks and tools."""
    args = argparse.Namespace(cfg=cfg_path, opts=list(opts), **flags)
    return get_config(args, task, is_pretrain=is_pretrain, notes=notes)


def load_config_text(
    yaml_text: str,
    opts: Sequence = (),
    task: Task | bool = FINETUNE,
    *,
    is_pretrain: bool | None = None,
    source: str = 'the stored config',
) -> CN:
    """The frozen config that YAML text (e.g. a checkpoint's) gives, with `opts` applied. A stored
    config (FINALIZED) reads back as itself. Checked as for fine-tuning unless `task` says
    otherwise: readers of a stored config build the encoder or the classifier."""
    args = argparse.Namespace(cfg=None, opts=list(opts))
    return _merged(
        lambda config: merge_yaml_text(config, yaml_text, source), args, task, is_pretrain
    )


def get_defaults() -> CN:
    """A mutable copy of the defaults."""
    return _C.clone()
