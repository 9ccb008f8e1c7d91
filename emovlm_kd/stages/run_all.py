"""All stages in order for one dataset, skipping those already complete for the same inputs and arguments.

    0. instruction data   only with --base-url (an OpenAI-compatible vision endpoint)
    1. instruction tuning LoRA on the VLM (classification task alone without instruction data)
    2. teacher            3. distillation    4. gate    5. evaluation    6. export (+ push with --push-to-hub)

Shared options (data, run dir, seed, VLM, teacher, ...) go to every stage that has them; anything else goes to one
stage through `--<stage>-args "..."`, e.g. `--distill-args "--epochs 50 --learning-rate 1e-3"`. A stage whose
`COMPLETE.json` holds the fingerprint it would write is skipped (`--force` runs it anyway); an interrupted stage
resumes from its last epoch checkpoint.
"""

import argparse
import importlib
import json
import logging
import shlex
import time

from emovlm_kd.data import is_complete, read_complete
from emovlm_kd.stages import STAGES

logger = logging.getLogger(__name__)

# run_all option (dest) -> the flag(s) a stage may know it by (all that it has are set).
SHARED_OPTIONS = {
    "data_dir": ["--data-dir"],
    "run_dir": ["--run-dir"],
    "val_fraction": ["--val-fraction"],
    "seed": ["--seed", "--split-seed"],
    "report_to": ["--report-to"],
    "num_workers": ["--num-workers"],
    "mixed_precision": ["--mixed-precision"],
    "vlm": ["--vlm"],
    "teacher": ["--teacher"],
    "pretrained": ["--pretrained"],
    "base_url": ["--base-url"],
    "instruction_model": ["--model"],
    "gate_type": ["--gate-type"],
    "push_to_hub": ["--push-to-hub"],
    "resume": ["--resume"],
    "force": ["--overwrite"],  # stages that check their own completion
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", required=True, help="ImageFolder dataset: train/[val/]test/<class>/<image>")
    parser.add_argument("--run-dir", required=True, help="The run directory")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="Held-out share of train when no val/")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--report-to", default="tensorboard", help="Accelerate tracker(s), or 'none'")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--vlm", default="Qwen/Qwen2-VL-7B-Instruct", help="Base VLM; 'tiny' works offline")
    parser.add_argument("--teacher", default="vit_base_patch16_384", help="timm model name, or 'tiny'")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="Pretrained teacher")
    parser.add_argument(
        "--base-url", "--instruction-endpoint", dest="base_url", default=None,
        help="OpenAI-compatible endpoint for stage 0; without it stage 0 is skipped",
    )  # fmt: skip
    parser.add_argument("--instruction-model", default=None, help="Chat model of that endpoint (stage 0 --model)")
    parser.add_argument("--gate-type", default=None, help="Gate variant (stage 4 --gate-type)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="Upload the final repo (stage 6)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="Stages to consider")
    parser.add_argument("--force", action="store_true", help="Run the stages even when complete")
    parser.add_argument(
        "--resume", action=argparse.BooleanOptionalAction, default=True, help="Resume interrupted stages"
    )
    for stage in STAGES:
        parser.add_argument(
            f"--{stage.replace('_', '-')}-args", default="", metavar="ARGS", help=f"Extra arguments of stage {stage!r}"
        )
    return parser


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return parser._option_string_actions


def stage_argv(args, stage: str, parser: argparse.ArgumentParser) -> list[str]:
    """The command line of one stage: the shared options it knows, then its `--<stage>-args`."""
    known = _flags(parser)
    argv = []
    for dest, flags in SHARED_OPTIONS.items():
        value = getattr(args, dest)
        for flag in [f for f in flags if f in known] if value is not None else []:
            action = known[flag]
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else flag.replace("--", "--no-", 1))
            elif action.nargs == 0:  # store_true
                argv += [flag] if value else []
            else:
                argv += [flag, str(value)]
    return argv + shlex.split(getattr(args, f"{stage}_args"))


def selected_stages(args) -> list[str]:
    stages = [stage for stage in STAGES if stage in args.stages]
    if "instruction_data" in stages and not args.base_url:
        logger.info("Stage 0 (instruction data) skipped: no --base-url; stage 1 trains the classification task alone")
        stages.remove("instruction_data")
    return stages


def run(args) -> dict:
    summary = {}
    for stage in selected_stages(args):
        try:
            module = importlib.import_module(f"emovlm_kd.stages.{stage}")
        except ModuleNotFoundError as error:
            if error.name != f"emovlm_kd.stages.{stage}":
                raise
            logger.warning(f"Stage {stage!r} is not available in this installation; skipped")
            summary[stage] = {"skipped": "not available"}
            continue
        argv = stage_argv(args, stage, module.build_parser())
        stage_args = module.build_parser().parse_args(argv)
        # Stages without `fingerprint()` check their own completion inside `run()`.
        if hasattr(module, "fingerprint") and not args.force:
            if is_complete(args.run_dir, stage, module.fingerprint(stage_args)):
                logger.info(f"Stage {stage!r} is complete for these inputs; skipped")
                summary[stage] = {"skipped": "complete", **_recorded(args.run_dir, stage)}
                continue
        logger.info(f"Stage {stage!r}: {shlex.join(argv)}")
        started = time.time()
        result = module.run(stage_args)
        result["seconds"] = round(time.time() - started, 1)
        summary[stage] = result
        if result.get("stopped"):
            logger.warning(f"Stage {stage!r} stopped early; later stages not run")
            break
    return summary


def _recorded(run_dir, stage: str) -> dict:
    record = read_complete(run_dir, stage) or {}
    return {k: v for k, v in record.items() if k in ("val_metrics", "results", "output")}


def main(argv=None) -> dict:
    from emovlm_kd.stages import end_processes

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    args = build_parser().parse_args(argv)
    started = time.time()
    try:
        summary = run(args)
    finally:
        end_processes()
    summary["total_seconds"] = round(time.time() - started, 1)
    print(json.dumps(summary, indent=2, default=str))
    return summary


__all__ = ["build_parser", "run", "selected_stages", "stage_argv"]
