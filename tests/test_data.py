"""The data library: ImageFolder loading, stratified val split, bad images, class checks."""

import collections
import logging

import pytest

from emovlm_kd.data import dataset_hash, load_imagefolder, open_image_rgb
from emovlm_kd.run_dir import DataError
from emovlm_kd.testing import add_bad_images, make_imagefolder


@pytest.fixture
def folder(tmp_path):
    return make_imagefolder(tmp_path / "data", per_class={"train": 10, "test": 3})


def test_splits_and_stratified_val(folder):
    data = load_imagefolder(folder)
    assert data.class_names == ["negative", "neutral", "positive"]
    assert list(data.splits) == ["train", "val", "test"]
    assert data.val_from_train
    assert len(data.splits["train"]) + len(data.splits["val"]) == 30
    assert collections.Counter(data.splits["val"]["label"]) == {0: 1, 1: 1, 2: 1}  # 10% of each class
    assert data.splits["train"].features["label"].names == data.class_names
    row = data.splits["test"][0]
    assert row["image_path"].startswith(str(folder / "test" / "negative")) and row["label"] == 0
    # same seed, same split; different seed, a different one
    again = load_imagefolder(folder)
    assert again.splits["val"]["image_path"] == data.splits["val"]["image_path"]
    other = load_imagefolder(folder, seed=7)
    assert other.splits["val"]["image_path"] != data.splits["val"]["image_path"]
    assert open_image_rgb(row["image_path"]).mode == "RGB"


def test_val_folder_is_used_and_class_order_can_be_given(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=4, splits=("train", "val"))
    data = load_imagefolder(root, class_names=["positive", "negative", "neutral"])
    assert not data.val_from_train and len(data.splits["val"]) == 12 and "test" not in data.splits
    positives = [
        p for p, label in zip(data.splits["train"]["image_path"], data.splits["train"]["label"]) if label == 0
    ]
    assert positives and all("/positive/" in p for p in positives)
    with pytest.raises(DataError, match="differ from the class folders"):
        load_imagefolder(root, class_names=["negative", "positive"])


def test_bad_images_are_reported_and_skipped(folder, caplog):
    bad_files = add_bad_images(folder / "train" / "neutral")
    (folder / "train" / "neutral" / "README.txt").write_text("not an image, ignored")
    with caplog.at_level(logging.WARNING, logger="emovlm_kd.data"):
        data = load_imagefolder(folder)
    reported = dict(data.bad_images)
    assert set(reported) == {str(p) for p in bad_files}
    assert "empty" in reported[str(folder / "train" / "neutral" / "empty.jpg")]
    assert all(reason for reason in reported.values())
    listed = set(data.splits["train"]["image_path"]) | set(data.splits["val"]["image_path"])
    assert len(listed) == 30 and not listed & set(reported)
    assert data.ignored_files == [str(folder / "train" / "neutral" / "README.txt")]
    for path in reported:
        assert path in caplog.text
    with pytest.raises(ValueError, match="notes.jpg"):
        open_image_rgb(folder / "train" / "neutral" / "notes.jpg")


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: (root / "test").mkdir(parents=True), "no train/ folder"),
        (
            lambda root: make_imagefolder(root, per_class=2) and (root / "train" / "extra").mkdir(),
            "contains no image files",
        ),
        (
            lambda root: (
                make_imagefolder(root, per_class=2) and make_imagefolder(root, ["joy"], per_class=2, splits=["test"])
            ),
            "Class folders of .*test.* differ",
        ),
    ],
    ids=["missing-root", "missing-train", "empty-class", "classes-differ"],
)
def test_clear_errors(tmp_path, breakage, message):
    root = tmp_path / "broken"
    breakage(root)
    with pytest.raises(DataError, match=message):
        load_imagefolder(root, check_images=False)


def test_hashes_change_with_data(folder):
    data = load_imagefolder(folder, check_images=False)
    before, folder_before = data.content_hash(), dataset_hash(folder, 0.1, 42)
    assert load_imagefolder(folder, check_images=False).content_hash() == before
    assert dataset_hash(folder, 0.1, 42) == folder_before != dataset_hash(folder, 0.2, 42)
    (folder / "test" / "neutral" / "neutral_000.jpg").unlink()
    assert load_imagefolder(folder, check_images=False).content_hash() != before
    assert dataset_hash(folder, 0.1, 42) != folder_before


def test_tiny_train_split_holds_out_one_image_per_class(tmp_path):
    data = load_imagefolder(make_imagefolder(tmp_path / "small", per_class=2, splits=("train",)), check_images=False)
    assert sorted(data.splits["val"]["label"]) == [0, 1, 2] and len(data.splits["train"]) == 3
    lonely = make_imagefolder(tmp_path / "lonely", per_class=1, splits=("train",))
    with pytest.raises(DataError, match="at least 2 readable images per class"):
        load_imagefolder(lonely, check_images=False)
