"""SimMIM pre-training.

    python main_simmim.py --cfg configs/quickstart/simmim_pretrain__swin_tiny__img64__synthetic.yaml
    torchrun --nproc_per_node 8 main_simmim.py --cfg FILE --data-path DIR [--opts KEY VALUE ...]
"""
import sys

from data import build_loader
from models import build_model
from utils.engine import PretrainTask, build_trainer
from utils.launch import run
from utils.sharding import is_fsdp
from utils.visualize import ReconstructionLogger


def main(config, dist_info, logger, writer):
    dataset, data_loader = build_loader(config, logger, is_pretrain=True)
    model = build_model(config, is_pretrain=True).to(dist_info.device)
    logger.debug(str(model))
    trainer = build_trainer(config, model, data_loader, PretrainTask(), logger, dist_info, writer)
    visualize = None
    if config.VIS_FREQ and (dist_info.is_main or is_fsdp(model)):  # FSDP: all ranks run forward
        visualize = ReconstructionLogger(config, dataset, model, dist_info.device, writer,
                                         write=dist_info.is_main)
    start_epoch, start_step = trainer.resume()
    logger.info('Start training')
    trainer.fit(start_epoch, start_step, after_epoch=visualize)


if __name__ == '__main__':
    sys.exit(run(main, sys.argv[1:], is_pretrain=True))
