"""Snakemake script of every aggregation rule (workflow/rules/aggregate.smk): builds the target
named by ``params.target`` from the validated config in ``params.config`` into the rule's
``snakemake.output`` (declared once, by mimlib.analysis.aggregate.target_outputs)."""

import traceback
from contextlib import redirect_stderr, redirect_stdout

from mimlib.analysis.aggregate import run_target

params = snakemake.params  # noqa: F821 (injected by Snakemake's script directive)
extra = {"tolerance": params.tolerance} if "tolerance" in params.keys() else {}
# everything the target prints (warnings, a traceback) goes to the rule's log; an error still fails the job
with open(snakemake.log[0], "w") as log, redirect_stdout(log), redirect_stderr(log):  # noqa: F821
    try:
        run_target(params.target, params.config, out=dict(snakemake.output.items()), **extra)  # noqa: F821
    except BaseException:
        traceback.print_exc()
        raise
