"""All stages in order for one dataset, skipping those already complete for the same inputs and settings.

    0. instruction data   only when an endpoint is set (`instruction_data.base_url` or `instruction_data.provider`)
    1. instruction tuning LoRA on the VLM (classification task alone without instruction data)
    2. teacher            3. distillation    4. gate    5. evaluation    6. export (+ push with `export.push_to_hub`)

Settings come from the stages' defaults (the paper's), then a recipe (`--config FILE` or a shipped name such as
`quickstart`; see `emovlm_kd.arguments`), then the command line: the run options (`--data-dir`, `--seed`, ...) and
`--set KEY=VALUE ...`, where KEY is `STAGE.FIELD` (`distill.epochs=10`) or a bare `FIELD` for every stage that has
it (`vlm=tiny`), and VALUE is YAML (`head_hidden_sizes=[64]`). The resolved settings of every stage are written to
`<run_dir>/run_config.yaml`, itself a recipe. A stage whose `COMPLETE.json` holds the fingerprint it would write is
skipped (`--force` runs it anyway); an interrupted stage resumes from its last epoch checkpoint.
"""

import argparse
import dataclasses
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from emovlm_kd.arguments import (
    REDACTED,
    RunArguments,
    coerce_values,
    field_names,
    load_recipe,
    overrides_of,
    recordable,
    stage_values,
)
from emovlm_kd.processes import main_process_lock, print_once
from emovlm_kd.run_dir import STAGES, DataError, is_complete, read_complete, write_atomic
from emovlm_kd.settings import NOTHING, Affects

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.yaml"


@dataclass
class RunAllArguments:
    AFFECTS: ClassVar[dict[str, Affects]] = {
        "config": NOTHING,  # its values are the stages' settings; its name is RunArguments.recipe_name
        "stages": NOTHING,
        "set": NOTHING,
        "force": NOTHING,
        "resume": NOTHING,
    }

    config: str | None = field(
        default=None,
        metadata={
            "help": "Recipe: a YAML/JSON file, or the name of a shipped one (e.g. quickstart)",
            "aliases": ["--recipe"],
        },
    )
    stages: list[str] | None = field(
        default=None, metadata={"help": f"Stages to consider, among {list(STAGES)} (default: the recipe's, else all)"}
    )
    set: list[str] = field(
        default_factory=list,
        metadata={"help": "Stage settings STAGE.FIELD=VALUE, or FIELD=VALUE for every stage that has the field"},
    )
    force: bool = field(default=False, metadata={"help": "Run the stages even when complete"})
    resume: bool = field(default=True, metadata={"help": "Resume interrupted stages from their epoch checkpoints"})


def check_stage_names(stages: list[str]):
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"Unknown stage(s) {unknown}; stages: {list(STAGES)}")


@dataclass
class StagePlan:
    stage: str
    module: object
    args: object


def build_parser():
    from transformers import HfArgumentParser

    # Run options override the recipe only when given, hence optional copies of the RunArguments fields.
    return HfArgumentParser(
        (overrides_of(RunArguments), RunAllArguments),
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse_overrides(items: list[str], modules: dict) -> tuple[dict, dict]:
    """`--set` items as (RunArguments values, `{stage: {field: value}}`); YAML values."""
    import yaml

    run_values, stage_values_ = {}, {stage: {} for stage in modules}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. distill.epochs=10")
        value = yaml.safe_load(text) if text else ""
        target, _, name = key.rpartition(".")
        name = name.replace("-", "_")
        if target == "run":
            run_values[name] = value
        elif target:
            if target not in modules:
                raise ValueError(f"--set {item!r}: stage {target!r} is not among the selected stages {list(modules)}")
            stage_values_[target][name] = value
        else:
            having = [stage for stage, module in modules.items() if name in field_names(module.ARGUMENTS)]
            if not having:
                raise ValueError(f"--set {item!r}: no selected stage has a setting {name!r}")
            for stage in having:
                stage_values_[stage][name] = value
    return run_values, stage_values_


def plan(argv=None) -> tuple[RunAllArguments, RunArguments, list[StagePlan]]:
    """Parse the command line and resolve every selected stage's settings (defaults < recipe < command line)."""
    cli_run, run_all_args = build_parser().parse_args_into_dataclasses(argv)
    cli_run = {name: value for name, value in dataclasses.asdict(cli_run).items() if value is not None}
    recipe = load_recipe(run_all_args.config) if run_all_args.config else {"run": {}}
    selected = run_all_args.stages or recipe.get("stages") or list(STAGES)
    check_stage_names(selected)
    modules = {stage: importlib.import_module(f"emovlm_kd.stages.{stage}") for stage in STAGES if stage in selected}
    set_run, set_stages = parse_overrides(run_all_args.set, modules)
    run_args = RunArguments(**{**recipe["run"], **coerce_values(RunArguments, {**cli_run, **set_run}, "command line")})
    plans = []
    for stage, module in modules.items():
        base = {"resume": run_all_args.resume} if "resume" in field_names(module.ARGUMENTS) else {}
        values = {**base, **stage_values(recipe, stage, module.ARGUMENTS, set_stages[stage])}
        plans.append(StagePlan(stage, module, module.ARGUMENTS(**values)))
    return run_all_args, run_args, plans


def write_run_config(run_args: RunArguments, plans: list[StagePlan]) -> Path:
    """The resolved settings, as a recipe that reproduces the run: `<run_dir>/run_config.yaml`."""
    import yaml

    config = {"run": recordable(run_args), "stages": [p.stage for p in plans]}
    for p in plans:  # credentials stay out: a rerun takes them from the environment again
        config[p.stage] = {name: value for name, value in recordable(p.args).items() if value != REDACTED}
    path = Path(run_args.run_dir) / RUN_CONFIG_FILE
    write_atomic(path, yaml.safe_dump(config, sort_keys=False))
    return path


def _is_complete(plan_: StagePlan, run_args) -> bool:
    try:
        return is_complete(run_args.run_dir, plan_.stage, plan_.module.fingerprint(run_args, plan_.args))
    except DataError:  # an upstream stage is missing: the stage will say so when it runs
        return False


def run(run_all_args: RunAllArguments, run_args: RunArguments, plans: list[StagePlan]) -> dict:
    summary = {}
    with main_process_lock(run_args.run_dir):  # one run at a time in a run directory
        write_run_config(run_args, plans)
        for plan_ in plans:
            result = run_stage(run_all_args, run_args, plan_)
            if result is None:
                continue
            summary[plan_.stage] = result
            if result.get("stopped"):
                logger.warning(f"Stage {plan_.stage!r} stopped early; later stages not run")
                break
    return summary


def run_stage(run_all_args: RunAllArguments, run_args: RunArguments, plan_: StagePlan) -> dict | None:
    """One stage of the run: None when it is not configured, a `skipped` summary when it is complete."""
    stage = plan_.stage
    enabled = getattr(plan_.module, "enabled", None)
    if enabled is not None and not enabled(plan_.args):
        logger.info(f"Stage {stage!r} skipped: not configured (see `python train/{stage}.py --help`)")
        return None
    if not run_all_args.force and _is_complete(plan_, run_args):
        logger.info(f"Stage {stage!r} is complete for these inputs; skipped")
        return {"skipped": "complete", **_recorded(run_args.run_dir, stage)}
    logger.info(f"Stage {stage!r}: {recordable(plan_.args)}")
    started = time.time()
    result = plan_.module.run(run_args, plan_.args)
    result["seconds"] = round(time.time() - started, 1)
    return result


def _recorded(run_dir, stage: str) -> dict:
    record = read_complete(run_dir, stage) or {}
    return {key: value for key, value in record.items() if key in ("val_metrics", "results", "output")}


def main(argv=None) -> dict:
    from emovlm_kd.console import exit_with_error, run_dir_command, setup_logging
    from emovlm_kd.processes import end_processes

    setup_logging()
    try:
        run_all_args, run_args, plans = plan(argv)
    except ValueError as error:
        exit_with_error(error)
    started = time.time()
    try:
        with run_dir_command(run_args.run_dir):
            summary = run(run_all_args, run_args, plans)
    finally:
        end_processes()
    summary["total_seconds"] = round(time.time() - started, 1)
    print_once(json.dumps(summary, indent=2, default=str))
    return summary


__all__ = ["RunAllArguments", "StagePlan", "build_parser", "main", "parse_overrides", "plan", "run"]
