"""Index files, class-split yaml files, ImageFolder trees and ``build_datasets``: parsing and every error path."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import DataLoader

from metapeft.data import (
    DataFormatError,
    ImageDecodeError,
    IndexDataset,
    build_datasets,
    build_transforms,
    builtin_split,
    class_split,
    image_folder,
    load_image,
    read_class_split,
    read_index,
)
from tests.helpers.imagefiles import digit_images, write_index_dataset


def write(path, text):
    path.write_text(text)
    return path


def test_read_index_paths_labels_comments_and_spaces(tmp_path):
    index = write(tmp_path / "train.txt", "# header\nimages/a.jpg 3\n\n  my dir/b c.png   0  \nc.jpg 12\n")
    assert read_index(index) == [("images/a.jpg", 3), ("my dir/b c.png", 0), ("c.jpg", 12)]


@pytest.mark.parametrize("text, line, message", [
    ("a.jpg 1\nb.jpg x\n", 2, "label 'x' is not an integer"),
    ("a.jpg 1\n\nb.jpg\n", 3, "expected '<relative/path> <integer label>'"),
    ("a.jpg -1\n", 1, "label -1 must be >= 0"),
    ("a.jpg 1\nb.jpg 5\n", 2, "must be >= 0 and < 5"),
    ("/abs/a.jpg 1\n", 1, "must be relative to the root"),
], ids=["non-int", "missing-label", "negative", "out-of-range", "absolute"])
def test_read_index_errors_name_file_and_line(tmp_path, text, line, message):
    index = write(tmp_path / "split.txt", text)
    with pytest.raises(DataFormatError) as error:
        read_index(index, num_classes=5)
    assert str(error.value).startswith(f"{index}:{line}:")
    assert message in str(error.value)


def test_read_index_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.txt"))):
        read_index(tmp_path / "nope.txt")
    with pytest.raises(DataFormatError, match="lists no images"):
        read_index(write(tmp_path / "empty.txt", "# nothing\n\n"))


def test_index_dataset_items_targets_and_counts(tmp_path):
    root = write_index_dataset(tmp_path, {"train": [3, 2, 1]})
    dataset = IndexDataset(root, "train.txt", build_transforms(False, 16))
    assert len(dataset) == 6 and dataset.targets == [0, 0, 0, 1, 1, 2]
    assert dataset.class_counts(4).tolist() == [3, 2, 1, 0]
    image, label = dataset[4]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 1
    assert dataset.verify() == []


def test_index_dataset_reports_missing_images_with_lines(tmp_path):
    root = write_index_dataset(tmp_path, {"train": [2, 1]})
    write(root / "train.txt", "# c\n" + (root / "train.txt").read_text() + "gone/x.png 1\n")
    with pytest.raises(FileNotFoundError) as error:
        IndexDataset(root, root / "train.txt")
    assert f"{root / 'train.txt'}:5: {root / 'gone/x.png'}" in str(error.value)
    assert "1 image(s)" in str(error.value)


def test_undecodable_image_is_reported_with_its_path(tmp_path):
    root = write_index_dataset(tmp_path, {"train": [2, 1]})
    broken = root / "images/train/1.png"
    broken.write_bytes(b"not a png at all")
    dataset = IndexDataset(root, "train.txt")
    dataset[0]
    with pytest.raises(ImageDecodeError) as error:
        dataset[1]
    assert error.value.path == str(broken) and str(broken) in str(error.value)
    failures = dataset.verify()
    assert [f.path for f in failures] == [str(broken)]
    truncated = root / "images/train/2.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    assert [f.path for f in dataset.verify()] == [str(broken), str(truncated)]


def test_index_dataset_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        IndexDataset(tmp_path / "missing", "train.txt")


SPLIT_YAML = """\
name: toy
classes: [cat, dog, bird, fish]
many: [dog, 0]
few:
  - bird
  - fish
"""


def test_read_class_split_names_and_labels(tmp_path):
    split = read_class_split(write(tmp_path / "s.yaml", SPLIT_YAML))
    assert split.name == "toy" and split.classes == ("cat", "dog", "bird", "fish") and split.num_classes == 4
    assert split.groups == {"many": [1, 0], "few": [2, 3]}
    assert class_split(tmp_path / "s.yaml") == split


@pytest.mark.parametrize("text, line, message", [
    (SPLIT_YAML.replace("- fish", "- shark"), 6, "unknown class 'shark'"),
    (SPLIT_YAML.replace("- fish", "- dog"), 6, "class 'dog' is in group 'few' and already in group 'many'"),
    (SPLIT_YAML.replace("[dog, 0]", "[dog, 7]"), 3, "label 7 is outside [0, 4)"),
    (SPLIT_YAML.replace("classes", "klasses"), 1, "missing the 'classes' list"),
    (SPLIT_YAML.replace("[cat, dog", "[cat, cat"), 2, "class 'cat' is listed twice"),
    (SPLIT_YAML.replace("many: [dog, 0]", "many: dog"), 3, "group 'many' must be a list"),
    (SPLIT_YAML.replace("few:", "few: ["), 5, "invalid yaml"),
    ("name: only\nclasses: [a, b]\n", 1, "no groups"),
], ids=["unknown", "two-groups", "label-range", "no-classes", "duplicate-class", "not-list", "bad-yaml",
        "no-groups"])
def test_read_class_split_errors_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path / "split.yaml", text)
    with pytest.raises(DataFormatError) as error:
        read_class_split(path)
    assert str(error.value).startswith(f"{path}:{line}:"), str(error.value)
    assert message in str(error.value)


def test_builtin_splits_follow_the_paper_in_the_authors_label_orders():
    dota = builtin_split("dota")
    assert dota.classes == tuple(sorted(dota.classes)) and dota.classes[10] == "small-vehicle"
    assert dota.num_classes == 15 and [len(dota.groups[g]) for g in ("many", "medium", "few")] == [3, 6, 6]
    assert sorted(sum(dota.groups.values(), [])) == list(range(15))
    assert [dota.classes[c] for c in dota.groups["many"]] == ["ship", "large-vehicle", "small-vehicle"]
    fusrs = builtin_split("fusrs_v2.5")
    assert fusrs.classes == ("cargo", "fishing", "tanker", "dredger")
    assert fusrs.groups == {"head": [0, 1], "tail": [2, 3]}
    v17 = builtin_split("fusrs_v1.7")
    assert v17.classes == ("cargo", "other", "fishing", "tanker", "dredger")
    assert v17.groups == {"head": [0, 1, 2], "tail": [3, 4]}
    with pytest.raises(ValueError, match="unknown built-in class split 'dotaa'"):
        class_split("dotaa")


def test_image_folder_classes_and_decode_errors(tmp_path):
    images, _ = digit_images(3)
    for name, image in zip(("b", "a", "a"), images):
        (tmp_path / name).mkdir(exist_ok=True)
        image.save(tmp_path / name / f"{len(list((tmp_path / name).iterdir()))}.png")
    broken = tmp_path / "b" / "zz.png"
    broken.write_bytes(b"garbage")
    folder = image_folder(tmp_path, build_transforms(False, 16))
    assert folder.classes == ["a", "b"] and folder.targets == [0, 0, 1, 1]
    assert folder[0][0].shape == (3, 16, 16)
    with pytest.raises(ImageDecodeError, match=re.escape(str(broken))):
        folder[3]
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        image_folder(tmp_path / "missing")


def test_build_datasets_index_and_folder(tmp_path):
    root = write_index_dataset(tmp_path / "idx", {"train": [5, 1, 2], "test": [1, 1, 1]})
    split = write(tmp_path / "split.yaml", "classes: [zero, one, two]\nhead: [zero]\ntail: [one, two]\n")
    bundle = build_datasets({"kind": "index", "root": str(root), "train": "train.txt", "test": "test.txt",
                             "split": str(split), "image_size": 16}, base_dir=tmp_path)
    assert len(bundle.train) == 8 and len(bundle.test) == 3
    assert bundle.split.groups == {"head": [0], "tail": [1, 2]}
    assert bundle.train[0][0].shape == (3, 16, 16)
    counted = build_datasets({"kind": "index", "root": "idx", "train": "train.txt", "test": "test.txt",
                              "image_size": 16}, base_dir=tmp_path)
    assert counted.split.groups == {"many": [], "medium": [], "few": [0, 1, 2]}
    for split_name in ("train", "test"):
        for c in range(2):
            (tmp_path / "tree" / split_name / f"class{c}").mkdir(parents=True)
            digit_images(1)[0][0].save(tmp_path / "tree" / split_name / f"class{c}" / "x.png")
    tree = build_datasets({"kind": "folder", "root": "tree", "train": "train", "test": "test", "image_size": 16},
                          base_dir=tmp_path)
    assert tree.split.classes == ("class0", "class1") and tree.test.targets == [0, 1]
    with pytest.raises(ValueError, match="lists classes"):
        build_datasets({"kind": "folder", "root": "tree", "train": "train", "test": "test", "split": "fusrs_v2.5"},
                       base_dir=tmp_path)


@pytest.mark.parametrize("data, message", [
    ({"kind": "index", "root": "r", "train": "t", "test": "t", "colour": 1}, r"unknown data config key.*colour"),
    ({"kind": "lmdb", "root": "r"}, "data.kind must be one of"),
    ({"kind": "index", "root": "r", "train": "t"}, "needs data.test"),
], ids=["unknown-key", "bad-kind", "missing-key"])
def test_build_datasets_config_errors(data, message):
    with pytest.raises(ValueError, match=message):
        build_datasets(data)


def test_index_dataset_in_worker_processes(tmp_path):
    root = write_index_dataset(tmp_path, {"train": [3, 3, 2]})
    dataset = IndexDataset(root, "train.txt", build_transforms(False, 16))
    assert dataset.paths.dtype.kind == "U"  # one NumPy array: no per-path Python objects to copy into workers
    serial = list(DataLoader(dataset, batch_size=3))
    parallel = list(DataLoader(dataset, batch_size=3, num_workers=2))
    for (x0, y0), (x1, y1) in zip(serial, parallel, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    broken = root / "images/train/5.png"
    broken.write_bytes(b"broken")
    with pytest.raises(ImageDecodeError, match=re.escape(str(broken))):
        list(DataLoader(dataset, batch_size=3, num_workers=2))


def test_train_eval_is_the_training_set_under_the_test_transform(tmp_path):
    root = write_index_dataset(tmp_path, {"train": [3, 2], "test": [1, 1]})
    bundle = build_datasets({"kind": "index", "root": str(root), "train": "train.txt", "test": "test.txt",
                             "image_size": 16, "resize": 20})
    plain = bundle.train_eval
    assert plain.targets == bundle.train.targets and list(plain.paths) == list(bundle.train.paths)
    assert plain.transform is bundle.test.transform and bundle.train.transform is not bundle.test.transform
    for i in range(len(plain)):
        expected = bundle.test.transform(load_image(root / str(plain.paths[i])))
        assert torch.equal(plain[i][0], expected) and plain[i][1] == bundle.train.targets[i]
