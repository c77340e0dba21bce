"""Turning whatever a user uploads into the uint8 array the model expects.

The model itself rescales pixels (a ``Rescaling`` layer), so this module never
normalises: it only decodes, orients, converts channels and reduces size the
way MedMNIST built each dataset from its source images (MedMNIST v2, Methods):

* BloodMNIST: the 360x363 PBC originals were centre-cropped to 200x200, then
  resized to 28x28.
* BreastMNIST: the ~500x500 BUSI originals were resized to 28x28 (no crop).

Images that already are MedMNIST(+) thumbnails -- square, 28/64/128/224 px --
were cropped already, so they are only resized.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .registry import MEDMNIST_SIZES, TaskSpec, get_task

ImageLike = Union[bytes, bytearray, str, os.PathLike, Image.Image, np.ndarray]

#: Anything larger is refused before decoding (decompression bombs, huge scans).
MAX_PIXELS = 50_000_000
MAX_BYTES = 50 * 1024 * 1024
#: Smaller than this is refused before decoding; after MedMNIST's crop an image needs the model's 28 px.
MIN_SIDE = 8
#: An image whose shorter side is at least twice this is first shrunk by a whole factor (box filter, or
#: JPEG's own scaled decoding) to a shorter side of at least this.  The 28-px model input stays the same to
#: within a grey level or two, and a 7000x7000 upload no longer takes gigabytes to convert.
WORKING_SIDE = 1024
#: Key of ``Image.info`` holding the (width, height) a JPEG decoded at reduced scale has in its file.
STORED_SIZE = "medclassify_stored_size"
#: A 16-bit PNG or TIFF whose brightest value is below this uses at most 14 of its 16 bits: almost surely
#: 10- to 14-bit data stored without the scaling the formats ask for, which would be read several times
#: too dark.  (A real 8-bit picture in 16 bits reaching only 25% grey is no cell or ultrasound image.)
LOW_BITS_LIMIT = 2 ** 14
#: Longer side over shorter side beyond which an image cannot be a cell or an ultrasound frame:
#: squashing it to a square would give the model a picture it never saw.
MAX_ASPECT = 4.0
#: The formats an upload may be; Pillow would otherwise also open EPS (which it hands to Ghostscript,
#: through a temporary file) and a long tail of formats nobody exports a microscope or ultrasound image to.
#: ("JPEG" includes the multi-picture JPEGs, MPO, that many cameras write.)
DECODE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
#: File name endings of those formats and DICOM: what the app's uploader offers and a folder walk picks up.
IMAGE_ENDINGS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp", "gif", "dcm")
#: The same, in words for a message.
FORMATS_TEXT = "png, jpg, bmp, tif, webp, gif or DICOM .dcm"


class ImageError(ValueError):
    """An input that cannot be turned into model input; the message is one line for the user."""


def open_image(source: ImageLike) -> Image.Image:
    """Decode ``source`` (``decode_image``) and shrink it when large (``WORKING_SIDE``)."""
    return _shrink(decode_image(source))


def decode_image(source: ImageLike) -> Image.Image:
    """Decode ``source`` into a fully loaded PIL image at full size (first frame, EXIF-oriented; JPEGs of
    2048 px or more decode at a reduced scale).  Refuses 16-bit files that hold unscaled low-bit data."""
    if isinstance(source, Image.Image):
        image = source.copy()  # the EXIF rotation below works in place: never on the caller's image
        image.info.pop(STORED_SIZE, None)  # from an earlier decoding: this image may have been resized since
        _refuse_unscaled_low_bits(image)
    elif isinstance(source, np.ndarray):
        return _array_to_image(source)
    else:
        data = _read_bytes(source)
        if data[:4] == b"DICM":  # some writers leave out the 128-byte preamble, whose content is arbitrary anyway
            data = bytes(128) + data
        if data[128:132] == b"DICM":
            return _dicom_to_image(data)
        if data[:2] == b"\x08\x00" and _is_bare_dicom(data):
            return _dicom_to_image(data, bare=True)
        try:
            # catch_warnings is process-wide: should two uploads interleave, the worst case is a printed warning
            # for an image that _check_dimensions refuses anyway (MAX_PIXELS is under Pillow's warning limit).
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
                _check_dimensions(image.size)
                image.seek(0)  # animated GIF/PNG/WebP: first frame
                if image.format in ("JPEG", "MPO") and min(image.size) >= 2 * WORKING_SIDE:
                    scale = WORKING_SIDE / min(image.size)  # JPEG decodes at 1/2, 1/4 or 1/8 size for free
                    full_width, full_height = image.size
                    image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
                    image.info[STORED_SIZE] = (full_width, full_height)  # what the file holds, for the page
                image.load()
                _refuse_unscaled_low_bits(image, _stored_depth(image, data))
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"image is too large (over {MAX_PIXELS:,} pixels)") from None
        except UnidentifiedImageError:
            kind = _claimed_format(data)
            if kind:
                raise ImageError(f"image file is damaged: it starts like a {kind} file but cannot be read") from None
            raise ImageError(f"not a recognised image file ({FORMATS_TEXT})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            # Pillow's own "image file is truncated (16 bytes not processed)" keeps only its news
            detail = first_line(exc).removeprefix("image file is truncated").strip()
            if detail.startswith("(") and detail.endswith(")"):  # "(16 bytes not processed)": one pair is enough
                detail = detail[1:-1]
            raise ImageError("image file is damaged or truncated" + (f" ({detail})" if detail else "")) from None
    _check_dimensions(image.size)
    try:
        quarter_turn = image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # a broken EXIF block should not cost the user the image
        quarter_turn = False
    if quarter_turn and STORED_SIZE in image.info:  # the stored size, turned as the picture was
        image.info[STORED_SIZE] = image.info[STORED_SIZE][::-1]
    return image


def _stored_depth(image: Image.Image, data: bytes) -> int | None:
    """Bits per sample as the file stores them (PNG's IHDR, TIFF's BitsPerSample), where Pillow may keep fewer."""
    if data.startswith(b"\x89PNG") and len(data) > 24:
        return data[24]
    if image.format == "TIFF":
        bits = image.tag_v2.get(258)  # BitsPerSample: one value per sample
        return max(bits) if isinstance(bits, tuple) and bits else bits if isinstance(bits, int) else None
    return None


def _refuse_unscaled_low_bits(image: Image.Image, stored_depth: int | None = None) -> None:
    """Refuse a 16-bit image whose brightest value is under ``LOW_BITS_LIMIT`` (see there).

    Pillow keeps 16-bit grey as 16 bits (I;16) but reduces 16-bit colour (PNG, TIFF) and grey-with-alpha
    (PNG) to their high bytes, so for those (``stored_depth`` 16) the same rule reads the 8-bit maximum
    against 2^14 / 2^8.  Checked at full size: averaging while shrinking lowers the brightest value.
    """
    if image.mode.startswith("I;16"):
        brightest, scale = int(np.asarray(image).max()), 1
    elif stored_depth == 16 and image.mode in ("RGB", "RGBA", "LA"):
        bands = image.getextrema()[:3 if image.mode != "LA" else 1]
        brightest, scale = max(high for _, high in bands), 256
    else:
        return
    if 0 < brightest * scale < LOW_BITS_LIMIT:
        raise ImageError(f"16-bit image whose brightest value is about {brightest * scale} of 65535: it looks "
                         "like data of 14 bits or fewer stored unscaled, which would be read too dark; export "
                         "it as an 8-bit PNG or JPEG")


#: How each supported format's file starts (WebP is a RIFF file whose own tag stands at byte 8).
_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"),
          (b"BM", "bmp"))


def _claimed_format(data: bytes) -> str | None:
    """The supported format whose signature ``data`` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _shrink(image: Image.Image) -> Image.Image:
    """A large image shrunk by a whole factor so its shorter side stays at least ``WORKING_SIDE``."""
    factor = min(image.size) // WORKING_SIDE
    if factor < 2:
        return image
    key = image.info.get("transparency")
    if image.mode.startswith("I;16"):  # PIL cannot reduce 16-bit images; averaging keeps their bit depth
        if key is not None:
            return image  # a colour key names exact values, which averaging would blend away
        values = np.asarray(image)
        height, width = (values.shape[0] // factor) * factor, (values.shape[1] // factor) * factor
        blocks = values[:height, :width].reshape(height // factor, factor, width // factor, factor)
        return Image.fromarray(np.round(blocks.mean(axis=(1, 3), dtype=np.float32)).astype(np.uint16))
    if image.mode == "1" and key is None:
        image = image.convert("L")
    elif key is not None and image.mode in ("L", "1"):
        image = image.convert("LA")
    elif key is not None or image.mode not in _AVERAGEABLE:  # palette indices, hue angles, colour keys: alpha
        image = image.convert("RGBA")
    return image.reduce(factor)


#: Modes whose pixel values can be averaged into a smaller picture (not palette indices or hue angles).
_AVERAGEABLE = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "I", "F"}


def _read_bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if not path.is_file():
                raise ImageError(f"not a file: {path}" if path.exists() else f"no such file: {path}")
            if path.stat().st_size > MAX_BYTES:
                raise ImageError(f"file is larger than {MAX_BYTES // (1024 * 1024)} MB")
            data = path.read_bytes()
        except OSError as exc:  # no permission, a folder that cannot be looked into: the system's reason
            raise ImageError(f"cannot read {path}: {exc.strerror or first_line(exc)}") from None
    elif hasattr(source, "read"):  # file-like, e.g. Streamlit's UploadedFile
        data = source.read()
    else:
        raise ImageError(f"cannot read an image from {type(source).__name__}")
    if not data:
        raise ImageError("file is empty")
    if len(data) > MAX_BYTES:
        raise ImageError(f"file is larger than {MAX_BYTES // (1024 * 1024)} MB")
    return data


def _check_dimensions(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageError(f"image is too large ({width}x{height}; at most {MAX_PIXELS:,} pixels)")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image is too small ({width}x{height}; at least {MIN_SIDE}x{MIN_SIDE} pixels)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(f"image is {width}x{height}, too elongated for a single cell or ultrasound image "
                         f"(at most {MAX_ASPECT:g}:1)")


def first_line(exc: BaseException) -> str:
    """The gist of an exception in one line (a first line that only introduces a list keeps its first item)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def _array_to_image(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"array of shape {array.shape} is not an image (H x W, H x W x 3 or H x W x 4)")
    _check_dimensions((array.shape[1], array.shape[0]))
    if array.dtype == np.uint16 and array.ndim == 2:
        _refuse_unscaled_low_bits(Image.fromarray(array))
    if array.dtype != np.uint8:
        array = _to_uint8(array)
    return Image.fromarray(array)


def _to_uint8(values: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Map pixel values onto 0..255 by the range their format holds, not by the image's own extremes.

    Stretching each image to its own minimum and maximum (what this did before) made a 16-bit export
    brighter or darker than the same picture in 8 bits -- enough to flip breast decisions -- and let
    one hot pixel black out the rest.  MedMNIST never stretched.  The range is ``value_range`` when
    the caller knows it (DICOM's Bits Stored), else the one the data type declares (8 or 16 bits,
    booleans 0..1).  Only data that declares none (32-bit integer and float images, arrays of other
    types) is read by its values: [0, 1] for floats whose 99.5th percentile is at most 2, else 8, 16
    or 32 bits, whichever holds 99.5% of the values.  Data whose 0.5th percentile is negative or beyond
    32 bits has no convention, and NaN or infinite values none either: all are refused (``ImageError``), since any
    guess could change the answer without the user knowing.  Values outside the range
    are clipped.
    """
    array = np.asarray(values)
    if value_range is None:
        value_range = _DECLARED_RANGES.get(array.dtype.newbyteorder("=").type)
    try:
        values = array.astype(np.float64)  # decoded files arrive here shrunk (WORKING_SIDE): float64 costs little
    except (TypeError, ValueError):
        raise ImageError(f"pixel values of type {array.dtype} are not numbers") from None
    missing = values.size - int(np.isfinite(values).sum())
    if missing:
        raise ImageError(f"{missing:,} of the image's {values.size:,} pixel values are missing (NaN or infinite)")
    if value_range is None:
        sample = values.ravel()[::max(1, values.size // 1_000_000)]  # percentiles of a million values suffice
        low, high = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
        if low < 0:
            raise ImageError(f"pixel values run from {float(array.min()):.4g} to {float(array.max()):.4g}: negative "
                             "values have no standard brightness; export the image as an 8-bit PNG or JPEG")
        else:
            if high <= 2.0 and not np.issubdtype(array.dtype, np.integer):
                high = 1.0  # floats meant as 0..1 (a little overshoot from resampling is clipped)
            else:
                bits = next((b for b in (8, 16, 32) if high <= 2.0 ** b - 1), None)
                if bits is None:  # stretching to the image's own values would be a guess the user never sees
                    raise ImageError(f"pixel values reach {float(array.max()):.4g}, beyond any standard range "
                                     "(8, 16 or 32 bits); export the image as an 8-bit PNG or JPEG")
                high = 2.0 ** bits - 1
            low = 0.0
        value_range = (low, high)
    low, high = value_range
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round(np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


#: Value ranges that a data type itself declares (a 16-bit PNG or TIFF decodes to uint16).
_DECLARED_RANGES = {np.uint8: (0.0, 255.0), np.uint16: (0.0, 65535.0), np.bool_: (0.0, 1.0)}


def _is_bare_dicom(data: bytes) -> bool:
    """A DICOM data set stored without preamble and file meta (older PACS and ACR-NEMA-style exports), which
    begins with its (0008,xxxx) elements.  No supported image format starts with those two bytes; to be taken
    as DICOM, the bytes must also parse into a data set with image rows."""
    import pydicom

    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        return "Rows" in dataset and "Columns" in dataset
    except Exception:
        return False


def _dicom_to_image(data: bytes, bare: bool = False) -> Image.Image:
    try:
        import pydicom
        from pydicom.pixels import pixel_array
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        dataset = pydicom.dcmread(io.BytesIO(data), force=bare)
        if bare:  # no file meta to name the encoding: the one the reader found (little endian: it starts 08 00)
            implicit, _ = dataset.original_encoding
            dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    except Exception as exc:
        raise ImageError(f"DICOM file could not be decoded ({first_line(exc)})") from None
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageError("DICOM file holds no image (no Rows and Columns)") from None
    # Before decoding: a few kilobytes of RLE can claim gigapixels, and pydicom allocates what the header says.
    _check_dimensions((columns, rows))
    if _jp2_header_never_ends(dataset):
        raise ImageError("DICOM JPEG 2000 data is malformed (a JP2 header box of length 0 hides the image)")
    try:
        pixels = pixel_array(dataset, index=0)  # multi-frame (cine loops): the first frame, the others undecoded
    except Exception as exc:
        if not _dicom_decoder_available(dataset):
            raise ImageError(f"DICOM compressed as {dataset.file_meta.TransferSyntaxUID.name} cannot be read "
                             "here; export it uncompressed or as PNG") from None
        raise ImageError(f"DICOM file could not be decoded ({first_line(exc)})") from None
    try:
        return _array_to_image(_dicom_display_values(dataset, pixels))
    except ImageError:
        raise
    except Exception as exc:  # a malformed LUT or window element
        raise ImageError(f"DICOM file could not be displayed ({first_line(exc)})") from None


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


def _jp2_header_never_ends(dataset) -> bool:
    """True for a JPEG 2000 frame on which pydicom (3.0) would loop for ever before decoding.

    pydicom walks the JP2 boxes in front of the codestream box ('jp2c') by their lengths; a box of length 0
    (legal only as the file's last box) never moves the walk on. A ~150-byte file would hold a CPU core for
    good, so the first frame's boxes are walked here first, the same way, to the codestream box or the end.
    """
    try:
        from pydicom.encaps import get_frame

        if not dataset.file_meta.TransferSyntaxUID.is_compressed:
            return False
        extended = None  # where the frames start, when the file says so: pydicom's decoder reads it too
        if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
            extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
        frame = get_frame(dataset.PixelData, 0, extended_offsets=extended,
                          number_of_frames=int(dataset.get("NumberOfFrames") or 1))
    except Exception:  # no first frame to find: nor does the decoder find one, and it says why
        return False
    if not frame.startswith(_JP2_SIGNATURE):
        return False
    offset = len(_JP2_SIGNATURE) + 4  # the signature box is always 12 bytes
    while offset < len(frame):
        if frame[offset + 4:offset + 8] == b"jp2c":
            return False
        length = int.from_bytes(frame[offset:offset + 4], "big")
        if length == 0:
            return True
        offset += length
    return False


def _dicom_decoder_available(dataset) -> bool:
    """False only for a compressed transfer syntax that no installed pydicom plugin decodes."""
    try:
        from pydicom.pixels import get_decoder

        syntax = dataset.file_meta.TransferSyntaxUID
        return not syntax.is_compressed or get_decoder(syntax).is_available
    except Exception:  # no file meta, an unknown syntax: let the decoder's own message speak
        return True


def _dicom_has(dataset, keyword: str) -> bool:
    value = dataset.get(keyword)
    return value is not None and value != "" and not (isinstance(value, (list, tuple)) and not value)


def _dicom_display_values(dataset, pixels: np.ndarray) -> np.ndarray:
    """Stored DICOM pixels -> uint8 as a viewer shows them: palette, VOI LUT or window, MONOCHROME1 inversion.

    The scale comes from the header (Bits Stored, Pixel Representation, a LUT's entry bits), not from
    the image's extremes, so the same picture gives the same model input whatever the file's bit depth.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_windowing

    photometric = str(getattr(dataset, "PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, dataset)
        entry_bits = int(dataset.get("RedPaletteColorLookupTableDescriptor", [0, 0, 16])[2])  # 8 or 16
        return _to_uint8(rgb, (0.0, 2.0 ** entry_bits - 1))
    bits = int(getattr(dataset, "BitsStored", 0) or 8 * pixels.dtype.itemsize)
    if int(getattr(dataset, "PixelRepresentation", 0) or 0) == 1:
        low, high = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        low, high = 0.0, 2.0 ** bits - 1
    values = pixels
    rescaled = _dicom_has(dataset, "RescaleSlope") and _dicom_has(dataset, "RescaleIntercept")
    slope = float(dataset.RescaleSlope) if rescaled else 1.0
    intercept = float(dataset.RescaleIntercept) if rescaled else 0.0
    windowed = (photometric.startswith("MONOCHROME") and _dicom_has(dataset, "WindowCenter")
                and _dicom_has(dataset, "WindowWidth") and not _dicom_has(dataset, "ModalityLUTSequence")
                and slope > 0 and _first_number(dataset.WindowWidth) >= 1  # a width under 1 is no window
                and np.isfinite(_first_number(dataset.WindowCenter)))  # nor is a centre that is not a number
    voi_luts = dataset.get("VOILUTSequence") or [{}]
    if (photometric.startswith("MONOCHROME") and voi_luts[0].get("LUTDescriptor") is not None
            and voi_luts[0].get("LUTData") is not None):
        # A VOI LUT is the view the scan was meant to be read with (viewers prefer it to a window).
        modality = np.rint(apply_modality_lut(pixels, dataset)).astype(np.int64)
        values, depth = _apply_voi_lut(voi_luts[0], modality, _dicom_little_endian(dataset))
        low, high = 0.0, 2.0 ** depth - 1
    elif windowed:
        # The window the scan was meant to be read with.  pydicom applies the rescale only when both of its
        # elements are present, and maps the window onto the stored range rescaled the same way.
        low, high = low * slope + intercept, high * slope + intercept
        values = apply_windowing(apply_modality_lut(pixels, dataset), dataset)
    scaled = _to_uint8(values, (low, high))
    if photometric == "MONOCHROME1":  # low values are shown white
        scaled = 255 - scaled
    return scaled


def _first_number(value) -> float:
    """A DICOM number that may be multi-valued (the first value counts, as for pydicom's windowing); nan if none."""
    from collections.abc import Sequence

    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # pydicom's MultiValue is one
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _apply_voi_lut(item, values: np.ndarray, little_endian: bool) -> tuple[np.ndarray, int]:
    """Look ``values`` up in a VOI LUT item -> (output values, output bits).

    Not pydicom's ``apply_voi``: pydicom 3.0 indexes an 8-bit LUT with uint8 indices, so every LUT with more
    than 256 entries (the usual 12-bit input) wraps around.  Values below the first mapped value take the
    first entry, values past the table the last (PS3.3 C.11.2.1.1).  Some devices declare the LUT's word
    size (16) rather than the bits its entries use; like Horos and Cornerstone, the output bits are those
    the largest entry needs when that is fewer than declared (never under 8).
    """
    entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the file's byte order
        table = np.frombuffer(data, dtype="<u2" if little_endian else ">u2")
    else:  # US: already numbers
        table = np.atleast_1d(np.asarray(data, dtype=np.int64))
    table = table[:entries or 65536]
    bits = min(bits, max(8, int(table.max()).bit_length()))
    return table[np.clip(values - first_mapped, 0, len(table) - 1)], bits


def _dicom_little_endian(dataset) -> bool:
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_transfer_syntax:
        return syntax.is_little_endian
    return dataset.original_encoding[1] is not False


def to_mode(image: Image.Image, channels: int, background: int = 255) -> Image.Image:
    """Convert any PIL mode to L (channels=1) or RGB (channels=3); transparency becomes ``background``."""
    key = image.info.get("transparency")
    if key is not None and image.mode in ("L", "RGB", "1"):
        image = image.convert("RGBA" if image.mode == "RGB" else "LA")  # a tRNS colour key: that colour is transparent
    elif image.mode == "La":
        image = image.convert("LA")  # premultiplied alpha: PIL converts it to nothing else
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image)
        image = Image.fromarray(_to_uint8(values))
        if isinstance(key, int) and mode != "F":  # a 16-bit PNG's colour key names a 16-bit value
            image.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8)))
    elif mode == "P":
        image = image.convert("RGBA")
    elif mode == "CMYK" or mode == "YCbCr" or mode == "LAB" or mode == "HSV":
        image = image.convert("RGB")
    elif mode == "1":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        # Transparent pixels carry no image: they become the modality's background.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (background,) * 3 + (255,)), rgba)
    target = "L" if channels == 1 else "RGB"
    if image.mode != target:
        image = image.convert(target)
    return image


def is_medmnist_thumbnail(size: tuple[int, int]) -> bool:
    """A square MedMNIST(+) size: already cropped, so only resized."""
    width, height = size
    return width == height and width in MEDMNIST_SIZES


def centre_crop_side(size: tuple[int, int], spec: TaskSpec) -> int | None:
    """The side in pixels of the centre square MedMNIST's crop keeps of an image this size, or None (a
    thumbnail, or a dataset whose source images were not cropped)."""
    if is_medmnist_thumbnail(size) or not spec.source_center_crop:
        return None
    return max(1, round(min(size) * spec.source_center_crop))


def medmnist_geometry(image: Image.Image, spec: TaskSpec) -> Image.Image:
    """Crop and resize as MedMNIST did for this dataset's source images."""
    width, height = image.size
    size = spec.image_size
    is_thumbnail = is_medmnist_thumbnail(image.size)
    side = centre_crop_side(image.size, spec)
    if side is not None:
        if side < size:
            raise ImageError(f"image is too small ({width}x{height}): the centre crop MedMNIST takes of "
                             f"a full-size image would leave only {side}x{side} pixels, fewer than the "
                             f"model's {size}x{size}")
        left = (width - side) // 2
        top = (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif not is_thumbnail and min(width, height) < size:
        # Enlarging it would invent the detail the model looks for (tested: breast images shrunk below
        # 28 px and enlarged again were called malignant almost always).
        raise ImageError(f"image is too small ({width}x{height}): the model needs at least {size}x{size} pixels")
    if image.size != (size, size):
        # MedMNIST does not name its resize filter (the v2 paper and its on_medmnist_plus.md say "resized"):
        # bicubic, which PIL antialiases when shrinking, is our assumption (README, "How an image becomes ...").
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


@dataclass
class Prepared:
    """Model input plus what the out-of-distribution checks need to know about the upload."""

    array: np.ndarray  # uint8, spec.input_shape: exactly what the model sees
    colourfulness: float  # of the reduced RGB image: ~0 for grayscale, high for stained cells / photos
    original_size: tuple[int, int]
    original_mode: str


def prepare(source: ImageLike, task: str | TaskSpec) -> Prepared:
    """Any supported image -> ``Prepared`` (model input and colour statistics).

    Raises ``ImageError`` with a one-line reason for anything that cannot be used.
    """
    spec = get_task(task) if isinstance(task, str) else task
    decoded = decode_image(source)
    # as the file holds it: before scaled decoding and any shrinking
    original_size, original_mode = tuple(decoded.info.get(STORED_SIZE, decoded.size)), decoded.mode
    image = _shrink(decoded)
    try:
        # Reduce in RGB first so the modality check sees the colour the user sent.
        rgb = medmnist_geometry(to_mode(image, 3, spec.background), spec)
        rgb_array = np.asarray(rgb, dtype=np.uint8)
        if spec.channels == 1:
            array = np.asarray(rgb.convert("L"), dtype=np.uint8)[..., None]
        else:
            array = rgb_array
    except ImageError:
        raise
    except Exception as exc:  # PIL can still fail on exotic files at this stage
        raise ImageError(f"image could not be converted ({first_line(exc)})") from None
    return Prepared(np.ascontiguousarray(array), colourfulness(rgb_array), original_size, original_mode)


def to_model_input(source: ImageLike, task: str | TaskSpec) -> np.ndarray:
    """Any supported image -> uint8 array of shape ``spec.input_shape``."""
    return prepare(source, task).array


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of an RGB array (0 for grayscale)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        return 0.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
