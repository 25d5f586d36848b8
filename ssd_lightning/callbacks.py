"""Lightning callbacks used by the Hydra configs (``conf/callbacks/``)."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl

__all__ = ["ValidationSchedule"]


class ValidationSchedule(pl.Callback):
    """Validate after the listed epochs, or every ``trainer.check_val_every_n_epoch`` epochs, and always after
    the last epoch.

    NVIDIA SSD300 v1.1 evaluates after epochs 21, 31, 37, 42, 48, 53, 59 and 64 (0-based) of 65. Lightning
    can only validate every N epochs and does not validate after the last epoch unless N divides
    ``max_epochs``; this callback decides per epoch (it sets ``trainer.check_val_every_n_epoch`` to 1 on the
    epochs that validate and to a value that skips validation on the others).

    Args:
        epochs: 0-based epochs after which to validate. None: every ``trainer.check_val_every_n_epoch`` epochs
            (Lightning's rule).
        final: also validate after the last epoch (``max_epochs - 1``), so a run always ends with its AP.

    With ``trainer.check_val_every_n_epoch=null`` (validation every N training batches) the callback does
    nothing.
    """

    def __init__(self, epochs: Sequence[int] | None = None, final: bool = True) -> None:
        self.epochs = None if epochs is None else sorted({int(e) for e in epochs})
        self.final = bool(final)
        self._every: int | None = None
        self._active = False

    def should_validate(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether to validate after 0-based ``epoch``."""
        if self.final and max_epochs is not None and max_epochs > 0 and epoch == max_epochs - 1:
            return True
        if self.epochs is not None:
            return epoch in self.epochs
        return self._every is not None and (epoch + 1) % self._every == 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every = trainer.check_val_every_n_epoch
        self._active = self._every is not None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        epoch = trainer.current_epoch
        # (epoch + 1) % (epoch + 2) != 0: Lightning skips validation this epoch.
        trainer.check_val_every_n_epoch = 1 if self.should_validate(epoch, trainer.max_epochs) else epoch + 2

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            trainer.check_val_every_n_epoch = self._every
