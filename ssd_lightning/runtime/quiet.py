"""Third-party chatter a new user reads as trouble, each kept off the console at its source.

Called once by :func:`ssd_lightning.runtime.entry.run_entry_point` before Hydra configures logging (Hydra's
``disable_existing_loggers: false`` keeps the levels and filters set here). Nothing of our own, and no warning
or error of anyone's, is hidden:

* ``alembic`` (imported by Optuna and by MLflow's SQLite store) logs seven ``setup plugin alembic...`` lines
  at INFO on import, and its schema migrations when MLflow creates its database: its loggers are set to
  WARNING.
* ``mlflow.store.db.utils`` says at INFO that it creates or updates its tables: WARNING.
* Lightning's ``💡 Tip:`` lines (install ``litlogger`` / ``litmodels``) are advertisements logged at INFO by
  ``pytorch_lightning.utilities.rank_zero``: a filter drops exactly those records; the logger's other lines
  (devices found, limits, why training stopped) stay.
* torch 2.14 deprecated ``torch.utils._pytree.LeafSpec``, which Lightning 2.6.6 (the newest release) still
  builds in ``CombinedLoader``: this one ``FutureWarning``, raised from that Lightning module only, is
  ignored. None of our code uses ``LeafSpec``; drop the filter when Lightning moves off it.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["QUIET_LOGGERS", "quiet_third_party_output"]

#: logger name -> the lowest level shown
QUIET_LOGGERS = {"alembic": logging.WARNING, "mlflow.store.db.utils": logging.WARNING}

_LIGHTNING_TIPS = "pytorch_lightning.utilities.rank_zero"


def _not_an_install_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


def quiet_third_party_output() -> None:
    """Set the levels of :data:`QUIET_LOGGERS`, drop Lightning's install tips and Lightning's ``LeafSpec``
    deprecation warning (see the module docstring). Idempotent."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    tips = logging.getLogger(_LIGHTNING_TIPS)
    if _not_an_install_tip not in tips.filters:
        tips.addFilter(_not_an_install_tip)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"pytorch_lightning\.utilities\._pytree",
    )
