"""SimMIM: masks, normalised targets, masked loss, per-sample losses, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mimlib.models import MaskGenerator, SimMIM, build_simmim, normalize_targets

# ------------------------------------------------------------------ masks


def test_mask_paper_setting() -> None:
    mg = MaskGenerator(192, 32, 4, 0.6)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = mg(g)
        assert m.shape == (48, 48) and m.dtype == torch.uint8
        cells = m[::8, ::8]
        assert int(cells.sum()) == 22 == math.ceil(0.6 * 36)
        # each cell is a constant 8x8 block of tokens
        assert torch.equal(m, cells.repeat_interleave(8, 0).repeat_interleave(8, 1))
        assert int(m.sum()) == 22 * 64


def test_mask_deterministic_for_generator_state() -> None:
    mg = MaskGenerator()
    a = [mg(torch.Generator().manual_seed(123)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    g = torch.Generator().manual_seed(123)
    first, second = mg(g), mg(g)
    assert torch.equal(first, a[0]) and not torch.equal(first, second)


def test_mask_cells_uniform() -> None:
    mg = MaskGenerator()
    g = torch.Generator().manual_seed(7)
    n = 3000
    freq = torch.stack([mg(g)[::8, ::8].float() for _ in range(n)]).mean(0)
    assert (freq > 0).all()
    p = 22 / 36
    sd = math.sqrt(p * (1 - p) / n)
    assert (freq - p).abs().max() < 5 * sd


def test_mask_validation_names_values() -> None:
    with pytest.raises(ValueError, match="200.*32"):
        MaskGenerator(200, 32, 4)
    with pytest.raises(ValueError, match="30.*4"):
        MaskGenerator(180, 30, 4)
    # float guard: 0.7 * 10 cells is 7, not ceil(7.000000000000001) = 8
    assert MaskGenerator(input_size=320, mask_patch_size=32, mask_ratio=0.7).mask_count == 70


# ------------------------------------------------------------------ normalised targets


def _brute_normalize(x: torch.Tensor, window: int) -> torch.Tensor:
    r = window // 2
    out = torch.empty_like(x)
    _, _, h, w = x.shape
    for i in range(h):
        for j in range(w):
            patch = x[:, :, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
            flat = patch.flatten(2)
            mean = flat.mean(-1)
            var = flat.var(-1, unbiased=True).clamp(min=0)
            out[:, :, i, j] = (x[:, :, i, j] - mean) / torch.sqrt(var + 1e-6)
    return out


def _pooled_normalize(x: torch.Tensor, window: int) -> torch.Tensor:
    # The reference formulation: one 2-D average pool without the padding, count map for n/(n-1).
    p = window // 2
    mean = F.avg_pool2d(x, window, 1, p, count_include_pad=False)
    sq = F.avg_pool2d(x * x, window, 1, p, count_include_pad=False)
    n = F.avg_pool2d(torch.ones_like(x), window, 1, p, count_include_pad=True) * window**2
    var = ((sq - mean**2) * n / (n - 1)).clamp(min=0)
    return (x - mean) / (var + 1e-6) ** 0.5


@pytest.mark.parametrize("shape,window", [((1, 3, 12, 12), 5), ((1, 1, 50, 50), 47), ((2, 3, 9, 14), 3)])
def test_normalize_targets_vs_brute_force(shape: tuple[int, ...], window: int) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 0.5
    got = normalize_targets(x, window)
    torch.testing.assert_close(got, _brute_normalize(x, window), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, _pooled_normalize(x, window), rtol=1e-9, atol=1e-9)


def test_normalize_targets_float32_and_constant_region() -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(normalize_targets(x, 47), _pooled_normalize(x.double(), 47).float(), rtol=1e-4, atol=1e-4)
    flat = torch.full((1, 1, 10, 10), 3.0)
    assert torch.allclose(normalize_targets(flat, 5), torch.zeros_like(flat), atol=1e-3)  # var clamps to 0
    with pytest.raises(ValueError):
        normalize_targets(x, 4)


# ------------------------------------------------------------------ model / loss


@pytest.fixture(scope="module")
def model() -> SimMIM:
    torch.manual_seed(0)
    return build_simmim("swinv2_pico", img_size=64, window_size=4, drop_path_rate=0.0).eval()


def _mask(batch: int, seed: int = 0) -> torch.Tensor:
    mg = MaskGenerator(64, 16, 4, 0.6)  # 4x4 cells, 10 masked, 16x16 tokens
    g = torch.Generator().manual_seed(seed)
    return torch.stack([mg(g) for _ in range(batch)])


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_forward_is_reference_formula(model: SimMIM) -> None:
    x, mask = _images(3), _mask(3)
    with torch.no_grad():
        loss = model(x, mask)
        rec = model.reconstruct(x, mask)
    t = normalize_targets(x, 47)
    m = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    expected = (F.l1_loss(t, rec, reduction="none") * m).sum() / (m.sum() + 1e-5) / 3
    torch.testing.assert_close(loss, expected)
    assert rec.shape == x.shape


def test_loss_only_from_masked_pixels(model: SimMIM) -> None:
    x, mask = _images(2), _mask(2)
    with torch.no_grad():
        rec = model.reconstruct(x, mask)
    t = model.targets(x)
    base = model.loss_from_reconstruction(t, rec, mask)
    pm = model.pixel_mask(mask).expand_as(rec).bool()
    for tensor_name in ("rec", "target"):
        r, tt = rec.clone(), t.clone()
        changed = r if tensor_name == "rec" else tt
        changed[~pm] += 100.0  # every unmasked pixel
        assert model.loss_from_reconstruction(tt, r, mask) == base
        r, tt = rec.clone(), t.clone()
        changed = r if tensor_name == "rec" else tt
        idx = pm.nonzero()[0].tolist()
        changed[tuple(idx)] += 1.0  # one masked pixel
        assert model.loss_from_reconstruction(tt, r, mask) != base


def test_l2_switch(model: SimMIM) -> None:
    x, mask = _images(2), _mask(2)
    l2 = build_simmim("swinv2_pico", img_size=64, window_size=4, drop_path_rate=0.0, loss="l2").eval()
    l2.load_state_dict(model.state_dict())
    with torch.no_grad():
        rec = model.reconstruct(x, mask)
        got = l2(x, mask)
    m = model.pixel_mask(mask).expand_as(rec).bool()
    expected = ((model.targets(x) - rec) ** 2)[m].mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, model(x, mask))
    with pytest.raises(ValueError):
        build_simmim("swinv2_pico", img_size=64, window_size=4, loss="huber")


def test_per_sample_losses_average_to_batch_loss(model: SimMIM) -> None:
    x, mask = _images(4), _mask(4)  # every mask has the same count by construction
    with torch.no_grad():
        per = model.forward_losses(x, mask)
        batch = model(x, mask)
        single = torch.stack([model(x[i : i + 1], mask[i : i + 1]) for i in range(4)])
    assert per.shape == (4,)
    torch.testing.assert_close(per.mean(), batch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per, single, rtol=1e-5, atol=1e-6)


def test_raw_targets_and_mask_dtypes(model: SimMIM) -> None:
    x, mask = _images(1), _mask(1)
    raw = build_simmim("swinv2_pico", img_size=64, window_size=4, norm_target_window=None)
    assert torch.equal(raw.targets(x), x)
    with torch.no_grad():
        a = model(x, mask)
        assert torch.equal(a, model(x, mask.bool()))
        assert torch.equal(a, model(x, mask.float()))
    with pytest.raises(ValueError, match="token grid"):
        model(x, mask[:, :8])


def test_gradient_reaches_mask_token() -> None:
    torch.manual_seed(0)
    m = build_simmim("swinv2_pico", img_size=64, window_size=4)
    x = _images(2)
    m(x, _mask(2)).backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0
    assert m.decoder[0].weight.grad.abs().sum() > 0
    m.zero_grad(set_to_none=False)
    m(x, torch.zeros(2, 16, 16)).backward()  # nothing masked: token unused, loss 0
    assert m.mask_token.grad.abs().sum() == 0


def test_mask_token_init_and_names(model: SimMIM) -> None:
    assert model.mask_token.shape == (1, 1, 24)
    names = [n for n, _ in model.named_parameters()]
    assert "mask_token" in names
    # the optimiser's no-decay keywords find these by substring
    assert any("cpb_mlp" in n for n in names) and any("logit_scale" in n for n in names)
    std = float(model.mask_token.detach().std())
    assert 0.005 < std < 0.05  # trunc-normal std 0.02 over only 24 values


def test_trivial_predictor_is_the_mean_visible_colour(model: SimMIM) -> None:
    x, mask = _images(2), _mask(2)
    m = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    t = normalize_targets(x, 47)
    for i in range(2):
        visible = t[i][:, m[i, 0] == 0]  # (3, n visible pixels)
        guess = visible.mean(1)[:, None, None].expand_as(t[i])
        expected = ((t[i] - guess).abs() * m[i]).sum() / (m[i].sum() + 1e-5) / 3
        torch.testing.assert_close(model.trivial_losses(x, mask)[i], expected)
    # Where the visible pixels tell the masked ones exactly (one flat colour), it is perfect.
    flat = torch.ones(2, 3, 64, 64) * torch.tensor([0.2, -1.0, 0.5])[:, None, None]
    raw = SimMIM(model.encoder, norm_target_window=None)
    torch.testing.assert_close(raw.trivial_losses(flat, mask), torch.zeros(2), atol=1e-5, rtol=0)
