"""Views depend only on (view_seed, sample_id)."""
import numpy as np
import torch

from dynaprompt.views import AUGMIX_OPS, ViewConfig, ViewGenerator, apply_augmix_op

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)


def generator(**config):
    return ViewGenerator(ViewConfig(**config), 32, MEAN, STD)


def test_shape_and_original_view_is_deterministic():
    views = generator(n_views=8)(image(), "a")
    assert views.shape == (8, 3, 32, 32)
    other = generator(n_views=8, view_seed=5)(image(), "b")
    assert torch.equal(views[0], other[0])  # the original view has no randomness


def test_views_are_a_pure_function_of_seed_and_sample_id():
    make = generator(n_views=6, augmix=True)
    first = make(image(), "sample-7")
    make(image(1), "another")  # calls in between must not matter
    torch.manual_seed(123)  # nor the global RNG
    again = make(image(), "sample-7")
    assert torch.equal(first, again)
    assert not torch.equal(first[1:], make(image(), "sample-8")[1:])
    assert not torch.equal(first[1:], generator(n_views=6, augmix=True, view_seed=1)(image(), "sample-7")[1:])


def test_views_do_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generator(n_views=4, augmix=True)(image(), "x")
    assert torch.equal(torch.rand(3), expected)


def test_augmix_changes_the_augmented_views_only():
    plain = generator(n_views=5)(image(), "s")
    mixed = generator(n_views=5, augmix=True)(image(), "s")
    assert torch.equal(plain[0], mixed[0])
    assert not torch.equal(plain[1:], mixed[1:])


def test_every_augmix_op_keeps_size_and_mode():
    from PIL import Image

    pil = Image.fromarray(image())
    rng = torch.Generator().manual_seed(0)
    for op in AUGMIX_OPS:
        out = apply_augmix_op(op, pil, 1, rng)
        assert out.size == pil.size and out.mode == "RGB", op


def pinned_op(monkeypatch, name, level, sign):
    """apply_augmix_op with its strength and sign fixed, on a 32x32 test card."""
    from PIL import Image

    import dynaprompt.views as views

    monkeypatch.setattr(views, "_level", lambda generator, severity: level)
    monkeypatch.setattr(views, "_sign", lambda generator: sign)
    card = np.zeros((32, 32, 3), dtype=np.uint8)
    card[:, 8:12] = 255  # a vertical bar at x = 8..11
    card[20:24, :] = 128  # a horizontal bar at y = 20..23
    return np.asarray(views.apply_augmix_op(name, Image.fromarray(card), 1, None)), card


def test_shear_turns_about_the_top_left_corner_as_pil_does(monkeypatch):
    # shear_x with factor 0.3 * level / 10 = 0.3 at level 10: output (x, y) samples input (x + 0.3 y, y).
    # PIL samples at pixel centres, so row y moves by 0.3 (y + 0.5) px: a centre-origin shear would move row 0
    # by +4.8 px and row 16 by none.
    out, card = pinned_op(monkeypatch, "shear_x", 10.0, 1)
    centroid = lambda row: float((np.arange(32) * row).sum() / row.sum())
    bar = centroid(card[0, :, 0].astype(float))  # 9.5
    for y in (0, 4, 16):
        assert abs(centroid(out[y, :, 0].astype(float)) - (bar - 0.3 * (y + 0.5))) < 0.25, y


def test_rotate_and_affine_ops_resample_bilinear(monkeypatch):
    # a 3-degree rotation of a hard edge: nearest neighbour keeps only 0 and 255, bilinear blends them
    out, _ = pinned_op(monkeypatch, "rotate", 1.0, 1)
    values = np.unique(out[..., 0])
    assert ((values > 0) & (values < 128)).any()
    out, _ = pinned_op(monkeypatch, "shear_y", 3.3, -1)
    values = np.unique(out[..., 0])
    assert ((values > 0) & (values < 128)).any()


def test_translate_moves_by_whole_pixels_from_the_top_left(monkeypatch):
    # level 10 on a 32 px image: int(10 * 32 / 3 / 10) = 10 px; output x samples input x + 10
    out, card = pinned_op(monkeypatch, "translate_x", 10.0, -1)
    assert np.array_equal(out[:, 18:22], card[:, 8:12])


def test_crop_is_resized_bilinear():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    import dynaprompt.views as views

    make = generator(n_views=2)
    pixels = torch.from_numpy(image()).permute(2, 0, 1).contiguous()
    rng = torch.Generator().manual_seed(views.view_seed_for(0, "s"))
    box = views.random_resized_crop_box(48, 40, rng)
    flip = float(torch.rand((), generator=rng)) < 0.5
    crop = TF.resized_crop(pixels, *box, [32, 32], interpolation=InterpolationMode.BILINEAR, antialias=True)
    crop = TF.horizontal_flip(crop) if flip else crop
    assert torch.equal(make(image(), "s")[1], make.normalize(crop))


def test_grayscale_and_pil_inputs():
    from PIL import Image

    gray = np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)
    assert generator(n_views=2)(gray, "g").shape == (2, 3, 32, 32)
    assert generator(n_views=2)(Image.fromarray(gray), "g").shape == (2, 3, 32, 32)


def test_views_drawn_in_parallel_threads_equal_sequential_ones():
    from concurrent.futures import ThreadPoolExecutor

    make = generator(n_views=16, augmix=True)
    ids = [f"s{i}" for i in range(8)]
    sequential = [make(image(i), sid) for i, sid in enumerate(ids)]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda args: make(image(args[0]), args[1]), enumerate(ids)))
    assert all(torch.equal(a, b) for a, b in zip(sequential, parallel))
