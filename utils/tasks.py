"""Pre-training and fine-tuning as data: what differs between the two, chosen once by the entry
script (main_simmim.py: PRETRAIN, main_finetune.py: FINETUNE) and handed to the shared code.

    Task              which config sections are checked, which model the builders make, whether
                      layer-wise LR decay applies, which flags the command line takes
    as_task(...)      a Task from a Task, its name, or the official `is_pretrain` flag

A leaf module, so every layer may take a Task. How a batch becomes a loss for each task is
engine/batch_loss.py.
"""

from dataclasses import dataclass

from utils.registry import Registry


@dataclass(frozen=True)
class Task:
    name: str  # 'pretrain' or 'finetune'
    description: str  # for messages: 'pre-training', 'fine-tuning'
    # The model is SimMIM(encoder, head, target) fed masked images, so the masking, head and target
    # sections of the config (DATA.MASK_*, DATA.BLOCKWISE, MODEL.SIMMIM) are checked; otherwise the
    # model is the classifier and those sections are ignored.
    masked_image_modeling: bool
    layer_decay: bool  # TRAIN.LAYER_DECAY applies (the official pre-training ignores it)
    finetune_flags: bool  # the command line takes --pretrained, --eval and --throughput


PRETRAIN = Task(
    'pretrain', 'pre-training', masked_image_modeling=True, layer_decay=False, finetune_flags=False
)
FINETUNE = Task(
    'finetune', 'fine-tuning', masked_image_modeling=False, layer_decay=True, finetune_flags=True
)
TASKS = Registry('task', 'tasks', {task.name: task for task in (PRETRAIN, FINETUNE)})


def as_task(task=None, is_pretrain=None):
    """The Task meant by the keyword `is_pretrain` when given (the official flag), else by `task`:
    a Task, its name, or a bool in the `is_pretrain` sense; PRETRAIN when neither is given. Public
    builders accept the official flag through this, so scripts written against the official API
    keep working."""
    if is_pretrain is not None:
        return PRETRAIN if is_pretrain else FINETUNE
    if task is None:
        return PRETRAIN
    if isinstance(task, Task):
        return task
    if isinstance(task, bool):
        return PRETRAIN if task else FINETUNE
    return TASKS.lookup(task)
