"""SimMIM pre-training.

    python main_simmim.py --cfg configs/quickstart/simmim_pretrain__swin_tiny__img64__synthetic.yaml
    torchrun --nproc_per_node 8 main_simmim.py --cfg FILE --data-path DIR [--opts KEY VALUE ...]
"""
import sys

from data import build_pretrain_data
from models import build_simmim, model_patch_size
from engine.compilation import compile_model
from engine.trainer import build_trainer
from engine.launch import run
from checkpoint.weights import load_pretrained
from engine.sharding import is_fsdp
from utils.tasks import PRETRAIN, PretrainBatchLoss
from engine.figures import ReconstructionLogger


def main(config, dist_info, logger, writer):
    data = build_pretrain_data(config, model_patch_size(config), logger)
    model = build_simmim(config).to(dist_info.device)
    logger.debug(str(model))
    # FSDP shards the model in build_trainer, so starting weights go in before (a resume then
    # overwrites them).
    before_sharding = config.TRAIN.SHARDING == 'fsdp' and dist_info.distributed
    if before_sharding and config.MODEL.PRETRAINED:
        load_pretrained(config, model.encoder, logger)
    compile_model(model, config.TRAIN.COMPILE, logger, config.TRAIN.COMPILE_BACKEND)
    trainer = build_trainer(config, model, data.train_loader, PretrainBatchLoss(), logger,
                            dist_info, writer, PRETRAIN)
    visualize = None
    if config.VIS_FREQ and (dist_info.is_main or is_fsdp(model)):  # FSDP: all ranks run forward
        visualize = ReconstructionLogger(config, data.train_set, model, dist_info.device, writer,
                                         steps_per_epoch=len(data.train_loader),
                                         write=dist_info.is_main)
    start_epoch, start_step = trainer.resume()
    if trainer.last_checkpoint is None and config.MODEL.PRETRAINED and not before_sharding:
        load_pretrained(config, model.encoder, logger)  # e.g. timm:NAME: start from other weights
    logger.info('Start training')
    trainer.fit(start_epoch, start_step, after_epoch=visualize)


if __name__ == '__main__':
    sys.exit(run(main, sys.argv[1:], PRETRAIN))
