"""``python -m mimlib <stage> ...``: the one entry point the workflow rules call.

Each stage reads explicit paths and a JSON recipe, so a rule (or a person) can run any cell
by hand, under torchrun, or under srun.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from mimlib.finetune import DEMO_TASKS, TASKS
from mimlib.models.registry import MODELS


def _cmd_seed_study(args: argparse.Namespace) -> int:
    import yaml

    from mimlib.analysis.seeds import key_cells, seed_study_config, seed_targets
    from mimlib.config import load_config, validate_config

    cfg = load_config(args.config)
    study = validate_config(seed_study_config(cfg, args.seed))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(yaml.safe_dump(study, sort_keys=False))
    print("\n".join(seed_targets(study, key_cells(cfg, cfg["results"]))))
    return 0


def _cmd_seed_spread(args: argparse.Namespace) -> int:
    from mimlib.analysis.seeds import SEED_STUDY, SPREAD, seed_spread
    from mimlib.config import load_config

    cfg = load_config(args.config)
    studies = [Path(cfg["results"])] + [Path(cfg["results"]) / SEED_STUDY.format(seed=s) for s in args.seeds]
    table = seed_spread(cfg, studies)
    out = Path(cfg["results"]) / SPREAD
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.6g")
    print(f"{out}: {len(table)} quantities over seeds {cfg['seed']} {' '.join(map(str, args.seeds))}")
    print(table.drop(columns="values").to_string(index=False))
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from mimlib.config import load_config, pretrain_cells

    cfg = load_config(args.config, check_paths=not args.no_paths)
    cells = pretrain_cells(cfg)
    print(f"{args.config}: valid; {len(cells)} pre-training cells "
          f"({len(cfg['models'])} models x {len(cfg['datasets'])} datasets x {len(cfg['lengths'])} lengths)")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from mimlib.data.demo import ClassificationDemoSpec, write_classification_demo

    spec = ClassificationDemoSpec(**json.loads(args.spec_json)) if args.spec_json else ClassificationDemoSpec()
    counts = write_classification_demo(Path(args.out), spec)
    print(json.dumps(counts))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from mimlib.data.index import build_index

    df = build_index(Path(args.root), Path(args.out))
    print(f"{args.out}: {len(df)} images in {df['class_name'].nunique()} classes")
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    from mimlib.data.manifests import build_manifest

    kind = "fraction" if args.fraction is not None else "classes" if args.num_classes is not None else "whole"
    df = build_manifest(args.index, args.out, kind, seed=args.seed, fraction=args.fraction, num_classes=args.num_classes)
    print(f"{args.out}: {len(df)} images, {df['class_name'].nunique()} classes")
    return 0


def _tracking(args: argparse.Namespace) -> dict:
    """``--tracking-json`` over the schema's defaults (without it: the defaults, TensorBoard on)."""
    from mimlib.config import check_tracking

    return check_tracking(json.loads(args.tracking_json) if args.tracking_json else {}, "--tracking-json")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from mimlib.config import check_pretrain_recipe
    from mimlib.train.pretrain import PretrainJob, run_pretrain

    job = PretrainJob(
        model=args.model,
        recipe=check_pretrain_recipe(json.loads(args.recipe_json), "--recipe-json"),
        manifest=Path(args.manifest),
        end_iter=args.end_iter,
        out=Path(args.out),
        log_out=Path(args.log_out) if args.log_out else None,
        resume_dir=Path(args.resume_dir),
        seed=args.seed,
        decay_at=args.decay_at,
        init=Path(args.init) if args.init else None,
        val_index=Path(args.val_index) if args.val_index else None,
        val_max_images=args.val_max_images,
        metrics_out=Path(args.metrics_out) if args.metrics_out else None,
        cell=json.loads(args.cell_json) if args.cell_json else {},
        save_optimizer=not args.no_optimizer,
        device=args.device,
        keep_final=args.keep_final_state,
        tracking=_tracking(args),
    )
    from mimlib.train.preemption import Preempted

    try:
        run_pretrain(job, progress=not args.no_progress)
    except Preempted as exc:
        print(f"preempted: {exc}", file=sys.stderr)
        return exc.exit_code  # 143 after SIGTERM, 130 after SIGINT
    return 0


def _cmd_task_demo(args: argparse.Namespace) -> int:
    from mimlib.finetune import write_demo

    print(json.dumps(write_demo(args.task, args.out, json.loads(args.spec_json or "{}"))))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from mimlib.finetune import engine
    from mimlib.finetune.common import FinetuneJob

    job = FinetuneJob(
        task=args.task,
        model=args.model,
        recipe=json.loads(args.recipe_json),
        data=json.loads(args.data_json),
        out_dir=Path(args.out_dir),
        resume_dir=Path(args.resume_dir),
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        seed=args.seed,
        cell=json.loads(args.cell_json) if args.cell_json else {},
        device=args.device,
        trust_pickle=args.trust_pickle,
        keep_final=args.keep_final_state,
        tracking=_tracking(args),
    )
    task = engine(args.task)  # its run() checks the recipe first
    from mimlib.train.preemption import Preempted

    try:
        record = task.run(job, progress=not args.no_progress)
    except Preempted as exc:
        print(f"preempted: {exc}", file=sys.stderr)
        return exc.exit_code  # 143 after SIGTERM, 130 after SIGINT
    print(json.dumps(record["metrics"], sort_keys=True))
    return 0


def _cmd_finetune_summary(args: argparse.Namespace) -> int:
    from mimlib.analysis.finetune_summary import write_finetune_summary
    from mimlib.config import validate_config

    cfg = validate_config(json.loads(args.config_json), check_paths=False)
    write_finetune_summary(cfg, Path(args.results), Path(args.out))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from mimlib.config import load_config
    from mimlib.plan import format_plan, plan

    cfg = load_config(args.config, check_paths=False)
    print(format_plan(plan(cfg), show_jobs=args.jobs))
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from mimlib.analysis.pretrain_summary import write_pretrain_summary
    from mimlib.config import load_config, validate_config

    if args.config_json:
        cfg = validate_config(json.loads(args.config_json), check_paths=False)
    else:
        cfg = load_config(args.config, check_paths=False)
    write_pretrain_summary(cfg, Path(args.results), Path(args.out), Path(args.curves))
    return 0


def _json_text(text: str) -> str:
    """argparse type of the ``--*-json`` options: a parse error is a usage error naming the option."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    return text


def _cmd_export(args: argparse.Namespace) -> int:
    from mimlib.models.export import export_cell

    written = export_cell(args.checkpoint, args.out, tuple(args.format))  # a bad file: main's one-line error
    for fmt, path in written.items():
        print(f"{fmt}: {path}")
    return 0


TRACKING_HELP = ("the config's tracking block (TensorBoard, W&B, MLflow; default: TensorBoard event files in the "
                 "job's folder), optionally with run: {name, group, tags}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimlib", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true",
                   help=f"show the traceback of user errors too (or set {DEBUG_ENV}=1)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("seed-study", help="write a seed study's config and print its targets (make demo-seeds)")
    s.add_argument("--config", required=True, help="the main study's config")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--out", required=True, help="the seed study's config file to write")
    s.set_defaults(func=_cmd_seed_study)
    s = sub.add_parser("seed-spread", help="seed-to-seed spread of the key numbers -> <results>/analysis/seed_spread.csv")
    s.add_argument("--config", required=True, help="the main study's config")
    s.add_argument("--seeds", type=int, nargs="+", required=True, help="the seed studies' seeds")
    s.set_defaults(func=_cmd_seed_spread)
    s = sub.add_parser("check-config", help="validate a study config and count its cells")
    s.add_argument("config")
    s.add_argument("--no-paths", action="store_true", help="do not check that dataset folders exist")
    s.set_defaults(func=_cmd_check_config)

    s = sub.add_parser("demo-data", help="write the embedded demo image folder (no download)")
    s.add_argument("--out", required=True)
    s.add_argument("--spec-json", type=_json_text, help="ClassificationDemoSpec fields as JSON")
    s.set_defaults(func=_cmd_demo_data)

    s = sub.add_parser("index", help="index an ImageNet-layout folder into Parquet")
    s.add_argument("--root", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_index)

    s = sub.add_parser("manifest", help="write a pre-training subset manifest (Parquet)")
    s.add_argument("--index", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--fraction", type=float)
    g.add_argument("--num-classes", type=int)
    s.set_defaults(func=_cmd_manifest)

    s = sub.add_parser("pretrain", help="run SimMIM pre-training iterations [start, end) of one job")
    s.add_argument("--model", required=True, choices=sorted(MODELS))
    s.add_argument("--recipe-json", type=_json_text, required=True, help="the model's pre-training recipe (config 'pretrain')")
    s.add_argument("--manifest", required=True)
    s.add_argument("--end-iter", type=int, required=True)
    s.add_argument("--decay-at", type=int, help="iteration of the x0.1 lr step (omit for a trunk)")
    s.add_argument("--init", help="checkpoint to start from (a trunk point)")
    s.add_argument("--out", required=True)
    s.add_argument("--log-out", help="where to put the job's metric log (JSON lines) when it completes")
    s.add_argument("--resume-dir", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--val-index")
    s.add_argument("--val-max-images", type=int)
    s.add_argument("--metrics-out")
    s.add_argument("--cell-json", type=_json_text)
    s.add_argument("--no-optimizer", action="store_true", help="leave AdamW state out of --out")
    s.add_argument("--keep-final-state", action="store_true",
                   help="when done, keep the final state in --resume-dir: a rerun whose outputs were deleted re-creates them without training (the workflow passes it and removes the state once Snakemake has recorded the job; docs/cluster.md)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--tracking-json", type=_json_text, help=TRACKING_HELP)
    s.set_defaults(func=_cmd_pretrain)

    s = sub.add_parser("task-demo", help="write a fine-tuning task's demo set in its real format")
    s.add_argument("--task", required=True, choices=DEMO_TASKS)
    s.add_argument("--out", required=True)
    s.add_argument("--spec-json", type=_json_text)
    s.set_defaults(func=_cmd_task_demo)

    s = sub.add_parser("finetune", help="fine-tune a pre-trained cell (or scratch) on one task")
    s.add_argument("--task", required=True, choices=list(TASKS))
    s.add_argument("--model", required=True, choices=sorted(MODELS))
    s.add_argument("--checkpoint", help="pre-trained checkpoint (mimscale cell or reference SimMIM); omit for scratch")
    s.add_argument("--trust-pickle", action="store_true", help="allow reference checkpoints that pickle objects")
    s.add_argument("--recipe-json", type=_json_text, required=True)
    s.add_argument("--data-json", type=_json_text, required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--resume-dir", required=True)
    s.add_argument("--cell-json", type=_json_text)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--keep-final-state", action="store_true",
                   help="when done, keep the final state in --resume-dir: a rerun whose outputs were deleted re-creates them without training (the workflow passes it and removes the state once Snakemake has recorded the job; docs/cluster.md)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--tracking-json", type=_json_text, help=TRACKING_HELP)
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("finetune-summary", help="collect fine-tuning metrics of a study")
    s.add_argument("--config-json", type=_json_text, required=True)
    s.add_argument("--results", default="results")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_finetune_summary)

    s = sub.add_parser("plan", help="jobs, GPU-hours, trunk-reuse saving and critical path of a study")
    s.add_argument("config")
    s.add_argument("--jobs", action="store_true", help="list every job with its GPUs and hours")
    s.set_defaults(func=_cmd_plan)

    s = sub.add_parser("export", help="write a cell's encoder for timm (safetensors) and in the reference SimMIM layout")
    s.add_argument("--checkpoint", required=True, help="results/pretrain/<model>/<dataset>/<length>/checkpoint.pt")
    s.add_argument("--out", required=True, help="folder to write <out>/timm/ and <out>/reference/checkpoint.pth into")
    s.add_argument("--format", nargs="+", choices=["timm", "reference"], default=["timm", "reference"])
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("summary", help="collect pre-training metrics and curves of a study")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--config")
    g.add_argument("--config-json", type=_json_text)
    s.add_argument("--results", default="results")
    s.add_argument("--out", required=True)
    s.add_argument("--curves", required=True)
    s.set_defaults(func=_cmd_summary)
    return p


DEBUG_ENV = "MIMSCALE_DEBUG"
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def _user_error(exc: BaseException) -> bool:
    """An expected mistake in what the user gave (the message names it), not a bug in mimscale."""
    from mimlib.config import ConfigError
    from mimlib.models.checkpoint_io import CheckpointError

    if isinstance(exc, (ConfigError, CheckpointError)):
        return True
    distributed = sys.modules.get("mimlib.train.distributed")  # loaded by the training commands
    if distributed is not None and isinstance(exc, distributed.DeviceError):
        return True
    tracking = sys.modules.get("mimlib.train.tracking")
    if tracking is not None and isinstance(exc, tracking.TrackingError):
        return True
    if isinstance(exc, OSError):  # a path that is missing, unreadable, a folder...
        return exc.filename is not None or isinstance(exc, _PATH_ERRORS)
    if isinstance(exc, ValueError):  # mimscale's own checks of an argument or file; not a library's
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("mimlib.")
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. An expected user error prints ``mimscale: error: <message>`` on stderr
    and returns 2 (argparse's usage errors exit 2 too); ``--debug`` or ``MIMSCALE_DEBUG=1``
    shows its traceback instead. Anything else (a bug) raises with its traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # SIGINT outside a training loop (set-up, final evaluation; inside one it saves and
        # stops, see mimlib/train/preemption.py): nothing to save, so one line, not a traceback.
        print(f"mimscale: interrupted (SIGINT) during {args.command}; nothing was saved since the "
              "last rolling checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0") or not _user_error(exc):
            raise
        # pyarrow & co raise FileNotFoundError(path): say what the bare path means
        bare = isinstance(exc, OSError) and exc.filename is None
        print(f"mimscale: error: {type(exc).__name__ + ': ' if bare else ''}{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
