"""Which SDPA kernel SwinV2's window attention gets on this GPU, and why not a fused one.

1. SwinV2-B stage-1 shapes (window 12: N = 144 tokens, head dim 32, 4 heads x 16 windows per
   image, batch 64), q/k/v in bf16, the additive bias (continuous position bias + shift mask)
   broadcast over the batch as FusedWindowAttention passes it. Each SDPA backend alone, forward
   + backward, with several bias variants: works or PyTorch's reason, and milliseconds.
2. The CUDA kernels a SimMIM SwinV2-B training step spends its time in (torch.profiler), to see
   whether attention runs fused (fmha / flash / cudnn) or as bmm + softmax.

    python benchmarks/gpu_attention_probe.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def probe_kernels() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    b, nw, h, n, d = 64, 16, 4, 144, 32
    q, k, v = (torch.randn(b, nw * h, n, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    base = torch.randn(1, nw * h, n, n, device=dev, dtype=dt)
    variants = {
        "bias broadcast over batch, requires grad (as used)": lambda: base.clone().requires_grad_(True),
        "bias broadcast over batch, no grad": lambda: base.clone(),
        "bias expanded + contiguous, requires grad": lambda: base.expand(b, -1, -1, -1).contiguous().requires_grad_(True),
        "no bias": lambda: None,
    }
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.MATH]
    print("| bias | backend | fwd+bwd ms | note |\n|---|---|---|---|")
    for name, make in variants.items():
        for backend in backends:
            bias = make()

            def step() -> None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
                out.float().sum().backward()

            with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
                warnings.simplefilter("always")
                try:
                    ms, note = f"{timed(step):.2f}", ""
                except RuntimeError as exc:
                    ms, note = "-", str(exc).splitlines()[0][:100]
            reasons = " / ".join(str(w.message).replace("\n", " ")[:160] for w in caught)
            print(f"| {name} | {backend.name} | {ms} | {note} {reasons} |", flush=True)
    # what the default dispatcher picks for the bias as used
    bias = base.clone().requires_grad_(True)
    print(f"default dispatch, bias as used: {timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0).float().sum().backward()):.2f} ms")


def probe_model_calls() -> None:
    """Every distinct SDPA call of a SwinV2-B SimMIM step: shapes, strides, dtypes, and whether
    the memory-efficient kernel accepts it (PyTorch's reason when not)."""
    from bench_pretrain import synthetic_batch

    from mimlib.models.attention import use_fused_attention
    from mimlib.models.simmim import build_simmim

    dev = torch.device("cuda")
    model = build_simmim("swinv2_b", img_size=192, window_size=12, drop_path_rate=0.1).to(dev)
    use_fused_attention(model)
    images, masks = synthetic_batch(8, 192, dev, 0)
    original = F.scaled_dot_product_attention
    seen: dict[str, int] = {}

    def spy(q, k, v, attn_mask=None, **kw):
        sig = " ".join(f"{n}{tuple(t.shape)}/{t.stride()}/{str(t.dtype)[6:]}/g{int(t.requires_grad)}"
                       for n, t in (("q", q), ("k", k), ("v", v), ("m", attn_mask)) if t is not None)
        if sig not in seen:
            seen[sig] = 0
            clones = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
                      for t in (q, k, v, attn_mask)]
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                warnings.simplefilter("always")
                try:
                    original(clones[0], clones[1], clones[2], attn_mask=clones[3], **kw)
                    verdict = "efficient OK"
                except RuntimeError:
                    verdict = "efficient REFUSED: " + " / ".join(
                        str(w.message).split("(Triggered")[0].strip() for w in caught)
            print(f"{sig}\n    -> {verdict}", flush=True)
        seen[sig] += 1
        return original(q, k, v, attn_mask=attn_mask, **kw)

    F.scaled_dot_product_attention = spy
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images, masks)
        loss.backward()
    finally:
        F.scaled_dot_product_attention = original
    print("calls per signature:", list(seen.values()))


def profile_step() -> None:
    from bench_pretrain import synthetic_batch

    from mimlib.models.attention import use_fused_attention
    from mimlib.models.simmim import build_simmim

    dev = torch.device("cuda")
    model = build_simmim("swinv2_b", img_size=192, window_size=12, drop_path_rate=0.1).to(dev)
    use_fused_attention(model)
    images, masks = synthetic_batch(64, 192, dev, 0)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images, masks)
        loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


def main() -> int:
    print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    if "--calls-only" not in sys.argv:
        probe_kernels()
    probe_model_calls()
    if "--calls-only" not in sys.argv:
        profile_step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
