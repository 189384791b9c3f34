"""Stop a training run cleanly on Ctrl-C (SIGINT) or SIGTERM: checkpoint at the current update, say how to resume.

The signal handler only records the signal, so the update in flight (and any checkpoint or Hub push being
written) finishes untouched; the loop asks `StopSignals.requested` after each update and, when it answers, saves
a checkpoint at that update, prints `stop_message` and exits with `exit_code` (130 for SIGINT, 143 for SIGTERM,
the shell's convention): `stop_run`. A second signal stops at once, without saving. A checkpoint is collective, so every
process must stop at the same update: `requested` takes the maximum of the flags over processes (a launcher
forwards the signal to every process, but a job scheduler may signal only one).
"""

import os
import signal
import threading
from typing import Optional

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A context manager catching SIGINT / SIGTERM while training (a no-op outside the main thread)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopSignals":
        """Catch the signals from now on; returns self."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def restore(self) -> None:
        """Give the signals back to the handlers they had before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc_info) -> bool:
        self.restore()
        return False

    def _handle(self, signum, frame) -> None:
        """First signal: remember it. Second: stop now, as without this handler."""
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        os.write(2, f"\n{signal.Signals(signum).name}: saving a checkpoint after this update, then stopping "
                    "(send it again to stop at once, without saving).\n".encode())

    def requested(self, accelerator) -> Optional[int]:
        """The signal to stop for, the same in every process (None: go on). Call it once per update in every process."""
        flag = self.received or 0
        if accelerator.num_processes > 1:
            flag = int(accelerator.gather(torch.tensor([flag], device=accelerator.device)).max().item())
        return flag or None


def exit_code(signum: int) -> int:
    """The shell's exit status of a process stopped by `signum`: 128 + signum (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


def stop_run(accelerator, signum: int, update: int, checkpoint, resume_command: str) -> None:
    """End the run after `checkpoint` was saved for a stop signal: trackers closed, one line printed, exit 128 + signum."""
    accelerator.end_training()
    if accelerator.is_main_process:
        print(stop_message(signum, update, checkpoint, resume_command), flush=True)
    raise SystemExit(exit_code(signum))


def stop_message(signum: int, update: int, checkpoint, resume_command: str) -> str:
    """The one line printed when a run stops on a signal: what was saved, and the exact command that resumes."""
    return (f"Stopped by {signal.Signals(signum).name} at update {update}: saved {checkpoint}. "
            f"Resume with: {resume_command}")
