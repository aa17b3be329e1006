"""The package's stages import only from stages below them (lazy imports inside functions too),
so a change to a lower stage never needs a higher one and there are no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mimlib"

#: bottom to top; a module may import from its own stage and the ones before it
STAGES = ["provenance", "paths", "models", "data", "train", "finetune", "resources", "config", "plan",
          "analysis", "cli", "__main__"]


def stage_of(module: str) -> str:
    return module.split(".")[1]


def test_no_module_imports_from_a_higher_stage() -> None:
    rank = {s: i for i, s in enumerate(STAGES)}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if rel.parts == ("mimlib", "__init__"):
            continue
        here = rel.parts[1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("mimlib"):
                targets = [stage_of(node.module)] if "." in node.module else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [stage_of(a.name) for a in node.names if a.name.startswith("mimlib.")]
            else:
                continue
            for target in targets:
                assert here in rank and target in rank, f"{path}: stage of {here!r} or {target!r} unknown"
                if rank[target] > rank[here]:
                    upward.append(f"{rel}:{node.lineno} imports mimlib.{target}")
    assert not upward, "imports from a higher stage:\n" + "\n".join(upward)
