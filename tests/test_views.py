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


def test_every_augmix_op_keeps_shape_and_dtype():
    pixels = torch.from_numpy(image()).permute(2, 0, 1).contiguous()
    rng = torch.Generator().manual_seed(0)
    for op in AUGMIX_OPS:
        out = apply_augmix_op(op, pixels, 1, rng)
        assert out.shape == pixels.shape and out.dtype == torch.uint8, op


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
