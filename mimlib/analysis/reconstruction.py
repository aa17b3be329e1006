"""Figure 5: reconstructions of an overfitting and a non-overfitting model.

The paper compares SwinV2-L pre-trained on IN-1K 10% (overfits) and on IN-1K 100% (does not),
at the same length. In general: the study's largest model at its longest length; among its
cells (one per dataset) the overfitting one is the flagged cell with the highest final val loss
(if none is flagged: the cell with the highest val loss, and the figure says so), the
non-overfitting one the unflagged cell with the lowest val loss.

Images: the first row group are training images of the overfitting cell's dataset that the
other cell's dataset also contains (as the paper's IN-1K 10% images, seen by both models); the
second are validation images (the study's validation source). Each image gets the same fixed
mask for both models. Columns: original, masked input, each model's reconstruction.

De-normalisation: the model predicts the reconstruction target. With ``norm_target_window``
the target is each pixel normalised by the mean / std of its window in the (ImageNet-normalised)
input, so the prediction is mapped back with those local statistics of the original image, then
ImageNet's mean / std are undone; without it the target is the ImageNet-normalised input and only
the second step applies. Visible pixels are the original's, masked ones the model's. (With a
target window, the masked regions thus inherit the original's local mean and contrast, as in
the usual SimMIM / MAE visualisations; what differs between the models is the structure.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .common import display_dataset, display_length, display_model, study_name


def local_stats(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and std of the window x window neighbourhood inside the image, per channel,
    with the unbiased variance and the 1e-6 of ``mimlib.models.simmim.normalize_targets``:
    ``normalize_targets(x) == (x - mean) / std``."""
    x = x.double()
    pad = window // 2
    ones = torch.ones_like(x[:, :1])
    n = F.avg_pool2d(ones, window, stride=1, padding=pad, count_include_pad=True) * window * window
    mean = F.avg_pool2d(x, window, stride=1, padding=pad, count_include_pad=False)
    sq = F.avg_pool2d(x * x, window, stride=1, padding=pad, count_include_pad=False)
    var = ((sq - mean * mean) * (n / (n - 1))).clamp(min=0.0)
    return mean.float(), torch.sqrt(var + 1e-6).float()


def to_pixels(normalised: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) -> [0, 1] RGB."""
    from mimlib.data.pretrain_data import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (normalised.float() * std + mean).clamp(0.0, 1.0)


def prediction_to_input_space(pred: torch.Tensor, images: torch.Tensor, norm_target_window: int | None) -> torch.Tensor:
    """Map a SimMIM prediction (target space) back to the ImageNet-normalised input space."""
    if norm_target_window is None:
        return pred.float()
    mean, std = local_stats(images.float(), norm_target_window)
    return pred.float() * std + mean


def load_simmim(checkpoint: str | Path):
    """A cell's SimMIM model, rebuilt from the recipe stored in its checkpoint, in eval mode."""
    from mimlib.models.simmim import build_simmim
    from mimlib.train.checkpoint import load

    state = load(checkpoint, require=("model_name", "recipe", "model"))
    r = state["recipe"]
    model = build_simmim(state["model_name"], img_size=r["img_size"], window_size=r["window_size"],
                         drop_path_rate=0.0, decoder=r["decoder"], loss=r["loss"],
                         norm_target_window=r["norm_target_window"])
    model.load_state_dict(state["model"])
    return model.eval(), r


def choose_cells(cfg: Mapping[str, Any], overfit: pd.DataFrame, largest_model: str) -> list[tuple[str, str]]:
    """[(dataset, role)] of the largest model at the longest length: the overfitting cell first,
    then the non-overfitting one (one entry when the model has a single dataset)."""
    length = max(cfg["lengths"])
    cand = overfit[(overfit["model"] == largest_model) & (overfit["length"] == length)
                   & overfit["final_val_loss"].notna()]
    if cand.empty:
        return []
    flagged = cand[cand["overfit"]]
    if len(flagged):
        over = flagged.sort_values("final_val_loss").iloc[-1]
        over_role = "overfitting"
    else:
        over = cand.sort_values("final_val_loss").iloc[-1]
        over_role = "highest val loss (no cell flagged as overfitting)"
    rest = cand[(~cand["overfit"]) & (cand["dataset"] != over["dataset"])]
    chosen = [(str(over["dataset"]), over_role)]
    if len(rest):
        chosen.append((str(rest.sort_values("final_val_loss").iloc[0]["dataset"]), "non-overfitting"))
    return chosen


def _pick(paths: Sequence[str], k: int) -> list[str]:
    if len(paths) <= k:
        return list(paths)
    keep = np.linspace(0, len(paths) - 1, k).round().astype(int)
    return [paths[i] for i in keep]


def pick_images(manifests: Mapping[str, str | Path], datasets: Sequence[str], val_index: str | Path,
                k: int) -> tuple[list[Path], list[Path]]:
    """k training images of ``datasets[0]`` also in every other dataset, and k validation images
    (evenly spaced over the class-sorted lists, so several classes show)."""
    from mimlib.data.index import read_index
    from mimlib.data.manifests import read_manifest

    first, root, _ = read_manifest(manifests[datasets[0]])
    common = set(first["path"])
    for ds in datasets[1:]:
        df, other_root, _ = read_manifest(manifests[ds])
        if Path(other_root) == Path(root):
            common &= set(df["path"])
    pool = [p for p in first["path"] if p in common] or list(first["path"])
    train = [Path(root) / p for p in _pick(pool, k)]
    val_df, val_root = read_index(val_index)
    val = [Path(val_root) / p for p in _pick(list(val_df["path"]), k)]
    return train, val


@torch.no_grad()
def reconstruct(models: Sequence[tuple[Any, dict]], image_paths: Sequence[Path], seed: int) -> dict[str, list[np.ndarray]]:
    """Original, masked and each model's reconstruction (HWC float arrays in [0, 1]) per image."""
    from mimlib.data.decode import decode_rgb_tensor
    from mimlib.data.pretrain_data import eval_transform, mask_generator
    from mimlib.data.sampling import stable_seed

    recipe = models[0][1]
    transform = eval_transform(recipe["img_size"])
    masks = mask_generator(recipe)
    out: dict[str, list[np.ndarray]] = {"original": [], "masked": []}
    for i in range(len(models)):
        out[f"model{i}"] = []
    for n, path in enumerate(image_paths):
        image = transform(decode_rgb_tensor(str(path))).unsqueeze(0)
        mask = masks(torch.Generator().manual_seed(stable_seed(seed, "figure5", n))).unsqueeze(0)
        original = to_pixels(image)
        first_model = models[0][0]
        pixel_mask = first_model.pixel_mask(mask)  # (1, 1, H, W)
        out["original"].append(original[0].permute(1, 2, 0).numpy())
        out["masked"].append((original * (1 - pixel_mask) + 0.5 * pixel_mask)[0].permute(1, 2, 0).numpy())
        for i, (model, r) in enumerate(models):
            pred = model.reconstruct(image, mask)
            rec = to_pixels(prediction_to_input_space(pred, image, r["norm_target_window"]))
            pasted = original * (1 - pixel_mask) + rec * pixel_mask
            out[f"model{i}"].append(pasted[0].permute(1, 2, 0).numpy())
    return out


def figure5(cfg: Mapping[str, Any], overfit: pd.DataFrame, largest_model: str,
            checkpoints: Mapping[str, str | Path], manifests: Mapping[str, str | Path],
            val_index: str | Path, png: str | Path, pdf: str | Path | None = None,
            images: int = 4) -> list[tuple[str, str]]:
    """Draw Figure 5; ``checkpoints`` / ``manifests`` map dataset -> path for the largest model
    at the longest length. Returns the [(dataset, role)] shown."""
    from .figures import new_figure, placeholder, save_figure

    chosen = choose_cells(cfg, overfit, largest_model)
    if not chosen:
        placeholder(png, pdf, "Figure 5", f"{study_name(cfg)}: no pre-trained cell of {display_model(largest_model)} to show")
        return []
    torch.manual_seed(0)
    models = [load_simmim(checkpoints[ds]) for ds, _ in chosen]
    train, val = pick_images(manifests, [ds for ds, _ in chosen], val_index, images)
    seed = int(cfg.get("seed", 0))
    groups = [("train", reconstruct(models, train, seed)), ("val", reconstruct(models, val, seed + 1))]
    cols = 2 + len(models)
    rows = max(len(g["original"]) for _, g in groups)
    fig, axes = new_figure(rows, 2 * cols, 1.45, 1.5)
    length = display_length(max(cfg["lengths"]))
    heads = ["original", "masked"] + [f"{display_dataset(cfg, ds)}\n({role.split(' (')[0]})" for ds, role in chosen]
    for g, (name, group) in enumerate(groups):
        keys = ["original", "masked"] + [f"model{i}" for i in range(len(models))]
        for c, key in enumerate(keys):
            for r in range(rows):
                ax = axes[r, g * cols + c]
                ax.set_xticks([])
                ax.set_yticks([])
                if r < len(group[key]):
                    ax.imshow(group[key][r])
                else:
                    ax.axis("off")
                if r == 0:
                    ax.set_title(f"{name}: {heads[c]}" if c == 0 else heads[c], fontsize=7)
    roles = "; ".join(f"{display_dataset(cfg, ds)} = {role}" for ds, role in chosen)
    fig.suptitle(f"{study_name(cfg)}: {display_model(largest_model)} at {length} iterations ({roles}); "
                 "left: training images, right: validation images", fontsize=8)
    save_figure(fig, png, pdf)
    return chosen
