# Config validation (before any job starts) and the helpers every rule file uses.
import json
import pathlib
import shlex
import sys

from mimlib import paths as P
from mimlib.config import ConfigError, pretrain_recipe, source_root, validate_config
from mimlib.resources import finetune_resources, light_resources, pretrain_resources
from mimlib.train.schedule import branch_iters, decay_at, trunk_points

try:
    CFG = validate_config(config)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

RESULTS = CFG["results"]
# The interpreter that runs Snakemake runs the jobs too (same venv locally and on Slurm nodes).
MIMLIB = f"{shlex.quote(sys.executable)} -m mimlib"
LAUNCH = f"{workflow.basedir}/workflow/scripts/launch.sh"


def launch(resources):
    """The command prefix that starts a training job's processes (see launch.sh)."""
    return f"{LAUNCH} {resources.nodes} {resources.tasks} {shlex.quote(sys.executable)}"


def job_device(resources):
    """A job given GPUs must train on them (no silent CPU run); others take CUDA if present."""
    return "cuda" if resources.gpus else "auto"


wildcard_constraints:
    model="|".join(map(re.escape, CFG["models"])),
    dataset="|".join(map(re.escape, CFG["datasets"])),
    source="|".join(map(re.escape, CFG["sources"])),
    split="train|val",
    iter=r"\d+",
    length=r"\d+",


def res(pattern, **wildcards):
    """A results path; with no wildcards given, the pattern keeps Snakemake's {wildcards}."""
    return f"{RESULTS}/{pattern.format(**wildcards) if wildcards else pattern}"


def results_of(path, pattern):
    """The results folder of a path ``res(pattern)`` built (a rule's output names its root)."""
    full, tail = pathlib.Path(path).parts, pathlib.Path(pattern).parts
    if full[-len(tail):] != tail:
        raise WorkflowError(f"{path} is not <results>/{pattern}")
    return str(pathlib.Path(*full[: -len(tail)])) if len(full) > len(tail) else "."


def resume(pattern, **wildcards):
    """A job's rolling resume state (under the config's resume_root; never a declared output)."""
    return str(P.resume_root(CFG) / pattern.format(**wildcards))


def quoted_json(obj):
    return shlex.quote(json.dumps(obj, sort_keys=True))


def tracking_args(cfg):
    """The training jobs' ``--tracking-json``: the config's tracking block (TensorBoard, W&B,
    MLflow). Each job names its run after its folder and tags it with its cell itself.

    The rules use it as the global TRACKING, not as a param: where metrics are also sent is
    not a parameter of a result (as a param, turning W&B on would rerun every job), as
    MIMLIB, the interpreter, is not."""
    return f"--tracking-json {quoted_json(cfg['tracking'])}"


TRACKING = tracking_args(CFG)


# Training jobs keep their final state in their resume folder when done (--keep-final-state,
# mimlib/train/final_state.py): a job that completes after Snakemake was interrupted is never
# recorded, and the rerun re-creates its outputs from that state instead of training again.
# The run removes the final states of the training jobs it has recorded: every one of its DAG
# that did not need to run or has finished. An orphaned job still running is neither.
FINAL_STATE_RULES = ("pretrain_trunk", "pretrain_branch", "finetune")


def drop_recorded_final_states():
    from snakemake.logging import logger

    from mimlib.train.final_state import drop_final_state

    try:
        dag = workflow.dag
        for job in list(dag.jobs):
            if job.rule.name in FINAL_STATE_RULES and dag.noneedrun_finished(job):
                drop_final_state(job.params.resume)
    except Exception as exc:  # housekeeping only: never fail a run over it
        logger.warning(f"could not remove the final states of finished training jobs: {exc!r}")
