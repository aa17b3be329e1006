"""Snakemake script of every aggregation rule (workflow/rules/aggregate.smk): builds the target
named by ``params.target`` from the validated config in ``params.config``; the writers live in
mimlib.analysis.aggregate and compute their own output paths (the rule declares the same ones)."""

from mimlib.analysis.aggregate import run_target

params = snakemake.params  # noqa: F821 (injected by Snakemake's script directive)
extra = {"tolerance": params.tolerance} if "tolerance" in params.keys() else {}
run_target(params.target, params.config, **extra)
