"""The image_folder dataset: PNG files read with Pillow, cropping, resizing, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flowkit
from flowkit_plugins.datasets.image_folder import ImageFolderParams, load_image_folder


def _write(folder: Path, images: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, pixels in images.items():
        Image.fromarray(pixels).save(folder / name)


def _rng_images(n: int, shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(n)]


def _load(path: Path, **kwargs: object) -> flowkit.ImageDataset:
    return load_image_folder(ImageFolderParams(path=str(path), **kwargs), build=None)


def test_grey_pngs_are_read_in_name_order(tmp_path: Path) -> None:
    train = _rng_images(3, (5, 7), 0)
    test = _rng_images(2, (5, 7), 1)
    # Written out of order, with a non-PNG file that must be ignored.
    _write(tmp_path / "train", {"b.png": train[1], "c.PNG": train[2], "a.png": train[0]})
    _write(tmp_path / "test", {"0.png": test[0], "1.png": test[1]})
    (tmp_path / "train" / "notes.txt").write_text("ignored")
    data = flowkit.build("dataset", "image_folder", path=str(tmp_path))
    assert data.train.dtype == np.uint8
    assert data.train.shape == (3, 1, 5, 7) and data.test.shape == (2, 1, 5, 7)
    np.testing.assert_array_equal(data.train[:, 0], np.stack(train))
    np.testing.assert_array_equal(data.test[:, 0], np.stack(test))
    assert data.name == tmp_path.name and data.source == str(tmp_path)


def test_rgb_pngs_become_nchw(tmp_path: Path) -> None:
    train = _rng_images(2, (4, 6, 3), 2)
    test = _rng_images(1, (4, 6, 3), 3)
    _write(tmp_path / "train", {f"{i}.png": im for i, im in enumerate(train)})
    _write(tmp_path / "test", {"0.png": test[0]})
    data = _load(tmp_path)
    assert data.shape == (3, 4, 6)
    np.testing.assert_array_equal(data.train, np.stack(train).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(data.test, np.stack(test).transpose(0, 3, 1, 2))


def test_size_center_crops_and_box_resizes(tmp_path: Path) -> None:
    # 8x12 (H x W) images of different sizes: size = 4 crops the central 8x8 and halves it.
    wide = _rng_images(1, (8, 12, 3), 4)[0]
    tall = _rng_images(1, (10, 4, 3), 5)[0]
    _write(tmp_path / "train", {"0.png": wide, "1.png": tall})
    _write(tmp_path / "test", {"0.png": wide})
    data = _load(tmp_path, size=4)
    assert data.train.shape == (2, 3, 4, 4) and data.test.shape == (1, 3, 4, 4)
    expected = Image.fromarray(wide[:, 2:10]).resize((4, 4), Image.BOX)
    np.testing.assert_array_equal(data.train[0], np.asarray(expected).transpose(2, 0, 1))
    # The tall image is already 4 wide: its central 4x4 square is kept as it is.
    np.testing.assert_array_equal(data.train[1], tall[3:7].transpose(2, 0, 1))
    # Halving with BOX averages 2x2 blocks (Pillow's fixed-point arithmetic may round by 1).
    blocks = wide[:, 2:10].astype(float).reshape(4, 2, 4, 2, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    assert np.abs(data.train[0].astype(float) - blocks).max() <= 1.0


def test_limits_are_applied_before_reading(tmp_path: Path) -> None:
    images = _rng_images(4, (3, 3), 6)
    _write(tmp_path / "train", {f"{i}.png": im for i, im in enumerate(images)})
    _write(tmp_path / "test", {f"{i}.png": im for i, im in enumerate(images)})
    (tmp_path / "train" / "9.png").write_bytes(b"not a png, never read")
    data = _load(tmp_path, limit_train=2, limit_test=3)
    np.testing.assert_array_equal(data.train[:, 0], np.stack(images[:2]))
    assert data.test.shape[0] == 3


def _error(path: Path, needle: Path | str, **kwargs: object) -> str:
    with pytest.raises(flowkit.DataError) as info:
        _load(path, **kwargs)
    message = str(info.value)
    assert str(needle) in message, message
    assert message.endswith("."), message
    return message


def test_missing_folder_is_named(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "absent", tmp_path / "absent")


def test_missing_split_folder_is_named(tmp_path: Path) -> None:
    _write(tmp_path / "train", {"0.png": _rng_images(1, (3, 3), 7)[0]})
    assert "has no test/ subfolder" in _error(tmp_path, tmp_path)


def test_split_without_images_is_named(tmp_path: Path) -> None:
    _write(tmp_path / "train", {"0.png": _rng_images(1, (3, 3), 8)[0]})
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "a.txt").write_bytes(b"")
    assert "holds no image files" in _error(tmp_path, tmp_path / "test")


def test_mixed_sizes_name_the_first_offending_file(tmp_path: Path) -> None:
    small, big = _rng_images(1, (3, 3), 9)[0], _rng_images(1, (4, 3), 10)[0]
    _write(tmp_path / "train", {"0.png": small, "1.png": big, "2.png": big})
    _write(tmp_path / "test", {"0.png": small})
    message = _error(tmp_path, tmp_path / "train" / "1.png")
    assert "is 3x4 but" in message and "2.png" not in message


def test_test_images_must_match_the_train_images(tmp_path: Path) -> None:
    _write(tmp_path / "train", {"0.png": _rng_images(1, (3, 3), 11)[0]})
    _write(tmp_path / "test", {"0.png": _rng_images(1, (3, 3, 3), 12)[0]})
    message = _error(tmp_path, tmp_path / "test" / "0.png")
    assert "has mode RGB but" in message


def test_rgba_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "train", {"0.png": _rng_images(1, (3, 3, 4), 13)[0]})
    _write(tmp_path / "test", {"0.png": _rng_images(1, (3, 3, 4), 14)[0]})
    message = _error(tmp_path, tmp_path / "train" / "0.png")
    assert "has mode RGBA" in message and "convert" in message


def test_unreadable_png_is_named(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "0.png").write_bytes(b"garbage")
    _write(tmp_path / "test", {"0.png": _rng_images(1, (3, 3), 15)[0]})
    assert "could not be read" in _error(tmp_path, tmp_path / "train" / "0.png")


def test_negative_size_is_a_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(flowkit.RecipeError, match="size = -1 is negative"):
        flowkit.build("dataset", "image_folder", path=str(tmp_path), size=-1)
