"""Every `datasets` source gives the stages the same data as the ImageFolder tree it was built from."""

import json
import os

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value

from emovlm_kd.arguments import RunArguments
from emovlm_kd.run_dir import DataError
from emovlm_kd.sources import SourceData, detect_source, load_source, source_hash, source_name, web_image
from emovlm_kd.testing import imagefolder_to_dataset, make_image, make_imagefolder, save_dataset, tiny_run_all_argv

CLASSES = ["negative", "neutral", "positive"]
BAD_IMAGE = "truncated.jpg"


def truncated_jpeg(path):
    make_image(0, np.random.default_rng(1)).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:300])
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same images as an ImageFolder tree, a save_to_disk folder and parquet files; one undecodable image."""
    root = tmp_path_factory.mktemp("sources")
    folder = make_imagefolder(root / "folder", CLASSES, {"train": 6, "test": 2})
    truncated_jpeg(folder / "train" / "neutral" / BAD_IMAGE)
    dataset = imagefolder_to_dataset(folder)
    return {
        "folder": folder,
        "disk": save_dataset(dataset, root / "disk", "disk"),
        "parquet": save_dataset(dataset, root / "parquet", "parquet"),
    }


def run_args(dataset, **options) -> RunArguments:
    return RunArguments(run_dir="unused", dataset=str(dataset), **options)


def test_sources_are_detected(sources, tmp_path):
    assert {name: detect_source(str(path)) for name, path in sources.items()} == {
        "folder": "imagefolder",
        "disk": "disk",
        "parquet": "files",
    }
    assert detect_source(str(sources["parquet"] / "train.parquet")) == "files"
    assert detect_source(str(sources["parquet"] / "*.parquet")) == "files"
    assert detect_source("Woleek/EmoSet-118K") == "hub"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is none of: an ImageFolder tree"):
        detect_source(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no file, folder or glob that exists"):
        detect_source(str(tmp_path / "missing" / "a" / "b"))


def test_every_source_gives_the_same_data(sources):
    loaded = {name: load_source(run_args(path)) for name, path in sources.items()}
    folder = loaded["folder"]
    train = imagefolder_to_dataset(sources["folder"])["train"].cast_column("image", Image(decode=False))
    bad_row = [os.path.basename(image["path"]) for image in train["image"]]
    for name, data in loaded.items():
        assert data.class_names == CLASSES, name
        assert list(data.splits) == ["train", "val", "test"] and data.val_from_train, name
        for split in data.splits:
            assert data.column(split, "label") == folder.column(split, "label"), (name, split)
            for index in range(len(data.splits[split])):
                assert np.array_equal(np.asarray(data.image(split, index)), np.asarray(folder.image(split, index)))
        assert len(data.bad_images) == 1, name
    assert folder.bad_images[0][0] == str(sources["folder"] / "train" / "neutral" / BAD_IMAGE)
    for name in ("disk", "parquet"):
        where, reason = loaded[name].bad_images[0]
        assert isinstance(loaded[name], SourceData)
        assert where == f"train[{bad_row.index(BAD_IMAGE)}]" and reason, (name, reason)
        # the key of a row names its source split and row; the stored bytes are the file's
        assert loaded[name].key("test", 0) == "test[0]"
        assert loaded[name].image_bytes("test", 0) == folder.image_bytes("test", 0)
    # images stay encoded in the dataset: nothing decoded is kept
    assert all(images.dataset.features["image"].decode is False for images in loaded["disk"].images.values())


def test_identity_is_stable_and_follows_the_content(sources, tmp_path):
    for path in sources.values():
        assert source_hash(run_args(path)) == source_hash(run_args(path))
        assert source_hash(run_args(path)) != source_hash(run_args(path, seed=7))
    data = load_source(run_args(sources["parquet"]))
    assert data.content_hash("test") == load_source(run_args(sources["parquet"])).content_hash("test")
    # an ImageFolder tree is the same data whether given as --data-dir or --dataset
    folder = str(sources["folder"])
    assert source_hash(run_args(folder)) == source_hash(RunArguments(run_dir="unused", data_dir=folder))
    # a moved copy of the parquet files is the same data; a changed file is not
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for file in sources["parquet"].iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
        os.utime(moved / file.name, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns))
    assert source_hash(run_args(moved)) == source_hash(run_args(sources["parquet"]))
    os.utime(moved / "test.parquet", ns=(1, 1))
    assert source_hash(run_args(moved)) != source_hash(run_args(sources["parquet"]))
    assert source_name(run_args(moved)) == "elsewhere"


@pytest.fixture(scope="module")
def custom_dataset(tmp_path_factory):
    """String labels, non-default column and split names, a second image column and an integer column."""
    rng = np.random.default_rng(0)
    names = ["joy", "awe", "fear"]  # sorted classes: awe, fear, joy
    features = Features({"picture": Image(), "thumbnail": Image(), "emotion": Value("string"), "id": Value("int64")})

    def split(count):
        labels = [names[i % 3] for i in range(count)]
        images = [make_image(names.index(label), rng) for label in labels]
        return Dataset.from_dict(
            {"picture": images, "thumbnail": images, "emotion": labels, "id": list(range(count))}, features=features
        )

    dataset = DatasetDict(training=split(12), dev=split(3), eval=split(6))
    return save_dataset(dataset, tmp_path_factory.mktemp("custom") / "disk", "disk")


def test_string_labels_and_custom_names(custom_dataset):
    options = dict(
        image_column="picture", label_column="emotion", train_split="training", val_split="dev", test_split="eval"
    )
    data = load_source(run_args(custom_dataset, **options))
    assert data.class_names == ["awe", "fear", "joy"]
    assert not data.val_from_train and [len(data.splits[s]) for s in ("train", "val", "test")] == [12, 3, 6]
    assert data.column("train", "label")[:3] == [2, 0, 1]  # joy, awe, fear
    assert data.key("val", 1) == "dev[1]" and data.key("test", 5) == "eval[5]"
    assert data.image("train", 0).mode == "RGB" and data.image("train", 0).size == (64, 64)
    # the run's class order (labels.json) is kept when given
    reordered = load_source(run_args(custom_dataset, **options), class_names=["joy", "fear", "awe"])
    assert reordered.column("train", "label")[:3] == [0, 2, 1]
    # without a test split option, there is no "test" split here: only the two given
    no_test = load_source(run_args(custom_dataset, **{**options, "test_split": None}))
    assert list(no_test.splits) == ["train", "val"]


TRAINING = {"train_split": "training"}


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {**TRAINING, "image_column": "picture"},
            r"has 0 `ClassLabel` columns \[\]: name the one to use with --label-co",
        ),
        ({**TRAINING, "label_column": "emotion"}, r"has 2 `Image` columns \['picture', 'thumbnail'\]: name the one"),
        ({**TRAINING, "image_column": "photo", "label_column": "emotion"}, r"no column 'photo' \(--image-column\)"),
        ({**TRAINING, "image_column": "picture", "label_column": "mood"}, r"no column 'mood' \(--label-column\)"),
        ({**TRAINING, "image_column": "id", "label_column": "emotion"}, r"Column 'id' .* not images or paths"),
        ({"image_column": "picture", "label_column": "emotion"}, r"no split 'train' \(--train-split\); its splits: "),
        (
            {**TRAINING, "image_column": "picture", "label_column": "emotion", "test_split": "final"},
            r"no split 'final' \(--test-split\); its splits: \['training', 'dev', 'eval'\]",
        ),
    ],
    ids=["no-classlabel", "two-images", "no-image-column", "no-label-column", "not-images", "no-train", "no-test"],
)
def test_missing_columns_and_splits_are_clear_errors(custom_dataset, options, message):
    with pytest.raises(DataError, match=message):
        load_source(run_args(custom_dataset, **options))


def test_imagefolder_trees_refuse_dataset_options(sources):
    with pytest.raises(DataError, match=r"ImageFolder tree.*\['--label-column'\]"):
        load_source(run_args(sources["folder"], label_column="emotion"))


def test_an_unknown_hub_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="Could not load dataset 'nobody/no-such-dataset'"):
        load_source(run_args("nobody/no-such-dataset"))


def test_web_image_keeps_web_formats_and_shrinks_the_rest(sources):
    png = (sources["folder"] / "test" / "neutral" / "neutral_001.png").read_bytes()
    assert web_image(png, "x.png") == (png, "PNG")
    data, image_format = web_image(png, "x.png", max_side=32)
    assert image_format == "JPEG" and data[:2] == b"\xff\xd8"
    with pytest.raises(ValueError, match="Could not read image broken: "):
        web_image((sources["folder"] / "train" / "neutral" / BAD_IMAGE).read_bytes(), "broken")


@pytest.mark.slow
def test_all_stages_give_the_same_results_on_every_source(sources, tmp_path):
    """The quickstart setup (stages 2-6) on the ImageFolder tree, the save_to_disk folder and the parquet files."""
    from emovlm_kd.run_dir import read_complete
    from emovlm_kd.stages import run_all

    results, runs = {}, {}
    for name, path in sources.items():
        runs[name] = tmp_path / name
        argv = tiny_run_all_argv(path, runs[name], data_option="--dataset")
        summary = run_all.run(*run_all.plan(argv))
        assert all("skipped" not in summary[stage] for stage in ("teacher", "distill", "gate", "evaluate")), name
        results[name] = json.loads((runs[name] / "eval" / "results.json").read_text())
        assert json.loads((runs[name] / "labels.json").read_text())["class_names"] == CLASSES
    for name in ("disk", "parquet"):
        for split in ("val", "test"):
            for branch in ("teacher", "vlm", "head", "fused"):
                got, expected = results[name]["splits"][split][branch], results["folder"]["splits"][split][branch]
                assert got == expected, (name, split, branch)
        assert len(results[name]["unreadable_images"]) == 1
        assert results[name]["unreadable_images"][0][0].startswith("train[")
        assert read_complete(runs[name], "teacher")["unreadable_images"] == results[name]["unreadable_images"]
    assert results["folder"]["unreadable_images"][0][0].endswith(BAD_IMAGE)
    # a second run finds every stage complete for the same source: fingerprints are stable
    again = run_all.run(*run_all.plan(tiny_run_all_argv(sources["parquet"], runs["parquet"], data_option="--dataset")))
    assert all(again[stage].get("skipped") == "complete" for stage in ("teacher", "distill", "gate", "evaluate"))
    card = (runs["parquet"] / "model" / "README.md").read_text()
    assert "datasets:\n- parquet" in card


def test_stage_settings_carry_the_source_options():
    from emovlm_kd.stages import run_all

    _, resolved, _ = run_all.plan(
        ["--run-dir", "R", "--dataset", "user/data", "--label-column", "emotion", "--val-split", "dev"]
    )
    assert (resolved.dataset, resolved.label_column, resolved.val_split, resolved.data_dir) == (
        "user/data",
        "emotion",
        "dev",
        None,
    )
    with pytest.raises(ValueError, match="not both"):
        RunArguments(run_dir="R", data_dir="a", dataset="b")
