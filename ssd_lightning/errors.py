"""The errors a user can cause, each ending a script in one ``error: ...`` line (``docs/ARCHITECTURE.md``).

The bottom of the package: this module imports nothing of the project, so every layer can raise these.
:func:`ssd_lightning.runtime.entry.run_task` turns them into one line on stderr and exit code 1; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "USER_ERRORS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataWarning",
    "ExportError",
    "NonFiniteLossError",
    "PeerLostError",
    "WriteError",
]


class ConfigError(ValueError):
    """A configuration a user wrote that cannot work (one-line message naming the key and the fix)."""


class DataError(ValueError):
    """A data set that cannot be used as it is (one-line message naming the file or entry and the fix)."""


class DataWarning(UserWarning):
    """Annotations that were dropped or repaired (one warning per annotation file, with counts)."""


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not an SSD300 checkpoint (one-line message)."""


class NonFiniteLossError(RuntimeError):
    """Training stopped: too many optimizer steps in a row with a non-finite loss or gradients."""


class WriteError(OSError):
    """An output file could not be written (disk full, permission, read-only file system, quota); the file
    that was there before is intact and no temporary file is left (one-line message naming both).

    ``WriteError(errno_code, message)``: ``str()`` is the message alone (no ``[Errno N]`` prefix).
    """

    def __str__(self) -> str:
        return str(self.strerror)


class PeerLostError(RuntimeError):
    """A DDP rank died (killed, out of memory, a lost node): the survivors stop, naming it and the resume."""


class ExportError(ConfigError):
    """An exported model file that cannot be written or does not reproduce the PyTorch model."""


#: what the entry points report as one line (a diverged training is a user error too: the checkpoints hold
#: the last good model)
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    CheckpointError,
    NonFiniteLossError,
    PeerLostError,
    WriteError,
)
