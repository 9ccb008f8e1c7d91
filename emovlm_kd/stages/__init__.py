"""The training stages, one module each, in pipeline order (`STAGES`); `train/<stage>.py` runs one, `run_all` all.

Every stage module has
  * `STAGE`, its name, and `ARGUMENTS`, the dataclass of its settings (with the paper's defaults);
  * `fingerprint(run_args, args) -> str`: a hash of everything its result depends on (its settings, its data and
    the fingerprints of the upstream stages it reads), recorded in its `COMPLETE.json`;
  * `run(run_args, args) -> dict`: does the work, writes `COMPLETE.json` as its last action and returns a small
    summary (`{"stopped": True, ...}` when `stop_after_epoch` ended it early, without `COMPLETE.json`).
`run_args` are the shared [`~emovlm_kd.arguments.RunArguments`], `args` the stage's own `ARGUMENTS`;
`emovlm_kd.cli.cli_main(stage)` is a stage's command line.
"""

from emovlm_kd.run_dir import STAGES

__all__ = ["STAGES"]
