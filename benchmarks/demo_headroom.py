"""How much a masked-image model *could* learn on a validation set, per mask-cell size.

Prints, for each mask cell size, the validation loss (L1 over masked pixels, raw-pixel
targets, the demo's fixed crops and masks) of two predictors that learn nothing:

* ``mean colour`` -- every masked pixel is the image's mean visible colour (the
  ``trivial_val_loss`` of results/pretrain/summary.csv);
* ``local mean k`` -- every masked pixel is the mean of the visible pixels in the k x k window
  around it (a normalised-convolution inpainter), the best k shown.

The gap between them is structure that local context implies; a mask grid whose inpainter is
barely below the mean colour leaves a small model little to learn in a CPU budget
(docs/demo.md uses this to choose the demo's mask cell).

    python benchmarks/demo_headroom.py results/data/imagenet/index_val.parquet --img-size 96 --cells 8 16 32
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from mimlib.data.index import read_index
from mimlib.data.pretrain_data import ValidationDataset, collate


def losses(index_path: str, img_size: int, cell: int, images: int, seed: int) -> dict[str, float]:
    index, root = read_index(index_path)
    recipe = {"img_size": img_size, "mask_patch_size": cell, "patch_size": 4, "mask_ratio": 0.6}
    ds = ValidationDataset(index, root, recipe, seed, images)
    batch = collate([ds[i] for i in range(len(ds))])
    x = batch["image"]
    m = batch["mask"].float().repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    visible = 1 - m

    def l1(pred: torch.Tensor) -> float:
        return float(((pred - x).abs() * m).sum() / (m.sum() * 3))

    mean = (x * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True)
    out = {"mean colour": l1(mean.expand_as(x))}
    for k in (3, 5, 9, 17, 33):
        num = F.avg_pool2d(x * visible, k, 1, k // 2, count_include_pad=False)
        den = F.avg_pool2d(visible, k, 1, k // 2, count_include_pad=False)
        out[f"local mean {k}"] = l1(torch.where(den > 1e-3, num / den.clamp_min(1e-6), mean.expand_as(x)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("index", help="a validation index (Parquet), e.g. results/data/imagenet/index_val.parquet")
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--cells", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'cell px':>8} {'grid':>6} {'mean colour':>12} {'best local mean':>16} {'k':>3} {'ratio':>6}")
    for cell in args.cells:
        r = losses(args.index, args.img_size, cell, args.images, args.seed)
        k, best = min(((name, v) for name, v in r.items() if name.startswith("local")), key=lambda kv: kv[1])
        grid = args.img_size // cell
        print(f"{cell:>8} {f'{grid}x{grid}':>6} {r['mean colour']:>12.4f} {best:>16.4f} {k.split()[-1]:>3} "
              f"{best / r['mean colour']:>6.3f}")


if __name__ == "__main__":
    main()
