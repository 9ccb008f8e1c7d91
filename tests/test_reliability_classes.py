"""Reliability, round 2 (issue 21): each class of defect found by adversarial testing, tried with several members.

Labels as paths, the run-directory lock and its cleanup, data rows naming local files, cost bombs inside the pixel
limit (a side, TIFF strips and tiles, JPEG scans, a decode time budget), labels out of range or colliding, non-finite
pixels, named pipes, files removed mid-run, content swaps, prediction runs, and the Endpoint handler's last gaps. The
end-to-end export and the per-request cost measurements (child processes) are marked slow.
"""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from helpers_repo_template import HANDLER, SPACE_APP, load_module
from hostile_inputs import image_bytes, jpeg_repeating_scan, png_bomb, tiff_image
from PIL import Image

from emovlm_kd.arguments import RunArguments
from emovlm_kd.cli import run_dir_errors
from emovlm_kd.data import dataset_hash, load_imagefolder
from emovlm_kd.model_card import build_model_card
from emovlm_kd.run_dir import (
    TEMP_SUFFIX,
    DataError,
    check_class_names,
    ensure_class_names,
    run_dir_lock,
    safe_file_name,
    temporary_path,
)
from emovlm_kd.sources import load_source
from emovlm_kd.testing import make_imagefolder
from emovlm_kd.widgets import widget_images
from image_decoding_emovlm_kd import (
    MAX_IMAGE_DIMENSION,
    MAX_JPEG_SCANS,
    DecodeTimeout,
    check_image_header,
    open_image,
    verify_image,
)
from image_processing_emovlm_kd import prepare_image

CLASSES = ["negative", "neutral", "positive"]
RED_PNG = image_bytes(Image.new("RGB", (24, 20), (200, 40, 40)), "PNG")


# 1. Labels that reach the file system go through one safe-name function.
HOSTILE_LABELS = ["../x", "../../x", "/abs/x", "a/b", "..", "a\x00b", "x" * 300, "C:\\evil", ".hidden", "a b|c"]


def test_safe_file_name_never_leaves_its_folder(tmp_path):
    names = [safe_file_name(label) for label in HOSTILE_LABELS]
    assert len(set(names)) == len(names)  # distinct labels stay distinct
    for label, name in zip(HOSTILE_LABELS, names):
        assert name and len(name) <= 100 and not name.startswith("."), (label, name)
        assert not set(name) & {"/", "\\", "\x00", " ", "|"}, (label, name)
        assert (tmp_path / name).resolve().parent == tmp_path.resolve(), (label, name)
    assert safe_file_name("awe") == "awe" and safe_file_name("photo_001.png") == "photo_001.png"


class _RowsData:
    """Just what `widget_images` reads of an `ImageData`: a label column, keys and bytes per split."""

    def __init__(self, splits: dict[str, list[int]]):
        self.splits = splits

    def column(self, split, name):
        return self.splits[split]

    def key(self, split, index):
        return f"{split}/../../{index}.png"

    def image_bytes(self, split, index):
        return RED_PNG


def test_widget_files_are_safe_names_of_test_images_only():
    labels = ["../../x", "/abs/evil", "a/b"]
    examples = widget_images(_RowsData({"train": [0, 1, 2], "test": [2, 1, 0]}), labels)
    assert [example.title for example in examples] == labels  # the titles (card, config) stay exact
    for example in examples:
        assert ".." not in example.name.split("/") and not example.name.startswith("/")
        assert example.name.count("/") == 1  # <class folder>/<file>, both safe names
    # no test split: nothing is copied (never a train or val image)
    assert widget_images(_RowsData({"train": [0, 1, 2], "val": [0, 1, 2]}), labels) == []


# 2./3. The run-directory lock never follows a link; cleanup deletes only the package's own temporary files.
def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious.txt"
    target.write_text("keep me")
    for name in (".a.tmp", ".b.txt.tmp", f".c{TEMP_SUFFIX}"):
        (outside / name).write_text("also kept")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(target)
    with pytest.raises(DataError, match=r"\.lock'\] in the run directory .* are symbolic links"):
        with run_dir_lock(run_dir):
            pass
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == sorted(
        [".a.tmp", ".b.txt.tmp", f".c{TEMP_SUFFIX}", "precious.txt"]
    )
    # the command-line form: exit status 2 and the message, no traceback
    with pytest.raises(SystemExit) as exited:
        with run_dir_errors(run_dir):
            pass
    assert exited.value.code == 2


@pytest.mark.parametrize("entry", ["model", "head", "labels.json", "instruction_data.jsonl"])
def test_linked_stage_outputs_are_refused(tmp_path, entry):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / entry).symlink_to(elsewhere)
    with pytest.raises(DataError, match=rf"{entry}'\] in the run directory .* are symbolic links"):
        with run_dir_lock(run_dir):
            pass


def test_cleanup_deletes_only_the_packages_temporary_files(tmp_path):
    run_dir = tmp_path / "run"
    user_files = ["notes/.thesis.md.tmp", ".draft.tmp", "cache/.mine.tmp", "notes/.x" + TEMP_SUFFIX, "data/.y.tmp"]
    ours = [temporary_path(run_dir / "labels.json"), temporary_path(run_dir / "cache" / "vlm-test.safetensors")]
    ours.append(temporary_path(run_dir / "checkpoints" / "teacher" / "epoch_1" / "index.json"))
    linked = tmp_path / "linked-target"
    linked.mkdir()
    (linked / (".z" + TEMP_SUFFIX)).write_text("not the run's")
    for path in [run_dir / name for name in user_files] + ours:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (run_dir / "cache" / "more").symlink_to(linked)  # a link below a package folder is not followed
    with run_dir_lock(run_dir):
        pass
    assert all((run_dir / name).exists() for name in user_files)
    assert not any(path.exists() for path in ours)
    assert (linked / (".z" + TEMP_SUFFIX)).exists()


# 4. Data rows that only name a file are read inside the dataset's folder (and the HF caches) only.
def _path_rows_dataset(tmp_path, paths: list[str]) -> Path:
    rows = {"image": [{"path": path, "bytes": None} for path in paths], "label": [i % 3 for i in range(len(paths))]}
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASSES)})
    folder = tmp_path / "dataset"
    folder.mkdir(exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train.parquet"))
    return folder / "train.parquet"


def test_rows_naming_local_files_outside_the_dataset_are_not_read(tmp_path):
    inside = make_imagefolder(tmp_path / "dataset" / "images", CLASSES, 4, splits=("train",), size=(16, 16))
    own = sorted(str(p) for p in inside.rglob("*.*"))[:9]
    secret = tmp_path / "secret.png"  # a file of the machine, named by the dataset in three ways
    secret.write_bytes(RED_PNG)
    (inside / "link.png").symlink_to(secret)
    hostile = [str(secret), str(tmp_path / "dataset" / ".." / "secret.png"), str(inside / "link.png")]
    folder = _path_rows_dataset(tmp_path, own + hostile)
    data = load_source(RunArguments(run_dir=str(tmp_path / "run"), dataset=str(folder)))
    refused = dict(data.bad_images)
    assert sorted(refused) == ["train[10]", "train[11]", "train[9]"]  # the three rows naming `secret.png`
    assert all("--allow-local-paths" in reason for reason in refused.values())
    allowed = load_source(RunArguments(run_dir=str(tmp_path / "run"), dataset=str(folder), allow_local_paths=True))
    assert allowed.bad_images == []


# 5. Cost bombs inside the pixel limit: refused from the header, at every door.
COST_BOMBS = {
    "png_1x40M": lambda: png_bomb(1, 40_000_000),
    "png_40Mx1": lambda: png_bomb(40_000_000, 1),
    "png_70000x10": lambda: png_bomb(70_000, 10),
    "tiff_3.9M_strips": lambda: tiff_image(16, 16, blocks=3_900_000),
    "tiff_tiles": lambda: tiff_image(40, 24, blocks=50_000, tile=(16, 16)),
    "tiff_100k_rows": lambda: tiff_image(16, 16, blocks=100_000, rows_per_strip=1),
    "jpeg_1000_scans": lambda: jpeg_repeating_scan(1000, size=(256, 256)),
}
COST_MESSAGES = {"png": r"side longer than 65,535", "tiff": r"TIFF declaring [\d,]+ (strips|tiles)", "jpeg": r"scans"}


@pytest.fixture(scope="module")
def cost_bombs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cost-bombs")
    paths = {}
    for name, make in COST_BOMBS.items():
        paths[name] = folder / f"{name}.{name.split('_')[0]}"
        paths[name].write_bytes(make())
    return paths


@pytest.mark.parametrize("name", sorted(COST_BOMBS))
def test_cost_bombs_are_refused_from_the_header(cost_bombs, name):
    path = cost_bombs[name]
    message = COST_MESSAGES[name.split("_")[0]]
    for door in (check_image_header, open_image, verify_image, prepare_image):
        with pytest.raises(ValueError, match=message):
            door(str(path))
    with pytest.raises(ValueError, match=message):
        prepare_image(path.read_bytes(), name="upload")


def test_genuine_layouts_and_sizes_at_the_limits_are_accepted():
    """One strip per row, tiles, several strips, a side of exactly the limit, a progressive JPEG: decoded."""
    for layout in ({}, {"rows_per_strip": 1}, {"rows_per_strip": 5}, {"tile": (16, 16)}):
        raw = tiff_image(40, 24, **layout)
        assert np.array_equal(np.asarray(open_image(raw)), np.asarray(Image.open(io.BytesIO(raw)))), layout
    assert open_image(png_bomb(MAX_IMAGE_DIMENSION, 2)).size == (MAX_IMAGE_DIMENSION, 2)
    progressive = image_bytes(Image.linear_gradient("L").convert("RGB"), "JPEG", progressive=True)
    assert open_image(progressive).size == (256, 256)
    assert open_image(jpeg_repeating_scan(MAX_JPEG_SCANS - 10, size=(64, 64))).size == (64, 64)


def test_lazily_opened_images_are_checked_like_files(cost_bombs):
    with pytest.raises(ValueError, match="scans"):
        prepare_image(Image.open(cost_bombs["jpeg_1000_scans"]))


def test_decode_time_budget(monkeypatch, tiny_folder):
    large = image_bytes(Image.linear_gradient("L").resize((2000, 2000)), "PNG")
    with pytest.raises(DecodeTimeout, match=r"took more than 1e-09 s to decode .*max_decode_seconds"):
        open_image(large, "slow.png", max_seconds=1e-9)
    assert isinstance(DecodeTimeout("x"), ValueError)
    assert open_image(large, max_seconds=60).size == (2000, 2000)
    monkeypatch.setenv("EMOVLM_KD_MAX_DECODE_SECONDS", "0")
    handler = load_module(HANDLER, "budget_handler").EndpointHandler(str(tiny_folder))
    assert handler.image_processor.max_decode_seconds == 0
    handler.image_processor.max_decode_seconds = 1e-9
    with pytest.raises(ValueError, match="inputs took more than"):  # the remote code's own DecodeTimeout
        handler({"inputs": base64.b64encode(large).decode()})


# 6. ClassLabel values out of range.
@pytest.mark.parametrize("value", [-2, 3, 99])
def test_class_label_values_out_of_range_are_refused(tmp_path, value):
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASSES)})
    rows = Dataset.from_dict({"image": [{"bytes": RED_PNG, "path": None}] * 9, "label": [0, 1, 2] * 3}, features)
    labels = [0, 1, 2] * 3
    labels[4] = value  # as another tool may write it: `datasets` itself refuses to encode it
    table = rows.data.table
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
    pq.write_table(table, tmp_path / "train.parquet")
    with pytest.raises(DataError, match=rf"split 'train', row 4 holds the label {value}, which is not one of"):
        load_source(RunArguments(run_dir=str(tmp_path / "run"), dataset=str(tmp_path / "train.parquet")))


# 7. Non-finite pixels: the loader's check applies the processor's tests, naming the file.
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_images_are_refused_by_name(tmp_path, bad):
    root = make_imagefolder(tmp_path / "data", CLASSES, 4, splits=("train",), size=(16, 16))
    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    pixels[3, 3] = bad
    path = root / "train" / "neutral" / "float.tiff"
    Image.fromarray(pixels, mode="F").save(path)
    assert dict(load_imagefolder(root).bad_images)[str(path)].endswith("contains NaN or infinite values")
    with pytest.raises(ValueError, match=r"Image '.*float\.tiff' contains NaN or infinite values"):
        prepare_image(str(path))


# 8. Only regular files are opened: a named pipe never blocks.
def test_named_pipes_and_devices_are_skipped(tmp_path):
    root = make_imagefolder(tmp_path / "data", CLASSES, 4, splits=("train",), size=(16, 16))
    pipe = root / "train" / "neutral" / "pipe.png"
    os.mkfifo(pipe)
    (root / "train" / "neutral" / "to-pipe.png").symlink_to(pipe)
    result = {}
    loader = threading.Thread(target=lambda: result.update(data=load_imagefolder(root)), daemon=True)
    loader.start()
    loader.join(timeout=60)
    assert "data" in result, "load_imagefolder blocked on a named pipe"
    data = result["data"]
    assert str(pipe) in data.ignored_files
    assert "named pipe" in dict(data.bad_images)[str(root / "train" / "neutral" / "to-pipe.png")]
    for path in (pipe, "/dev/zero"):
        with pytest.raises(ValueError, match="not a regular file"):
            prepare_image(str(path))


# Low: labels that collide, hold prompt markup, or name nothing.
@pytest.mark.parametrize(
    "names, message",
    [
        (["caf\u00e9", "cafe\u0301"], "differ only in Unicode normalisation"),
        (["Joy", "joy"], "'Joy' and 'joy'"),
        ([" sad ", "sad"], "' sad ' and 'sad'"),
        (["a", "<example_label_2>"], "prompt placeholder"),
        (["a", "x<|im_end|>"], r"'<\|im_end\|>'"),
        (["a", "<label_list>"], "prompt placeholder"),
        (["a", "---"], "no letter or digit"),
        (["a", ""], "no letter or digit"),
        (["a", ".."], "no letter or digit"),
    ],
)
def test_colliding_and_markup_labels_are_refused(tmp_path, names, message):
    with pytest.raises(DataError, match=message):
        ensure_class_names(tmp_path, names)
    assert not (tmp_path / "labels.json").exists()
    assert check_class_names(["café", "Joy", "a/b", "../x"]) == ["café", "Joy", "a/b", "../x"]  # kept exact


def _table_rows(markdown: str, header_start: str) -> list[str]:
    lines = markdown.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(header_start))
    return [line for line in lines[start:] if line.startswith("|")]


def _columns(row: str) -> int:
    return len([cell for cell in row.replace("\\|", "").split("|")]) - 2


def test_class_names_are_escaped_in_the_card_and_the_space():
    labels = ["a|b", "two\nlines", "<b>bold</b>"]
    widget = [
        {"src": f"widget/{i}.png", "example_title": label, "output": [{"label": label, "score": 0.5}]}
        for i, label in enumerate(labels)
    ]
    card = str(build_model_card("me/x", labels, None, None, None, {}, widget=widget))
    rows = _table_rows(card, "| image | true class")
    assert all(_columns(row) == 3 for row in rows), rows
    assert "<b>" not in card.split("---", 2)[2] and "a\\|b" in card
    app = load_module(SPACE_APP, "escaping_app")
    assert app.markdown_text("a|b\n<i>") == "a\\|b &lt;i&gt;"


# Low: a file removed between the check and the read; a same-size, same-time swap (--verify-content).
def test_files_removed_during_a_run_give_clear_errors(tmp_path):
    root = make_imagefolder(tmp_path / "data", CLASSES, {"train": 4, "test": 2}, size=(16, 16))
    data = load_imagefolder(root)
    gone = data.image_path("test", 0)
    os.remove(gone)
    for read in (data.image, data.image_bytes):
        with pytest.raises(DataError, match=rf"{gone}.*changed or removed during the run"):
            read("test", 0)
    with pytest.raises(DataError, match=rf"{gone}.*changed or removed during the run"):
        data.files_hash()


def test_verify_content_sees_a_same_size_same_time_swap(tmp_path):
    root = make_imagefolder(tmp_path / "data", CLASSES, 4, splits=("train",), size=(16, 16))
    first, second = sorted((root / "train" / "neutral").glob("*.png"))[:2]
    before = [dataset_hash(root, 0.1, 42), dataset_hash(root, 0.1, 42, verify_content=True)]
    data = load_imagefolder(root, verify_content=True)
    files_before = data.files_hash()
    stat = first.stat()
    swapped = image_bytes(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG")
    assert len(swapped) <= stat.st_size
    first.write_bytes(swapped + bytes(stat.st_size - len(swapped)))  # same size (PNG ignores trailing bytes)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dataset_hash(root, 0.1, 42) == before[0]  # by size and time: not seen (documented)
    assert dataset_hash(root, 0.1, 42, verify_content=True) != before[1]
    assert data.files_hash() != files_before
    assert second.exists()


# Low: the Endpoint handler: deeply nested bodies, non-finite weights.
def test_handler_refuses_deep_nesting_and_non_finite_scores(tiny_folder, tmp_path):
    handler = load_module(HANDLER, "nesting_handler").EndpointHandler(str(tiny_folder))
    nested = "x"
    for _ in range(5000):
        nested = [nested]
    for body in ({"inputs": nested}, nested, {"inputs": "a", "parameters": nested}):
        with pytest.raises(ValueError):
            handler(body)
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_folder, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(key for key in weights if key.startswith("gate.") and weights[key].is_floating_point())
    weights[name][...] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    nan_handler = load_module(HANDLER, "nan_handler").EndpointHandler(str(broken))
    with pytest.raises(RuntimeError, match="NaN or infinite scores"):
        nan_handler({"inputs": base64.b64encode(RED_PNG).decode()})


# Prediction runs: the run-directory machinery.
def _predict_argv(model, inputs, output, *extra):
    return ["--model", str(model), "--inputs", str(inputs), "--output-dir", str(output), "--num-workers", "0", *extra]


def test_prediction_runs_fail_cleanly_and_give_every_input_a_row(tiny_folder, tmp_path, caplog):
    from emovlm_kd.predict import main

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(RED_PNG)
    (images / "dangling.png").symlink_to(tmp_path / "gone.png")
    output = tmp_path / "out"
    summary = main(_predict_argv(tiny_folder, images, output))
    assert summary["rows"] == 2 and summary["unreadable"] == 1
    rows = Dataset.from_parquet(str(next(output.glob("predictions-*.parquet")))).to_list()
    assert "broken symbolic link" in next(row["error"] for row in rows if row["input"].endswith("dangling.png"))
    # a corrupt record: exit 2 naming it, not a traceback; --overwrite starts over
    (output / "predictions.json").write_text('{"settings": ')
    with pytest.raises(SystemExit) as exited:
        main(_predict_argv(tiny_folder, images, output))
    assert exited.value.code == 2 and "--overwrite" in caplog.text
    assert main(_predict_argv(tiny_folder, images, output, "--overwrite"))["rows"] == 2
    assert not list(output.glob(f".*{TEMP_SUFFIX}")) and not list(output.glob(".*.tmp"))
    # an output path that is a file
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exited:
        main(_predict_argv(tiny_folder, images, tmp_path / "file"))
    assert exited.value.code == 2 and "is a file, not a folder" in caplog.text


@pytest.mark.slow  # a second process holds the lock
def test_a_second_prediction_run_on_the_same_output_is_refused(tiny_folder, tmp_path, caplog):
    from emovlm_kd.predict import main

    output = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from emovlm_kd.run_dir import run_dir_lock\n"
            "with run_dir_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
            str(output),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "a.png").write_bytes(RED_PNG)
        with pytest.raises(SystemExit) as exited:
            main(_predict_argv(tiny_folder, tmp_path / "a.png", output))
    finally:
        holder.kill()
        holder.wait()
    assert exited.value.code == 2 and f'"pid": {holder.pid}' in caplog.text


# What it must show, end to end (slow): an export of hostile labels writes only inside model/, user files survive.
@pytest.mark.slow
def test_export_of_hostile_labels_writes_only_inside_the_model_folder(tmp_path):
    from emovlm_kd.stages import run_all
    from emovlm_kd.testing import tiny_run_all_argv

    outside = tmp_path / "outside"
    labels = ["../../escaped", str(outside / "abs"), "a/b"]
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
    rows = {"image": [], "label": []}
    splits = {}
    for split, count in (("train", 10), ("test", 3)):
        rows = {"image": [], "label": []}
        for index in range(count * 3):
            colour = tuple(min(255, c + 5 * (index // 3)) for c in colours[index % 3])
            rows["image"].append({"bytes": image_bytes(Image.new("RGB", (32, 32), colour), "PNG"), "path": None})
            rows["label"].append(labels[index % 3])
        features = Features({"image": ImageFeature(), "label": Value("string")})
        splits[split] = Dataset.from_dict(rows, features=features)
    dataset = tmp_path / "hostile"
    dataset.mkdir()
    for split, rows_of_split in splits.items():
        rows_of_split.to_parquet(str(dataset / f"{split}.parquet"))
    run_dir = tmp_path / "work" / "run"
    user_files = {run_dir / "notes" / ".thesis.md.tmp": "mine", run_dir / ".draft.tmp": "mine too"}
    for path, text in user_files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    before = {p for p in tmp_path.rglob("*") if run_dir not in p.parents}
    argv = tiny_run_all_argv(dataset, run_dir, data_option="--dataset") + ["--label-column", "label"]
    run_all.run(*run_all.plan(argv))
    after = {p for p in tmp_path.rglob("*") if run_dir not in p.parents}
    assert after == before, sorted(map(str, after - before))
    assert not outside.exists() and not (tmp_path / "work" / "escaped").exists()
    model = run_dir / "model"
    for path in model.rglob("*"):
        assert model.resolve() in path.resolve().parents
    assert json.loads((model / "config.json").read_text())["id2label"] == {
        str(i): n for i, n in enumerate(sorted(labels))
    }
    widget_files = sorted(p.relative_to(model).as_posix() for p in (model / "widget").rglob("*.*"))
    assert len(widget_files) == 3 and all(name.count("/") == 2 for name in widget_files), widget_files
    assert all(path.read_text() == text for path, text in user_files.items())


# What it must show (slow): the three cost bombs cost under 300 MB and 2 s of CPU at the handler, or are refused.
# The child reads its own peak memory (VmHWM, reset first) and CPU time; a plain-PIL control shows the JPEG's cost.
COST_SCRIPT = textwrap.dedent(
    """
    import base64, io, json, re, resource, sys
    sys.path.insert(0, sys.argv[1])

    def status_mb(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

    def cpu_seconds():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    from helpers_repo_template import HANDLER, load_module
    from PIL import Image
    handler = load_module(HANDLER, "handler").EndpointHandler(sys.argv[3], max_request_bytes=0)
    handler({"inputs": base64.b64encode(open(sys.argv[4], "rb").read()).decode()})  # warm up
    results = {}
    for path in json.loads(sys.argv[2]):
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before, started = status_mb("VmRSS"), cpu_seconds()
        try:
            if path.endswith(".control"):
                Image.open(path).load()  # plain PIL, no guard
            else:
                handler({"inputs": base64.b64encode(open(path, "rb").read()).decode()})
            error = None
        except ValueError as raised:
            error = str(raised)
        results[path] = (status_mb("VmHWM") - before, cpu_seconds() - started, error)
    json.dump(results, sys.stdout)
    """
)


@pytest.mark.slow
def test_cost_bombs_at_the_handler_cost_under_300_mb_and_2_s(tmp_path, tiny_folder):
    bombs = {
        "png_1x40M.png": png_bomb(1, 40_000_000),
        "tiff_3.9M_strips.tiff": tiff_image(16, 16, blocks=3_900_000),
        "jpeg_1000_scans.jpg": jpeg_repeating_scan(1000),
    }
    paths = []
    for name, data in bombs.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    control = tmp_path / "jpeg_1000_scans.control"
    shutil.copy(tmp_path / "jpeg_1000_scans.jpg", control)
    small = tmp_path / "small.png"
    small.write_bytes(RED_PNG)
    script = tmp_path / "cost.py"
    script.write_text(COST_SCRIPT)
    tests_dir = str(Path(HANDLER).parent.parent.parent / "tests")
    command = [
        sys.executable,
        str(script),
        tests_dir,
        json.dumps(paths + [str(control)]),
        str(tiny_folder),
        str(small),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout)
    print(json.dumps({Path(path).name: values for path, values in measured.items()}, indent=1))
    for path in paths:
        extra_mb, cpu, error = measured[path]
        assert error is not None and "refused" in error, (path, error)
        assert extra_mb < 300 and cpu < 2, (path, extra_mb, cpu)
    assert measured[str(control)][1] > 1, measured[str(control)]  # the same bytes cost plain PIL seconds
