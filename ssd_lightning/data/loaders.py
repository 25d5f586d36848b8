"""The iterables the data module hands Lightning: DALI pipelines wrapped per epoch, DALI failures made clear.

:class:`TrainLoader` builds one pipeline per epoch (epoch ``e``'s order and augmentation depend only on the
seed and ``e``, so a resumed run repeats the uninterrupted run's data); :class:`EvalLoader` yields every
validation image exactly once per epoch over all ranks and restarts cleanly after a partial pass. A DALI
decode failure is traced back to the file behind it (:func:`find_undecodable_image`) and raised as a one-line
:class:`~ssd_lightning.errors.DataError`. Batch formats: :mod:`ssd_lightning.data.datamodule`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ssd_lightning.data.image_check import dali_decode_error
from ssd_lightning.data.pipelines import READER_NAME
from ssd_lightning.errors import ConfigError, DataError

__all__ = ["EvalLoader", "TrainLoader", "find_undecodable_image", "gpu_failure"]

log = logging.getLogger(__name__)


def _dali_reason(exc: BaseException) -> str:
    """The informative line of a DALI error (the message is a multi-line C++ report)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        for key in ("Error in thread", "Assert on", "nvImageCodec", "Failed to decode", "[/opt/dali"):
            if key in ln and not ln.startswith("C++ context"):
                return ln.split(": ", 1)[1] if ln.startswith("Error in thread") and ": " in ln else ln
    return lines[-1] if lines else type(exc).__name__


def _is_decode_failure(exc: BaseException) -> bool:
    text = str(exc)
    return any(k in text for k in ("decoders.image", "nvImageCodec", "decode", "Decode"))


# What a DALI error says when the GPU, not a file, failed (checked before the decode-failure hunt).
_OUT_OF_MEMORY = (
    "out of memory",
    "OUT_OF_MEMORY",
    "cudaErrorMemoryAllocation",
    "NVJPEG_STATUS_ALLOCATOR_FAILURE",
)
_GPU_START = (
    "CUDA driver",
    "CUDA error",
    "cudaError",
    "CUDA_ERROR",
    "NVJPEG_STATUS_NOT_INITIALIZED",
    "NVJPEG_STATUS_ARCH_MISMATCH",
    "NVJPEG_STATUS_INTERNAL_ERROR",
    "Failed to create decoder",
    "no CUDA-capable device",
)


def gpu_failure(exc: BaseException, split: str) -> ConfigError | None:
    """The one-line error for a DALI failure of the GPU itself (out of memory, a decoder or CUDA that does
    not start), naming the setting to change; None when the message names no such failure (then it may be a
    file: :func:`find_undecodable_image` looks)."""
    text = str(exc)
    reason = _dali_reason(exc)
    if any(k in text for k in _OUT_OF_MEMORY):
        return ConfigError(
            f"the DALI {split} pipeline ran out of GPU memory ({reason}); lower data.batch_size"
            f"{'' if split == 'train' else ' / data.val_batch_size'} or data.prefetch_queue_depth, or decode "
            "on the CPU with data.device=cpu"
        )
    if any(k in text for k in _GPU_START):
        return ConfigError(
            f"the DALI {split} pipeline's GPU decoder or CUDA failed to start ({reason}); check the driver "
            "and that the GPU is free, or decode on the CPU with data.device=cpu"
        )
    return None


def find_undecodable_image(paths: Sequence[Path]) -> tuple[Path, str] | None:
    """Decode ``paths`` one by one with DALI's own CPU decoder; the first failing (path, reason), or None."""
    for p in paths:
        reason = dali_decode_error(p)
        if reason is not None:
            return Path(p), reason
    return None


class _DaliLoader:
    """Shared part of the train/eval iterables: DALI iterator construction, DALI failures -> DataError."""

    output_map: tuple[str, ...] = ()

    def __init__(
        self,
        build_pipeline: Callable[[], Any],
        split: str,
        images_dir: Path,
        candidate_files: Callable[[int], list[Path]],
        cast: torch.dtype | None,
    ) -> None:
        self._build_pipeline = build_pipeline
        self.split = split
        self.images_dir = images_dir
        self._candidates = candidate_files
        self._cast = cast
        self._pipe = None
        self._it = None
        self._position = 0  # samples consumed in the current DALI epoch (to locate a decode failure)

    def _fail(self, exc: BaseException) -> DataError | ConfigError:
        self.release()
        gpu = gpu_failure(exc, self.split)
        if gpu is not None:
            return gpu
        if _is_decode_failure(exc):
            candidates = self._candidates(self._position)
            if len(candidates) > 500:
                log.warning(
                    "DALI could not decode an image of the %s split; decoding %d candidate files to name it",
                    self.split,
                    len(candidates),
                )
            found = find_undecodable_image(candidates)
            if found is not None:
                path, reason = found
                return DataError(
                    f"cannot decode {path} ({reason}); replace the file or remove it from the {self.split} "
                    "annotation file"
                )
        return DataError(
            f"the DALI {self.split} pipeline over {self.images_dir} failed: {_dali_reason(exc)}; check the "
            f"images and annotations of the {self.split} split"
        )

    def _build(self) -> None:
        self.release()
        self._position = 0
        try:
            self._pipe, self._it = self._started(self._build_pipeline)
        except RuntimeError as e:
            raise self._fail(e) from None

    def _started(self, build_pipeline: Callable[[], Any]) -> tuple[Any, Any]:
        """A built pipeline and its iterator (which runs the first batch ahead)."""
        # lazy: DALI's torch plugin is heavy and only needed once a pipeline is built
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = build_pipeline()
        pipe.build()
        iterator = DALIGenericIterator(
            pipe,
            list(self.output_map),
            reader_name=READER_NAME,
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=False,
        )
        return pipe, iterator

    def _next_raw(self) -> dict[str, torch.Tensor]:
        """Next DALI batch of this pipeline; StopIteration at the end of the DALI epoch."""
        try:
            out = next(self._it)[0]
        except StopIteration:
            raise
        except RuntimeError as e:
            raise self._fail(e) from None
        self._position += int(out["images"].shape[0])
        return out

    def _reset_epoch(self) -> None:
        self._it.reset()
        self._position = 0

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self._cast) if self._cast is not None else images

    def release(self) -> None:
        """Drop the DALI pipeline (it is rebuilt on the next ``iter()``)."""
        self._it = None
        self._pipe = None


class TrainLoader(_DaliLoader):
    """Training iterable: one epoch of ``len(self)`` full batches per ``iter()``.

    Each ``iter()`` is one epoch ``e``: ``trainer.current_epoch`` when a trainer runs it (``epoch_source``),
    else the number of earlier ``iter()`` calls. The DALI pipeline is rebuilt for every epoch by
    ``build_epoch(e)`` (this rank's shard of the epoch's global permutation, augmentation seeded by epoch
    and rank), so an epoch's data is a function of the seed and ``e`` alone: a run resumed at epoch ``e``
    sees what the uninterrupted run saw. A partially consumed ``iter()`` (``limit_train_batches``,
    ``max_steps``) is dropped; the next ``iter()`` starts the next epoch.

    Lightning saves :meth:`state_dict` in checkpoints: after a mid-epoch resume (a preemption checkpoint) the
    next ``iter()`` replays the epoch's first ``batches`` batches through the pipeline, drops them and yields
    the rest, so the epoch continues with exactly the batches the uninterrupted run had.

    While an epoch runs, the next epoch's pipeline is built in a background thread (``background``), which
    also runs its first batch ahead: the next ``iter()`` of that epoch takes it over, so the epoch boundary
    costs no pipeline build. It is the pipeline ``build_epoch(e + 1)`` would give then (an epoch's data
    depends on ``e`` only); one that does not match the epoch asked for is dropped and built anew.
    """

    output_map = ("images", "boxes", "labels")
    background = True

    def __init__(
        self,
        build_epoch: Callable[[int], Any],
        *args,
        batch_size: int,
        num_batches: int,
        with_image_ids: bool = False,
        epoch_source: Callable[[], int | None] | None = None,
        progress_source: Callable[[], int | None] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(lambda: build_epoch(self.epoch), *args, **kwargs)
        self._build_epoch = build_epoch
        self._ahead: tuple[int, Future] | None = None  # (epoch, future of (pipeline, iterator))
        self.batch_size = batch_size
        self.num_batches = num_batches
        if with_image_ids:
            self.output_map = (*self.output_map, "image_ids")
        self._epoch_source = epoch_source
        self._progress_source = progress_source
        self.epoch = -1  # the epoch in flight (-1: none yet)
        self._yielded = 0  # batches yielded in this epoch
        self._resume: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # a generator: nothing runs before the first batch is asked for (Lightning calls iter() to check)
        epoch = self._epoch_source() if self._epoch_source is not None else None
        self.epoch = int(epoch) if epoch is not None else self.epoch + 1
        self._yielded = 0
        self._take_or_build()
        skip = 0
        if self._resume is not None and self._resume["epoch"] == self.epoch:
            skip = min(int(self._resume["batches"]), self.num_batches)
        self._resume = None
        if skip:
            log.info("train epoch %d resumes at batch %d: replaying the batches before it", self.epoch, skip)
        for _ in range(skip):
            self._next_batch()
        self._yielded = skip
        for k in range(self.num_batches - skip):
            batch = self._next_batch()
            self._yielded += 1
            if k == 0:  # after this epoch's first batch, not in the way of it
                self._build_ahead(self.epoch + 1)
            yield batch
        self._retire()  # the next epoch has its own pipeline (built ahead)

    def _take_or_build(self) -> None:
        """Use the pipeline built ahead for this epoch when there is one, else build it now."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0] != self.epoch:
            self._drop(ahead)
            self._build()
            return
        self._retire()
        self._position = 0
        try:
            self._pipe, self._it = ahead[1].result()
        except RuntimeError as e:
            raise self._fail(e) from None

    def _build_ahead(self, epoch: int) -> None:
        if not self.background:
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="next-epoch-pipeline")
        self._ahead = (epoch, pool.submit(self._started, lambda: self._build_epoch(epoch)))
        pool.shutdown(wait=False)

    def _retire(self) -> None:
        """Drop the current pipeline in a background thread: destroying a DALI pipeline waits for its worker
        threads (0.6-0.9 s measured on the COCO-sized set), time the epoch boundary would otherwise stall."""
        old = [self._pipe, self._it]
        self._pipe = self._it = None
        threading.Thread(target=old.clear, name="retired-pipeline").start()

    @staticmethod
    def _drop(ahead: tuple[int, Future] | None) -> None:
        if ahead is not None:
            with contextlib.suppress(Exception):  # an unused pipeline's failure is not this epoch's
                ahead[1].result()

    def release(self) -> None:
        """Drop the DALI pipeline and the one built ahead (rebuilt on the next ``iter()``)."""
        super().release()
        ahead, self._ahead = getattr(self, "_ahead", None), None
        self._drop(ahead)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        while True:
            try:
                raw = self._next_raw()
            except StopIteration:
                raise RuntimeError(
                    f"the DALI train pipeline of epoch {self.epoch} ended after {self._position} images, "
                    f"before {self.num_batches} batches of {self.batch_size}"
                ) from None
            if raw["images"].shape[0] < self.batch_size:
                continue  # the shard's last, partial batch (never reached: the shard has enough images)
            batch = {
                "images": self._images(raw["images"]),
                "boxes": raw["boxes"],
                "labels": raw["labels"].long(),
            }
            if "image_ids" in raw:
                batch["image_ids"] = raw["image_ids"].reshape(-1).long()
            return batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: the epoch in flight and how many of its batches were trained on (the
        trainer's count when it runs this loader: Lightning fetches one batch ahead)."""
        done = self._progress_source() if self._progress_source is not None else None
        return {"epoch": int(self.epoch), "batches": int(done if done is not None else self._yielded)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume epoch ``state["epoch"]`` after its first ``state["batches"]`` batches (next ``iter()``)."""
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


class EvalLoader(_DaliLoader):
    """Evaluation iterable: each ``iter()`` yields this rank's shard once, in order, without padding
    samples."""

    output_map = ("images", "image_ids")

    def __init__(
        self, *args, batch_size: int, shard_size: int, image_sizes: Mapping[int, tuple[int, int]], **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size
        self.shard_size = shard_size
        self._sizes = image_sizes
        self._dirty = False  # the DALI epoch in flight was not finished
        self._generation = 0

    def __len__(self) -> int:
        return math.ceil(self.shard_size / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._epoch()

    def _epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        self._generation += 1
        generation = self._generation
        if self.shard_size == 0:
            return
        if self._it is None or self._dirty:
            self._build()
        self._dirty = True
        seen = 0
        while seen < self.shard_size:
            if generation != self._generation:
                return  # a newer iter() took over the pipeline
            try:
                raw = self._next_raw()
            except StopIteration:
                raise RuntimeError(
                    f"DALI {self.split} pipeline ended after {seen} of {self.shard_size} images"
                ) from None
            n = min(int(raw["images"].shape[0]), self.shard_size - seen)
            if n == 0:
                continue
            seen += n
            ids = raw["image_ids"][:n].reshape(-1).long().cpu()
            batch = {
                "images": self._images(raw["images"][:n]),
                "image_ids": ids,
                "image_sizes": torch.tensor([self._sizes[int(i)] for i in ids], dtype=torch.int64).reshape(
                    -1, 2
                ),
            }
            if seen >= self.shard_size:
                self._finish()
            yield batch

    def _finish(self) -> None:
        """Consume the padding left in the DALI epoch and reset, so the next ``iter()`` reuses the
        pipeline."""
        while True:
            try:
                self._next_raw()
            except StopIteration:
                break
        self._reset_epoch()
        self._dirty = False
