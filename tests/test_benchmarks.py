"""Smoke tests of the benchmark scripts: tiny sizes, one run, and checks that their reports hold together."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_inference  # noqa: E402
import bench_scaling  # noqa: E402
import bench_training  # noqa: E402
from bench_utils import MIKELS_LABELS, MODEL_PRESETS, build_model, labels_for, synthetic_images, to_device  # noqa: E402
from reference_pipeline import ReferencePipeline, parse_answer  # noqa: E402

# Small but real: the cpu preset's model on 56x56 images (4 image tokens), one timed run, no warm-up.
QUICK = ["--runs", "1", "--warmup", "0", "--threads", "1"]


def _read(output_dir: Path, name: str) -> tuple[dict, str]:
    return json.loads((output_dir / f"{name}.json").read_text()), (output_dir / f"{name}.md").read_text()


def _check_stats(stats: dict, images: int):
    assert stats["median_s"] > 0 and stats["runs"] == 1
    assert stats["images_per_s"] == pytest.approx(images / stats["median_s"])
    assert stats["wall"]["min_s"] <= stats["wall"]["median_s"] <= stats["wall"]["max_s"]
    assert stats["cpu"]["median_s"] > 0


def test_inference_benchmark_reports_every_contender_ratio_and_memory(tmp_path):
    argv = QUICK + [
        "--image-sizes",
        "56",
        "--batch-sizes",
        "1",
        "2",
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
    assert [(row["image_size"], row["batch_size"]) for row in result["results"]] == [(56, 1), (56, 2)]
    for row in result["results"]:
        assert row["image_tokens"] == 4 and row["prompt_tokens"] > row["image_tokens"]
        expected = {"emovlm_kd", "vlm_floor", "reference"} | ({"reference_256"} if row["batch_size"] == 1 else set())
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
        assert set(result["target_checks"][f"56px_batch{row['batch_size']}"]) >= {"emovlm_kd_over_floor"}
    for name in ("emovlm_kd", "vlm_floor", "reference", "reference_256", "| 56² |"):
        assert name in markdown


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
    config = build_model(MODEL_PRESETS["cpu"], 56, MIKELS_LABELS, "cpu", torch.float32)[0].config
    answer = config.answer_token_ids[config.label2id["contentment"]]  # the realistic generation length
    assert result["settings"]["reference_generated_tokens"] == len(answer)
    assert "cached (this project)" in markdown and "multiplied by the epoch counts" in markdown


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
    model, image_processor, vlm_processor = build_model(MODEL_PRESETS["cpu"], 56, MIKELS_LABELS, "cpu", torch.float32)
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


def test_label_sets_and_bad_arguments():
    assert labels_for(2) == ["negative", "positive"] and labels_for(8) == MIKELS_LABELS
    assert len(set(labels_for(32))) == 32
    with pytest.raises(ValueError, match="num_classes must be between 2 and 32, got 33"):
        labels_for(33)
    for parse, argv in (
        (bench_training.parse_args, ["--num-images", "0"]),
        (bench_scaling.parse_args, ["--class-counts", "2", "40"]),
        (bench_inference.parse_args, ["--image-sizes", "20"]),
    ):
        with pytest.raises(SystemExit):
            parse(argv)


def test_run_all_summarizes_results_into_the_readme(tmp_path):
    import run_all

    bench_scaling.main(QUICK + ["--image-size", "56", "--batch-sizes", "1", "--class-counts", "2",
                                "--output-dir", str(tmp_path), "--tag", "smoke"])  # fmt: skip
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
