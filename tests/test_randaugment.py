"""RandAugment: timm's spelling parsed, each operation's magnitude mapping, the draws in range, and the
batch a pure function of the pipeline's Generator."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from vitspec.app import randaugment
from vitspec.app.randaugment import OPERATION_NAMES, RandAugment, draw, parse, rand_augment

FILL_RGB, FILL_GRAY = (10, 20, 30), 40


def _operation(name: str, increasing: bool = False):
    return randaugment._operations(increasing)[name]


def _gradient_image(mode: str, size: int = 20) -> Image.Image:
    """Every pixel distinct in a row, every channel different, so a shift or blend shows."""
    rows, cols = np.mgrid[0:size, 0:size]
    gray = (rows * 11 + cols * 3 + 7) % 256
    if mode == "L":
        return Image.fromarray(gray.astype(np.uint8))
    return Image.fromarray(np.stack([gray, 255 - gray, (gray * 7) % 256], axis=-1).astype(np.uint8))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("rand-m9", RandAugment(num_ops=2, magnitude=9.0)),
        ("rand-m9-n2-mstd0.5", RandAugment(num_ops=2, magnitude=9.0, magnitude_std=0.5)),
        ("rand-m9-mstd0.5-inc1", RandAugment(magnitude=9.0, magnitude_std=0.5, increasing=True)),
        ("rand-n3-m7.5-inc0", RandAugment(num_ops=3, magnitude=7.5)),
        ("rand-m10-n1", RandAugment(num_ops=1, magnitude=10.0)),
    ],
)
def test_timm_spellings_parse(spec, expected):
    assert parse(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("rand", "expected rand-m<magnitude>"),
        ("rand-n2", "expected rand-m<magnitude>"),
        ("augmix-m9", "expected rand-m<magnitude>"),
        ("rand-m9-w0", "expected rand-m<magnitude>"),
        ("rand-m9-mstd-1", "expected rand-m<magnitude>"),
        ("rand-m9-n2.5", "'n2.5' is not a value n takes"),
        ("rand-m9-inc2", "'inc2' is not a value inc takes"),
        ("rand-m11", "magnitude=11.0: expected a value in [0, 10]"),
        ("rand-m9-n0", "num_ops=0: expected an int >= 1"),
    ],
)
def test_bad_spellings_are_named_errors(spec, message):
    with pytest.raises(ValueError, match="--randaugment") as error:
        parse(spec)
    assert message in str(error.value)


def test_timm_list_in_its_order():
    assert OPERATION_NAMES == (
        "AutoContrast",
        "Equalize",
        "Invert",
        "Rotate",
        "Posterize",
        "Solarize",
        "SolarizeAdd",
        "Color",
        "Contrast",
        "Brightness",
        "Sharpness",
        "ShearX",
        "ShearY",
        "TranslateXRel",
        "TranslateYRel",
    )


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_pixel_operations_by_hand(mode):
    image = _gradient_image(mode)
    pixels = np.asarray(image).astype(np.int64)
    fill = FILL_GRAY if mode == "L" else FILL_RGB

    def run(name, level, sign=1.0, increasing=False):
        return np.asarray(_operation(name, increasing)(image, level, sign, fill)).astype(np.int64)

    np.testing.assert_array_equal(run("Invert", 0.3), 255 - pixels)
    # Solarize: level 0.5 -> threshold int(0.5 * 256) = 128; increasing: 256 - 128.
    np.testing.assert_array_equal(run("Solarize", 0.5), np.where(pixels >= 128, 255 - pixels, pixels))
    np.testing.assert_array_equal(run("Solarize", 0.0, increasing=True), pixels)  # threshold 256
    # SolarizeAdd: level 0.5 -> add int(55.0) = 55 below 128, clipped at 255.
    np.testing.assert_array_equal(run("SolarizeAdd", 0.5), np.where(pixels < 128, pixels + 55, pixels))
    # Posterize: level 0.5 -> keep int(2.0) = 2 bits; level 0.2 -> 0 bits: black; increasing: 4 - bits.
    np.testing.assert_array_equal(run("Posterize", 0.5), pixels & 0b11000000)
    np.testing.assert_array_equal(run("Posterize", 0.2), np.zeros_like(pixels))
    np.testing.assert_array_equal(run("Posterize", 0.25, increasing=True), pixels & 0b11100000)
    np.testing.assert_array_equal(run("Posterize", 1.0, increasing=True), np.zeros_like(pixels))
    # Factor 1 (increasing, level 0) leaves an image as it is.
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        np.testing.assert_array_equal(run(name, 0.0, increasing=True), pixels, err_msg=name)
    # Level 0 geometry is the identity.
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        np.testing.assert_array_equal(run(name, 0.0), pixels, err_msg=name)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_translation_shifts_whole_pixels_and_fills(mode):
    image = _gradient_image(mode)  # 20 px: level 5/9 moves 0.45 * 5/9 * 20 = 5 px
    pixels = np.asarray(image)
    fill = FILL_GRAY if mode == "L" else FILL_RGB
    left = np.asarray(_operation("TranslateXRel")(image, 5 / 9, 1.0, fill))
    np.testing.assert_array_equal(left[:, :15], pixels[:, 5:])
    assert (left[:, 15:] == fill).all()
    down = np.asarray(_operation("TranslateYRel")(image, 5 / 9, -1.0, fill))
    np.testing.assert_array_equal(down[5:], pixels[:15])
    assert (down[:5] == fill).all()


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_operations_pass_timms_arguments_to_pillow(mode, sign):
    """Level 0.9 (magnitude 9): each operation is Pillow's with timm's level-to-argument mapping."""
    image, level = _gradient_image(mode), 0.9
    fill = FILL_GRAY if mode == "L" else FILL_RGB
    bilinear, affine = Image.Resampling.BILINEAR, Image.Transform.AFFINE
    shear = sign * 0.27
    expected = {
        "AutoContrast": ImageOps.autocontrast(image),
        "Equalize": ImageOps.equalize(image),
        "Rotate": image.rotate(sign * 27.0, resample=bilinear, fillcolor=fill),
        "Color": ImageEnhance.Color(image).enhance(1.72),
        "Contrast": ImageEnhance.Contrast(image).enhance(1.72),
        "Brightness": ImageEnhance.Brightness(image).enhance(1.72),
        "Sharpness": ImageEnhance.Sharpness(image).enhance(1.72),
        "ShearX": image.transform(
            image.size, affine, (1, shear, 0, 0, 1, 0), resample=bilinear, fillcolor=fill
        ),
        "ShearY": image.transform(
            image.size, affine, (1, 0, 0, shear, 1, 0), resample=bilinear, fillcolor=fill
        ),
        "TranslateXRel": image.transform(
            image.size, affine, (1, 0, sign * 8.1, 0, 1, 0), resample=bilinear, fillcolor=fill
        ),
    }
    for name, want in expected.items():
        got = _operation(name)(image, level, sign, fill)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    # The increasing enhancements move away from factor 1 by 0.9 level, either way.
    got = _operation("Contrast", increasing=True)(image, level, sign, fill)
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(ImageEnhance.Contrast(image).enhance(1 + sign * 0.81))
    )


def test_draws_are_in_range_and_cover_the_list():
    n = 4000
    wide = draw(np.random.default_rng(0), n, RandAugment(num_ops=3, magnitude=9, magnitude_std=3.0))
    assert wide.operation.shape == (n, 3)
    assert set(np.unique(wide.operation)) == set(range(len(OPERATION_NAMES)))
    assert wide.magnitude.min() == 0.0 and wide.magnitude.max() == 10.0  # clipped at both ends
    assert 0.45 < wide.applied.mean() < 0.55 and set(np.unique(wide.sign)) == {-1.0, 1.0}
    fixed = draw(np.random.default_rng(0), n, RandAugment(num_ops=3, magnitude=7))
    assert (fixed.magnitude == 7.0).all()
    # The same draws whatever the magnitude settings: only the magnitudes differ.
    np.testing.assert_array_equal(fixed.operation, wide.operation)
    np.testing.assert_array_equal(fixed.sign, wide.sign)


@pytest.mark.parametrize("channels", [1, 3])
def test_batch_applies_each_images_drawn_operations(channels):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(12, 16, 16, channels), dtype=np.uint8)
    settings = RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5, fill=(50,) * channels)
    out = rand_augment(images, np.random.default_rng(7), settings)
    assert out.dtype == np.uint8 and out.shape == images.shape
    draws = draw(np.random.default_rng(7), len(images), settings)
    operations = list(randaugment._operations(False).values())
    fill = 50 if channels == 1 else (50,) * 3
    for i, image in enumerate(images):
        expected = Image.fromarray(image[:, :, 0] if channels == 1 else image)
        for j in range(2):
            if draws.applied[i, j]:
                operation = operations[draws.operation[i, j]]
                expected = operation(expected, draws.magnitude[i, j] / 10, draws.sign[i, j], fill)
        np.testing.assert_array_equal(out[i], np.asarray(expected).reshape(image.shape), err_msg=str(i))
    untouched = ~draws.applied.any(axis=1)
    assert untouched.any() and (out[untouched] == images[untouched]).all()


def test_other_channel_counts_and_a_missing_pillow_are_named(monkeypatch):
    with pytest.raises(ValueError, match="1- or 3-channel"):
        rand_augment(np.zeros((2, 4, 4, 2), np.uint8), np.random.default_rng(0), RandAugment())
    monkeypatch.setattr(randaugment, "Image", None)
    with pytest.raises(ValueError, match=r"--randaugment needs Pillow.*pip install"):
        rand_augment(np.zeros((2, 4, 4, 3), np.uint8), np.random.default_rng(0), RandAugment())
