"""The paper authors' released dataset files, read as they are: ``classnames.txt`` (last line without a newline),
index files ``<split>/<class name>/<file>.png <label>`` and ``lt_split_config.yaml`` (``many_classes`` /
``med_classes`` / ``few_classes``, a group may be ``null``). Oracle: the class name each image path carries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from metapeft.data import DataFormatError, build_datasets, builtin_split, class_split, read_classnames
from tests.helpers.imagefiles import digit_images

DOTA_NAMES = ("baseball-diamond", "basketball-court", "bridge", "ground-track-field", "harbor", "helicopter",
              "large-vehicle", "plane", "roundabout", "ship", "small-vehicle", "soccer-ball-field", "storage-tank",
              "swimming-pool", "tennis-court")
DOTA_SPLIT = """many_classes:
- ship
- large-vehicle
- small-vehicle
med_classes:
- plane
- harbor
- storage-tank
- tennis-court
- bridge
- swimming-pool
few_classes:
- helicopter
- soccer-ball-field
- roundabout
- basketball-court
- baseball-diamond
- ground-track-field
"""
FUSRS_SPLIT = "many_classes: [cargo, fishing]\nmed_classes: null\nfew_classes: [tanker, dredger]\n"


def write_authors_dataset(root: Path, classnames: tuple[str, ...], per_class: dict[str, int]) -> Path:
    """``root/classnames.txt`` (no trailing newline), ``root/<split>/<class>/<i>.png`` and ``root/<split>.txt`` with
    lines ``<split>/<class>/<i>.png <label>``, classes interleaved so file order is not label order."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classnames))
    images, _ = digit_images(sum(per_class.values()) * len(classnames), size=8)
    for split, count in per_class.items():
        lines = []
        for i in range(count):
            for label in reversed(range(len(classnames))):
                relative = f"{split}/{classnames[label]}/{i}.png"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                images.pop().save(root / relative)
                lines.append(f"{relative} {label}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def assert_labels_match_paths(dataset, classes: tuple[str, ...]) -> None:
    for path, label in zip(dataset.paths, dataset.targets):
        assert classes[label] == str(path).split("/")[1], f"{path} has label {label} = {classes[label]!r}"


def named_groups(split) -> dict[str, list[str]]:
    return {group: [split.classes[label] for label in labels] for group, labels in split.groups.items()}


@pytest.fixture(scope="module")
def dota_root(tmp_path_factory):
    root = write_authors_dataset(tmp_path_factory.mktemp("authors") / "DOTA", DOTA_NAMES, {"train": 2, "val": 1})
    (root / "lt_split_config.yaml").write_text(DOTA_SPLIT)
    return root


def test_dota_files_as_released(dota_root):
    assert not (dota_root / "classnames.txt").read_text().endswith("\n")
    assert "val/small-vehicle/0.png 10" in (dota_root / "val.txt").read_text().splitlines()
    bundle = build_datasets({"kind": "index", "root": str(dota_root), "train": "train.txt", "test": "val.txt",
                             "split": str(dota_root / "lt_split_config.yaml"), "image_size": 8, "resize": 8})
    assert bundle.split.classes == DOTA_NAMES and bundle.split.name == "DOTA"
    for dataset in (bundle.train, bundle.test):
        assert_labels_match_paths(dataset, bundle.split.classes)
    released = yaml.safe_load(DOTA_SPLIT)
    assert named_groups(bundle.split) == {"many": released["many_classes"], "medium": released["med_classes"],
                                          "few": released["few_classes"]}
    builtin = builtin_split("dota")
    assert (builtin.classes, builtin.groups) == (bundle.split.classes, bundle.split.groups)


def test_builtin_dota_split_reads_the_authors_index_files(dota_root):
    bundle = build_datasets({"kind": "index", "root": str(dota_root), "train": "train.txt", "test": "val.txt",
                             "split": "dota", "image_size": 8, "resize": 8})
    assert_labels_match_paths(bundle.test, bundle.split.classes)


@pytest.mark.parametrize("version, names", [
    ("v2.5", ("cargo", "fishing", "tanker", "dredger")),
    ("v1.7", ("cargo", "other", "fishing", "tanker", "dredger")),
])
def test_fusrs_files_with_a_null_group_and_classnames_in_the_data_root(tmp_path, version, names):
    root = write_authors_dataset(tmp_path / f"FUSRS_{version}", names, {"train": 1, "test": 1})
    split_file = tmp_path / "splits" / "lt_split_config.yaml"  # away from the data: classnames.txt is in the root
    split_file.parent.mkdir()
    split_file.write_text(FUSRS_SPLIT)
    bundle = build_datasets({"kind": "index", "root": str(root), "train": "train.txt", "test": "test.txt",
                             "split": str(split_file), "image_size": 8, "resize": 8})
    assert bundle.split.classes == names
    assert named_groups(bundle.split) == {"many": ["cargo", "fishing"], "few": ["tanker", "dredger"]}
    assert_labels_match_paths(bundle.train, names)
    builtin = builtin_split(f"fusrs_{version}")
    assert builtin.classes == names and named_groups(builtin)["tail"] == ["tanker", "dredger"]


def test_explicit_classnames_path_wins(tmp_path):
    root = write_authors_dataset(tmp_path / "data", ("cargo", "other", "fishing", "tanker", "dredger"),
                                 {"train": 1, "test": 1})
    (root / "classnames.txt").write_text("wrong\nnames\n")
    (root / "names").mkdir()
    (root / "names" / "v17.txt").write_text("cargo\nother\nfishing\ntanker\ndredger\n\n")
    (root / "lt_split_config.yaml").write_text(FUSRS_SPLIT)
    bundle = build_datasets({"kind": "index", "root": "data", "train": "train.txt", "test": "test.txt",
                             "split": "data/lt_split_config.yaml", "classnames": "data/names/v17.txt",
                             "image_size": 8, "resize": 8}, base_dir=tmp_path)
    assert bundle.split.classes[1] == "other"
    assert_labels_match_paths(bundle.test, bundle.split.classes)


def test_index_dataset_without_a_split_takes_names_from_classnames_and_groups_from_counts(tmp_path):
    root = write_authors_dataset(tmp_path / "inat", ("a", "b", "c"), {"train": 1, "val": 1})
    bundle = build_datasets({"kind": "index", "root": str(root), "train": "train.txt", "test": "val.txt",
                             "image_size": 8, "resize": 8})
    assert bundle.split.classes == ("a", "b", "c") and bundle.split.groups == {"many": [], "medium": [],
                                                                                "few": [0, 1, 2]}


def test_classnames_file_edge_cases(tmp_path):
    path = tmp_path / "classnames.txt"
    path.write_bytes(b"cargo\r\nfishing\r\ntanker")
    assert read_classnames(path) == ("cargo", "fishing", "tanker")
    path.write_text("cargo\n\nfishing\n")
    with pytest.raises(DataFormatError, match=rf"^{path}:2: blank line"):
        read_classnames(path)
    path.write_text("cargo\nfishing\ncargo")
    with pytest.raises(DataFormatError, match=rf"^{path}:3: class 'cargo' is already named on line 1"):
        read_classnames(path)


@pytest.mark.parametrize("text, line, message", [
    (DOTA_SPLIT.replace("- roundabout", "- round-about"), 15, "unknown class 'round-about': not one of the 15 class "
                                                              "names in "),
    (DOTA_SPLIT.replace("- roundabout", "- ship"), 15, "class 'ship' is in group 'few' and already in group 'many'"),
    (DOTA_SPLIT.replace("- roundabout", "- 15"), 15, "label 15 is outside [0, 15)"),
    ("dataset: DOTA\n" + DOTA_SPLIT, 1, "unknown key 'dataset'"),
], ids=["unknown-class", "two-groups", "label-range", "unknown-key"])
def test_authors_split_errors_name_file_and_line(dota_root, tmp_path, text, line, message):
    path = tmp_path / "lt_split_config.yaml"
    path.write_text(text)
    with pytest.raises(DataFormatError) as error:
        class_split(path, data_root=dota_root)
    assert str(error.value).startswith(f"{path}:{line}: "), str(error.value)
    assert message in str(error.value)


def test_label_outside_classnames_names_the_index_line(dota_root, tmp_path):
    root = Path(shutil.copytree(dota_root, tmp_path / "DOTA"))
    (root / "val.txt").write_text("val/small-vehicle/0.png 10\nval/extra/0.png 15\n")
    with pytest.raises(DataFormatError, match=rf"^{root / 'val.txt'}:2: label 15 must be >= 0 and < 15"):
        build_datasets({"kind": "index", "root": str(root), "train": "train.txt", "test": "val.txt",
                        "split": "lt_split_config.yaml"}, base_dir=root)


def test_missing_classnames_names_where_it_looked(tmp_path):
    (tmp_path / "lt_split_config.yaml").write_text(FUSRS_SPLIT)
    with pytest.raises(FileNotFoundError, match="no classnames.txt was found at .* or .*; set data.classnames"):
        class_split(tmp_path / "lt_split_config.yaml", data_root=tmp_path / "root")
