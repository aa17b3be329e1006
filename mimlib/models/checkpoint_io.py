"""Read a checkpoint file a user names, with one clear error per way it can be unusable.

Every checkpoint read (``finetune --checkpoint``, ``pretrain --init``, resume states, reference
SimMIM files) goes through :func:`read_checkpoint`: a missing, empty, foreign, damaged or
non-dict file gets a message naming the file and what is wrong with it, and the ``trust_pickle``
hint comes only when torch's safe loader refused a pickled object, the one case it helps.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "LAYOUTS", "TRUST_HINT", "describe_keys", "read_checkpoint", "unknown_layout"]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file and what is wrong.

    A RuntimeError, as the loaders raised before, so existing ``except RuntimeError`` keeps working.
    """


#: what :func:`mimlib.models.pretrained.read_encoder_state` understands, for error messages
LAYOUTS = (
    "a mimscale cell checkpoint (top-level keys model_name, recipe, model, iteration)",
    "a reference SimMIM checkpoint ({'model': {'encoder.*': ..., 'decoder.*': ...}, ...})",
    "a bare reference SimMIM state dict (keys encoder.*, decoder.*)",
)

TRUST_HINT = "pass --trust-pickle (trust_pickle=True) only for a file you trust"

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_WEIGHTS_ONLY = "Weights only load failed"  # torch's text when weights_only refuses an object


def describe_keys(obj: Mapping, limit: int = 12) -> str:
    keys = [repr(k) for k in list(obj)[:limit]]
    more = f", ... (+{len(obj) - limit} more)" if len(obj) > limit else ""
    return "[" + ", ".join(keys) + more + "]" if keys else "none (an empty dict)"


def _looks_like_torch(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_ZIP_MAGIC):
        return True
    # legacy torch.save: a pickle (protocol 2-5) of torch's magic number first; very old: a tar
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or tarfile.is_tarfile(path)


def _refused_object(exc: BaseException) -> str:
    """The part of torch's long weights_only message that says which object was refused."""
    m = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please|\n|$)", str(exc))
    return m.group(1).strip() if m else str(exc).splitlines()[0]


def read_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    trust_pickle: bool = False,
    trust_hint: str | None = TRUST_HINT,
    require: Iterable[str] = (),
) -> dict[str, Any]:
    """``torch.load`` of a checkpoint dict (``weights_only`` unless ``trust_pickle``).

    Raises :class:`CheckpointError` naming ``path`` when it does not exist, is empty, is not a
    PyTorch file, is damaged, pickles objects the safe loader refuses (with ``trust_hint``, or
    none where trusting is not an option), holds something other than a dict, or lacks one of
    the top-level keys in ``require``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes; an interrupted copy or save?)")
    if not _looks_like_torch(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint ({size} bytes, neither torch.save's zip format "
            "nor its legacy pickle format)"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except Exception as exc:
        if _WEIGHTS_ONLY in str(exc) and not trust_pickle:
            if trust_hint is None:
                raise CheckpointError(
                    f"{path} pickles Python objects ({_refused_object(exc)}); mimscale checkpoints "
                    "hold only tensors and plain values, so this is not one"
                ) from exc
            raise CheckpointError(
                f"{path} pickles Python objects that the safe loader refuses ({_refused_object(exc)}); "
                f"reference checkpoints pickle their config: {trust_hint}"
            ) from exc
        if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
            raise  # the file may be fine: do not call it damaged
        text = str(exc).strip() or type(exc).__name__
        first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]  # torch's first sentence; the rest is advice
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes; truncated, damaged or not written by "
            f"torch.save): {first}"
        ) from exc
    if not isinstance(obj, Mapping):
        kind = type(obj).__qualname__
        if type(obj).__module__ != "builtins":
            kind = f"{type(obj).__module__}.{kind}"
        raise CheckpointError(f"{path} holds a {kind}, not a checkpoint dict")
    missing = [k for k in require if k not in obj]
    if missing:
        raise CheckpointError(
            f"{path} lacks the top-level key(s) {missing}: its keys are {describe_keys(obj)}"
        )
    return obj


def unknown_layout(name: str, ckpt: Mapping) -> str:
    """The message for a checkpoint dict in none of the :data:`LAYOUTS`."""
    where = f"its top-level keys are {describe_keys(ckpt)}"
    inner = ckpt.get("model")
    if isinstance(inner, Mapping):
        where += f", its 'model' entry's keys {describe_keys(inner, 6)}"
    return f"{name} is in no checkpoint layout mimscale understands: {where}; understood: " + "; ".join(LAYOUTS)
