"""hiflow_fast.io: output paths checked before any work, and a run's files written all-or-nothing."""

import os

import pytest

from hiflow_fast import HiFlowInputError
from hiflow_fast.io import OutputSet, check_output_path, check_output_paths


def _write(text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return write


def test_commit_moves_every_file_into_place(tmp_path):
    with OutputSet() as outputs:
        outputs.write(tmp_path / "a.png", _write("a"))
        outputs.write(tmp_path / "b.png", _write("b"))
        assert not (tmp_path / "a.png").exists()  # nothing visible before the commit
        outputs.commit()
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]
    assert (tmp_path / "b.png").read_text() == "b"


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_nothing(tmp_path, error):
    def fail(tmp):
        raise error

    with pytest.raises(type(error)):
        with OutputSet() as outputs:
            outputs.write(tmp_path / "a.png", _write("a"))
            outputs.write(tmp_path / "b.png", fail)
            outputs.commit()
    assert os.listdir(tmp_path) == []


def test_a_failed_commit_is_rolled_back_and_restores_replaced_files(tmp_path):
    (tmp_path / "a.png").write_text("old a")
    (tmp_path / "b.png").write_text("old b")
    with OutputSet(overwrite=True) as outputs:
        outputs.write(tmp_path / "a.png", _write("new a"))
        outputs.write(tmp_path / "b.png", _write("new b"))
        # Break the second move: its temporary vanishes before the commit.
        os.unlink(outputs._pending[1][0])
        with pytest.raises(OSError):
            outputs.commit()
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]
    assert (tmp_path / "a.png").read_text() == "old a" and (tmp_path / "b.png").read_text() == "old b"


def test_leaving_without_commit_discards(tmp_path):
    with OutputSet() as outputs:
        outputs.write(tmp_path / "a.png", _write("a"))
    assert os.listdir(tmp_path) == []


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "new.png") == str(tmp_path / "new.png")
    (tmp_path / "old.png").write_text("x")
    check_output_path(tmp_path / "old.png", overwrite=True)
    for bad in [tmp_path / "old.png", tmp_path, tmp_path / "no" / "x.png", "/proc/x.png", ""]:
        with pytest.raises(HiFlowInputError) as info:
            check_output_path(bad, field="--output")
        assert info.value.field == "--output"
    with pytest.raises(HiFlowInputError, match="different path"):
        check_output_paths([tmp_path / "a.png", tmp_path / "." / "a.png"])
    assert sorted(os.listdir(tmp_path)) == ["old.png"]  # the writability probe leaves nothing
