"""A non-editable install works: the wheel carries every data file mimlib reads at run time
(the config schema, the paper's reference values), and an installed copy, imported from
outside the source tree, validates config/smoke.yaml."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = ["mimlib/schema/config.schema.yaml", "mimlib/analysis/paper_values.csv"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # without the test run's PYTHONPATH (the source tree)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_and_validates_a_config(tmp_path: Path) -> None:
    # build from a copy: setuptools writes build/ and *.egg-info next to pyproject.toml
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mimlib", src / "mimlib", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
          "."], src)
    (wheel,) = (tmp_path / "dist").glob("mimscale-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [f for f in DATA_FILES if f not in names], f"{wheel.name} lacks data files"
    # every non-Python file under mimlib/ that git tracks is in the wheel
    tracked = subprocess.run(["git", "ls-files", "mimlib"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if not f.endswith(".py") and f not in names]

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    # torch & co. come from this interpreter's environment (a venv itself: "system" would be the base's)
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).stdout.strip()
    Path(purelib, "zz_test_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         tmp_path)

    away = tmp_path / "elsewhere"  # not the repository: the source tree must not be importable
    away.mkdir()
    where = _run([str(py), "-c", "import mimlib; print(mimlib.__file__)"], away).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    out = _run([str(venv / "bin" / "mimscale"), "check-config", str(ROOT / "config" / "smoke.yaml")], away)
    assert "smoke.yaml: valid; 4 pre-training cells" in out.stdout
    n = _run([str(py), "-c", "from mimlib.analysis.paper import paper_values; print(len(paper_values()))"], away)
    assert n.stdout.strip() == "189"
