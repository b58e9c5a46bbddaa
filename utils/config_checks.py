"""Validation of a merged config: `validate_config(config, task)` raises ConfigError naming the key
and the fix.

The keys of a registered unit are checked by that unit, in the module that owns it: the
architecture (models/architectures.py), the optimizer (optimizer.py), the LR schedule
(lr_scheduler.py) and, for a task that masks images, the mask strategy (data/masking.py), the
prediction head (models/heads.py) and the target and loss (models/targets.py). What is left here
are the keys no unit owns.
"""
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
from engine.compilation import check_compile_config
from utils.errors import require
from engine.sharding import check_sharding_config

DATASETS = ('imagenet', 'folder', 'synthetic')
POSITIVE_KEYS = ('DATA.BATCH_SIZE', 'TRAIN.EPOCHS', 'PRINT_FREQ', 'SAVE_FREQ', 'DATA.IMG_SIZE')


def _get(config, key):
    value = config
    for part in key.split('.'):
        value = value[part]
    return value


def check_common_keys(config):
    """Keys that no registered unit owns."""
    data = config.DATA
    require(data.DATASET in DATASETS, f"DATA.DATASET '{data.DATASET}' is not one of {DATASETS}.")
    check_on_bad_image(data.ON_BAD_IMAGE)
    check_rgb_conversion(data.RGB_CONVERSION)
    require(config.AMP_OPT_LEVEL in ('', 'O0', 'O1', 'O2'),
            f"AMP_OPT_LEVEL must be '', O0, O1 or O2, got '{config.AMP_OPT_LEVEL}'.")
    require(config.AMP_DTYPE in ('auto', 'bfloat16', 'float16'),
            f"AMP_DTYPE must be auto, bfloat16 or float16, got '{config.AMP_DTYPE}'.")
    for key in POSITIVE_KEYS:
        require(_get(config, key) > 0, f"{key} must be positive, got {_get(config, key)}.")
    require(config.CHECKPOINT.STEP_FREQ >= 0 and config.CHECKPOINT.KEEP_STEP_CKPTS >= 1,
            "CHECKPOINT.STEP_FREQ must be >= 0 and CHECKPOINT.KEEP_STEP_CKPTS >= 1.")
    require(config.TRAIN.MAX_NONFINITE_STEPS >= 1, "TRAIN.MAX_NONFINITE_STEPS must be >= 1.")
    crop = list(config.AUG.CROP_SCALE)
    require(len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1,
            f"AUG.CROP_SCALE must be [low, high] with 0 < low <= high <= 1, got {crop}.")


def check_masked_image_modeling(config):
    """The sections only SimMIM reads: masking, then the target (it fixes the head's upscale), then
    the head."""
    check_mask_config(config, model_patch_size(config))
    stride = encoder_stride(config)
    check_target_config(config, stride)
    check_head_config(config, stride)


def validate_config(config, task):
    """Raise ConfigError naming the key and the fix for any inconsistent value; `task` (a
    utils.tasks.Task) says which sections the run reads."""
    architecture = architecture_of(config)
    check_common_keys(config)
    check_scheduler_config(config)
    check_optimizer_config(config)
    check_sharding_config(config)
    architecture.check_config(config)
    check_loader_config(config, task)
    check_window_attention(config.MODEL.WINDOW_ATTENTION)
    check_compile_config(config)
    if task.masked_image_modeling:
        check_masked_image_modeling(config)
