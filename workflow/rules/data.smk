# Data: the demo image folders (generated), folder indexes and subset manifests.


rule demo_data:
    output:
        directory(res(P.DEMO_SOURCE)),
    params:
        spec=lambda wc: quoted_json({"seed": CFG["seed"], **CFG["demo_data"]}),
    log:
        res("logs/demo_data/{source}.log"),
    shell:
        "{MIMLIB} demo-data --out {output} --spec-json {params.spec} > {log} 2>&1"


def index_inputs(wc):
    if CFG["sources"][wc.source].get("demo"):
        return res(P.DEMO_SOURCE, source=wc.source)
    # A dataset on disk: ancient() so touching the folder does not re-run the study.
    return ancient(source_root(CFG, wc.source, wc.split))


rule index:
    input:
        index_inputs,
    output:
        res(P.INDEX),
    params:
        root=lambda wc: source_root(CFG, wc.source, wc.split),
    log:
        res("logs/index/{source}_{split}.log"),
    shell:
        "{MIMLIB} index --root {params.root} --out {output} > {log} 2>&1"


def manifest_args(wc):
    ds = CFG["datasets"][wc.dataset]
    if "fraction" in ds:
        return f"--fraction {ds['fraction']}"
    if "num_classes" in ds:
        return f"--num-classes {ds['num_classes']}"
    return ""


rule manifest:
    input:
        lambda wc: res(P.INDEX, source=CFG["datasets"][wc.dataset]["source"], split="train"),
    output:
        res(P.MANIFEST),
    params:
        subset=manifest_args,
        seed=CFG["seed"],
    log:
        res("logs/manifest/{dataset}.log"),
    shell:
        "{MIMLIB} manifest --index {input} --out {output} "
        "--seed {params.seed} {params.subset} > {log} 2>&1"
