"""Errors a user can cause name the file, key or value at fault, in one line (issue 12, item 6)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimlib import cli
from mimlib.config import ConfigError, load_config
from mimlib.models.checkpoint_io import CheckpointError
from mimlib.models.pretrained import read_encoder_state
from mimlib.models.reference import CheckpointMismatchError, load_reference_checkpoint, to_reference_state_dict
from mimlib.models.simmim import build_simmim
from mimlib.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

# every function a user's checkpoint path reaches
READERS = {
    "finetune --checkpoint": lambda p: read_encoder_state(p, "swinv2_pico"),
    "pretrain --init / resume": lambda p: ckpt.load(p, require=("model", "iteration")),
    "reference import": lambda p: load_reference_checkpoint(p, build_simmim("swinv2_pico", img_size=64, window_size=4)),
}


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its message must say)."""
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "random.pt").write_bytes(bytes(range(7, 250)) * 4)  # neither zip nor pickle magic
    (tmp / "notes.pt").write_text("not a checkpoint\n")
    return {
        "missing": (tmp / "missing.pt", "does not exist"),
        "empty": (tmp / "empty.pt", "is empty (0 bytes"),
        "random": (tmp / "random.pt", "is not a PyTorch checkpoint"),
        "text": (tmp / "notes.pt", "is not a PyTorch checkpoint"),
        "folder": (tmp, "is a folder"),
    }


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("case", ["missing", "empty", "random", "text", "folder"])
def test_unusable_checkpoint_files_get_their_own_message(tmp_path: Path, reader: str, case: str) -> None:
    path, says = _bad_files(tmp_path)[case]
    with pytest.raises(CheckpointError) as e:
        READERS[reader](path)
    msg = str(e.value)
    assert str(path) in msg and says in msg, msg
    assert "trust" not in msg.lower(), msg  # trusting pickles cannot help these files


def test_a_truncated_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save({"model": {"w": torch.zeros(64)}, "iteration": 3}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*cut\.pt \(200 bytes; truncated") as e:
        ckpt.load(path)
    assert "trust" not in str(e.value).lower()


def test_running_out_of_memory_is_not_called_a_damaged_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "fine.pt"
    torch.save({"model": {}, "iteration": 0}, path)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "load", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        ckpt.load(path)


def test_only_a_refused_pickle_hints_trust_pickle(tmp_path: Path) -> None:
    path = tmp_path / "ref.pth"
    src = build_simmim("swinv2_pico", img_size=64, window_size=4)
    torch.save({"model": to_reference_state_dict(src), "config": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError, match=r"ref\.pth pickles .*argparse\.Namespace.*--trust-pickle"):
        read_encoder_state(path, "swinv2_pico")
    # a mimscale resume/init file is never a trusted pickle: no hint, says why instead
    with pytest.raises(CheckpointError, match="mimscale checkpoints hold only tensors") as e:
        ckpt.load(path)
    assert "trust-pickle" not in str(e.value)


@pytest.mark.parametrize("reader", list(READERS))
def test_a_saved_tensor_is_not_a_checkpoint_dict(tmp_path: Path, reader: str) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match=r"tensor\.pt holds a torch\.Tensor, not a checkpoint dict"):
        READERS[reader](path)


def test_an_unknown_layout_names_its_keys_and_the_known_layouts(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": {"conv.weight": torch.zeros(1)}, "epoch": 3}, path)
    for read in (READERS["finetune --checkpoint"], READERS["reference import"]):
        with pytest.raises(CheckpointMismatchError) as e:
            read(path)
        msg = str(e.value)
        assert "other.pt" in msg and "['weights', 'epoch']" in msg, msg
        assert "mimscale cell checkpoint" in msg and "reference SimMIM checkpoint" in msg, msg
        assert "downsample" not in msg, msg  # not the old misleading key message
    with pytest.raises(CheckpointError, match=r"other\.pt lacks the top-level key\(s\) \['model', 'iteration'\]"):
        READERS["pretrain --init / resume"](path)


def test_a_reference_mismatch_names_the_file(tmp_path: Path) -> None:
    sd = to_reference_state_dict(build_simmim("swinv2_pico", img_size=64, window_size=4))
    del sd["encoder.norm.weight"]
    path = tmp_path / "ref.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointMismatchError, match=r"ref\.pth.*missing keys: encoder\.norm\.weight"):
        read_encoder_state(path, "swinv2_pico")


def test_pretrain_init_names_what_the_file_lacks(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from mimlib.train.distributed import DistInfo
    from mimlib.train.pretrain import _find_start

    path = tmp_path / "init.pt"
    torch.save({"weights": {}}, path)
    job = SimpleNamespace(resume_dir=tmp_path / "resume", end_iter=8, init=path, recipe={})
    with pytest.raises(CheckpointError, match=r"init\.pt lacks the top-level key\(s\) \['model', 'iteration'\]"):
        _find_start(job, DistInfo())


def test_a_reconstruction_checkpoint_names_what_it_lacks(tmp_path: Path) -> None:
    from mimlib.analysis.reconstruction import load_simmim

    path = tmp_path / "cell.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match=r"cell\.pt lacks the top-level key\(s\) \['model_name', 'recipe'\]"):
        load_simmim(path)


# --- YAML ------------------------------------------------------------------------------------

BROKEN_YAML = "results: r\nmodels: [a, b\nlengths: 3\n"  # an unclosed flow sequence


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(BROKEN_YAML)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3:8: expected ',' or ']', but got ':'"), msg
    assert "from line 2, column 9" in msg and "\n" not in msg, msg


def test_a_yaml_list_is_not_a_config(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping .* not a list"):
        load_config(path)


def test_snakemake_names_the_line_of_a_broken_default_config(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(BROKEN_YAML)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "config/config.yaml:3:8: expected ',' or ']', but got ':'" in proc.stdout + proc.stderr, proc.stderr[-3000:]


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_user_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    # a ValueError from mimscale's own check
    assert cli.main(["index", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "i.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimscale: error: ") and "nope" in err and err.count("\n") == 1, err
    # a FileNotFoundError raised by a library with just the path
    code = cli.main(["manifest", "--index", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "m.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"mimscale: error: FileNotFoundError: {tmp_path / 'none.parquet'}\n", err
    # a config error
    (tmp_path / "c.yaml").write_text(BROKEN_YAML)
    assert cli.main(["check-config", str(tmp_path / "c.yaml")]) == 2
    assert capsys.readouterr().err == f"mimscale: error: {tmp_path / 'c.yaml'}:3:8: expected ',' or ']', but got ':' " \
                                      "(while parsing a flow sequence, from line 2, column 9)\n"


def test_cli_checkpoint_errors_are_user_errors(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(cli, "_cmd_plan", lambda args: read_encoder_state(tmp_path / "gone.pt", "swinv2_pico"))
    assert cli.main(["plan", "x.yaml"]) == 2
    assert capsys.readouterr().err == f"mimscale: error: checkpoint {tmp_path / 'gone.pt'} does not exist\n"


def test_debug_keeps_the_traceback(tmp_path: Path, monkeypatch) -> None:
    argv = ["index", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "i.parquet")]
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(ValueError, match="nope"):
        cli.main(["--debug", *argv])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="nope"):
        cli.main(argv)


def test_bugs_still_show_their_traceback(monkeypatch) -> None:
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(cli, "_cmd_plan", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["plan", "x.yaml"])
    # a ValueError from a library (not one of mimscale's checks) is a bug too
    monkeypatch.setattr(cli, "_cmd_plan", lambda args: torch.zeros(2).view(3))
    with pytest.raises(RuntimeError):
        cli.main(["plan", "x.yaml"])
    monkeypatch.setattr(cli, "_cmd_plan", lambda args: int("x"))
    with pytest.raises(ValueError):
        cli.main(["plan", "x.yaml"])


def test_bad_json_options_and_model_names_are_usage_errors(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune-summary", "--config-json", "{results: r}", "--out", "x.csv"])
    assert e.value.code == 2
    assert "argument --config-json: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--model", "swinv2_tiny", "--recipe-json", "{}", "--manifest", "m", "--end-iter", "8",
                  "--out", "o.pt", "--resume-dir", "r"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --model: invalid choice: 'swinv2_tiny'" in err and "swinv2_pico" in err, err


def test_python_m_mimlib_prints_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(BROKEN_YAML)
    proc = subprocess.run([sys.executable, "-m", "mimlib", "check-config", str(tmp_path / "c.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"mimscale: error: {tmp_path / 'c.yaml'}:3:8: ") and "Traceback" not in proc.stderr
