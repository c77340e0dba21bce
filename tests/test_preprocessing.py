"""Preprocessing: any upload -> the uint8 28-px array the model expects, or a one-line ImageError."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import AWKWARD_KINDS, gradient, png_header_only, write_dicom
from medclassify import preprocessing
from medclassify.preprocessing import (
    MAX_ASPECT,
    MIN_SIDE,
    ImageError,
    colourfulness,
    open_image,
    prepare,
    to_model_input,
)
from medclassify.registry import get_task

TASK_NAMES = ("blood", "breast")
MODES = ("L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "1")


def make_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """A random image of ``mode`` and size, built without relying on lossy conversions where avoidable."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    if mode == "L":
        image = Image.fromarray(gray)
    elif mode == "LA":
        image = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(rgb[..., 1])])
    elif mode == "P":
        image = Image.fromarray(rgb).convert("P")
    elif mode == "RGB":
        image = Image.fromarray(rgb)
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (height, width), dtype=np.uint8)]))
    elif mode == "CMYK":
        image = Image.fromarray(rgb).convert("CMYK")
    elif mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode == "I":
        image = Image.fromarray(rng.integers(0, 2**20, (height, width), dtype=np.int32))
    elif mode == "F":
        image = Image.fromarray(np.abs(rng.normal(0.0, 1000.0, (height, width))).astype(np.float32))
    elif mode == "1":
        image = Image.fromarray(gray).convert("1")
    else:
        raise AssertionError(mode)
    assert image.mode == mode
    assert image.size == (width, height)
    return image


def png_16_bit_colour(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow writes none)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def tiff_16_bit_colour(rgb: np.ndarray) -> bytes:
    """An uncompressed 16-bit RGB TIFF written by hand (Pillow writes none)."""
    import struct

    height, width, _ = rgb.shape
    pixels = rgb.astype("<u2").tobytes()
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, None), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, len(pixels)), (284, 3, 1, 1)]
    bits_at = 8 + 2 + 12 * len(tags) + 4  # header, entry count, entries, next-IFD offset
    values = {258: bits_at, 273: bits_at + 6}  # BitsPerSample (three shorts) and the strip follow the IFD
    entries = b"".join(struct.pack("<HHI", tag, kind, count)
                       + (struct.pack("<I", values[tag]) if value is None else
                          struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
                       for tag, kind, count, value in tags)
    return (b"II*\x00" + struct.pack("<IH", 8, len(tags)) + entries + bytes(4) + struct.pack("<3H", 16, 16, 16)
            + pixels)


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def assert_model_input(array: np.ndarray, task: str) -> None:
    spec = get_task(task)
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.uint8
    assert array.shape == spec.input_shape
    assert array.flags["C_CONTIGUOUS"]


def assert_one_line(message: str) -> None:
    assert message and message.strip() == message
    assert "\n" not in message and "\r" not in message
    assert len(message) < 200


# --------------------------------------------------------------------------- properties

def usable_size(width: int, height: int, task: str) -> bool:
    """The documented limits: at most MAX_ASPECT:1, and at least the model's 28 px after the MedMNIST crop
    (blood: 200/360 of the short side), unless the image is a MedMNIST-size thumbnail."""
    if max(width, height) > MAX_ASPECT * min(width, height) or min(width, height) < MIN_SIDE:
        return False
    thumbnail = width == height and width in (28, 64, 128, 224)
    side = round(min(width, height) * 200 / 360) if task == "blood" else min(width, height)
    return thumbnail or side >= 28


@settings(max_examples=60)
@given(mode=st.sampled_from(MODES), width=st.integers(8, 600), height=st.integers(8, 600),
       task=st.sampled_from(TASK_NAMES), seed=st.integers(0, 2**16))
@example(mode="RGB", width=360, height=363, task="blood", seed=0)
@example(mode="L", width=500, height=500, task="breast", seed=0)
@example(mode="I;16", width=150, height=600, task="breast", seed=1)
@example(mode="1", width=600, height=150, task="blood", seed=2)
@example(mode="L", width=8, height=8, task="breast", seed=3)
@example(mode="L", width=14, height=14, task="blood", seed=3)
@example(mode="I;16", width=8, height=600, task="breast", seed=1)
@example(mode="1", width=600, height=8, task="blood", seed=2)
@example(mode="L", width=13, height=13, task="blood", seed=3)
def test_any_mode_and_size_gives_model_input_or_a_reason(mode, width, height, task, seed):
    image = make_image(mode, width, height, seed)
    if not usable_size(width, height, task):
        with pytest.raises(ImageError, match="too elongated|too small") as info:
            prepare(image, task)
        assert_one_line(str(info.value))
        return
    prepared = prepare(image, task)
    assert_model_input(prepared.array, task)
    assert prepared.original_size == (width, height)
    assert prepared.original_mode == mode
    assert np.isfinite(prepared.colourfulness) and prepared.colourfulness >= 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_mode_through_png_bytes(mode, task):
    image = make_image(mode, 74, 52, seed=5)
    if mode in ("CMYK", "F", "I"):  # PNG cannot store these modes; use TIFF
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF")
        data = buffer.getvalue()
    else:
        data = png_bytes(image)
    assert_model_input(to_model_input(data, task), task)


@settings(max_examples=40)
@given(pixels=st.binary(min_size=28 * 28 * 3, max_size=28 * 28 * 3))
def test_blood_thumbnail_passes_through_unchanged(pixels):
    thumb = np.frombuffer(pixels, dtype=np.uint8).reshape(28, 28, 3)
    for source in (thumb, Image.fromarray(thumb), png_bytes(Image.fromarray(thumb))):
        out = to_model_input(source, "blood")
        assert_model_input(out, "blood")
        np.testing.assert_array_equal(out, thumb)


@settings(max_examples=40)
@given(pixels=st.binary(min_size=28 * 28, max_size=28 * 28))
def test_breast_thumbnail_passes_through_unchanged(pixels):
    thumb = np.frombuffer(pixels, dtype=np.uint8).reshape(28, 28)
    for source in (thumb, thumb[..., None], Image.fromarray(thumb), png_bytes(Image.fromarray(thumb))):
        out = to_model_input(source, "breast")
        assert_model_input(out, "breast")
        np.testing.assert_array_equal(out[..., 0], thumb)


def test_real_thumbnails_pass_through(fixture_data_dir):
    from medclassify.data import load_split

    for task in TASK_NAMES:
        split = load_split(task, "test", data_dir=fixture_data_dir)
        for image in split.images[:10]:
            np.testing.assert_array_equal(to_model_input(image, task), image)
            source = image[..., 0] if image.shape[-1] == 1 else image
            np.testing.assert_array_equal(to_model_input(png_bytes(Image.fromarray(source)), task), image)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the damaged headers it skips
@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_random_bytes_never_raise_anything_but_image_error(data):
    for task in TASK_NAMES:
        try:
            assert_model_input(to_model_input(data, task), task)
        except ImageError as exc:
            assert_one_line(str(exc))


def _valid_files() -> dict[str, bytes]:
    image = Image.fromarray(gradient(40, 32))
    out = {}
    for fmt, kwargs in (("PNG", {}), ("JPEG", {"quality": 90}), ("GIF", {}), ("BMP", {}), ("TIFF", {}),
                        ("WEBP", {"quality": 90})):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        out[fmt] = buffer.getvalue()
    return out


VALID_FILES = _valid_files()


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the damaged headers it skips
@settings(max_examples=150)
@given(fmt=st.sampled_from(sorted(VALID_FILES)), edits=st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8), cut=st.integers(0, 10**6))
def test_corrupted_files_never_raise_anything_but_image_error(fmt, edits, cut):
    data = bytearray(VALID_FILES[fmt])
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % len(data))])
    for task in TASK_NAMES:
        try:
            assert_model_input(to_model_input(data, task), task)
        except ImageError as exc:
            assert_one_line(str(exc))


# --------------------------------------------------------------------------- sources

@pytest.mark.parametrize("task", TASK_NAMES)
def test_all_source_kinds_agree(tmp_path, task):
    image = Image.fromarray(gradient(120, 90, seed=3))
    data = png_bytes(image)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    sources = {
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "str path": str(path),
        "Path": path,
        "PIL": image,
        "ndarray": np.asarray(image),
        "file-like": io.BytesIO(data),
        "open file": open(path, "rb"),
    }
    try:
        reference = to_model_input(data, task)
        assert_model_input(reference, task)
        for name, source in sources.items():
            np.testing.assert_array_equal(to_model_input(source, task), reference, err_msg=name)
    finally:
        sources["open file"].close()


def test_grayscale_array_with_channel_axis_and_float_arrays():
    gray = gradient(50, 50, channels=1)
    a = to_model_input(gray, "breast")
    np.testing.assert_array_equal(to_model_input(gray[..., None], "breast"), a)
    # floats in 0..1 mean 0..255, and integers in 0..255 are 8-bit, whatever the array's dtype: same picture
    for same in (gray.astype(np.float64) / 255.0, gray.astype(np.float32) / 255.0, gray.astype(np.int64)):
        assert np.abs(to_model_input(same, "breast").astype(int) - a.astype(int)).max() <= 1
    # not stretched to the image's own extremes: a dark image stays dark
    dark = (gray // 4).astype(np.float64) / 255.0
    assert to_model_input(dark, "breast").max() <= 64


@settings(max_examples=40)
@given(dtype=st.sampled_from(["uint8", "uint16", "int16", "int32", "int64", "float32", "float64", "bool"]),
       channels=st.sampled_from([None, 1, 3, 4]), width=st.integers(8, 80), height=st.integers(8, 80),
       task=st.sampled_from(TASK_NAMES))
def test_arrays_of_any_dtype(dtype, channels, width, height, task):
    rng = np.random.default_rng(width * 1000 + height)
    shape = (height, width) if channels is None else (height, width, channels)
    array = (rng.random(shape) * (60000 if dtype == "uint16" else 300)).astype(dtype)  # 16 bits in use
    if usable_size(width, height, task):
        assert_model_input(to_model_input(array, task), task)
    else:
        with pytest.raises(ImageError, match="too elongated|too small"):
            to_model_input(array, task)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_missing_pixel_values_are_refused_not_guessed(bad):
    """Reading NaN or infinity as black once turned a P(malignant) of 0.30 into 0.90 without a word."""
    array = gradient(30, 30, 1).astype(np.float32) / 255
    array[10:13, 10:12] = bad
    with pytest.raises(ImageError, match=r"^6 of the image's 900 pixel values are missing \(NaN or infinite\)$"):
        prepare(array, "breast")
    tiff = io.BytesIO()
    Image.fromarray(array).save(tiff, format="TIFF")
    with pytest.raises(ImageError, match="pixel values are missing"):
        prepare(tiff.getvalue(), "breast")


@pytest.mark.parametrize("low", [-1.0, -1000.0])
def test_negative_pixel_values_are_refused_not_stretched(low):
    """Data centred on zero (-1..1, signed integers) has no brightness convention; a stretch once flipped
    13 of 74 breast decisions."""
    array = np.linspace(low, -low, 40 * 40).reshape(40, 40)
    with pytest.raises(ImageError, match="negative values have no standard brightness") as info:
        prepare(array, "breast")
    assert_one_line(str(info.value))
    with pytest.raises(ImageError, match="negative values"):
        prepare(array.astype(np.int32) if low < -1 else array.astype(np.float32), "blood")


def test_constant_values():
    flat = to_model_input(np.full((30, 30), 7.5), "breast")
    assert (flat == 8).all()  # a constant image keeps its value (7.5 of 255), rounded


@pytest.mark.parametrize("array", [np.zeros((30, 30, 2), np.uint8), np.zeros((2, 30, 30, 3), np.uint8),
                                   np.zeros(30, np.uint8), np.zeros((4, 4, 3), np.uint8)])
def test_bad_arrays(array):
    with pytest.raises(ImageError) as info:
        prepare(array, "blood")
    assert_one_line(str(info.value))


@pytest.mark.parametrize("source", [12345, None, 3.5, object()])
def test_unsupported_source_types(source):
    with pytest.raises(ImageError, match="cannot read an image from"):
        prepare(source, "blood")


def test_missing_file_folder_fifo_and_unreadable_file(tmp_path, monkeypatch):
    import os
    import pathlib

    with pytest.raises(ImageError, match="no such file"):
        prepare(tmp_path / "missing.png", "blood")
    with pytest.raises(ImageError, match="not a file"):
        prepare(str(tmp_path), "blood")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageError, match="not a file"):
        prepare(tmp_path / "pipe.png", "blood")  # never opened: reading a FIFO would wait for a writer

    path = tmp_path / "locked.png"
    path.write_bytes(png_bytes(Image.fromarray(gradient(40, 40))))

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)  # tests run as root, where chmod 000 still reads
    with pytest.raises(ImageError, match="cannot read .*locked.png: Permission denied") as info:
        prepare(path, "blood")
    assert_one_line(str(info.value))


def test_too_many_bytes(tmp_path, monkeypatch):
    data = png_bytes(Image.fromarray(gradient(40, 40)))
    path = tmp_path / "big.png"
    path.write_bytes(data)
    monkeypatch.setattr(preprocessing, "MAX_BYTES", len(data) - 1)
    for source in (path, data, io.BytesIO(data)):
        with pytest.raises(ImageError, match="larger than"):
            prepare(source, "blood")


@pytest.mark.parametrize("size", [(7, 100), (100, 7), (1, 1)])
def test_too_small(size):
    with pytest.raises(ImageError, match="too small"):
        prepare(Image.new("RGB", size), "blood")
    with pytest.raises(ImageError, match="too small"):
        prepare(png_bytes(Image.new("L", size)), "breast")


def test_task_as_spec_or_name():
    image = Image.fromarray(gradient(64, 64))
    np.testing.assert_array_equal(to_model_input(image, get_task("blood")), to_model_input(image, "blood"))
    with pytest.raises(ValueError, match="unknown task"):
        to_model_input(image, "lung")


# --------------------------------------------------------------------------- orientation and frames

@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation, rotate", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(fmt, orientation, rotate):
    thumb = gradient(28, 28, seed=11, noise=0 if fmt == "JPEG" else 8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(thumb).save(buffer, format=fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    out = to_model_input(buffer.getvalue(), "blood")
    expected = np.rot90(thumb, rotate)  # np.rot90: k>0 counter-clockwise
    if fmt == "PNG":
        np.testing.assert_array_equal(out, expected)
    else:
        error = np.abs(out.astype(int) - expected.astype(int)).mean()
        assert error < 3
        for wrong in (1, 2, 3):
            assert np.abs(out.astype(int) - np.rot90(thumb, rotate + wrong).astype(int)).mean() > 4 * error


def test_exif_orientation_on_a_non_square_image():
    image = Image.fromarray(gradient(60, 30, seed=2))
    exif = Image.Exif()
    exif[0x0112] = 6
    prepared = prepare(png_bytes(image, exif=exif), "breast")
    assert prepared.original_size == (30, 60)  # after rotation
    np.testing.assert_array_equal(prepared.array, to_model_input(image.rotate(-90, expand=True), "breast"))


def test_broken_exif_does_not_lose_the_image():
    image = Image.fromarray(gradient(60, 60))
    data = png_bytes(image, exif=b"Exif\x00\x00garbage-that-is-not-tiff")
    assert_model_input(to_model_input(data, "blood"), "blood")


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_uses_first_frame(fmt):
    first = Image.fromarray(gradient(60, 60, seed=1))
    second = Image.fromarray(255 - gradient(60, 60, seed=1))
    buffer = io.BytesIO()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    first.save(buffer, format=fmt, save_all=True, append_images=[second], duration=100, loop=0, **kwargs)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as reopened:
        assert getattr(reopened, "n_frames", 1) == 2
        reopened.seek(0)
        frame0 = reopened.convert("RGB")
        reopened.seek(1)
        frame1 = reopened.convert("RGB")
    out = to_model_input(data, "blood")
    np.testing.assert_array_equal(out, to_model_input(frame0, "blood"))
    assert not np.array_equal(out, to_model_input(frame1, "blood"))


def test_pil_image_positioned_on_a_later_frame_still_gives_an_array():
    buffer = io.BytesIO()
    Image.fromarray(gradient(60, 60)).save(buffer, format="GIF", save_all=True,
                                           append_images=[Image.fromarray(255 - gradient(60, 60))])
    image = Image.open(io.BytesIO(buffer.getvalue()))
    image.seek(1)
    assert_model_input(to_model_input(image, "blood"), "blood")


# --------------------------------------------------------------------------- MedMNIST geometry

def _thumbnail(fixture_images, task: str) -> np.ndarray:
    name = next(n for n, info in sorted(fixture_images.items()) if info.task == task and n.endswith(".png"))
    array = np.asarray(Image.open(fixture_images[name].path))
    return array if array.ndim == 3 else array[..., None]


def test_blood_source_geometry_recovers_thumbnail(fixture_images):
    thumb = _thumbnail(fixture_images, "blood")
    cell = Image.fromarray(thumb).resize((200, 200), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(0)
    canvas = Image.fromarray(rng.integers(0, 256, (363, 360, 3), dtype=np.uint8))  # 360 wide, 363 high
    canvas.paste(cell, ((360 - 200) // 2, (363 - 200) // 2))
    prepared = prepare(canvas, "blood")
    assert prepared.original_size == (360, 363)
    diff = np.abs(prepared.array.astype(int) - thumb.astype(int)).mean()
    assert diff < 4.0, diff
    # Control: without the centre crop the noise border dominates, so the test can tell.
    uncropped = np.asarray(canvas.resize((28, 28), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(uncropped - thumb.astype(int)).mean() > 4 * diff


def test_blood_jpeg_source_geometry(fixture_images):
    thumb = _thumbnail(fixture_images, "blood")
    canvas = Image.new("RGB", (360, 363), tuple(int(v) for v in thumb[0, 0]))
    canvas.paste(Image.fromarray(thumb).resize((200, 200), Image.Resampling.BICUBIC), (80, 81))
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=95)
    diff = np.abs(to_model_input(buffer.getvalue(), "blood").astype(int) - thumb.astype(int)).mean()
    assert diff < 5.0, diff


def test_breast_source_geometry_recovers_thumbnail(fixture_images):
    thumb = _thumbnail(fixture_images, "breast")
    source = Image.fromarray(thumb[..., 0]).resize((500, 500), Image.Resampling.BICUBIC)
    out = to_model_input(source, "breast")
    diff = np.abs(out.astype(int) - thumb.astype(int)).mean()
    assert diff < 4.0, diff
    # the same ultrasound as RGB (what many viewers export) gives the same input
    np.testing.assert_array_equal(to_model_input(source.convert("RGB"), "breast"), out)


@pytest.mark.parametrize("size", [64, 128, 224])
def test_medmnist_plus_thumbnails_are_not_cropped(size):
    image = Image.fromarray(gradient(size, size, seed=4))
    expected = np.asarray(image.resize((28, 28), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(to_model_input(image, "blood"), expected)


def test_non_thumbnail_blood_is_centre_cropped():
    image = Image.fromarray(gradient(300, 300, seed=4))  # square but not a MedMNIST size
    side = round(300 * 200 / 360)
    left = (300 - side) // 2
    expected = np.asarray(image.crop((left, left, left + side, left + side)).resize((28, 28), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(to_model_input(image, "blood"), expected)


# --------------------------------------------------------------------------- colour and transparency

@pytest.mark.parametrize("task, background", [("blood", 255), ("breast", 0)])
def test_transparent_pixels_become_the_modality_background(task, background):
    """A smear is light and an ultrasound frame is black outside the beam; alpha and a tRNS colour key alike."""
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 10
    assert (to_model_input(Image.fromarray(rgba), task) == background).all()  # fully transparent
    gray = gradient(60, 60, 1)
    gray[:, :10] = 77  # a band in the colour that the tRNS chunk declares transparent
    keyed = to_model_input(png_bytes(Image.fromarray(gray), transparency=77), task).astype(int)
    filled = gray.copy()
    filled[gray == 77] = background
    assert np.abs(keyed - to_model_input(filled, task).astype(int)).max() <= 1


@pytest.mark.parametrize("task, background", [("blood", 255), ("breast", 0)])
def test_a_colour_key_in_16_bit_and_1_bit_greys_is_transparent_too(task, background):
    deep = gradient(60, 60, 1).astype(np.uint16) * 257  # the 8-bit picture in 16 bits
    deep[:, :10] = 77 * 257
    keyed = to_model_input(png_bytes(Image.fromarray(deep), transparency=77 * 257), task)
    filled = (deep // 257).astype(np.uint8)
    filled[deep == 77 * 257] = background
    assert_array_equal_by_one(keyed, to_model_input(filled, task))
    # 1 bit, black keyed out: the white squares stay white, the black ones become the background
    squares = np.kron(np.indices((6, 6)).sum(0) % 2, np.ones((10, 10), int)).astype(bool)
    keyed = to_model_input(png_bytes(Image.fromarray(squares), transparency=0), task)
    assert_array_equal_by_one(keyed, to_model_input(np.where(squares, 255, background).astype(np.uint8), task))


def assert_array_equal_by_one(a: np.ndarray, b: np.ndarray) -> None:
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_premultiplied_alpha_is_read_like_straight_alpha():
    straight = Image.fromarray(np.dstack([gradient(40, 40, 1), np.full((40, 40), 128, np.uint8)]), "LA")
    np.testing.assert_array_equal(to_model_input(straight.convert("La"), "breast"),
                                  to_model_input(straight.convert("La").convert("LA"), "breast"))
    assert np.abs(to_model_input(straight.convert("La"), "breast").astype(int)
                  - to_model_input(straight, "breast").astype(int)).max() <= 2  # premultiplying rounds


def test_colourfulness():
    assert colourfulness(np.full((28, 28, 3), 128, np.uint8)) == 0.0
    gray = np.repeat(gradient(28, 28, 1)[..., None], 3, axis=-1)
    assert colourfulness(gray) == pytest.approx(0.0, abs=1e-6)
    assert colourfulness(gradient(28, 28, 3)) > 8.0
    assert colourfulness(np.zeros((28, 28), np.uint8)) == 0.0  # not RGB


def test_prepare_reports_colourfulness_of_the_upload():
    colour = prepare(Image.fromarray(gradient(64, 64)), "breast")
    assert colour.array.shape == (28, 28, 1)
    assert colour.colourfulness > 8.0  # so the OOD check can flag a colour image sent to the breast model
    gray = prepare(Image.fromarray(gradient(64, 64, 1)), "blood")
    assert gray.colourfulness < 1.0


# --------------------------------------------------------------------------- malformed and unusual files

@pytest.mark.parametrize("kind", sorted(AWKWARD_KINDS))
@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_awkward_files(awkward_files, kind, task, as_bytes):
    path = awkward_files[kind]
    source = path.read_bytes() if as_bytes else path
    expected = AWKWARD_KINDS[kind]
    try:
        array = to_model_input(source, task)
    except ImageError as exc:
        assert_one_line(str(exc))
        assert expected in ("error", "either"), f"{kind}: unexpected ImageError {exc}"
    else:
        assert_model_input(array, task)
        assert expected in ("ok", "either"), f"{kind}: expected an ImageError"


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (60_000, 1_000), (100_000, 8)])
def test_huge_dimension_headers_are_refused_without_allocating(width, height):
    with pytest.raises(ImageError) as info:
        prepare(png_header_only(width, height), "blood")
    assert_one_line(str(info.value))


def test_huge_dimensions_message():
    with pytest.raises(ImageError, match="too large"):
        prepare(png_header_only(100_000, 100_000), "blood")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_bit_depth_does_not_change_the_picture(task):
    """8-bit and 16-bit files of the same picture give the same model input, bright or dark (no stretching)."""
    for name, eight in {"bright": gradient(120, 120, 1), "dark": gradient(120, 120, 1) // 2}.items():
        out8 = to_model_input(png_bytes(Image.fromarray(eight)), task).astype(int)
        out16 = to_model_input(png_bytes(Image.fromarray(eight.astype(np.uint16) * 257)), task).astype(int)
        assert np.abs(out16 - out8).max() <= 1, name
        tiff = io.BytesIO()
        Image.fromarray(eight.astype(np.uint16) * 257).save(tiff, format="TIFF")
        assert np.abs(to_model_input(tiff.getvalue(), task).astype(int) - out8).max() <= 1, name
    # A 16-bit PNG holds 16-bit values (the PNG standard scales deeper data up).  A 12- or 14-bit scan stored
    # unscaled would be read 4-16x too dark (38 of 51 breast decisions changed), and guessing its depth from
    # its own maximum would make dark pictures bright: such a file is refused with the reason.
    for bits in (12, 14):
        unscaled = (gradient(120, 120, 1).astype(np.uint16) << (bits - 8)) | 3
        with pytest.raises(ImageError, match=f"brightest value is about {int(unscaled.max())} of 65535") as info:
            to_model_input(png_bytes(Image.fromarray(unscaled)), task)
        assert_one_line(str(info.value))
    rgb12 = (gradient(120, 120).astype(np.uint16) << 4) | 3  # Pillow reads 16-bit colour PNGs as 8 bits
    with pytest.raises(ImageError, match="stored unscaled"):
        to_model_input(png_16_bit_colour(rgb12), task)
    with pytest.raises(ImageError, match="stored unscaled"):  # and 16-bit colour TIFFs, read as 8 bits too
        to_model_input(tiff_16_bit_colour(rgb12), task)
    assert_array_equal_by_one(to_model_input(tiff_16_bit_colour(gradient(120, 120).astype(np.uint16) * 257), task),
                              to_model_input(gradient(120, 120), task))
    with pytest.raises(ImageError, match="stored unscaled"):  # the same rule for 16-bit arrays
        to_model_input(gradient(120, 120, 1).astype(np.uint16) << 4, task)
    assert_array_equal_by_one(to_model_input(png_16_bit_colour(gradient(120, 120).astype(np.uint16) * 257), task),
                              to_model_input(gradient(120, 120), task))
    dark_but_deep = gradient(120, 120, 1).astype(np.uint16) * 65  # brightest 16575: 16 bits in use, kept
    assert to_model_input(png_bytes(Image.fromarray(dark_but_deep)), task).max() <= 66
    blank = png_bytes(Image.fromarray(np.zeros((120, 120), np.uint16)))  # no bits at all: the blank-image check's
    assert to_model_input(blank, task).max() == 0


@pytest.mark.parametrize("array, expected", [
    (np.array([[0.0, 0.5, 1.02]] * 8), [0, 128, 255]),  # floats meant as 0..1, a little overshoot clipped
    (np.array([[0.0, 127.6, 255.0]] * 8), [0, 128, 255]),  # floats meant as 8-bit
    (np.array([[0, 128, 255]] * 8, np.int64), [0, 128, 255]),  # integers within 8 bits
    (np.array([[0, 32768, 65535]] * 8, np.int32), [0, 128, 255]),  # integers beyond 8 bits: 16-bit
])  # beyond every container (32 bits): refused, test_array_values_beyond_float32_and_non_numbers
def test_value_ranges_of_undeclared_data(array, expected):
    from medclassify.preprocessing import _to_uint8

    assert _to_uint8(array)[0].tolist() == expected


def test_eps_and_other_unlisted_formats_are_refused_without_decoding():
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"
           b"newpath 0 0 moveto 100 100 lineto stroke\nshowpage\n%%EOF\n")
    ico = io.BytesIO()
    Image.fromarray(gradient(32, 32)).save(ico, format="ICO")
    for data in (eps, ico.getvalue()):
        with pytest.raises(ImageError, match="not a recognised image file") as info:
            prepare(data, "blood")
        assert_one_line(str(info.value))


def test_cmyk_jpeg_keeps_colour():
    rgb = gradient(72, 72)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG", quality=95)
    out = to_model_input(buffer.getvalue(), "blood").astype(int)
    expected = to_model_input(rgb, "blood").astype(int)
    assert np.abs(out - expected).mean() < 3


def test_palette_png_matches_its_rgb_version():
    image = Image.fromarray(gradient(64, 64)).convert("P")
    np.testing.assert_array_equal(to_model_input(png_bytes(image), "blood"),
                                  to_model_input(image.convert("RGB"), "blood"))


@pytest.mark.parametrize("task", TASK_NAMES)
def test_dicom(tmp_path, task):
    eight = gradient(64, 64, 1)
    pixels = eight.astype(np.uint16) * 64  # 14 significant bits
    path = write_dicom(tmp_path / "scan.dcm", pixels, bits_stored=14)
    image = open_image(path)
    assert image.size == (64, 64)
    out = to_model_input(path, task)
    assert_model_input(out, task)
    # scaled by the header's Bits Stored, not the image's extremes: the 8-bit picture comes back
    assert np.abs(out.astype(int) - to_model_input(eight, task).astype(int)).max() <= 2
    # the same pixels declared as 16 significant bits are a quarter as bright
    quarter = to_model_input(write_dicom(tmp_path / "16.dcm", pixels, bits_stored=16), task).astype(int)
    assert np.abs(quarter - to_model_input(np.round(eight / 4).astype(np.uint8), task).astype(int)).max() <= 2
    # MONOCHROME1 shows low values as white: the same pixels come out inverted, on the same scale
    inverted = to_model_input(write_dicom(tmp_path / "inv.dcm", pixels, "MONOCHROME1", bits_stored=14), task)
    assert np.abs(inverted.astype(int) - (255 - out.astype(int))).max() <= 2


def test_dicom_window_is_applied(tmp_path):
    eight = gradient(64, 64, 1)
    pixels = eight.astype(np.uint16) * 64
    # a window over the lower half of the stored range shows that half at full contrast
    windowed = to_model_input(write_dicom(tmp_path / "w.dcm", pixels, bits_stored=14, window=(4096, 8192)), "breast")
    expected = to_model_input(np.clip(eight.astype(int) * 2, 0, 255).astype(np.uint8), "breast")
    assert np.abs(windowed.astype(int) - expected.astype(int)).max() <= 3


@pytest.mark.parametrize("entry_bits, declared_bits, vr", [(8, 8, "US"), (12, 12, "OW"), (16, 16, "US"),
                                                           (12, 16, "US")])
def test_dicom_voi_lut_is_applied_before_a_window(tmp_path, entry_bits, declared_bits, vr):
    """A VOI LUT Sequence is the view the scan was meant to be read with (viewers prefer it to a window):
    here it shows the lower half of the 14-bit range at full contrast; the file's window would not.
    The 8-bit LUT has 8,192 entries, which pydicom 3.0's ``apply_voi`` indexes with wrapping uint8s; the
    last LUT declares 16 bits for 12-bit entries, as some devices do."""
    import pydicom
    from pydicom.dataset import Dataset

    eight = gradient(64, 64, 1)
    pixels = eight.astype(np.uint16) * 64
    path = write_dicom(tmp_path / "voi.dcm", pixels, bits_stored=14, window=(8192, 16384))
    dataset = pydicom.dcmread(path)
    top = 2 ** entry_bits - 1
    lut = Dataset()
    lut.add_new(0x00283002, "US", [8192, 0, int(declared_bits)])  # LUT Descriptor: entries, first value mapped, bits
    table = [round(i * top / 8191) for i in range(8192)]
    lut.add_new(0x00283006, vr, table if vr == "US" else np.asarray(table, "<u2").tobytes())  # LUT Data
    dataset.VOILUTSequence = [lut]
    dataset.save_as(path, enforce_file_format=True)
    expected = to_model_input(np.clip(eight.astype(int) * 2, 0, 255).astype(np.uint8), "breast").astype(int)
    assert np.abs(to_model_input(path, "breast").astype(int) - expected).max() <= 3
    dataset.PhotometricInterpretation = "MONOCHROME1"  # the LUT's output is inverted, on the LUT's scale
    dataset.save_as(path, enforce_file_format=True)
    assert np.abs(to_model_input(path, "breast").astype(int) - (255 - expected)).max() <= 3


@pytest.mark.parametrize("entry_bits", [16, 8])
def test_palette_colour_dicom_shows_its_colours(tmp_path, entry_bits):
    """8- or 16-bit palette entries (the LUT descriptor says which), both scaled to the picture's colours."""
    import pydicom

    rgb = gradient(64, 64)
    palette = Image.fromarray(rgb).quantize(64)
    path = write_dicom(tmp_path / "p.dcm", np.asarray(palette).astype(np.uint16), "PALETTE COLOR", bits_stored=16)
    dataset = pydicom.dcmread(path)
    lut = np.zeros((256, 3), np.uint16)
    entries = np.asarray(palette.getpalette()[:64 * 3], np.uint16).reshape(64, 3)
    lut[:64] = entries * 257 if entry_bits == 16 else entries  # 8-bit entries still sit in 16-bit words
    for channel in range(3):  # Red, Green, Blue: (0028,110x) descriptors and (0028,120x) data
        dataset.add_new(0x00281101 + channel, "US", [256, 0, entry_bits])
        dataset.add_new(0x00281201 + channel, "OW", lut[:, channel].astype("<u2").tobytes())
    dataset.save_as(path, enforce_file_format=True)
    out = to_model_input(path, "blood").astype(int)
    assert np.abs(out - to_model_input(palette.convert("RGB"), "blood").astype(int)).max() <= 2


@pytest.mark.parametrize("decoder_available", [False, True])
def test_compressed_dicom_that_fails_to_decode_gets_a_clear_reason(tmp_path, monkeypatch, decoder_available):
    """Without a decoder plugin: say which compression; with one (here RLE), the decoder's own reason."""
    import types

    import pydicom
    import pydicom.pixels

    path = write_dicom(tmp_path / "scan.dcm", gradient(32, 32, 1).astype(np.uint16), rle=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed

    def fails(*args, **kwargs):
        raise RuntimeError("Unable to decompress the pixel data:\n    some plugin - details")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", fails)
    decoder = types.SimpleNamespace(is_available=decoder_available)
    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: decoder)
    with pytest.raises(ImageError) as info:
        prepare(path, "breast")
    assert_one_line(str(info.value))
    if decoder_available:
        # the first line only introduces the list of reasons, so the first reason comes with it
        assert str(info.value) == "DICOM file could not be decoded (Unable to decompress the pixel data: some plugin - details)"
    else:
        assert str(info.value).startswith("DICOM compressed as RLE Lossless cannot be read here")


def test_dicom_window_follows_pydicom_rescale_rules(tmp_path):
    """A rescale needs both of its elements (as pydicom applies it); an empty window element is no window."""
    import pydicom

    eight = gradient(64, 64, 1)
    pixels = eight.astype(np.uint16) * 64
    plain = to_model_input(write_dicom(tmp_path / "plain.dcm", pixels, bits_stored=14), "breast").astype(int)
    windowed = to_model_input(write_dicom(tmp_path / "w.dcm", pixels, bits_stored=14, window=(4096, 8192)), "breast")
    for name, change in {"intercept only": {"RescaleIntercept": "100"}}.items():
        path = write_dicom(tmp_path / f"{name}.dcm", pixels, bits_stored=14, window=(4096, 8192))
        dataset = pydicom.dcmread(path)
        for key, value in change.items():
            setattr(dataset, key, value)
        dataset.save_as(path, enforce_file_format=True)
        np.testing.assert_array_equal(to_model_input(path, "breast"), windowed, err_msg=name)
    path = write_dicom(tmp_path / "empty.dcm", pixels, bits_stored=14, window=(4096, 8192))
    dataset = pydicom.dcmread(path)
    dataset.WindowCenter = None
    dataset.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(to_model_input(path, "breast").astype(int), plain)
    # a window of width 0 (pydicom refuses it) is no window either; the stored range is shown
    zero = write_dicom(tmp_path / "zero.dcm", pixels, bits_stored=14, window=(4096, 0))
    np.testing.assert_array_equal(to_model_input(zero, "breast").astype(int), plain)
    # nor is a centre that is not a number (it ended in "unsupported operand type(s) for -=: 'str' and 'float'")
    path = write_dicom(tmp_path / "text.dcm", pixels, bits_stored=14, window=(4096, 8192))
    data = path.read_bytes()
    assert data.count(b"4096") == 1
    path.write_bytes(data.replace(b"4096", b"abcd"))  # same length: the element stays well-formed
    np.testing.assert_array_equal(to_model_input(path, "breast").astype(int), plain)


def test_multi_frame_dicom_gives_its_first_frame(tmp_path):
    first = gradient(48, 48, 1).astype(np.uint16) * 64
    frames = np.stack([first, 16000 - first, np.zeros_like(first)])
    for rle in (False, True):
        path = write_dicom(tmp_path / f"cine_{rle}.dcm", frames, rle=rle)
        np.testing.assert_array_equal(to_model_input(path, "breast"),
                                      to_model_input(write_dicom(tmp_path / "first.dcm", first), "breast"))


@pytest.mark.parametrize("claimed", [(20_000, 20_000), (4, 4)])
def test_dicom_size_is_checked_before_its_pixels_are_decoded(tmp_path, monkeypatch, claimed):
    import pydicom.pixels

    path = write_dicom(tmp_path / "bomb.dcm", gradient(32, 32, 1).astype(np.uint16), rle=True, claimed_size=claimed)

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded the pixels of a DICOM file whose header is out of bounds")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", must_not_decode)
    with pytest.raises(ImageError, match="too large" if claimed[0] > 1000 else "too small") as info:
        prepare(path, "breast")
    assert_one_line(str(info.value))


def test_dicom_without_pixels(tmp_path):
    import pydicom

    path = write_dicom(tmp_path / "scan.dcm", gradient(32, 32, 1).astype(np.uint16))
    dataset = pydicom.dcmread(path)
    del dataset.Rows, dataset.Columns, dataset.PixelData
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ImageError, match="DICOM file holds no image") as info:
        prepare(buffer.getvalue(), "breast")
    assert_one_line(str(info.value))


def jpeg2000_dicom(frame: bytes, shape: tuple[int, int]) -> bytes:
    """An 8-bit grayscale DICOM file whose one frame is ``frame``, encapsulated as JPEG 2000 Lossless."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEG2000Lossless
    ds = FileDataset("scan.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_jpeg2000_dicom_with_a_zero_length_header_box_is_refused_not_looped_on():
    """pydicom 3.0 walks JP2 boxes by their length; one of length 0 held a CPU core for ever (a 150-byte file)."""
    import threading

    pixels = gradient(64, 64, 1).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, "JPEG2000", irreversible=False, no_jp2=False)  # lossless, JP2 boxes
    assert encoded.getvalue().startswith(b"\x00\x00\x00\x0cjP  ")
    np.testing.assert_array_equal(to_model_input(jpeg2000_dicom(encoded.getvalue(), pixels.shape), "breast"),
                                  to_model_input(png_bytes(Image.fromarray(pixels)), "breast"))  # a well-formed one is read

    malformed = jpeg2000_dicom(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 100, pixels.shape)
    outcome = []

    def attempt(data):
        try:
            prepare(data, "breast")
        except ImageError as exc:
            outcome.append(str(exc))

    # A stray fragment first, and an Extended Offset Table (which pydicom's decoder reads) saying that the one
    # frame starts after it: read without the table, the frame would seem to start with the stray bytes.
    import struct

    import pydicom
    from pydicom.encaps import encapsulate

    bad = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 100
    dataset = pydicom.dcmread(io.BytesIO(malformed))
    dataset.PixelData = encapsulate([b"stray bytes here", bad], has_bot=False)
    dataset["PixelData"].VR = "OB"
    dataset.ExtendedOffsetTable = struct.pack("<Q", 8 + 16)  # past the stray fragment's item (8 + 16 bytes)
    dataset.ExtendedOffsetTableLengths = struct.pack("<Q", len(bad))
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    for data in (malformed, buffer.getvalue()):
        outcome.clear()
        worker = threading.Thread(target=attempt, args=(data,), daemon=True)  # a regression must not hang the run
        worker.start()
        worker.join(timeout=20)
        assert not worker.is_alive(), "still decoding after 20 s"
        assert outcome and "JPEG 2000" in outcome[0]
        assert_one_line(outcome[0])


def test_dicom_without_preamble_and_broken_dicom(tmp_path):
    path = write_dicom(tmp_path / "scan.dcm", gradient(32, 32, 1).astype(np.uint16))
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    np.testing.assert_array_equal(to_model_input(data[128:], "breast"), to_model_input(data, "breast"))  # no preamble
    broken = data[:140] + b"\x00" * 10  # DICM magic, then nothing usable
    with pytest.raises(ImageError, match="DICOM") as info:
        prepare(broken, "breast")
    assert_one_line(str(info.value))


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_dicom_data_set_without_file_meta_is_read(tmp_path, implicit_vr):
    """Older PACS exports hold the bare data set: no preamble, no DICM, no file meta naming the encoding."""
    import pydicom

    path = write_dicom(tmp_path / "scan.dcm", gradient(40, 36, 1).astype(np.uint16) * 64)
    dataset = pydicom.Dataset(pydicom.dcmread(path))  # its elements, without preamble and file meta
    bare = io.BytesIO()
    dataset.save_as(bare, implicit_vr=implicit_vr, little_endian=True)
    data = bare.getvalue()
    assert data[:2] == b"\x08\x00" and b"DICM" not in data[:200]
    np.testing.assert_array_equal(to_model_input(data, "breast"), to_model_input(path, "breast"))
    for not_dicom in (b"\x08\x00" + bytes(range(256)) * 8, data[:40]):  # starts alike; no image rows in it
        with pytest.raises(ImageError, match="not a recognised image file"):
            prepare(not_dicom, "breast")


# --------------------------------------------------------------------------- large, small and damaged files

def test_the_upload_size_is_the_files_even_when_a_jpeg_decodes_smaller():
    """A phone JPEG decodes at a fraction of its size; the page still names the size the user's file has."""
    from medclassify.preprocessing import decode_image

    picture = Image.fromarray(gradient(2203, 4201))  # sizes that no scaled decoding divides exactly
    for orientation, expected in ((None, (2203, 4201)), (6, (4201, 2203)), (3, (2203, 4201))):
        jpeg = io.BytesIO()
        exif = picture.getexif()
        if orientation:
            exif[0x0112] = orientation  # a phone's "turn a quarter (or half) when shown"
        picture.save(jpeg, "JPEG", quality=80, exif=exif.tobytes())
        assert prepare(jpeg.getvalue(), "blood").original_size == expected, orientation
    # a decoded image resized by the caller is described as it is now, not as its file was
    resized = decode_image(jpeg.getvalue()).resize((224, 224))
    assert prepare(resized, "blood").original_size == (224, 224)


@pytest.mark.parametrize("detail, expected", [
    ("image file is truncated (16 bytes not processed)", "image file is damaged or truncated (16 bytes not processed)"),
    ("image file is truncated", "image file is damaged or truncated"),
    ("broken PNG file (chunk b'abcd')", "image file is damaged or truncated (broken PNG file (chunk b'abcd'))"),
])
def test_damage_messages_keep_the_decoders_detail_once(monkeypatch, detail, expected):
    def damaged(*args, **kwargs):
        raise OSError(detail)

    monkeypatch.setattr(Image, "open", damaged)
    with pytest.raises(ImageError) as info:
        prepare(b"\x89PNG\r\n\x1a\n" + bytes(40), "blood")
    assert str(info.value) == expected

@pytest.mark.parametrize("task", TASK_NAMES)
def test_large_images_are_shrunk_first_without_changing_the_model_input(task):
    """A 7000x7000 upload of a few hundred KB once needed 1.7 GB to convert; now it is shrunk by a whole
    factor first (JPEG: scaled decoding), and the 28-px input stays within a grey level of the full path."""
    from medclassify.preprocessing import WORKING_SIDE, medmnist_geometry, to_mode

    spec = get_task(task)

    def full_resolution(image: Image.Image) -> np.ndarray:
        rgb = medmnist_geometry(to_mode(image, 3, spec.background), spec)
        return np.asarray(rgb if spec.channels == 3 else rgb.convert("L")).reshape(spec.input_shape).astype(int)

    picture = gradient(2600, 2100)
    jpeg = io.BytesIO()
    Image.fromarray(picture).save(jpeg, format="JPEG", quality=92)
    decoded = Image.open(io.BytesIO(jpeg.getvalue()))
    decoded.load()
    for source, reference in ((png_bytes(Image.fromarray(picture)), Image.fromarray(picture)),
                              (jpeg.getvalue(), decoded),
                              (png_bytes(Image.fromarray(picture[..., 0].astype(np.uint16) * 257)),
                               Image.fromarray(picture[..., 0]))):
        opened = open_image(source)
        assert WORKING_SIDE <= min(opened.size) < 2 * WORKING_SIDE
        assert np.abs(to_model_input(source, task).astype(int) - full_resolution(reference)).max() <= 1
    keyed = png_bytes(Image.fromarray(picture).convert("P"), transparency=0)  # palette and its transparency
    assert min(open_image(keyed).size) < 2 * WORKING_SIDE
    assert_model_input(to_model_input(keyed, task), task)


@pytest.mark.parametrize("size, task, reason", [
    ((20, 20), "breast", "the model needs at least 28x28 pixels"),
    ((27, 40), "breast", "the model needs at least 28x28 pixels"),
    ((40, 40), "blood", "would leave only 22x22 pixels, fewer than the model's 28x28"),
])
def test_images_smaller_than_the_model_input_are_refused(size, task, reason):
    """Enlarging them invents detail: breast images shrunk under 28 px and enlarged were called malignant
    almost always.  MedMNIST-size thumbnails (28, 64, 128, 224 squares) are never cropped or refused."""
    with pytest.raises(ImageError, match=reason) as info:
        prepare(Image.fromarray(gradient(*size)), task)
    assert_one_line(str(info.value))
    assert_model_input(to_model_input(gradient(28, 28), task), task)


def test_a_damaged_file_of_a_known_format_is_called_damaged():
    png = bytearray(png_bytes(Image.fromarray(gradient(40, 40))))
    png[29] ^= 0xFF  # inside IHDR: its checksum no longer holds
    with pytest.raises(ImageError, match="^image file is damaged: it starts like a png file but cannot be read$"):
        prepare(bytes(png), "blood")
    webp = bytearray(_encode_webp(gradient(40, 40)))
    webp[20:40] = bytes(20)  # its VP8 chunk header gone
    with pytest.raises(ImageError, match="^image file is damaged"):
        prepare(bytes(webp), "blood")
    for other in (b"PK\x03\x04 a zip archive, not an image" * 4, b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40)):
        with pytest.raises(ImageError, match="^not a recognised image file"):
            prepare(other, "blood")


def _encode_webp(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def test_shrinking_keeps_palettes_hues_and_the_16_bit_rule_honest():
    """From a review: a palette-with-alpha image averaged its palette indices (all black) once shrunk; the
    16-bit rule read the averaged (lower) maximum, so the answer depended on the image size; and the upload's
    size and mode in ``Prepared`` are those of the file, not of the shrunk copy."""
    picture = gradient(2100, 2100)
    palette = Image.fromarray(picture).convert("P")
    with_alpha = palette.convert("PA")
    assert np.abs(to_model_input(with_alpha, "blood").astype(int)
                  - to_model_input(palette.convert("RGB"), "blood").astype(int)).max() <= 2
    hsv = Image.fromarray(picture).convert("HSV")
    assert np.abs(to_model_input(hsv, "blood").astype(int)
                  - to_model_input(Image.fromarray(picture), "blood").astype(int)).max() <= 3
    deep = np.zeros((2100, 2100), np.uint16)
    deep[::2, ::2] = 20560  # brightest value 20560: 16 bits in use, though 2x2 averages reach only 5140
    assert_model_input(to_model_input(Image.fromarray(deep), "breast"), "breast")
    prepared = prepare(png_bytes(palette), "blood")
    assert (prepared.original_size, prepared.original_mode) == ((2100, 2100), "P")


def test_array_values_beyond_float32_and_non_numbers():
    from medclassify.preprocessing import _to_uint8

    # Beyond 32 bits there is no convention: stretching to the image's own values once turned a
    # P(malignant) of 0.93 into 0.35, with no warning.
    for scale in (1e37, 1e30, 2.0 ** 33):  # finite; the first beyond float32's range
        huge = gradient(40, 40, 1).astype(np.float64) / 255 * scale
        with pytest.raises(ImageError, match="beyond any standard range") as info:
            _to_uint8(huge)
        assert_one_line(str(info.value))
    tiff = io.BytesIO()
    Image.fromarray((gradient(40, 40, 1) / 255 * 1e30).astype(np.float32)).save(tiff, format="TIFF")
    with pytest.raises(ImageError, match="beyond any standard range"):
        prepare(tiff.getvalue(), "breast")
    within = gradient(40, 40, 1).astype(np.float64) / 255 * (2.0 ** 32 - 1)  # 32-bit data: read as 32 bits
    np.testing.assert_array_equal(_to_uint8(within), gradient(40, 40, 1).astype(np.uint8))
    with pytest.raises(ImageError, match="are not numbers"):
        _to_uint8(np.full((30, 30), "grey", dtype=object))


def test_our_pixel_limit_is_under_pillows_warning_limit():
    """decode_image relies on it: a bomb warning lost to two interleaved uploads is harmless only because our
    own size check refuses every image Pillow would warn about."""
    from medclassify.preprocessing import MAX_PIXELS

    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("width, height", [(420, 300), (300, 420)])  # landscape and portrait
def test_blood_centre_crop_of_a_non_square_image(width, height):
    """The crop is centred on both axes: left from the width, top from the height (a square image cannot
    tell them apart). The reference crop is plain array slicing."""
    from medclassify.preprocessing import medmnist_geometry

    array = gradient(width, height, seed=7)
    side = round(min(width, height) * 200 / 360)
    top, left = (height - side) // 2, (width - side) // 2
    reference = np.asarray(Image.fromarray(array[top:top + side, left:left + side])
                           .resize((28, 28), Image.Resampling.BICUBIC))
    out = np.asarray(medmnist_geometry(Image.fromarray(array), get_task("blood")))
    np.testing.assert_array_equal(out, reference)
    np.testing.assert_array_equal(to_model_input(Image.fromarray(array), "blood"), reference)
