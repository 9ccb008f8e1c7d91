"""EmoVLM-KD end to end in a few minutes, offline, on CPU.

With no arguments: builds the tiny random-init VLM and teacher, generates a small dataset whose classes differ in
colour (a learnable visual signal) with templated instruction data (an observation and a reasoning per class, in
stage 0's format, so that stage 1 trains all three tasks), runs every training stage through the same code as
`train/run_all.py`, exports the model folder, reloads it in a fresh process with `AutoModelForImageClassification`
and the pipeline, and prints per-branch accuracy, a few predictions and the VLM's explanations of them.

    python examples/quickstart.py                                  # everything offline
    python examples/quickstart.py --data path/to/imagefolder        # your data (train/[val/]test/<class>/*)
    python examples/quickstart.py --data path/to/parquet-folder     # or any `datasets` source (see --dataset)
    python examples/quickstart.py --vlm tiny-qwen3-vl               # the same with a tiny Qwen3-VL (deepstack)
    python examples/quickstart.py --vlm Qwen/Qwen2-VL-2B-Instruct --teacher vit_base_patch16_384  # real models

With real checkpoints the paper's hyper-parameters are used (needs Hub access, and a GPU to be practical).
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from huggingface_hub import ModelCard

from emovlm_kd.metrics import results_table
from emovlm_kd.run_dir import read_results, stage_output
from emovlm_kd.stages import run_all
from emovlm_kd.testing import make_imagefolder, write_instruction_data
from emovlm_kd.vlm import is_tiny_vlm

# Runs in a fresh interpreter: only transformers and the model folder (remote code), as a user on the Hub would.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoModelForImageClassification, pipeline

    folder, images, explain = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "explain"
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
    if explain:  # the scores, and the VLM's own words about each image
        results = classifier(images, batch_size=4, top_k=1, explain=True, max_new_tokens=48)
    else:
        results = [{"predictions": predictions} for predictions in classifier(images, batch_size=4, top_k=1)]
    print(json.dumps({"class": type(model).__name__, "results": results}))
    """
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        default=None,
        help="ImageFolder tree or any datasets source (save_to_disk folder, parquet/arrow files, Hub dataset id; "
        "its Image and ClassLabel columns); default: generate a small dataset",
    )
    parser.add_argument("--run-dir", default=None, help="Where the run goes; default: a new temporary folder")
    parser.add_argument(
        "--vlm",
        default="tiny",
        help="VLM checkpoint, or a built-in tiny one (offline): 'tiny' (Qwen2-VL), 'tiny-qwen2.5-vl', 'tiny-qwen3-vl'",
    )
    parser.add_argument("--teacher", default="tiny", help="timm model name, or 'tiny' (offline)")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def run_all_argv(args, data: str, run_dir: Path) -> list[str]:
    """The quickstart recipe; with real checkpoints, the paper's hyper-parameters (every stage's defaults)."""
    argv = ["--dataset", data, "--run-dir", str(run_dir), "--seed", str(args.seed)]
    if is_tiny_vlm(args.vlm) and args.teacher == "tiny":  # e.g. --vlm tiny-qwen3-vl: the recipe, that VLM
        return argv + ["--config", "quickstart"] + ([] if args.vlm == "tiny" else ["--set", f"vlm={args.vlm}"])
    stages = ["instruction_tuning", "teacher", "distill", "gate", "evaluate", "export"]
    pretrained = str(args.teacher != "tiny").lower()
    return argv + [
        "--stages",
        *stages,
        "--set",
        f"vlm={args.vlm}",
        f"teacher={args.teacher}",
        f"pretrained={pretrained}",
    ]


def reload_in_fresh_process(model_dir: Path, images: list[str], explain: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(model_dir), json.dumps(images), "explain" if explain else "-"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"Reloading {model_dir} in a fresh process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    started = time.time()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="emovlm-kd-quickstart-"))
    if args.data:  # a local path resolved (the reload runs from another folder); a Hub id as it is
        data = str(Path(args.data).resolve()) if Path(args.data).exists() else args.data
    else:
        data_dir = make_imagefolder(run_dir / "data", per_class={"train": 24, "test": 12}, seed=args.seed)
        instruction_data = write_instruction_data(data_dir, stage_output(run_dir, "instruction_data"))
        data = str(data_dir)
        print(f"Generated a 3-class colour dataset (24 train / 12 test images per class) in {data_dir}")
        print(f"Wrote templated instruction data (an observation and a reasoning per class) to {instruction_data}")

    summary = run_all.run(*run_all.plan(run_all_argv(args, data, run_dir)))
    model_dir = Path(summary["export"]["output"]) if "output" in summary.get("export", {}) else run_dir / "model"
    results = read_results(run_dir)

    # the card's widget examples: a test image per class (at most 4 here), copied into the repo by the export
    widget = ModelCard.load(model_dir / "README.md").data.to_dict().get("widget", [])
    samples = [model_dir / entry["src"] for entry in widget][:4]
    explained = stage_output(run_dir, "instruction_data").exists()  # stage 1 taught the VLM to explain
    reloaded = reload_in_fresh_process(model_dir, [str(path) for path in samples], explain=explained)

    print("\nAccuracy / macro-F1 per branch (from the evaluation stage):\n")
    print(results_table(results))
    print(f"\nPredictions of the reloaded model ({reloaded['class']}, fresh process, pipeline):")
    for path, result in zip(samples, reloaded["results"]):
        prediction = result["predictions"][0]
        print(f"  {path.parent.name:>12}/{path.name:<24} -> {prediction['label']} ({prediction['score']:.2f})")
    if explained:
        print("\nThe VLM's explanations of them (pipeline `explain=True`: its own words, not ground truth):")
        for path, result in zip(samples, reloaded["results"]):
            print(f"  {path.parent.name:>12}/{path.name:<24} -> {result['explanation']!r}")
    else:
        print("\nNo explanations: without instruction data (stage 0) stage 1 did not teach the VLM to explain.")
    print(f"\nDone in {time.time() - started:.0f} s. The model folder is {model_dir}")
    print(f"Load it with AutoModelForImageClassification.from_pretrained({str(model_dir)!r}, trust_remote_code=True)")
    return {"model_dir": str(model_dir), "results": results, "reloaded": reloaded}


if __name__ == "__main__":
    main()
