# Pre-training with trunk reuse (paper section 2.4): per model x dataset one trunk at the base
# lr, saved at 7/8 of every length (one job per segment, so the shortest cell is ready first),
# and per length a short x0.1 decay branch from its trunk point.

TRUNK_POINTS = trunk_points(CFG["lengths"])


def val_index():
    return res(P.INDEX, source=CFG["validation"]["source"], split="val")


def previous_trunk_point(wc):
    point = int(wc.iter)
    if point not in TRUNK_POINTS:
        raise WorkflowError(
            f"{point} is not a trunk point of this study (the decay point of a length: {TRUNK_POINTS})"
        )
    earlier = [p for p in TRUNK_POINTS if p < point]
    if not earlier:
        return {}
    return {"init": res(P.TRUNK_CKPT, model=wc.model, dataset=wc.dataset, iter=earlier[-1])}


def pretrain_threads(wc):
    """Loader workers + the training process (capped by --cores); 1 for in-process decoding."""
    recipe = pretrain_recipe(CFG, wc.model)
    return max(recipe["threads"] or 1, recipe["num_workers"])


def trunk_resources(key):
    def get(wc, attempt):
        earlier = [p for p in TRUNK_POINTS if p < int(wc.iter)]
        iterations = int(wc.iter) - (earlier[-1] if earlier else 0)
        recipe = pretrain_recipe(CFG, wc.model)
        return pretrain_resources(CFG, wc.model, iterations, recipe["global_batch"], attempt)[key]

    return get


def branch_resources(key):
    def get(wc, attempt):
        recipe = pretrain_recipe(CFG, wc.model)
        return pretrain_resources(CFG, wc.model, branch_iters(int(wc.length)), recipe["global_batch"], attempt)[key]

    return get


# Everything mimlib/resources.py computes reaches the executor: without tasks_per_gpu and gres
# the Slurm plugin would ask for `tasks` tasks on every GPU.
TRAINING_RESOURCES = ("nodes", "tasks", "gpus", "gres", "tasks_per_gpu", "cpus_per_task", "mem_mb", "runtime", "mpi")


def pretrain_common_args(wc):
    recipe = pretrain_recipe(CFG, wc.model)
    args = [
        f"--model {wc.model}",
        f"--recipe-json {quoted_json(recipe)}",
        f"--seed {CFG['seed']}",
        f"--val-index {val_index()}",
    ]
    if CFG["validation"]["max_images"]:
        args.append(f"--val-max-images {CFG['validation']['max_images']}")
    return " ".join(args)


rule pretrain_trunk:
    input:
        unpack(previous_trunk_point),
        manifest=res(P.MANIFEST),
        val=val_index(),
    output:
        ckpt=res(P.TRUNK_CKPT),
        metrics=res(P.TRUNK_LOG),
    params:
        common=pretrain_common_args,
        init=lambda wc, input: f"--init {input.init}" if "init" in input.keys() else "",
        resume=lambda wc: resume(P.RESUME, model=wc.model, dataset=wc.dataset, job=f"trunk_{wc.iter}"),
        launch=lambda wc, resources: launch(resources),
        device=lambda wc, resources: job_device(resources),
    threads: pretrain_threads
    resources:
        **{k: trunk_resources(k) for k in TRAINING_RESOURCES},
    log:
        res("logs/pretrain/{model}/{dataset}/trunk_{iter}.log"),
    shell:
        "{params.launch} pretrain {params.common} --manifest {input.manifest} {params.init} "
        "--end-iter {wildcards.iter} --out {output.ckpt} --log-out {output.metrics} "
        "--resume-dir {params.resume} --keep-final-state --device {params.device} {TRACKING} --no-progress > {log} 2>&1"


rule pretrain_branch:
    input:
        init=lambda wc: res(P.TRUNK_CKPT, model=wc.model, dataset=wc.dataset, iter=decay_at(int(wc.length))),
        manifest=res(P.MANIFEST),
        val=val_index(),
    output:
        ckpt=res(P.CELL_CKPT),
        metrics=res(P.CELL_METRICS),
        log=res(P.CELL_LOG),
    params:
        common=pretrain_common_args,
        decay_at=lambda wc: decay_at(int(wc.length)),
        cell=lambda wc: quoted_json({"model": wc.model, "dataset": wc.dataset, "length": int(wc.length)}),
        resume=lambda wc: resume(P.RESUME, model=wc.model, dataset=wc.dataset, job=f"branch_{wc.length}"),
        launch=lambda wc, resources: launch(resources),
        device=lambda wc, resources: job_device(resources),
    threads: pretrain_threads
    resources:
        **{k: branch_resources(k) for k in TRAINING_RESOURCES},
    log:
        res("logs/pretrain/{model}/{dataset}/branch_{length}.log"),
    shell:
        "{params.launch} pretrain {params.common} --manifest {input.manifest} --init {input.init} "
        "--end-iter {wildcards.length} --decay-at {params.decay_at} --cell-json {params.cell} "
        "--out {output.ckpt} --metrics-out {output.metrics} --log-out {output.log} --no-optimizer "
        "--resume-dir {params.resume} --keep-final-state --device {params.device} {TRACKING} --no-progress > {log} 2>&1"


rule pretrain_summary:
    input:
        metrics=expand(
            res(P.CELL_METRICS),
            model=CFG["models"],
            dataset=list(CFG["datasets"]),
            length=CFG["lengths"],
        ),
        trunk=expand(
            res(P.TRUNK_LOG),
            model=CFG["models"],
            dataset=list(CFG["datasets"]),
            iter=TRUNK_POINTS,
        ),
    output:
        table=res(P.PRETRAIN_SUMMARY),
        curves=res(P.PRETRAIN_CURVES),
    params:
        config=lambda wc: quoted_json(CFG),
        results=lambda wc, output: results_of(output.table, P.PRETRAIN_SUMMARY),
    log:
        res("logs/pretrain/summary.log"),
    shell:
        "{MIMLIB} summary --config-json {params.config} --results {params.results} "
        "--out {output.table} --curves {output.curves} > {log} 2>&1"
