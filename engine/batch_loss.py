"""How a batch becomes a loss, per task: the one thing pre-training and fine-tuning do differently
inside the shared training loop (engine/trainer.py), and fine-tuning's classification criterion."""

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from yacs.config import CfgNode


def build_classification_criterion(config: CfgNode, mixup_fn=None) -> torch.nn.Module:
    """Fine-tuning's loss: soft-target cross-entropy under Mixup/CutMix (their soft targets carry
    the label smoothing), else label-smoothed (MODEL.LABEL_SMOOTHING > 0) or plain cross-entropy."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return torch.nn.CrossEntropyLoss()


class PretrainBatchLoss:
    """SimMIM: the model maps (images, mask) to the reconstruction loss."""

    def __call__(self, model, batch, device):
        images, mask = batch[0], batch[1]
        images = images.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        return model(images, mask), images.shape[0]


class ClassificationBatchLoss:
    """Fine-tuning / linear probing: (images, labels) -> criterion(model(images), targets)."""

    def __init__(self, criterion, mixup_fn=None):
        self.criterion = criterion
        self.mixup_fn = mixup_fn

    def __call__(self, model, batch, device):
        images = batch[0].to(device, non_blocking=True)
        targets = batch[1].to(device, non_blocking=True)
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        return self.criterion(model(images), targets), images.shape[0]
