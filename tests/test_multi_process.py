"""What `batch_size` means on N processes, main-process discipline (logging, printing, the image check once per
run), and the shipped Accelerate configs; the launches themselves are in test_accelerate_multiprocess.py (slow)."""

import logging
import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

import emovlm_kd.data
from emovlm_kd.accelerator_setup import make_accelerator
from emovlm_kd.arguments import RunArguments
from emovlm_kd.batch_semantics import PER_PROCESS, SAME_UPDATES, BatchPlan, check_batch_fits
from emovlm_kd.processes import print_once, setup_process_logging
from emovlm_kd.run_dir import DataError
from emovlm_kd.sources import IMAGE_CHECK_FILE, load_source
from emovlm_kd.testing import add_bad_images, make_imagefolder

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "examples" / "accelerate"
DOC = REPO_ROOT / "docs" / "multi-gpu.md"


def test_an_update_is_stated_per_stage_semantics():
    stage1 = BatchPlan(PER_PROCESS, batch_size=1, num_processes=8, gradient_accumulation_steps=2)
    assert stage1.images_per_update == 16
    assert stage1.describe().startswith("one update = 16 images (1 per process x 2 accumulated x 8 processes")
    assert stage1.record()["images_per_update"] == 16 and stage1.record()["semantics"] == "per_process"
    assert BatchPlan(PER_PROCESS, 10, 1).images_per_update == 10
    one_image = BatchPlan(SAME_UPDATES, 1, 3)
    assert one_image.images_per_update == 1 and not one_image.split_across_processes
    assert "each of the 3 processes runs every update" in one_image.describe()
    split = BatchPlan(SAME_UPDATES, 8, 2)
    assert split.split_across_processes and "split across 2 processes" in split.describe()


def test_a_batch_that_cannot_be_filled_is_refused_with_one_that_fits():
    with pytest.raises(DataError, match=r"on 8 processes one step takes 80 images, .* use --batch-size 5 or less"):
        check_batch_fits(BatchPlan(PER_PROCESS, 10, 8), 40)
    with pytest.raises(DataError, match="use at most 3 processes"):
        check_batch_fits(BatchPlan(PER_PROCESS, 1, 4), 3)
    check_batch_fits(BatchPlan(PER_PROCESS, 10, 4), 40)  # fits exactly
    check_batch_fits(BatchPlan(PER_PROCESS, 10, 1), 3)  # one process: a smaller last batch
    check_batch_fits(BatchPlan(SAME_UPDATES, 1, 8), 3)  # every process runs every update


def test_batches_are_never_split_across_processes(tmp_path):
    """A split batch must divide by the process count (the crash of stage 1's batch 1 on 2 processes)."""
    accelerator = make_accelerator(RunArguments(run_dir=str(tmp_path), report_to="none"), "test")
    assert accelerator.dataloader_config.split_batches is False
    assert accelerator.dataloader_config.data_seed == RunArguments(run_dir=str(tmp_path)).seed


def test_the_image_check_runs_once_per_run(tmp_path, monkeypatch):
    data = make_imagefolder(tmp_path / "data", per_class={"train": 4, "test": 1})
    add_bad_images(data / "train" / "neutral")
    scans = []
    find_bad_images = emovlm_kd.data.find_bad_images
    monkeypatch.setattr(
        emovlm_kd.data, "find_bad_images", lambda items: scans.append(len(items)) or find_bad_images(items)
    )
    (tmp_path / "run").mkdir()  # a stage creates it (the run-directory lock) before loading the data
    run_args = RunArguments(data_dir=str(data), run_dir=str(tmp_path / "run"))
    first = load_source(run_args)
    second = load_source(run_args)  # a later stage, or another process of the launch
    assert len(scans) == 1 and len(first.bad_images) == 3
    assert (
        second.bad_images == first.bad_images
        and second.splits["train"]["image_path"] == first.splits["train"]["image_path"]
    )
    assert (tmp_path / "run" / IMAGE_CHECK_FILE).is_file()
    assert load_source(RunArguments(data_dir=str(data), run_dir=str(tmp_path / "none"))).bad_images == first.bad_images
    assert not (tmp_path / "none").exists() and len(scans) == 2  # no run directory: checked, nothing written
    add_bad_images(data / "train" / "positive")  # other files: checked again
    assert len(load_source(run_args).bad_images) == 6 and len(scans) == 3


def test_other_processes_log_only_errors_and_print_nothing(monkeypatch, capsys):
    root = logging.getLogger()
    level = root.level
    monkeypatch.setenv("RANK", "1")
    try:
        setup_process_logging()
        assert root.level == logging.ERROR
        print_once("summary")
        assert capsys.readouterr().out == ""
        monkeypatch.setenv("RANK", "0")
        print_once("summary")
        assert capsys.readouterr().out == "summary\n"
    finally:
        root.setLevel(level)


@pytest.mark.parametrize("name", sorted(path.stem for path in CONFIGS.glob("*.yaml")))
def test_accelerate_configs_load(name):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    expected = {
        "multi_gpu": ("MULTI_GPU", 1),
        "two_machines": ("MULTI_GPU", 2),
        "fsdp_stage1_7b": ("FSDP", 1),
        "deepspeed_zero2_lora": ("DEEPSPEED", 1),
        "deepspeed_zero3_lora": ("DEEPSPEED", 1),
    }[name]
    assert (config.distributed_type.value, config.num_machines) == expected
    assert config.mixed_precision == "bf16" and config.num_processes == 8 * config.num_machines
    if name == "fsdp_stage1_7b":  # LoRA mixes frozen and trained weights; the layers to shard exist in transformers
        from transformers.models.qwen2_vl import modeling_qwen2_vl

        assert config.fsdp_config["fsdp_use_orig_params"] is True
        for layer in config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","):
            assert hasattr(modeling_qwen2_vl, layer), layer
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[len("deepspeed_zero")])
        assert "gradient_accumulation_steps" not in config.deepspeed_config  # the stage's own setting rules


def test_the_doc_shows_every_config_with_a_script_that_exists():
    """docs/multi-gpu.md's `accelerate launch --config_file ...` commands name shipped configs and scripts; the
    offline variants of the DDP and two-machine ones run in test_accelerate_multiprocess.py."""
    commands = [line for line in DOC.read_text().replace("\\\n", " ").splitlines() if "--config_file" in line]
    launched = [re.search(r"--config_file (\S+) .*?(train/\S+\.py)", command).groups() for command in commands]
    assert {config for config, _ in launched} == {f"examples/accelerate/{p.name}" for p in CONFIGS.glob("*.yaml")}
    assert all((REPO_ROOT / script).is_file() for _, script in launched)
    assert any("predict.py" in script for _, script in launched)
