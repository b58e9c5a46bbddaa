"""DataLoader workers leave stop signals (SIGTERM, SIGINT) to the main process, which finishes its
step, saves and stops cleanly (engine/preemption.py); see `shield_worker`."""

import multiprocessing
import os
import signal
import threading


def shield_worker(main_pid):
    """Called first in each DataLoader worker: stop signals are the main process's business.

    A stop reaches the whole process group or job (Ctrl-C, `timeout`, `kill -TERM -PGID`, systemd,
    `scancel` without --signal=B:); a worker killed by it would crash the main process mid-step,
    before it could save. So workers ignore SIGINT, and SIGTERM from anyone but the main process
    (or their parent): the main process finishes the step, saves, and ends its workers as usual.
    SIGTERM from the main process still ends a worker at once (multiprocessing uses it at exit),
    so a failed run never waits on its workers; and a worker whose main process died (SIGKILL)
    exits by PyTorch's watchdog. Where `signal.sigwaitinfo` is missing (macOS, Windows), SIGTERM
    keeps its default and only SIGINT is ignored.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, 'sigwaitinfo'):
        return
    # Blocked in this thread and every thread started after it; the waiter below receives it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(
        target=_end_on_sigterm_from,
        args=({main_pid, os.getppid()},),
        daemon=True,
        name='sigterm-from-main',
    ).start()


def _end_on_sigterm_from(senders):
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid in senders:
            os._exit(0)  # what PyTorch's worker handler does for its parent's SIGTERM


def worker_start_context(num_workers):
    """The multiprocessing context for DataLoader workers: under 'fork', SIGTERM is blocked while
    a worker is forked, so it is born shielded (a group SIGTERM in the instant before
    shield_worker runs would otherwise kill it) and the signal waits for the main process's
    handler. Other start methods: None (the DataLoader default)."""
    # allow_none: asking must not fix the start method; the first listed is the default.
    method = (
        multiprocessing.get_start_method(allow_none=True)
        or multiprocessing.get_all_start_methods()[0]
    )
    if num_workers == 0 or method != 'fork':
        return None
    return _ShieldedForkContext()


if hasattr(multiprocessing.context, 'ForkContext'):  # not on Windows

    class _ShieldedForkProcess(multiprocessing.context.ForkProcess):
        def start(self):
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                super().start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    class _ShieldedForkContext(multiprocessing.context.ForkContext):
        Process = _ShieldedForkProcess
