"""GPU failures of a DALI pipeline are reported as what they are, with the setting to change, not as a
corrupt image; the image check decodes on the CPU only (no GPU context, whichever GPU the rank has)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssd_lightning.data.image_check import cpu_decode_pipeline, dali_decode_error
from ssd_lightning.data.loaders import EvalLoader, gpu_failure
from ssd_lightning.errors import ConfigError, DataError

# DALI 2.4 error texts (the multi-line C++ report, shortened)
OOM = (
    "Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image_slice`,\n"
    "encountered:\nCan't allocate 1073741824 bytes on device 0.\nCUDA error (2): out of memory\n"
    "C++ context: [/opt/dali/dali/core/mm/default_resources.cc:120]"
)
DECODER_START = (
    "Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`,\nencountered:\n"
    "nvImageCodec failure: NVJPEG_STATUS_ARCH_MISMATCH while creating the hardware decoder"
)
CORRUPT = (
    "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\nencountered:\n"
    "Error in thread 0: [/opt/dali/dali/operators/imgcodec/decoder.cc:402] Failed to decode sample #3"
)


def test_gpu_out_of_memory_and_decoder_start_are_named_with_the_setting():
    oom = gpu_failure(RuntimeError(OOM), "train")
    assert isinstance(oom, ConfigError) and "out of GPU memory" in str(oom)
    assert "data.batch_size" in str(oom) and "data.device=cpu" in str(oom) and "\n" not in str(oom)
    start = gpu_failure(RuntimeError(DECODER_START), "val")
    assert isinstance(start, ConfigError) and "failed to start" in str(start)
    assert "data.device=cpu" in str(start)
    assert gpu_failure(RuntimeError(CORRUPT), "train") is None  # a file: the loader looks for it


def test_the_loader_reports_a_gpu_failure_without_hunting_for_a_corrupt_file(tmp_path):
    def no_hunt(_position: int) -> list[Path]:
        raise AssertionError("a GPU failure must not start the search for an undecodable file")

    loader = EvalLoader(
        lambda: None, "val", tmp_path, no_hunt, None, batch_size=2, shard_size=4, image_sizes={}
    )
    assert isinstance(loader._fail(RuntimeError(OOM)), ConfigError)
    corrupt = loader._fail(RuntimeError("the reader lost a file handle"))
    assert isinstance(corrupt, DataError) and "check the images" in str(corrupt)


def test_the_image_check_decoder_runs_on_the_cpu_only(tmp_path):
    pipe = cpu_decode_pipeline(np.frombuffer(b"\xff\xd8\xff", dtype=np.uint8))
    pipe.build()
    assert pipe.device_id is None  # DALI's CPU_ONLY device: no CUDA context is created
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    assert dali_decode_error(broken) == "corrupt image data"


@pytest.mark.parametrize("message", [OOM, DECODER_START])
def test_gpu_messages_mention_decode_but_are_not_decode_failures(message):
    assert "decode" in message  # what the old rule took for a corrupt image
    assert gpu_failure(RuntimeError(message), "train") is not None
