"""When the training loop saves, and what a stop signal does: the policy beside the loop
(engine/trainer.py); the file layouts and the collective write are checkpoint/'s.

- every SAVE_FREQ epochs and after the last: ``ckpt_epoch_{e}`` (continues at epoch e + 1);
- every CHECKPOINT.STEP_FREQ optimizer steps: ``ckpt_epoch_{e}_step_{k}`` (continues with the next
  batch), the newest CHECKPOINT.KEEP_STEP_CKPTS kept;
- on SIGTERM / SIGINT (engine/preemption.py): a step checkpoint after the current step, then
  Preempted (exit code 75), so running the same command again continues exactly.
"""

import contextlib

import torch

from checkpoint.layout import epoch_checkpoint_path, prune_step_checkpoints, step_checkpoint_path
from checkpoint.save import save_training_state
from engine.preemption import PreemptionHandler
from utils.distributed import all_reduce_max, local_tensor
from utils.errors import NonFiniteLossError, Preempted
from utils.state_dict import nonfinite_tensors, summarize_keys


class CheckpointPolicy:
    """Saves `state` (a TrainingState) as the config says; `last_checkpoint` is the newest path
    written or resumed from (None before either)."""

    def __init__(self, config, state, dist_info, logger):
        self.config = config
        self.state = state
        self.dist_info = dist_info
        self.logger = logger
        self.last_checkpoint = None
        self.preemption = PreemptionHandler()

    @contextlib.contextmanager
    def stop_signals_caught(self):
        """While training: a stop signal only sets a flag, acted on after the current step."""
        self.preemption.install()
        try:
            yield
        finally:
            self.preemption.uninstall()

    def save(self, position, path):
        """Write the state for continuing at `position` ((epoch, step, samples trained in the
        epoch over all ranks)) to `path` (on every rank); return the path written (a directory
        under TRAIN.SHARDING fsdp). Weights that are not finite are never written."""
        self._refuse_nonfinite_weights(path)
        self.last_checkpoint = save_training_state(
            path, self.state, position, self.config, self.dist_info, self.logger
        )
        return self.last_checkpoint

    def _refuse_nonfinite_weights(self, path):
        """Collective: raise NonFiniteLossError on every rank if any rank's weights hold NaN/Inf."""
        params = self.state.model.named_parameters()
        bad = nonfinite_tensors({n: local_tensor(p) for n, p in params})
        flag = torch.tensor([float(bool(bad))], device=self.dist_info.device)
        if all_reduce_max(flag).item():
            last = self.last_checkpoint or 'none written yet'
            raise NonFiniteLossError(
                f'The weights are not finite ({summarize_keys(bad, limit=6) or "on another rank"}'
                f' hold NaN or Inf), so {path} was not written and the newest checkpoint is still '
                f'{last}. Resume from it with a lower TRAIN.BASE_LR, TRAIN.CLIP_GRAD on, or '
                f'bfloat16 / fp32 instead of float16.'
            )

    def after_update(self, epoch, next_step, samples):
        """After an optimizer step; `next_step` is the index of the epoch's next batch, `samples`
        the epoch's samples trained so far over all ranks."""
        config = self.config
        freq = config.CHECKPOINT.STEP_FREQ
        position = (epoch, next_step, samples)
        if freq and self.state.global_update % freq == 0:
            self.save(position, step_checkpoint_path(config.OUTPUT, epoch, next_step))
            if self.dist_info.is_main:
                prune_step_checkpoints(config.OUTPUT, config.CHECKPOINT.KEEP_STEP_CKPTS)
        if self.preemption.stop_requested():
            path = self.save(position, step_checkpoint_path(config.OUTPUT, epoch, next_step))
            raise Preempted(
                f'Stopped by {self.preemption.signal_name} after step {next_step} of '
                f'epoch {epoch}; checkpoint written to {path}. Run the same command '
                f'again (TRAIN.AUTO_RESUME) or pass --resume {path} to continue.'
            )

    def after_epoch(self, epoch):
        config = self.config
        if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
            self.save((epoch + 1, 0, 0), epoch_checkpoint_path(config.OUTPUT, epoch))
