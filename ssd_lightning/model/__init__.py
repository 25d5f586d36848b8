"""SSD300 model: ResNet trunk (:mod:`.backbone`) and detection heads (:mod:`.ssd300`)."""

from ssd_lightning.model.ssd300 import SSD300

__all__ = ["SSD300"]
