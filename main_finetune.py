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

from data import build_loader
from models import build_model
from models.linear_probe import build_linear_probe
from utils.checkpoint import atomic_save
from utils.engine import ClassificationTask, autocast_dtype, build_trainer
from utils.evaluation import evaluate, throughput
from utils.launch import run
from utils.pretrained import load_pretrained
from utils.safe_load import CheckpointError, load_checkpoint_file
from utils.sharding import full_model_state_dict

BEST_CHECKPOINT = 'model_best.pth'


def build_criterion(config, mixup_fn):
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # Mixup/CutMix give soft targets (label smoothing inside)
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return torch.nn.CrossEntropyLoss()


def load_weights_for_eval(config, model, logger):
    """--eval: the model weights of MODEL.RESUME (or the newest checkpoint in OUTPUT)."""
    path = config.MODEL.RESUME
    if not path:
        candidates = [os.path.join(config.OUTPUT, name) for name in (BEST_CHECKPOINT,)]
        path = next((p for p in candidates if os.path.isfile(p)), '')
    if not path:
        raise CheckpointError('--eval needs a checkpoint: pass --resume CKPT (a fine-tuned '
                              'checkpoint of this framework or the official code).')
    checkpoint = load_checkpoint_file(path, '--resume')
    state = checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else checkpoint
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f'{path} does not fit the model (another architecture or size?): '
                              f'{str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}') from None
    logger.info(f'loaded {path} for evaluation')
    return checkpoint


def main(config, dist_info, logger, writer):
    device = dist_info.device
    (_, _, data_loader_train, data_loader_val, mixup_fn,
     num_classes) = build_loader(config, logger, is_pretrain=False)
    config.defrost()
    config.MODEL.NUM_CLASSES = num_classes
    config.freeze()

    if config.LINEAR_PROBE.ENABLE:
        model = build_linear_probe(config).to(device)
        backbone = model.encoder  # pre-trained weights go here; only model.head trains
    else:
        model = backbone = build_model(config, is_pretrain=False).to(device)
    logger.debug(str(model))

    if config.EVAL_MODE:
        checkpoint = load_weights_for_eval(config, model, logger)
        acc1, acc5, loss, count = evaluate(model, data_loader_val, device,
                                           autocast_dtype(config, device), logger)
        logger.info(f' * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f}')
        logger.info(f'Accuracy of the network on the {count} test images: {acc1:.3f}%')
        if isinstance(checkpoint, dict) and 'accuracy' in checkpoint:
            logger.info(f'(the checkpoint recorded {checkpoint["accuracy"]:.3f}% when it was saved)')
        return

    task = ClassificationTask(build_criterion(config, mixup_fn), mixup_fn)
    # FSDP shards the model in build_trainer, so pre-trained weights go in before (a resume then
    # overwrites them).
    before_sharding = config.TRAIN.SHARDING == 'fsdp' and dist_info.distributed
    if before_sharding and config.MODEL.PRETRAINED:
        load_pretrained(config, backbone, logger)
    trainer = build_trainer(config, model, data_loader_train, task, logger, dist_info, writer,
                            is_pretrain=False)

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
            writer.add_scalar('val/acc1', acc1, epoch)
            writer.add_scalar('val/acc5', acc5, epoch)
            writer.add_scalar('val/loss', loss, epoch)

    logger.info('Start training')
    trainer.fit(start_epoch, start_step, after_epoch=validate)


if __name__ == '__main__':
    sys.exit(run(main, sys.argv[1:], is_pretrain=False))
