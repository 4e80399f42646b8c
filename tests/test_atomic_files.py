"""Checkpoint and safetensors files: checksums, refusals of damaged or foreign files naming the file, no non-finite
writes, umask-honouring modes, stale temp files, and the fit check of stored tensors against a model."""

import errno
import multiprocessing
import os
import random
import stat
import subprocess
import time

import pytest
import torch
from safetensors.torch import save_file

import metapeft.atomic_files
from metapeft.atomic_files import (
    CHECKPOINT_FORMAT,
    NAME_MAX,
    LoadError,
    atomic_write,
    check_tensors_fit,
    content_digest,
    load_checkpoint,
    load_safetensors,
    remove_stale_temporaries,
    save_checkpoint,
    save_safetensors,
)

MARKER = torch.arange(256, dtype=torch.float32) + 0.5  # bytes easy to find inside a file


def state():
    return {"model": {"w": MARKER.clone(), "b": torch.zeros(3, dtype=torch.bfloat16)}, "step": 7,
            "rng": (3, (1, 2), None), "empty": {}}


def flip_bit_inside(path, needle: bytes) -> None:
    """Flip one bit in the middle of the first occurrence of ``needle`` in the file."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0
    data[at + len(needle) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def damaged(path, how: str, seed: int = 0) -> None:
    data = path.read_bytes()
    noise = random.Random(seed).randbytes(len(data))
    damage = {"truncated": data[: len(data) // 2], "empty": b"", "random": noise, "zeros": bytes(len(data))}
    path.write_bytes(damage[how])


def test_checkpoint_round_trip_keeps_structure_and_values(tmp_path):
    path = save_checkpoint(state(), tmp_path / "ck.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], MARKER) and loaded["model"]["b"].dtype == torch.bfloat16
    assert loaded["step"] == 7 and loaded["rng"] == (3, (1, 2), None) and loaded["empty"] == {}
    assert content_digest(loaded) == content_digest(state())


@pytest.mark.parametrize("how, seed", [("truncated", 0), ("empty", 0), ("zeros", 0),
                                       *(("random", seed) for seed in range(12))])
def test_damaged_checkpoint_names_the_file_and_never_advises_unsafe_loading(tmp_path, how, seed):
    path = save_checkpoint(state(), tmp_path / "ck.pt")
    damaged(path, how, seed)
    with pytest.raises(LoadError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(str(path)) and "weights_only=False" not in message and "weights_only` set" not in message
    assert {"truncated": "truncated or corrupt", "empty": "empty"}.get(how, "") in message


def test_flipped_bit_in_checkpoint_tensor_data_is_a_checksum_error(tmp_path):
    path = save_checkpoint(state(), tmp_path / "ck.pt")
    torch.load(path, weights_only=True)  # torch itself reads the altered file without complaint (below)
    flip_bit_inside(path, MARKER.numpy().tobytes())
    assert not torch.equal(torch.load(path, weights_only=True)["state"]["model"]["w"], MARKER)
    with pytest.raises(LoadError, match=f"{path}: checksum mismatch"):
        load_checkpoint(path)


def test_refused_objects_name_the_file_and_what_was_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "state": {"obj": random.Random(0)}}, path)
    with pytest.raises(LoadError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path}: refused") and "random.Random" in message
    assert "weights_only" not in message


def test_foreign_and_unchecksummed_checkpoints_are_refused(tmp_path):
    torch.save({"model": {"w": MARKER}}, tmp_path / "plain.pt")
    with pytest.raises(LoadError, match="not a metapeft checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(LoadError, match="absent.pt: no such file"):
        load_checkpoint(tmp_path / "absent.pt")


def test_non_finite_state_is_never_written_and_the_old_file_survives(tmp_path):
    path = save_checkpoint(state(), tmp_path / "ck.pt")
    bad = state()
    bad["model"]["w"][3] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to write .*model\.w"):
        save_checkpoint(bad, path)
    assert load_checkpoint(path)["step"] == 7 and os.listdir(tmp_path) == ["ck.pt"]
    with pytest.raises(ValueError, match="refusing to write"):
        save_safetensors({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_non_finite_values_in_a_checksummed_checkpoint_are_refused_at_load(tmp_path):
    bad = {"w": torch.tensor([1.0, float("-inf")])}
    torch.save({"format": CHECKPOINT_FORMAT, "sha256": content_digest(bad), "state": bad}, tmp_path / "ck.pt")
    with pytest.raises(LoadError, match=r"non-finite values .* \['w'\]"):
        load_checkpoint(tmp_path / "ck.pt")


def test_safetensors_round_trip_with_checksum_and_metadata(tmp_path):
    path = save_safetensors({"a.b": MARKER, "c": torch.ones(2, dtype=torch.int64)}, tmp_path / "w.safetensors",
                            {"step": 3, "config": {"lr": 0.1}, "note": "x"})
    tensors, metadata = load_safetensors(path)
    assert torch.equal(tensors["a.b"], MARKER) and tensors["c"].dtype == torch.int64
    assert metadata["step"] == "3" and metadata["config"] == '{"lr": 0.1}' and len(metadata["sha256"]) == 64


@pytest.mark.parametrize("how", ["truncated", "empty", "random", "flipped"])
def test_damaged_safetensors_name_the_file(tmp_path, how):
    path = save_safetensors({"w": MARKER}, tmp_path / "w.safetensors")
    if how == "flipped":
        flip_bit_inside(path, MARKER.numpy().tobytes())
    else:
        damaged(path, how)
    with pytest.raises(LoadError, match="checksum mismatch" if how == "flipped" else "not a readable safetensors") \
            as error:
        load_safetensors(path)
    assert str(error.value).startswith(str(path))


def test_foreign_safetensors_need_no_checksum_only_when_asked(tmp_path):
    save_file({"w": MARKER}, tmp_path / "foreign.safetensors")
    with pytest.raises(LoadError, match="no content checksum"):
        load_safetensors(tmp_path / "foreign.safetensors")
    tensors, _ = load_safetensors(tmp_path / "foreign.safetensors", require_checksum=False)
    assert torch.equal(tensors["w"], MARKER)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        checkpoint = save_checkpoint(state(), tmp_path / "ck.pt")
        weights = save_safetensors({"w": MARKER}, tmp_path / "w.safetensors")
    finally:
        os.umask(previous)
    for path in (checkpoint, weights):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    save_checkpoint(state(), tmp_path / "checkpoint.pt")
    stale = tmp_path / f".checkpoint.pt.{'ab' * 16}.tmp"
    stale.write_bytes(b"partial")
    keep = [tmp_path / "notes.tmp", tmp_path / ".checkpoint.pt.short.tmp"]
    for path in keep:
        path.write_text("mine")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", *(p.name for p in keep)])


def test_tensor_fit_lists_every_problem():
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1, dtype=torch.float64)}
    stored = {"a": torch.zeros(3, 2), "c": torch.zeros(1), "z": torch.zeros(1)}
    with pytest.raises(LoadError) as error:
        check_tensors_fit(stored, expected, "file f")
    message = str(error.value)
    assert message.startswith("file f does not fit the model: ")
    for part in ("missing 1 tensor(s) ['b']", "unexpected 1 tensor(s) ['z']",
                 "a: file shape (3, 2) != model shape (2, 3)",
                 "c: file dtype torch.float32 != model dtype torch.float64"):
        assert part in message
    check_tensors_fit({"a": torch.ones(2, 3)}, expected, "file f", required={"a"})


@pytest.mark.parametrize("length", [NAME_MAX - 37, NAME_MAX])
def test_a_valid_long_file_name_is_written_and_its_temp_files_are_recognised(tmp_path, length):
    """The temp name beside the target fits the 255-byte name limit (it was 38 bytes longer than the target)."""
    path = tmp_path / ("c" * (length - 3) + ".pt")
    save_checkpoint(state(), path)
    assert load_checkpoint(path)["step"] == 7
    stale = metapeft.atomic_files._temporary_name(path)
    assert len(stale.name.encode()) <= NAME_MAX
    stale.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [stale]


def _rewrite_forever(path, stop) -> None:
    big, small = {"w": torch.randn(64, 64)}, {"w": torch.randn(8, 8), "v": torch.randn(3)}
    flip = False
    while not stop.is_set():
        save_safetensors(big if flip else small, path)
        flip = not flip


def test_loads_while_another_process_replaces_the_file_never_report_corruption(tmp_path):
    """A writer process renames new versions over the file while this one loads it (6 in 3,661 loads were
    "checksum mismatch: corrupted on disk"; about 1 in 300 here before the fix)."""
    path = tmp_path / "adapter.safetensors"
    save_safetensors({"w": torch.randn(64, 64)}, path)
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    writer = context.Process(target=_rewrite_forever, args=(path, stop))
    writer.start()
    failures, loads, deadline = [], 0, time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            try:
                load_safetensors(path)
            except LoadError as error:
                failures.append(str(error))
            loads += 1
    finally:
        stop.set()
        writer.join()
    assert loads > 100 and failures == []


def test_a_read_that_fails_because_the_file_was_replaced_is_read_again(tmp_path, monkeypatch):
    """A damaged version replaced by a good one right after it was read: the second read loads the good one; a
    file replaced after every read is reported as replaced, never as corrupt."""
    path = tmp_path / "adapter.safetensors"
    good = save_safetensors({"w": MARKER}, tmp_path / "good.safetensors").read_bytes()
    path.write_bytes(good[: len(good) // 2])
    read_once = metapeft.atomic_files._read_once

    def read_then_replace(target, replacement):
        result = read_once(target)
        (tmp_path / "next").write_bytes(replacement)
        os.replace(tmp_path / "next", target)
        return result

    monkeypatch.setattr(metapeft.atomic_files, "_read_once", lambda target: read_then_replace(target, good))
    assert torch.equal(load_safetensors(path)[0]["w"], MARKER)
    path.write_bytes(good[: len(good) // 2])
    monkeypatch.setattr(metapeft.atomic_files, "_read_once",
                        lambda target: read_then_replace(target, good[: len(good) // 2]))
    with pytest.raises(LoadError, match="replaced by another process twice while being read") as error:
        load_safetensors(path)
    assert "corrupt" not in str(error.value)


def test_a_full_device_is_named_and_the_old_file_survives(tmp_path, monkeypatch):
    """torch.save on a full device raises ``[enforce fail at inline_container.cc:672]``; the write says "no space
    left on device" naming the file, removes its temp file and keeps the previous checkpoint."""
    path = save_checkpoint(state(), tmp_path / "checkpoint.pt")
    before = path.read_bytes()

    def full_device(temp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(os, "statvfs", lambda directory: os.statvfs_result((4096, 4096, 1, 1, 0, 1, 1, 0, 0, 255)))
    with pytest.raises(OSError, match=f"no space left on device: could not write {path} .*previous checkpoint.pt "
                                      "is unchanged") as error:
        atomic_write(path, full_device)
    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.mark.parametrize("kind", ["checkpoint", "safetensors"])
def test_a_real_full_device_is_named(tiny_filesystem, kind):
    path = tiny_filesystem / f"state.{kind}"
    big = {"w": torch.randn(64, 1024)}
    save = save_checkpoint if kind == "checkpoint" else save_safetensors
    with pytest.raises(OSError, match=f"no space left on device: could not write {path}"):
        save(big, path)
    assert os.listdir(tiny_filesystem) == []
