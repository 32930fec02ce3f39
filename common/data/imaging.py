"""Reading images and masks in every format the site contract allows.

Raster formats go through Pillow; DICOM, NIfTI and NRRD through SimpleITK. Images come back as
2-D grayscale ``uint8``/``uint16`` arrays, masks as 2-D ``bool`` arrays (nonzero = lesion).

Every file's dimensions are read from its header first (Pillow's lazy open, SimpleITK's
``ReadImageInformation``) and checked against a pixel cap before any pixel is decoded, so a
header claiming 100000 x 100000 px is refused without allocating its memory; decoded float
pixels must be finite (a NaN would otherwise turn the whole image into zeros).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from cldlr.common.errors import ImageReadError

RASTER_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ITK_EXTS = (".dcm", ".nii", ".nii.gz", ".nrrd")
IMAGE_EXTS = RASTER_EXTS + (".dcm",)
MASK_EXTS = RASTER_EXTS + (".nii", ".nii.gz", ".nrrd")
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # ``data.max_image_pixels`` / a site policy's ``max_image_pixels``


class ImageTooLargeError(ImageReadError):
    """A file's header declares more pixels than the cap: refused before its pixels are decoded."""


class NonFiniteImageError(ImageReadError):
    """A decoded image holds NaN or infinite pixels (float TIFF, NIfTI, NRRD, DICOM)."""


def file_ext(path: str | Path) -> str:
    """Lower-case extension, treating ``.nii.gz`` as one extension."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _raster_size(path: Path) -> tuple[int, ...]:
    from PIL import Image

    with warnings.catch_warnings():  # our cap is the limit; Pillow's warning would only repeat it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:  # parses the header only (PNG IHDR, TIFF IFD, JPEG SOF, BMP)
            return tuple(int(n) for n in img.size)


def _itk_size(path: Path) -> tuple[int, ...]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # header only: no pixel buffer is allocated
    return tuple(int(n) for n in reader.GetSize())


def header_size(path: str | Path) -> tuple[int, ...]:
    """The dimensions a file's header declares (width, height[, depth…]), without decoding its pixels."""
    path = Path(path)
    ext = file_ext(path)
    if ext not in RASTER_EXTS + ITK_EXTS:
        raise ImageReadError(f"{path}: unsupported file type {ext!r}")
    try:
        return _raster_size(path) if ext in RASTER_EXTS else _itk_size(path)
    except Exception as exc:
        from PIL import Image

        if isinstance(exc, Image.DecompressionBombError):  # Pillow's own, larger, limit: still too large
            raise ImageTooLargeError(f"{path}: header declares an image too large to decode ({exc})") from exc
        raise ImageReadError(f"{path}: header cannot be read ({type(exc).__name__}: {exc})") from exc


def check_header(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, ...]:
    """The header's dimensions, refused when they hold more than ``max_pixels`` pixels (or none)."""
    size = header_size(path)
    pixels = math.prod(size)
    if pixels > max_pixels:
        raise ImageTooLargeError(f"{path}: header declares {' x '.join(map(str, size))} px ({pixels:,} pixels), "
                                 f"more than the cap of {max_pixels:,}")
    if pixels == 0:
        raise ImageReadError(f"{path}: header declares an empty image ({' x '.join(map(str, size))} px)")
    return size


def _read_raster(path: Path) -> np.ndarray:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the header was checked against our cap
        with Image.open(path) as img:
            img.load()
            colour = img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA", "PA")
            array = np.asarray(img.convert("L") if colour else img)
    return array


def _read_itk(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:  # RGB DICOM → luminance
        array = array[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ImageReadError(f"{path}: expected a single 2-D frame, got an array of shape {array.shape}")
    return array


def read_raw(path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode any supported file to a 2-D array of its raw values (validation inspects masks this way).

    The header is checked against ``max_pixels`` first (:func:`check_header`); float pixels
    must be finite.
    """
    path = Path(path)
    ext = file_ext(path)
    check_header(path, max_pixels)
    try:
        array = _read_raster(path) if ext in RASTER_EXTS else _read_itk(path)
    except ImageReadError:
        raise
    except Exception as exc:  # decoder errors come in many types
        raise ImageReadError(f"{path}: cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if array.ndim == 3:  # e.g. RGB TIFF that Pillow kept as multi-channel
        array = array[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if array.ndim != 2 or array.size == 0:
        raise ImageReadError(f"{path}: expected a 2-D image, got shape {array.shape}")
    if array.dtype.kind in "fc" and not (finite := np.isfinite(array)).all():
        raise NonFiniteImageError(f"{path}: {int(array.size - finite.sum()):,} of {array.size:,} pixels are NaN or "
                                  "infinite")
    return array


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read a B-mode image as 2-D grayscale, ``uint8`` or ``uint16`` (other depths are rescaled)."""
    array = read_raw(path, max_pixels=max_pixels)
    if array.dtype in (np.uint8, np.uint16):
        return array
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return np.round(scaled * 65535).astype(np.uint16)


def read_mask(path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read a lesion mask as 2-D ``bool`` (nonzero = lesion)."""
    mask: np.ndarray = read_raw(path, max_pixels=max_pixels) != 0
    return mask


#: DICOM tags that give the pixel spacing in mm as "row\\column" (first found wins).
SPACING_TAGS = ("0028|0030", "0018|1164")  # PixelSpacing, ImagerPixelSpacing


def read_spacing(path: str | Path) -> tuple[float, float] | None:
    """A DICOM file's pixel spacing ``(row_mm, column_mm)`` from its header; ``None`` when it states none.

    Only DICOM carries a spacing the contract trusts (a PNG's DPI is not a physical size); the
    header is read without decoding the pixels.
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(f"{path}: cannot read the DICOM header ({exc})") from exc
    for tag in SPACING_TAGS:
        if reader.HasMetaDataKey(tag):
            parts = reader.GetMetaData(tag).replace("\\", " ").split()
            try:
                values = [float(v) for v in parts]
            except ValueError:
                continue
            if len(values) == 2 and all(0 < v <= 10 for v in values):
                return values[0], values[1]
    return None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Scale a 16-bit image to 8 bits (min-max); 8-bit images pass through."""
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float64)
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.round((image - low) / (high - low) * 255).astype(np.uint8)
