"""TRAIN.COMPILE: torch.compile the transformer blocks one by one ('blocks') or the whole model
('model'), in place.

In place (`nn.Module.compile`) keeps the module tree and therefore the state-dict names: no
`_orig_mod.` prefix reaches a checkpoint, and eager and compiled runs resume each other's files.
Shapes are static (`dynamic=False`): training batches have one shape (drop_last), so a new shape
(e.g. the last evaluation batch) compiles one more graph instead of turning every graph dynamic.

'blocks' compiles each block on its own: blocks of one stage (same shapes, same shift) share one
graph, so compile time grows with the number of distinct block shapes, not with depth, and under
DDP each block's gradients are ready as soon as its backward graph has run (communication overlaps
the backward as in eager mode). 'model' compiles the whole forward, including patch embedding,
head and loss, in one graph: more fusion, longer compile, and under DDP the gradients become ready
only at the end of the single backward graph.
"""

import time

import torch

from config import COMPILE_MODES
from models import transformer_blocks
from models.attention import raise_recompile_limit
from utils.registry import require_choice


class CompileMonitor:
    """Counts torch.compile's compilations in this process and logs each one with its duration, so
    the first steps' compile time is in the log and a compilation after warm-up (a recompile)
    stands out."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.logger = None
        self._started = None
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def _start(self, *args):  # older torch versions pass no arguments
        self._started = time.perf_counter()

    def _end(self, *args):
        if self._started is None:
            return
        took = time.perf_counter() - self._started
        self._started = None
        self.count += 1
        self.seconds += took
        if self.logger is not None:
            trigger = getattr(args[0], 'callback_trigger', None) if args else None
            kind = f'{trigger.name.lower()} ' if trigger is not None else ''
            self.logger.info(
                f'torch.compile: compiled {kind}graph {self.count} in {took:.1f} s '
                f'({self.seconds:.1f} s of compilation so far)'
            )


_monitor = None


def compile_monitor():
    """The process-wide CompileMonitor (created on first use)."""
    global _monitor
    if _monitor is None:
        _monitor = CompileMonitor()
    return _monitor


def compile_model(
    model: torch.nn.Module, mode: str, logger=None, backend: str = 'inductor'
) -> torch.nn.Module:
    """Compile `model` in place as TRAIN.COMPILE `mode` says ('' leaves it eager) and return it.

    Call it after moving the model to its device and before wrapping it in DDP. The first forward
    and backward passes compile (logged with their duration); later steps reuse the graphs.
    """
    require_choice('TRAIN.COMPILE', mode, COMPILE_MODES, 'modes')
    if not mode:
        return model
    targets = transformer_blocks(model) if mode == 'blocks' else [model]
    if not targets:
        raise ValueError(
            f'TRAIN.COMPILE blocks found no transformer blocks in '
            f'{type(model).__name__}; use TRAIN.COMPILE model.'
        )
    # Every block variant (stage, shift, train/eval, batch shape) is one cache entry of the same
    # code; dynamo's default limit of 8 would silently fall back to eager for the rest.
    raise_recompile_limit(4 * len(targets) + 8)
    for module in targets:
        module.compile(backend=backend, dynamic=False)
    monitor = compile_monitor()
    monitor.logger = logger
    if logger is not None:
        what = f'{len(targets)} transformer blocks' if mode == 'blocks' else type(model).__name__
        logger.info(
            f'TRAIN.COMPILE {mode}: {what} compiled with torch.compile (backend '
            f'{backend}) on first use; the first steps include compilation'
        )
    return model
