"""The one atomic writer (ssd_lightning.fileio): a file is the old one or the complete new one; a write the
operating system refuses ends in one WriteError line naming the file, the sizes and what is left."""

from __future__ import annotations

import errno
import json

import pytest

from ssd_lightning.errors import WriteError
from ssd_lightning.fileio import atomic_path, atomic_write, format_bytes, write_error, write_json_atomic


def _refuse(code: int):
    def write(*_args, **_kwargs):
        raise OSError(code, "refused by the test")

    return write


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_a_refused_write_is_one_line_and_leaves_the_previous_file(tmp_path, code, words):
    path = write_json_atomic(tmp_path / "out" / "metrics.json", {"AP": 0.25})
    with pytest.raises(WriteError) as failed, atomic_write(path, "w", needed=2_500_000) as f:
        f.write('{"AP": 0.')
        _refuse(code)()
    line = str(failed.value)
    assert line.startswith(f"{words} while writing {path}") and "\n" not in line
    assert line.endswith(f"; the previous file {path} is intact")
    if code in (errno.ENOSPC, errno.EDQUOT):
        assert "(2.5 MB needed, " in line and " free)" in line
    assert json.loads(path.read_text()) == {"AP": 0.25}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temporary file left


def test_without_a_previous_file_says_nothing_was_written(tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(
        WriteError, match=f"read-only file system while writing {target}; no model was written$"
    ):
        with atomic_path(target, what="model") as tmp:
            tmp.write_bytes(b"half")
            _refuse(errno.EROFS)()
    assert list(tmp_path.iterdir()) == []


def test_errors_that_are_not_the_disk_keep_their_type(tmp_path):
    path = write_json_atomic(tmp_path / "a.json", [1])
    with pytest.raises(TypeError):  # a bug (an object JSON cannot encode) is not a user error
        write_json_atomic(path, {"x": object()})
    assert json.loads(path.read_text()) == [1] and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_torch_writer_failure_without_errno_is_a_full_disk_when_the_room_is_short(tmp_path):
    # torch.save's C++ writer reports ENOSPC as "unexpected pos" and may lose the OSError
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 34312064 vs 34311952")
    huge = 10**18
    found = write_error(err, tmp_path / "last.ckpt", had_previous=True, needed=huge, what="checkpoint")
    assert isinstance(found, WriteError) and found.errno == errno.ENOSPC
    assert str(found).startswith(
        f"no space left on device while writing {tmp_path / 'last.ckpt'} (1000000.0 TB"
    )
    assert write_error(err, tmp_path / "last.ckpt", had_previous=True, needed=1) is None  # room enough: a bug
    assert write_error(ValueError("bad"), tmp_path / "x", had_previous=False) is None


def test_format_bytes():
    assert [format_bytes(n) for n in (12, 1_500, 56_000_000, 2.5e9)] == [
        "12 B",
        "1.5 kB",
        "56.0 MB",
        "2.5 GB",
    ]
