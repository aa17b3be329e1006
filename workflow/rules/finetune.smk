# Fine-tuning (paper section 2.5): every pre-trained cell (and a from-scratch baseline per
# model) on each task of `finetune.tasks`, one target per (task, model, dataset, length).
from mimlib.config import finetune_cells, finetune_recipe

FT = CFG["finetune"]


wildcard_constraints:
    task="in1k|inat18|coco|ade20k",
    ftdataset="|".join(map(re.escape, [*CFG["datasets"], P.SCRATCH])),


def task_root(task):
    data = FT[task]["data"]
    if "demo" in data:
        root = res(P.DEMO_TASK, task=task)
        return f"{root}/ADEChallengeData2016" if task == "ade20k" else root
    return data["root"]


def task_data(task):
    """The paths a task's engine reads (mimlib/finetune/<engine>.py, FinetuneJob.data)."""
    if task == "in1k":
        src = FT[task]["data"]["source"]
        return {"train_index": res(P.INDEX, source=src, split="train"),
                "val_index": res(P.INDEX, source=src, split="val")}
    root = task_root(task)
    if task == "inat18":
        return {"root": root, "train_json": f"{root}/train2018.json", "val_json": f"{root}/val2018.json"}
    if task == "coco":
        return {"train_images": f"{root}/train2017", "val_images": f"{root}/val2017",
                "train_json": f"{root}/annotations/instances_train2017.json",
                "val_json": f"{root}/annotations/instances_val2017.json"}
    return {"root": root}


def finetune_inputs(wc):
    inputs = {}
    if wc.ftdataset != P.SCRATCH:
        inputs["ckpt"] = res(P.CELL_CKPT, model=wc.model, dataset=wc.ftdataset, length=wc.length)
    if wc.task == "in1k":
        inputs.update(task_data("in1k"))
    elif "demo" in FT[wc.task]["data"]:
        inputs["data"] = res(P.DEMO_TASK, task=wc.task)
    else:
        inputs["data"] = ancient(task_root(wc.task))
    return inputs


def finetune_threads(wc):
    recipe = finetune_recipe(CFG, wc.task, wc.model)
    return max(recipe.get("threads") or 1, recipe.get("num_workers", 0))


def ft_resources(key):
    return lambda wc, attempt: finetune_resources(CFG, wc.task, wc.model, attempt)[key]


rule task_demo_data:
    output:
        directory(res(P.DEMO_TASK)),
    params:
        spec=lambda wc: quoted_json({"seed": CFG["seed"], **FT[wc.task]["data"]["demo"]}),
    log:
        res("logs/demo_data/{task}.log"),
    shell:
        "{MIMLIB} task-demo --task {wildcards.task} --out {output} --spec-json {params.spec} > {log} 2>&1"


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        res("finetune/{task}/{model}/{ftdataset}/{length}/metrics.json"),
    params:
        recipe=lambda wc: quoted_json(finetune_recipe(CFG, wc.task, wc.model)),
        data=lambda wc: quoted_json(task_data(wc.task)),
        cell=lambda wc: quoted_json({"model": wc.model, "dataset": wc.ftdataset, "length": int(wc.length)}),
        checkpoint=lambda wc, input: f"--checkpoint {input.ckpt}" if "ckpt" in input.keys() else "",
        out_dir=lambda wc: res("finetune/{task}/{model}/{ftdataset}/{length}".format(**wc)),
        resume=lambda wc: resume(P.FINETUNE_RESUME, task=wc.task, model=wc.model, dataset=wc.ftdataset, length=wc.length),
        seed=CFG["seed"],
        launch=lambda wc, resources: launch(resources),
        device=lambda wc, resources: job_device(resources),
    threads: finetune_threads
    resources:
        **{k: ft_resources(k) for k in TRAINING_RESOURCES},
    log:
        res("logs/finetune/{task}/{model}/{ftdataset}_{length}.log"),
    shell:
        "{params.launch} finetune --task {wildcards.task} --model {wildcards.model} {params.checkpoint} "
        "--recipe-json {params.recipe} --data-json {params.data} --cell-json {params.cell} "
        "--out-dir {params.out_dir} --resume-dir {params.resume} --keep-final-state --seed {params.seed} "
        "--device {params.device} {TRACKING} --no-progress "
        "> {log} 2>&1"


rule finetune_summary:
    input:
        [res(P.FINETUNE_METRICS, task=c.task, model=c.model, dataset=c.dataset, length=c.length)
         for c in finetune_cells(CFG)],
    output:
        res(P.FINETUNE_SUMMARY),
    params:
        config=lambda wc: quoted_json(CFG),
        results=lambda wc, output: results_of(output[0], P.FINETUNE_SUMMARY),
    log:
        res("logs/finetune/summary.log"),
    shell:
        "{MIMLIB} finetune-summary --config-json {params.config} --results {params.results} "
        "--out {output} > {log} 2>&1"
