"""Build models from the config through the architecture registry (models/registry.py).

build_simmim(config)                   SimMIM: encoder + prediction head + target/loss
build_classifier(config)               the fine-tuning classifier with MODEL.NUM_CLASSES outputs
build_encoder(config)                  the SimMIM encoder alone (num_classes=0)
build_model(config, task)              one of the first two for a Task (official signature
                                       build_model(config, is_pretrain=True) also works)
"""

from torch import nn
from yacs.config import CfgNode

from utils.tasks import PRETRAIN, Task, as_task

from .heads import build_decoder
from .registry import architecture_of
from .simmim import SimMIM
from .targets import build_criterion
from .window_attention import set_window_attention


def _architecture_kwargs(config):
    """The registered architecture of MODEL.TYPE and its constructor arguments."""
    arch = architecture_of(config)
    kwargs = dict(
        img_size=config.DATA.IMG_SIZE,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        **arch.constructor_kwargs(arch.section(config)),
    )
    return arch, kwargs


def build_encoder(config: CfgNode) -> nn.Module:
    """The SimMIM encoder of MODEL.TYPE (no classifier head)."""
    arch, kwargs = _architecture_kwargs(config)
    return arch.encoder(num_classes=0, **kwargs)


def build_classifier(config: CfgNode) -> nn.Module:
    """The fine-tuning classifier of MODEL.TYPE with MODEL.NUM_CLASSES outputs."""
    arch, kwargs = _architecture_kwargs(config)
    model = arch.classifier(num_classes=config.MODEL.NUM_CLASSES, **kwargs)
    return set_window_attention(model, config.MODEL.WINDOW_ATTENTION)


def build_simmim(config: CfgNode) -> SimMIM:
    """SimMIM for pre-training: forward(images, mask) -> loss."""
    encoder = build_encoder(config)
    model = SimMIM(encoder, build_decoder(config, encoder), build_criterion(config, encoder))
    return set_window_attention(model, config.MODEL.WINDOW_ATTENTION)


def build_model(
    config: CfgNode, task: Task | bool = PRETRAIN, *, is_pretrain: bool | None = None
) -> nn.Module:
    """SimMIM (forward(x, mask) -> loss) for a masked-image-modeling task, else the classifier
    (forward(x) -> logits). `task` may also be given as the official `is_pretrain` flag."""
    task = as_task(task, is_pretrain)
    return build_simmim(config) if task.masked_image_modeling else build_classifier(config)
