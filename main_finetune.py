"""Fine-tuning, evaluation, throughput and linear probing of SimMIM encoders.

python main_finetune.py --cfg FILE --data-path DIR --pretrained CKPT      # fine-tune
python main_finetune.py --cfg FILE --data-path DIR --eval --resume CKPT   # evaluate
python main_finetune.py --cfg FILE --data-path DIR --throughput           # forward images/s
(linear probing: a config with LINEAR_PROBE.ENABLE True, e.g.
configs/vit_base__800ep/...linprobe...)
"""

import logging
import sys

from yacs.config import CfgNode

from data import build_finetune_data
from engine.batch_loss import ClassificationBatchLoss, build_classification_criterion
from engine.callbacks import ValidateAndKeepBest
from engine.compilation import compile_model
from engine.evaluation import evaluate, load_eval_weights, throughput
from engine.launch import run
from engine.precision import autocast_dtype
from engine.trainer import build_trainer
from models import build_classifier
from models.linear_probe import build_linear_probe
from utils.distributed import DistInfo
from utils.tasks import FINETUNE


def main(config: CfgNode, dist_info: DistInfo, logger: logging.Logger, writer=None) -> None:
    device = dist_info.device
    data = build_finetune_data(config, logger)
    config.defrost()
    config.MODEL.NUM_CLASSES = data.num_classes
    config.freeze()

    if config.LINEAR_PROBE.ENABLE:
        model = build_linear_probe(config).to(device)
        backbone = model.encoder  # pre-trained weights go here; only model.head trains
    else:
        model = backbone = build_classifier(config).to(device)
    logger.debug(str(model))
    compile_model(model, config.TRAIN.COMPILE, logger, config.TRAIN.COMPILE_BACKEND)

    if config.EVAL_MODE:
        checkpoint = load_eval_weights(config, model, logger)
        amp_dtype = autocast_dtype(config, device)
        acc1, acc5, loss, count = evaluate(model, data.val_loader, device, amp_dtype, logger)
        logger.info(f' * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f}')
        logger.info(f'Accuracy of the network on the {count} test images: {acc1:.3f}%')
        if isinstance(checkpoint, dict) and 'accuracy' in checkpoint:
            logger.info(
                f'(the checkpoint recorded {checkpoint["accuracy"]:.3f}% when it was saved)'
            )
        if config.THROUGHPUT_MODE:  # --eval --throughput: both, with the evaluated weights
            throughput(model, data.val_loader, device, logger, amp_dtype)
        return

    criterion = build_classification_criterion(config, data.mixup_fn)
    trainer = build_trainer(
        config,
        model,
        data.train_loader,
        ClassificationBatchLoss(criterion, data.mixup_fn),
        logger,
        dist_info,
        writer,
        FINETUNE,
        pretrained=backbone,
    )
    if config.THROUGHPUT_MODE:
        throughput(model, data.val_loader, device, logger, trainer.amp_dtype)
        return
    logger.info('Start training')
    trainer.fit(after_epoch=ValidateAndKeepBest(trainer, data.val_loader, writer))


if __name__ == '__main__':
    sys.exit(run(main, sys.argv[1:], FINETUNE))
