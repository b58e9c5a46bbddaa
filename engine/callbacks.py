"""What runs after each training epoch (the `after_epoch` of Trainer.fit), before its checkpoint:

    ReconstructionLogger   pre-training: reconstruction grids of a fixed batch (Figures 4-6)
    ValidateAndKeepBest    fine-tuning: validation accuracy, and OUTPUT/model_best.pth on a new best

Both put their values on the global step of the epoch's last training step, the axis of the
training scalars (engine/tracking.py).
"""

import os

import torch

from checkpoint.layout import BEST_CHECKPOINT
from engine.evaluation import evaluate
from engine.figures import COLUMNS, reconstruct_images, reconstruction_grid, save_png
from engine.sharding import full_model_state_dict
from engine.train_stats import epoch_end_step
from utils.atomic_write import atomic_save


class ReconstructionLogger:
    """Writes the grid of a fixed batch every VIS_FREQ epochs (and after the last epoch), as
    OUTPUT/reconstructions/epoch_{e}.png and to TensorBoard / W&B (`writer`, an
    engine.tracking.Tracker), at the epoch's last training step
    when `steps_per_epoch` is given. With `write` False it only runs the model (the other ranks of
    a sharded model, which must join every forward)."""

    def __init__(
        self,
        config,
        dataset,
        model,
        device,
        writer=None,
        steps_per_epoch=None,
        write=True,
        logger=None,
    ):
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.write = write
        self.model = model
        self.writer = writer
        self.folder = os.path.join(config.OUTPUT, 'reconstructions')
        count = min(config.VIS_NUM_IMAGES, len(dataset))
        # Fixed samples: key (epoch 0, index i), so the same crops and masks every time.
        samples = [dataset[(0, i)] for i in range(count)]
        self.images = torch.stack([s[0] for s in samples]).to(device)
        self.mask = torch.stack([s[1] for s in samples]).to(device)
        if logger is not None and write:
            images = writer is not None and writer.logs_images
            logger.info(
                f'reconstruction grids of {count} fixed images every {config.VIS_FREQ} '
                f'epochs and after the last: {self.folder}/epoch_N.png (columns: '
                f'{", ".join(COLUMNS)})'
                f'{" and to TensorBoard / W&B" if images else ""}'
            )

    def __call__(self, epoch):
        config = self.config
        last = epoch == config.TRAIN.EPOCHS - 1
        if not config.VIS_FREQ or not (epoch % config.VIS_FREQ == 0 or last):
            return None
        prediction = reconstruct_images(self.model, self.images, self.mask)
        if not self.write:
            return None
        grid = reconstruction_grid(self.images, self.mask, prediction)
        path = os.path.join(self.folder, f'epoch_{epoch}.png')
        save_png(grid, path, min_cell=128, labels=True)
        if self.writer is not None:
            step = epoch_end_step(epoch, self.steps_per_epoch) if self.steps_per_epoch else epoch
            self.writer.image('reconstruction', grid, step)
        return path


class ValidateAndKeepBest:
    """Validates the trainer's model after each epoch (exact over ranks, engine/evaluation.py),
    logs top-1 / top-5 and writes OUTPUT/model_best.pth when top-1 beats the trainer's
    `state.max_accuracy`, which it then raises (every rank agrees: the counts are all-reduced)."""

    def __init__(self, trainer, data_loader, writer=None):
        self.trainer = trainer
        self.data_loader = data_loader
        self.writer = writer

    def __call__(self, epoch):
        trainer, state, logger = self.trainer, self.trainer.state, self.trainer.logger
        config = trainer.config
        acc1, acc5, loss, count = evaluate(
            state.model, self.data_loader, trainer.device, trainer.amp_dtype
        )
        logger.info(f' * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}')
        logger.info(f'Accuracy of the network on the {count} test images: {acc1:.3f}%')
        if acc1 > state.max_accuracy:
            weights = full_model_state_dict(state.model)  # collective under FSDP
            path = os.path.join(config.OUTPUT, BEST_CHECKPOINT)
            if trainer.dist_info.is_main:
                atomic_save(
                    {
                        'model': weights,
                        'epoch': epoch,
                        'accuracy': acc1,
                        'acc5': acc5,
                        'max_accuracy': acc1,
                        'config': config.dump(),
                    },
                    path,
                    checksum=True,
                )
                logger.info(f'{path} saved (best so far)')
        state.max_accuracy = max(state.max_accuracy, acc1)
        logger.info(f'Max accuracy: {state.max_accuracy:.2f}%')
        if self.writer is not None:
            step = epoch_end_step(epoch, trainer.steps_per_epoch)
            self.writer.log('val', step, epoch, {'acc1': acc1, 'acc5': acc5, 'loss': loss})
        return acc1
