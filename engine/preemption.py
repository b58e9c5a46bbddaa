"""Graceful stop on SIGTERM / SIGINT (what SLURM and most schedulers send before a kill).

The handler only sets a flag. The training loop asks `stop_requested()` after each optimizer step;
under torchrun the ranks agree through a small all-reduce on a CPU (gloo) group, so every rank stops
after the same step even if the signal reached them at different times, and no GPU sync is needed.
DataLoader workers leave stop signals to the main process (data/worker_signals.py).
"""

import signal

import torch
import torch.distributed as dist


class PreemptionHandler:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name = None
        self._previous = {}
        self._group = None
        self._flag = torch.zeros(1, dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            # A CPU group so the agreement never waits on the GPU stream.
            self._group = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else None
            self._distributed = True
        else:
            self._distributed = False

    def install(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name

    def stop_requested(self):
        """True on every rank once any rank has received a stop signal."""
        if not self._distributed:
            return self.signal_name is not None
        self._flag.fill_(int(self.signal_name is not None))
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        if self._flag.item() and self.signal_name is None:
            self.signal_name = 'a signal on another rank'
        return bool(self._flag.item())
