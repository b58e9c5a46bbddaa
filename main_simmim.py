"""SimMIM pre-training.

python main_simmim.py --cfg configs/quickstart/simmim_pretrain__swin_tiny__img64__synthetic.yaml
torchrun --nproc_per_node 8 main_simmim.py --cfg FILE --data-path DIR [--opts KEY VALUE ...]
"""

import logging
import sys

from yacs.config import CfgNode

from data import build_pretrain_data
from engine.batch_loss import PretrainBatchLoss
from engine.callbacks import ReconstructionLogger
from engine.compilation import compile_model
from engine.launch import run
from engine.trainer import build_trainer
from models import build_simmim, model_patch_size
from utils.distributed import DistInfo, is_fsdp
from utils.tasks import PRETRAIN


def main(config: CfgNode, dist_info: DistInfo, logger: logging.Logger, writer=None) -> None:
    data = build_pretrain_data(config, model_patch_size(config), logger)
    model = build_simmim(config).to(dist_info.device)
    logger.debug(str(model))
    compile_model(model, config.TRAIN.COMPILE, logger, config.TRAIN.COMPILE_BACKEND)
    trainer = build_trainer(
        config,
        model,
        data.train_loader,
        PretrainBatchLoss(),
        logger,
        dist_info,
        writer,
        PRETRAIN,
        pretrained=model.encoder,
    )
    visualize = None
    if config.VIS_FREQ and (dist_info.is_main or is_fsdp(model)):  # FSDP: all ranks run forward
        visualize = ReconstructionLogger(
            config,
            data.train_set,
            model,
            dist_info.device,
            writer,
            steps_per_epoch=trainer.steps_per_epoch,
            write=dist_info.is_main,
            logger=logger,
        )
    logger.info('Start training')
    trainer.fit(after_epoch=visualize)


if __name__ == '__main__':
    sys.exit(run(main, sys.argv[1:], PRETRAIN))
