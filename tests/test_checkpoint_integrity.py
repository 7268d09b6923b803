"""Damaged checkpoints and run files are never resumed from, and never stop a re-run that has an
older good checkpoint: checksums, malformed markers, unreadable folders, unloadable files, a broken
config.yaml, all checkpoints damaged, the save's temporary files and its flushes (1 process).

One short run is trained once; each case copies its run folder and damages the copy."""

import json
import logging
import os
import shutil
import zlib

import pytest

from ft_train.lit import checkpointing
from ft_train.lit.checkpointing import MARKER, crc32, find_resume_checkpoint, verify
from ft_train.train import resume_path, train

from .test_resume import config

NEWEST, OLDER = "step-00000004", "step-00000002"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity")
    train(config(out, "base", 4, "data.num_workers=0"))  # step folders 2 and 4
    return out


@pytest.fixture
def run(trained, request):
    """A copy of the trained run (its own run_id); returns (output dir, run id, checkpoints dir)."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "_")[:60]
    shutil.copytree(trained / "base", trained / name)
    yield trained, name, trained / name / "clip" / "checkpoints"
    shutil.rmtree(trained / name, ignore_errors=True)


def resumed_from(caplog) -> str:
    [line] = [r.getMessage() for r in caplog.records if "(resuming from" in r.getMessage()]
    return line


def sizes_only(step_dir):
    """Rewrite the marker as it was written before checksums: ``{"files": {name: size}}``."""
    marker = json.loads((step_dir / MARKER).read_text())
    marker["files"] = {name: entry["bytes"] for name, entry in marker["files"].items()}
    (step_dir / MARKER).write_text(json.dumps(marker))


def test_marker_records_size_and_crc32_of_every_file(run):
    _, _, ckpt_dir = run
    marker = json.loads((ckpt_dir / NEWEST / MARKER).read_text())
    ckpt = ckpt_dir / NEWEST / "model.ckpt"
    assert marker["files"]["model.ckpt"] == {"bytes": ckpt.stat().st_size,
                                             "crc32": f"{zlib.crc32(ckpt.read_bytes()):08x}"}
    assert all(set(entry) == {"bytes", "crc32"} for entry in marker["files"].values())


def test_same_size_corruption_is_caught_and_the_rerun_resumes_from_the_older_folder(run, caplog):
    out, name, ckpt_dir = run
    ckpt = ckpt_dir / NEWEST / "model.ckpt"
    data = bytearray(ckpt.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])  # 4 KiB flipped in place
    ckpt.write_bytes(bytes(data))
    assert "model.ckpt has CRC-32" in verify(ckpt.parent)
    with caplog.at_level(logging.INFO):
        result = train(config(out, name, 5, "data.num_workers=0"))
    assert "checkpoint" in caplog.text and "is damaged (model.ckpt has CRC-32" in caplog.text
    assert OLDER in resumed_from(caplog)
    assert result["trainer"].global_step == 5


@pytest.mark.parametrize("marker", ["checksums", "sizes only"])
def test_zeroed_end_of_the_same_size_falls_back(run, marker, caplog):
    _, _, ckpt_dir = run
    if marker == "sizes only":
        sizes_only(ckpt_dir / NEWEST)
    ckpt = ckpt_dir / NEWEST / "model.ckpt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-4096] + bytes(4096))  # the zip's central directory is gone
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(ckpt_dir).name == OLDER
    # a size-only marker still verifies: torch's zip reader is what catches it
    expected = "CRC-32" if marker == "checksums" else "torch cannot load model.ckpt"
    assert expected in caplog.text and "falling back" in caplog.text


def test_marker_written_before_checksums_is_still_accepted(run, caplog):
    _, _, ckpt_dir = run
    sizes_only(ckpt_dir / NEWEST)
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(ckpt_dir).name == NEWEST
    assert caplog.text == ""
    ckpt = ckpt_dir / NEWEST / "model.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert "model.ckpt has 1000 bytes" in verify(ckpt.parent)  # sizes still checked


@pytest.mark.parametrize("text", ["null", "[]", '{"files": []}', '{"files": {}}', '{"files": {"model.ckpt": "big"}}',
                                  '{"files": {"model.ckpt": {"bytes": 3}}}', '{"files": {"spec.json": 10}}', '{"fil'])
def test_malformed_marker_falls_back_with_a_warning(run, text, caplog):
    out, _, ckpt_dir = run
    (ckpt_dir / NEWEST / MARKER).write_text(text)
    with caplog.at_level(logging.WARNING):
        assert resume_path("auto", ckpt_dir).endswith(f"{OLDER}/model.ckpt")
    assert f"{NEWEST} is damaged (unreadable marker" in caplog.text


def test_unreadable_step_folder_falls_back_with_a_warning(run, monkeypatch, caplog):
    _, _, ckpt_dir = run
    folder = ckpt_dir / NEWEST
    if os.geteuid() == 0:  # root reads through chmod 000: have the OS refuse as it would anyone else
        real_read_text = type(folder).read_text

        def read_text(self, *args, **kwargs):
            if self.parent == folder:
                raise PermissionError(13, "Permission denied", str(self))
            return real_read_text(self, *args, **kwargs)

        monkeypatch.setattr(type(folder), "read_text", read_text)
    else:
        folder.chmod(0)
    try:
        with caplog.at_level(logging.WARNING):
            assert find_resume_checkpoint(ckpt_dir).name == OLDER
    finally:
        folder.chmod(0o755)
    assert f"{NEWEST} is damaged (cannot read it (PermissionError" in caplog.text


@pytest.mark.parametrize("broken", ["half-written", "a list"])
def test_broken_config_yaml_warns_and_the_rerun_resumes(run, broken, caplog):
    out, name, ckpt_dir = run
    config_file = out / name / "clip" / "config.yaml"
    text = config_file.read_text()
    # cut short mid-write (a ParserError), or valid yaml but no mapping
    config_file.write_text(text[: len(text) // 2] + '\n  key: "unterminated' if broken == "half-written" else "- 1\n")
    with caplog.at_level(logging.INFO):
        train(config(out, name, 5, "data.num_workers=0"))
    assert f"{config_file} is unreadable" in caplog.text
    assert NEWEST in resumed_from(caplog)
    assert config_file.read_text().count("\n") > text.count("\n") // 2 + 5  # rewritten whole
    assert not [p.name for p in config_file.parent.iterdir() if p.name.endswith(".tmp")]


def damage_all(ckpt_dir):
    for step_dir in ckpt_dir.iterdir():
        (step_dir / MARKER).write_text("null")


def test_all_checkpoints_damaged_stops_resume_auto_with_the_fix(run):
    out, name, ckpt_dir = run
    damage_all(ckpt_dir)
    with pytest.raises(RuntimeError, match=rf"resume=auto: none of the 2 step folders in {ckpt_dir} is usable.*resume=never"):
        train(config(out, name, 5, "data.num_workers=0"))


def test_all_checkpoints_damaged_starts_over_under_auto_or_fresh(run, caplog):
    _, _, ckpt_dir = run
    damage_all(ckpt_dir)
    with caplog.at_level(logging.WARNING):
        assert resume_path("auto_or_fresh", ckpt_dir) is None
    assert "resume=auto_or_fresh: none of the 2 step folders" in caplog.text
    assert resume_path("auto", ckpt_dir.parent / "nothing-here") is None  # no folders at all: a fresh start


@pytest.mark.parametrize("value", ["sometimes", "/nonexistent/step-00000004"])
def test_resume_is_validated_before_anything_is_built(tmp_path, value):
    with pytest.raises(ValueError, match=r"^resume='.*': must be auto, auto_or_fresh, never or the path of a step folder"):
        train(config(tmp_path, "bad", 2, f"resume={value}"))


def test_explicit_resume_folder_that_does_not_load_names_it(run):
    _, _, ckpt_dir = run
    sizes_only(ckpt_dir / NEWEST)
    ckpt = ckpt_dir / NEWEST / "model.ckpt"
    ckpt.write_bytes(bytes(ckpt.stat().st_size))
    with pytest.raises(FileNotFoundError, match=rf"resume: {ckpt.parent} is not a usable checkpoint folder \(torch cannot"):
        resume_path(str(ckpt.parent), ckpt_dir)


def test_save_writes_nothing_to_tmpdir(tmp_path, monkeypatch):
    # Lightning's default CheckpointIO writes the whole file under $TMPDIR first, then moves it.
    import tempfile

    missing = tmp_path / "no-such-tmpdir"
    monkeypatch.setenv("TMPDIR", str(missing))
    monkeypatch.setattr(tempfile, "tempdir", str(missing))  # what tempfile reads TMPDIR into, once
    result = train(config(tmp_path, "tmpdir", 2, "data.num_workers=0"))
    assert verify(result["checkpoint_dir"]) is None
    assert not missing.exists()


def test_every_file_and_folder_is_flushed_before_the_commit_and_the_rename_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_open, real_replace = os.fsync, os.open, os.replace
    names = {}

    def spy_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        names[fd] = str(path)
        return fd

    def spy_fsync(fd):
        events.append(("fsync", names.get(fd, fd)))
        return real_fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "open", spy_open)
    monkeypatch.setattr(checkpointing.os, "fsync", spy_fsync)
    monkeypatch.setattr(checkpointing.os, "replace", spy_replace)
    train(config(tmp_path, "sync", 2, "data.num_workers=0"))
    ckpt_dir = tmp_path / "sync" / "clip" / "checkpoints"
    tmp = str(ckpt_dir / ".step-00000002.tmp")
    rename = events.index(("replace", tmp, str(ckpt_dir / "step-00000002")))
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert {f"{tmp}/model.ckpt", f"{tmp}/{MARKER}", tmp} <= synced_before
    assert ("fsync", str(ckpt_dir)) in events[rename:]
    assert crc32(ckpt_dir / "step-00000002" / "model.ckpt")  # and it is the file the marker names


def test_config_yaml_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from ft_train import train as train_module

    config_file = tmp_path / "config.yaml"
    config_file.write_text("seed: 0\n")

    def power_cut(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(train_module.os, "fsync", power_cut)  # dies after writing, before the rename
    with pytest.raises(OSError):
        train_module.write_atomically(config_file, "seed: 5\nlr: 1\n")
    assert config_file.read_text() == "seed: 0\n"  # the old file, not half of the new one
    monkeypatch.undo()
    train_module.write_atomically(config_file, "seed: 5\n")
    assert config_file.read_text() == "seed: 5\n"
