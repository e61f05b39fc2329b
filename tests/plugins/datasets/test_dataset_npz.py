"""The npz dataset: NHW and NHWC layouts, limits, max_value, and every error message."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import flowkit
from flowkit_plugins.datasets.npz import NpzParams, load_npz


def _images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _load(path: Path, **kwargs: object) -> flowkit.ImageDataset:
    return load_npz(NpzParams(path=str(path), **kwargs), build=None)


def test_grey_nhw_becomes_n1hw(tmp_path: Path) -> None:
    train, test = _images((5, 6, 4), 0), _images((3, 6, 4), 1)
    path = tmp_path / "grey.npz"
    np.savez_compressed(path, x_train=train, x_test=test, y_train=np.arange(5, dtype=np.uint8))
    data = flowkit.build("dataset", "npz", path=str(path))
    assert data.name == "grey" and data.source == str(path)
    assert data.train.shape == (5, 1, 6, 4) and data.test.shape == (3, 1, 6, 4)
    np.testing.assert_array_equal(data.train[:, 0], train)
    np.testing.assert_array_equal(data.test[:, 0], test)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_colour_nhwc_becomes_nchw(tmp_path: Path, channels: int) -> None:
    train, test = _images((4, 5, 6, channels), 2), _images((2, 5, 6, channels), 3)
    path = tmp_path / "colour.npz"
    np.savez(path, x_train=train, x_test=test)
    data = _load(path)
    assert data.train.shape == (4, channels, 5, 6) and data.test.shape == (2, channels, 5, 6)
    assert not data.train.flags.owndata, "NCHW is a view of the stored NHWC array, not a second copy"
    np.testing.assert_array_equal(data.train, train.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(data.test, test.transpose(0, 3, 1, 2))


def test_limits_keep_the_first_images(tmp_path: Path) -> None:
    train, test = _images((10, 4, 4, 3), 4), _images((6, 4, 4, 3), 5)
    path = tmp_path / "limits.npz"
    np.savez(path, x_train=train, x_test=test)
    data = _load(path, limit_train=3, limit_test=2)
    np.testing.assert_array_equal(data.train, train[:3].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(data.test, test[:2].transpose(0, 3, 1, 2))


def test_relative_path_is_resolved_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    np.savez(tmp_path / "sub" / "rel.npz", x_train=_images((2, 4, 4), 6), x_test=_images((1, 4, 4), 7))
    monkeypatch.chdir(tmp_path)
    data = flowkit.build("dataset", "npz", path="sub/rel.npz")
    assert data.source == str(tmp_path / "sub" / "rel.npz")


def test_max_value_is_passed_on_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=np.full((2, 8, 8), 16, np.uint8), x_test=np.zeros((1, 8, 8), np.uint8))
    assert _load(path, max_value=16).max_value == 16
    with pytest.raises(flowkit.DataError, match=r'Key "x_train" of .*digits\.npz holds values up to 16, above max_value = 15'):
        _load(path, max_value=15)


@pytest.mark.parametrize("value", [0, 256])
def test_max_value_out_of_range_is_a_recipe_error(tmp_path: Path, value: int) -> None:
    with pytest.raises(flowkit.RecipeError, match=f"max_value = {value} is out of range"):
        flowkit.build("dataset", "npz", path=str(tmp_path / "x.npz"), max_value=value)


def test_path_is_required() -> None:
    with pytest.raises(flowkit.RecipeError, match="path is required"):
        flowkit.build("dataset", "npz")


def _error(path: Path) -> str:
    with pytest.raises(flowkit.DataError) as info:
        _load(path)
    message = str(info.value)
    assert str(path) in message, message
    assert message.endswith("."), message
    return message


def test_missing_file_names_the_path_and_the_expected_keys(tmp_path: Path) -> None:
    message = _error(tmp_path / "nowhere.npz")
    assert "does not exist" in message and "local .npz" in message
    assert "x_train" in message and "x_test" in message


def test_a_folder_is_not_a_file(tmp_path: Path) -> None:
    assert "is not a file" in _error(tmp_path)


def test_a_file_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "text.npz"
    path.write_text("not an archive")
    message = _error(path)
    assert "is not a .npz (zip) archive" in message and "x_train" in message


def test_a_npy_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "single.npy"
    np.save(path, _images((2, 4, 4), 8))
    assert "is not a .npz (zip) archive" in _error(path)


def test_a_truncated_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.npz"
    np.savez(path, x_train=_images((50, 8, 8), 9), x_test=_images((5, 8, 8), 10))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _error(path)


@pytest.mark.parametrize("missing", ["x_train", "x_test"])
def test_missing_key_lists_the_keys_present(tmp_path: Path, missing: str) -> None:
    path = tmp_path / "partial.npz"
    arrays = {"x_train": _images((2, 4, 4), 11), "x_test": _images((1, 4, 4), 12), "y_train": np.zeros(2)}
    del arrays[missing]
    np.savez(path, **arrays)
    message = _error(path)
    assert f'has no key "{missing}"' in message
    present = re.search(r"keys present: ([^)]*)\)", message)
    assert present is not None and set(present.group(1).split(", ")) == set(arrays)


def test_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object), x_test=_images((1, 4, 4), 13))
    message = _error(path)
    assert 'Key "x_train"' in message and "object arrays are refused" in message


def test_float_images_name_the_dtype_and_the_conversion(tmp_path: Path) -> None:
    path = tmp_path / "floats.npz"
    np.savez(path, x_train=_images((2, 4, 4), 14), x_test=np.zeros((1, 4, 4), np.float32))
    message = _error(path)
    assert 'Key "x_test"' in message and "dtype float32" in message
    assert "`.astype(np.uint8)` only if its values are integers from 0 to 255" in message


@pytest.mark.parametrize("shape", [(2, 16), (2, 4, 4, 3, 1), (5,)])
def test_wrong_number_of_dimensions_is_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = tmp_path / "flat.npz"
    np.savez(path, x_train=np.zeros(shape, np.uint8), x_test=_images((1, 4, 4), 15))
    message = _error(path)
    assert 'Key "x_train"' in message and f"has {len(shape)} dimensions" in message


def test_channels_first_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "nchw.npz"
    np.savez(path, x_train=np.zeros((2, 3, 8, 8), np.uint8), x_test=np.zeros((1, 3, 8, 8), np.uint8))
    message = _error(path)
    assert 'Key "x_train"' in message and "channels-first" in message


def test_train_and_test_shapes_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "mixed.npz"
    np.savez(path, x_train=_images((2, 4, 4), 16), x_test=_images((1, 5, 5), 17))
    message = _error(path)
    assert 'Key "x_train"' in message and 'key "x_test"' in message
