"""Fine-tuning, evaluation, throughput and linear probing of SimMIM encoders.

    python main_finetune.py --cfg FILE --data-path DIR --pretrained CKPT      # fine-tune
    python main_finetune.py --cfg FILE --data-path DIR --eval --resume CKPT   # evaluate
    python main_finetune.py --cfg FILE --data-path DIR --throughput           # forward images/s
    (linear probing: a config with LINEAR_PROBE.ENABLE True, e.g. configs/vit_base__800ep/...linprobe...)
"""
import os
import sys

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from data import build_finetune_data
from models import build_classifier
from models.linear_probe import build_linear_probe
from checkpoint.layout import atomic_save, find_resume_checkpoint
from engine.compilation import compile_model
from engine.trainer import autocast_dtype, build_trainer
from utils.errors import CheckpointError
from engine.evaluation import evaluate, throughput
from engine.launch import run
from checkpoint.weights import load_full_state_dict, load_pretrained
from utils.safe_load import load_checkpoint_file
from engine.sharding import full_model_state_dict
from utils.tasks import FINETUNE, ClassificationBatchLoss

BEST_CHECKPOINT = 'model_best.pth'


def build_criterion(config, mixup_fn):
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # Mixup/CutMix give soft targets (label smoothing inside)
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return torch.nn.CrossEntropyLoss()


def load_weights_for_eval(config, model, logger):
    """--eval: load the model weights of MODEL.RESUME; without it, of OUTPUT/model_best.pth, else of
    the newest resumable ckpt_epoch_*.pth in OUTPUT. The file must hold every tensor of the model
    (checkpoint.weights.load_full_state_dict), so evaluation never runs on initial weights."""
    path, checkpoint = config.MODEL.RESUME, None
    if not path and os.path.isfile(os.path.join(config.OUTPUT, BEST_CHECKPOINT)):
        path = os.path.join(config.OUTPUT, BEST_CHECKPOINT)
    if not path:
        path, checkpoint = find_resume_checkpoint(config.OUTPUT, logger)
    if not path:
        raise CheckpointError(f'--eval needs a checkpoint: pass --resume CKPT (a fine-tuned '
                              f'checkpoint of this framework or the official code); none was found '
                              f'in {config.OUTPUT} (model_best.pth or ckpt_epoch_*.pth).')
    if checkpoint is None:
        checkpoint = load_checkpoint_file(path, '--resume')
    load_full_state_dict(model, checkpoint, f'The --eval checkpoint {path}')
    logger.info(f'loaded {path} for evaluation')
    return checkpoint


def main(config, dist_info, logger, writer):
    device = dist_info.device
    data = build_finetune_data(config, logger)
    data_loader_val = data.val_loader
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
        checkpoint = load_weights_for_eval(config, model, logger)
        acc1, acc5, loss, count = evaluate(model, data_loader_val, device,
                                           autocast_dtype(config, device), logger)
        logger.info(f' * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f}')
        logger.info(f'Accuracy of the network on the {count} test images: {acc1:.3f}%')
        if isinstance(checkpoint, dict) and 'accuracy' in checkpoint:
            logger.info(f'(the checkpoint recorded {checkpoint["accuracy"]:.3f}% when it was saved)')
        return

    batch_loss = ClassificationBatchLoss(build_criterion(config, data.mixup_fn), data.mixup_fn)
    # FSDP shards the model in build_trainer, so pre-trained weights go in before (a resume then
    # overwrites them).
    before_sharding = config.TRAIN.SHARDING == 'fsdp' and dist_info.distributed
    if before_sharding and config.MODEL.PRETRAINED:
        load_pretrained(config, backbone, logger)
    trainer = build_trainer(config, model, data.train_loader, batch_loss, logger, dist_info, writer,
                            FINETUNE)

    start_epoch, start_step = trainer.resume()
    resumed = trainer.last_checkpoint is not None
    if not resumed and config.MODEL.PRETRAINED and not before_sharding:
        load_pretrained(config, backbone, logger)
    if config.THROUGHPUT_MODE:
        throughput(model, data_loader_val, device, logger, trainer.amp_dtype)
        return

    def validate(epoch):
        acc1, acc5, loss, count = evaluate(model, data_loader_val, device, trainer.amp_dtype)
        logger.info(f' * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}')
        logger.info(f'Accuracy of the network on the {count} test images: {acc1:.3f}%')
        if acc1 > trainer.max_accuracy:  # the same on every rank (the counts are all-reduced)
            state = full_model_state_dict(model)  # collective under FSDP
            path = os.path.join(config.OUTPUT, BEST_CHECKPOINT)
            if dist_info.is_main:
                atomic_save({'model': state, 'epoch': epoch, 'accuracy': acc1, 'acc5': acc5,
                             'max_accuracy': acc1, 'config': config.dump()}, path)
                logger.info(f'{path} saved (best so far)')
        trainer.max_accuracy = max(trainer.max_accuracy, acc1)
        logger.info(f'Max accuracy: {trainer.max_accuracy:.2f}%')
        if writer is not None:
            step = (epoch + 1) * trainer.steps_per_epoch - 1  # the training scalars' axis
            writer.add_scalar('val/acc1', acc1, step)
            writer.add_scalar('val/acc5', acc5, step)
            writer.add_scalar('val/loss', loss, step)

    logger.info('Start training')
    trainer.fit(start_epoch, start_step, after_epoch=validate)


if __name__ == '__main__':
    sys.exit(run(main, sys.argv[1:], FINETUNE))
