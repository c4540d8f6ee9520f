import pytest
import torch

from msf.method.factorize import (
    accumulate_sample,
    check_sizes,
    compose,
    down,
    factorize,
    input_priors,
    resize_image,
    up,
)

SIZE_LISTS = [[5], [3, 7], [24, 32], [4, 7, 11], [3, 6, 9, 13]]


@pytest.mark.parametrize("sizes", SIZE_LISTS)
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_recomposition_identity(sizes, channels):
    z = torch.randn(2, channels, sizes[-1], sizes[-1])
    comps = factorize(z, sizes)
    assert [c.shape[-1] for c in comps] == sizes
    assert all(c.shape[:2] == (2, channels) for c in comps)
    torch.testing.assert_close(compose(comps), z, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sizes", SIZE_LISTS[1:])
def test_image_base_is_kept_and_identity_holds(sizes):
    z = torch.randn(2, 4, sizes[-1], sizes[-1])
    base = torch.randn(2, 4, sizes[0], sizes[0])
    comps = factorize(z, sizes, base=base)
    assert torch.equal(comps[0], base)
    torch.testing.assert_close(compose(comps), z, atol=1e-5, rtol=0)


def test_latent_base_is_downsampled_target_and_residuals_follow_algorithm_1():
    z = torch.randn(1, 3, 13, 13)
    c = factorize(z, [3, 6, 13])
    torch.testing.assert_close(c[0], down(z, 3))
    r = z - up(c[0], 13)
    torch.testing.assert_close(c[1], down(r, 6))
    torch.testing.assert_close(c[2], r - up(c[1], 13))


@pytest.mark.parametrize("sizes", SIZE_LISTS)
def test_priors_are_what_earlier_scales_add_up_to(sizes):
    z = torch.randn(2, 3, sizes[-1], sizes[-1])
    comps = factorize(z, sizes)
    priors = input_priors(comps)
    assert priors[0] is None
    N = sizes[-1]
    for k in range(1, len(sizes)):
        built = sum(up(comps[j], N) for j in range(k))
        torch.testing.assert_close(priors[k], down(built, sizes[k]), atol=1e-6, rtol=0)


def test_accumulate_sample_sees_training_priors_and_composes():
    sizes = [4, 7, 11]
    z = torch.randn(2, 3, 11, 11)
    comps = factorize(z, sizes)
    train_priors = input_priors(comps)
    seen = []

    def generate(k, prior):
        seen.append(prior)
        return comps[k]

    out = accumulate_sample(generate, sizes, torch.zeros_like(z))
    assert seen[0] is None
    for k in (1, 2):
        torch.testing.assert_close(seen[k], train_priors[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(compose(out), z, atol=1e-5, rtol=0)


def test_resize_pair_shapes_and_antialias():
    x = torch.randn(1, 2, 9, 9)
    assert up(x, 20).shape[-2:] == (20, 20)
    assert down(x, 4).shape[-2:] == (4, 4)
    assert up(x, 9) is x and down(x, 9) is x
    # A checkerboard has no low-frequency content: antialiased downsampling removes it.
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2.0 - 1.0
    assert down(checker[None, None], 4).abs().max() < 0.1
    img = resize_image(torch.rand(1, 3, 16, 16) * 2 - 1, 8)
    assert img.shape == (1, 3, 8, 8) and img.min() >= -1 and img.max() <= 1


@pytest.mark.parametrize("bad", [[], [8, 8], [16, 8], [0, 8], [4, 8, 6]])
def test_sizes_must_increase(bad):
    with pytest.raises(ValueError, match="increasing|at least one|positive"):
        check_sizes(bad)


def test_target_of_wrong_size_or_base_of_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, C, 16, 16\)"):
        factorize(torch.randn(1, 3, 15, 15), [8, 16])
    with pytest.raises(ValueError, match="base must be"):
        factorize(torch.randn(1, 3, 16, 16), [8, 16], base=torch.randn(1, 4, 8, 8))


def test_up_aligns_pixel_centres_not_corners():
    # half-pixel centres (align_corners=False): output pixel i of 4 sits at input position
    # (i + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1); aligned corners give thirds
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]
    w = torch.tensor([0.0, 0.25, 0.75, 1.0])
    torch.testing.assert_close(up(a, 4)[0, 0], 2 * w[:, None] + w[None, :], atol=1e-6, rtol=0)
    row = up(torch.tensor([[[[0.0, 3.0, 6.0]]]]).expand(1, 1, 3, 3), 6)[0, 0, 0]
    torch.testing.assert_close(row, torch.tensor([0.0, 0.75, 2.25, 3.75, 5.25, 6.0]), atol=1e-6, rtol=0)


def test_resize_image_is_antialiased_like_pils_bicubic():
    import numpy as np
    from PIL import Image

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    got = resize_image(x, 8)[0]
    pixels = (x[0] + 1).mul(127.5).numpy()
    pil = np.stack([np.asarray(Image.fromarray(c).resize((8, 8), Image.BICUBIC)) for c in pixels])
    torch.testing.assert_close(got, torch.from_numpy(pil) / 127.5 - 1, atol=1e-4, rtol=0)
    assert got.std() < 0.25  # noise averaged away, not point-sampled (which keeps most of its 0.58 std)
