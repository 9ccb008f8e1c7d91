"""Smoke tests of the benchmark scripts: tiny sizes, one run, and checks that their reports hold together.

The real-scale runs (Qwen2-VL-2B/7B architectures, real photo sizes) stay out of the test suite; `run_all.py --smoke`
checks their plans' logic with the small model.
"""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_inference  # noqa: E402
import bench_scaling  # noqa: E402
import bench_training  # noqa: E402
import profile_contenders  # noqa: E402
import run_all  # noqa: E402
from bench_utils import (  # noqa: E402
    MIKELS_LABELS,
    MODEL_PRESETS,
    build_model,
    cap_images,
    labels_for,
    parse_image_size,
    synthetic_images,
    to_device,
)
from reference_pipeline import ReferencePipeline, parse_answer  # noqa: E402

from image_processing_emovlm_kd import limit_longest_side  # noqa: E402

# Small but real: the cpu preset's model on 56x56 images (4 image tokens), one timed run, no warm-up.
QUICK = ["--runs", "1", "--warmup", "0", "--threads", "1"]


def _read(output_dir: Path, name: str) -> tuple[dict, str]:
    return json.loads((output_dir / f"{name}.json").read_text()), (output_dir / f"{name}.md").read_text()


def _check_stats(stats: dict, images: int):
    assert stats["median_s"] > 0 and stats["runs"] == 1
    assert stats["images_per_s"] == pytest.approx(images / stats["median_s"])
    assert stats["wall"]["min_s"] <= stats["wall"]["median_s"] <= stats["wall"]["max_s"]
    assert stats["cpu"]["median_s"] > 0


@pytest.mark.slow  # a memory-measuring subprocess per contender
def test_inference_benchmark_reports_every_contender_ratio_and_memory(tmp_path):
    argv = QUICK + [
        "--image-sizes",
        "56",
        "60",  # rounds to the same 56 x 56 model input: timed once
        "84x56",
        "--batch-sizes",
        "1",
        "2",
        "--max-batch-image-tokens",
        "8",  # 84x56 has 6 image tokens: batch 2 (12 tokens) is skipped there
        "--long-generation-tokens",
        "3",
        "--output-dir",
        str(tmp_path),
        "--tag",
        "smoke",
    ]
    bench_inference.main(argv)
    result, markdown = _read(tmp_path, "inference_smoke")

    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["torch_threads"] == 1
    measured = [(tuple(row["image_size"]), row["batch_size"]) for row in result["results"]]
    assert measured == [((56, 56), 1), ((56, 56), 2), ((84, 56), 1)]
    assert [row["timed_as"] for row in result["preprocessing"]] == ["56x56", "56x56", "84x56"]
    for row in result["preprocessing"]:
        assert row["image_tokens"] == row["uncapped_image_tokens"]  # no image here exceeds the 1024-px cap
        assert row["seconds"]["emovlm_kd"]["wall"] > 0 and row["seconds"]["reference"]["wall"] > 0
    for row in result["results"]:
        assert (
            row["image_tokens"] == {56: 4, 84: 6}[row["image_size"][0]] and row["prompt_tokens"] > row["image_tokens"]
        )
        assert row["image_cap"].startswith("benchmark") or "max_image_side" in row["image_cap"]
        expected = {"emovlm_kd", "vlm_floor", "reference"}
        expected |= {"reference_256"} if (row["image_size"], row["batch_size"]) == ([56, 56], 1) else set()
        assert set(row["contenders"]) == expected
        for stats in row["contenders"].values():
            _check_stats(stats, row["batch_size"])
        contenders, ratios = row["contenders"], row["ratios"]
        assert ratios["emovlm_kd_over_floor"] == pytest.approx(
            contenders["emovlm_kd"]["median_s"] / contenders["vlm_floor"]["median_s"]
        )
        assert ratios["reference_over_emovlm_kd"] == pytest.approx(
            contenders["reference"]["median_s"] / contenders["emovlm_kd"]["median_s"]
        )
        memory = row["memory"]
        # the head and gate add weights to the VLM; the reference also holds a second visual encoder
        assert (
            memory["vlm_floor"]["weights_mib"]
            < memory["emovlm_kd"]["weights_mib"]
            < memory["reference"]["weights_mib"]
        )
        for report in memory.values():
            assert report["inference_peak_mib"] >= 0
            assert report["total_mib"] == pytest.approx(report["weights_mib"] + report["inference_peak_mib"])
        key = f"{row['image_size'][0]}x{row['image_size'][1]}px_batch{row['batch_size']}"
        assert set(result["target_checks"][key]) >= {"emovlm_kd_over_floor"}
    assert result["targets"]["emovlm_kd_over_floor_max"] == 1.15  # the small preset's target
    for name in ("emovlm_kd", "vlm_floor", "reference", "reference_256", "| 56² |", "| 60² | 56² |", "| 84×56 |"):
        assert name in markdown


@pytest.mark.parametrize("memory", ["inline", "skip"])
def test_inline_or_no_memory_and_contender_subset(tmp_path, memory):
    argv = QUICK + ["--image-sizes", "56", "--batch-sizes", "1", "--contenders", "emovlm_kd", "vlm_floor"]
    argv += ["--memory", memory, "--output-dir", str(tmp_path), "--tag", memory]
    bench_inference.main(argv)
    result, markdown = _read(tmp_path, f"inference_{memory}")
    (row,) = result["results"]
    assert set(row["contenders"]) == {"emovlm_kd", "vlm_floor"} and "reference_over_emovlm_kd" not in row["ratios"]
    if memory == "inline":
        assert row["memory"]["emovlm_kd"]["weights_mib"] > row["memory"]["vlm_floor"]["weights_mib"] > 0
        assert "measured during the timed calls" in markdown
    else:
        assert "memory" not in row and "not measured in this run" in markdown


def test_training_benchmark_extrapolates_the_reference_epochs(tmp_path):
    argv = QUICK + [
        "--num-images",
        "3",
        "--image-size",
        "56",
        "--extract-batch-size",
        "2",
        "--head-epochs",
        "2",
        "--gate-epochs",
        "3",
        "--output-dir",
        str(tmp_path),
        "--tag",
        "smoke",
        "--clock",
        "cpu",
    ]
    bench_training.main(argv)
    result, markdown = _read(tmp_path, "training_smoke")

    cached, reference = result["cached"], result["reference"]
    assert cached["total_s"] == pytest.approx(
        cached["extract_features_s"] + cached["train_head_s"] + cached["train_gate_s"]
    )
    assert all(math.isfinite(loss) for loss in cached["final_losses"].values())
    for stage, epochs in (("head", 2), ("gate", 3)):
        timed = reference["stages"][stage]
        assert timed["epochs_timed"] == 1 and timed["epochs_total"] == epochs and timed["extrapolated"]
        assert timed["total_s"] == pytest.approx(timed["seconds_per_epoch"] * epochs)
    assert result["ratio_reference_over_cached"] == pytest.approx(reference["total_s"] / cached["total_s"])
    config = build_model(MODEL_PRESETS["cpu"], MIKELS_LABELS, "cpu", torch.float32)[0].config
    answer = config.answer_token_ids[config.label2id["contentment"]]  # the realistic generation length
    assert result["settings"]["reference_generated_tokens"] == len(answer)
    assert result["feature_caching_images_per_s"] == pytest.approx(3 / cached["extract_features_s"])
    assert "cached (this project)" in markdown and "multiplied by the epoch counts" in markdown
    assert "Feature caching" in markdown and "images/s" in markdown


def test_scaling_benchmark_sweeps_batch_and_classes(tmp_path):
    argv = QUICK + [
        "--image-size",
        "56",
        "--batch-sizes",
        "1",
        "3",
        "--class-counts",
        "2",
        "5",
        "--class-sweep-batch-size",
        "2",
        "--output-dir",
        str(tmp_path),
        "--tag",
        "smoke",
    ]
    bench_scaling.main(argv)
    result, markdown = _read(tmp_path, "scaling_smoke")

    assert [row["batch_size"] for row in result["batch_sweep"]] == [1, 3]
    assert all(row["num_classes"] == 8 for row in result["batch_sweep"])
    two, five = result["class_sweep"]
    assert (two["num_classes"], five["num_classes"]) == (2, 5)
    # more classes: a longer prompt (it lists them) and more answer tokens to score
    assert five["prompt_tokens"] > two["prompt_tokens"] and five["trie_nodes"] > two["trie_nodes"]
    for row in result["batch_sweep"] + result["class_sweep"]:
        for stats in row["contenders"].values():
            _check_stats(stats, row["batch_size"])
    assert "| 5 |" in markdown and "Class sweep" in markdown


def test_reference_pipeline_shares_weights_and_parses_like_the_paper():
    torch.manual_seed(0)
    model, image_processor, vlm_processor = build_model(MODEL_PRESETS["cpu"], MIKELS_LABELS, "cpu", torch.float32)
    reference = ReferencePipeline(model, vlm_processor, max_new_tokens=2, min_new_tokens=2)
    images = synthetic_images(2, 56)
    (prepared,) = reference.prepare(images[:1])
    inputs = to_device(image_processor(images[:1]), "cpu", torch.float32)
    # the reference builds the same prompt as the image processor, and its encoder copy equals the VLM's encoder
    assert torch.equal(prepared["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        copy_embeds = reference.visual_encoder_copy(prepared["pixel_values"], grid_thw=prepared["image_grid_thw"])
        own_embeds = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])[0]
    assert torch.allclose(copy_embeds.pooler_output, own_embeds)
    assert reference.visual_encoder_copy is not model.vlm.model.visual
    with torch.no_grad():
        logits = reference.predict(reference.prepare(images))
    assert logits.shape == (2, len(MIKELS_LABELS)) and torch.isfinite(logits).all()

    assert parse_answer("sure: {'emotion': 'awe'} and {'emotion': 'fear'}", MIKELS_LABELS) == MIKELS_LABELS.index(
        "awe"
    )
    assert parse_answer("{'emotion':'sadness'}", MIKELS_LABELS) == MIKELS_LABELS.index("sadness")
    assert parse_answer("{'emotion': 'joy'}", MIKELS_LABELS) is None  # not a class: the reference's all-zeros
    assert parse_answer("no answer here", MIKELS_LABELS) is None


@pytest.mark.slow
def test_profile_splits_the_time_into_components(tmp_path):
    argv = QUICK + ["--image-size", "56", "--top", "2", "--contenders", "emovlm_kd", "vlm_floor", "reference"]
    reports = profile_contenders.main(argv + ["--replay-runs", "2", "--output-dir", str(tmp_path), "--tag", "smoke"])
    markdown = (tmp_path / "profile_smoke_56x56px_batch1.md").read_text()
    for report in reports.values():
        components = report["components"]
        assert components["visual encoder"] > 0 and report["total_s"] == pytest.approx(sum(components.values()))
    assert (
        reports["emovlm_kd"]["calls_per_run"]["distilled head"] == 1 and "distilled head" not in reports["vlm_floor"]
    )
    assert reports["reference"]["calls_per_run"]["visual encoder copy (reference)"] == 1
    trie = reports["emovlm_kd"]["derived"][profile_contenders.TRIE_SHARE]
    lm = profile_contenders.LM_PROMPT
    assert trie == pytest.approx(reports["emovlm_kd"]["components"][lm] - reports["vlm_floor"]["components"][lm])
    assert "Top operators of `emovlm_kd`" in markdown and profile_contenders.TRIE_SHARE in markdown
    replay = json.loads((tmp_path / "profile_smoke_56x56px_batch1.json").read_text())["language_model_replay"]
    ours, floor = replay["tokens"].values()
    from emovlm_kd.tiny import build_tiny_model

    model = build_tiny_model(MIKELS_LABELS)[0]  # the same tokenizer as the benchmark's model
    inner = len(model._trie.tensors(torch.device("cpu"))["context_tokens"])
    padding = -(floor + inner) % model.scoring_pad_multiple  # dummy nodes up to a multiple of 8 tokens
    assert ours - floor == inner + padding and ours % model.scoring_pad_multiple == 0  # the trie's inner nodes
    assert replay["trie_s"] == pytest.approx(
        replay["median_s"]["prompt + trie (emovlm_kd)"] - replay["median_s"]["prompt only (floor)"]
    )
    assert "The trie tokens cost" in markdown


def test_the_papers_image_cap():
    photo = Image.new("RGB", (4032, 3024))
    assert limit_longest_side(photo).size == (1024, 768)
    assert limit_longest_side(Image.new("RGB", (3024, 4032))).size == (768, 1024)
    assert limit_longest_side(Image.new("RGB", (1500, 1001))).size == (1024, 683)  # truncated, as the reference does
    small = Image.new("RGB", (500, 375))
    assert limit_longest_side(small) is small
    capped, applied_by = cap_images([photo], SimpleNamespace())  # an image processor without its own cap
    assert capped[0].size == (1024, 768) and applied_by.startswith("benchmark")
    kept, applied_by = cap_images([photo], SimpleNamespace(max_image_side=1024))  # one that caps by itself
    assert kept[0] is photo and applied_by == "EmoVLMKDImageProcessor(max_image_side=1024)"


def test_real_photo_sizes_through_the_qwen2_vl_processor():
    _, image_processor, _ = build_model(MODEL_PRESETS["cpu"], MIKELS_LABELS, "cpu", torch.float32)
    contenders = SimpleNamespace(image_processor=image_processor)
    tokens = {}
    for size in [(500, 375), (1024, 768), (4032, 3024)]:
        images, _ = cap_images(synthetic_images(1, size), image_processor)
        grid = image_processor(images)["image_grid_thw"][0].tolist()
        tokens[size] = (grid[1] * grid[2] // 4, bench_inference.Contenders.uncapped_image_tokens(contenders, size))
    # 500x375 -> 504x364 (234 tokens); 1024x768 -> 1036x756 (999); the 12-MP photo would be 15,552 without the cap
    assert tokens == {(500, 375): (234, 234), (1024, 768): (999, 999), (4032, 3024): (999, 15552)}


def test_label_sets_and_bad_arguments():
    assert labels_for(2) == ["negative", "positive"] and labels_for(8) == MIKELS_LABELS
    assert len(set(labels_for(32))) == 32
    with pytest.raises(ValueError, match="num_classes must be between 2 and 32, got 33"):
        labels_for(33)
    assert parse_image_size("500x375") == (500, 375) and parse_image_size("224") == (224, 224)
    for parse, argv in (
        (bench_training.parse_args, ["--num-images", "0"]),
        (bench_scaling.parse_args, ["--class-counts", "2", "40"]),
        (bench_inference.parse_args, ["--image-sizes", "20"]),
        (bench_inference.parse_args, ["--image-sizes", "500x40"]),
        (bench_inference.parse_args, ["--image-sizes", "500by375"]),
    ):
        with pytest.raises(SystemExit):
            parse(argv)


def test_run_all_summarizes_results_into_the_readme(tmp_path):
    argv = QUICK + ["--image-size", "56", "--batch-sizes", "1", "--class-counts", "2"]
    bench_scaling.main(argv + ["--output-dir", str(tmp_path), "--tag", "smoke"])
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:smoke:start -->\nold table\n<!-- results:smoke:end -->\noutro\n")
    run_all.main(["--summarize-only", "--output-dir", str(tmp_path), "--tag", "smoke"])
    summary = (tmp_path / "summary_smoke.md").read_text()
    assert "### Scaling" in summary and "### Inference" not in summary  # only what was run
    run_all.update_readme(summary, "smoke", readme)
    text = readme.read_text()
    assert (
        "old table" not in text and "### Scaling" in text and text.startswith("intro\n") and text.endswith("outro\n")
    )
    with pytest.raises(ValueError, match="no <!-- results:cuda:start -->"):
        run_all.update_readme(summary, "cuda", readme)


def test_run_all_fails_fast_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU is available"):
        run_all.main(["--preset", "qwen2-vl-7b", "--device", "cuda", "--dtype", "bfloat16", "--update-readme"])
    assert "=====" not in capsys.readouterr().out  # nothing started


@pytest.mark.slow  # the GPU command's whole plan, on the small model at tiny sizes (~1 minute)
def test_the_gpu_command_fills_the_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:cuda-qwen2-vl-7b:start -->\npending\n<!-- results:cuda-qwen2-vl-7b:end -->\n")
    command = ["--preset", "qwen2-vl-7b", "--device", "cuda", "--dtype", "bfloat16", "--update-readme", "--smoke"]
    results = run_all.main(command + ["--threads", "1", "--output-dir", str(tmp_path), "--readme", str(readme)])
    assert set(results) == {"inference", "training", "scaling"}
    inference, training = results["inference"], results["training"]
    # the GPU plan's shape: three photo sizes (two reach the model alike at the smoke sizes), batches 1 and 8
    # -> 1 and 2, the paper's teacher -> a tiny one, a batch sweep and a class sweep
    assert len(inference["preprocessing"]) == 3 and {row["batch_size"] for row in inference["results"]} == {1, 2}
    assert training["settings"]["teacher"] == "vit_tiny_patch16_224"
    assert [row["num_classes"] for row in results["scaling"]["class_sweep"]] == [2, 3]
    text = readme.read_text()
    assert "pending" not in text
    for section in ("#### At a glance", "#### Inference", "#### Training stages 3 + 4", "#### Scaling"):
        assert section in text
    assert "emovlm_kd images/s" in text and "feature caching" in text.lower()
    assert (tmp_path / "summary_cuda-qwen2-vl-7b.md").exists()
