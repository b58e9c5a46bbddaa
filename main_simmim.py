"""SimMIM pre-training.

    python main_simmim.py --cfg configs/quickstart/simmim_pretrain__swin_tiny__img64__synthetic.yaml
    torchrun --nproc_per_node 8 main_simmim.py --cfg FILE --data-path DIR [--opts KEY VALUE ...]
"""
import sys

from torch.nn.parallel import DistributedDataParallel

from data import build_loader
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from utils.engine import PretrainTask, Trainer, autocast_dtype, build_grad_scaler
from utils.launch import run
from utils.visualize import ReconstructionLogger


def main(config, dist_info, logger, writer):
    device = dist_info.device
    dataset, data_loader = build_loader(config, logger, is_pretrain=True)

    model = build_model(config, is_pretrain=True).to(device)
    logger.debug(str(model))
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f'number of params: {num_params}')
    optimizer = build_optimizer(config, model, logger, is_pretrain=True)
    amp_dtype = autocast_dtype(config, device)
    logger.info(f'autocast: {amp_dtype or "off (fp32)"}')
    scaler = build_grad_scaler(amp_dtype)
    model_without_ddp = model
    if dist_info.distributed:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None,
            forward_sync_buffers=False)  # the official broadcast_buffers=False
    lr_scheduler = build_scheduler(config, optimizer, len(data_loader))

    trainer = Trainer(config, model, model_without_ddp, optimizer, lr_scheduler, scaler,
                      data_loader, PretrainTask(), logger, dist_info, writer, amp_dtype)
    visualize = (ReconstructionLogger(config, dataset, model_without_ddp, device, writer)
                 if config.VIS_FREQ else None)
    start_epoch, start_step = trainer.resume()
    logger.info('Start training')
    trainer.fit(start_epoch, start_step,
                after_epoch=(lambda e: visualize(e, dist_info.is_main)) if visualize else None)


if __name__ == '__main__':
    sys.exit(run(main, sys.argv[1:], is_pretrain=True))
