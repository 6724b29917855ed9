"""LEO-MINI image processor: any image → RGB → pad to square with the mean colour → resize → rescale → normalise.

Runs on transformers' PIL backend (PIL + numpy; no torchvision). The output is the canonical `pixel_values` the
model's vision experts each resize and re-normalise from.
"""

import base64
import binascii
import io
import numbers
import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, load_image
from transformers.processing_utils import ImagesKwargs

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 megapixels: far above any real input, far below a bomb


class LeoMiniImageProcessorKwargs(ImagesKwargs, total=False):
    max_image_pixels: int


def _statistics_as_floats(values):
    """An `image_mean` / `image_std` of numbers as floats ([0, 0, 1] → [0.0, 0.0, 1.0]); anything else unchanged."""
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        return float(values)  # a single number is refused by `_check_statistics` with its own message
    if isinstance(values, (list, tuple)) and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                 for v in values):
        return [float(v) for v in values]
    return values


def _check_max_image_pixels(max_image_pixels) -> int:
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be a positive int, got {max_image_pixels!r}")
    return max_image_pixels


def _check_size(width: int, height: int, max_image_pixels: int, source: str) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"{source} has zero size ({width}x{height})")
    if width * height > max_image_pixels:
        raise ValueError(
            f"{source} has {width}x{height} = {width * height:,} pixels, over the limit of {max_image_pixels:,} "
            "(max_image_pixels); refusing it as a possible decompression bomb"
        )


def _open_image_source(source: str, max_image_pixels: int) -> Image.Image:
    """An image file path, an http(s) URL (fetched by transformers' `load_image`), a `data:image/...;base64,` URL or a
    bare base64 string (as chat messages carry them) → a decoded PIL image, size-checked before decoding."""
    if source.startswith(("http://", "https://")):
        image = load_image(source, timeout=30)
        _check_size(image.width, image.height, max_image_pixels, f"Image {source[:80]!r}")
        return image
    if os.path.isfile(source):
        return _open_image_file(source, source, max_image_pixels)
    encoded = source.split(",", 1)[1] if source.startswith("data:image/") else source
    try:
        data = base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        data = None
    not_found = f"Image file not found: {source[:200]!r} (nor an http(s) URL or base64 image data)"
    if not data:
        raise ValueError(not_found)
    try:
        Image.open(io.BytesIO(data)).close()  # base64 text that is no image is a missing file's name
    except (UnidentifiedImageError, OSError):
        raise ValueError(not_found) from None
    return _open_image_file(io.BytesIO(data), f"base64 image ({len(data):,} bytes)", max_image_pixels)


def _open_image_file(file, name: str, max_image_pixels: int) -> Image.Image:
    """A path or file object → a decoded PIL image; its size is checked before the pixels are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)
            _check_size(image.width, image.height, max_image_pixels, f"Image file {name!r}")
            previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
            try:
                image.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = previous
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise ValueError(f"Image file {name!r} is corrupt, truncated or not an image: {error}") from error
    return image


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """HW, HWC or CHW (C in 1, 3, 4) array of uint8 / uint16 / bool / float in [0, 1] → PIL image.

    Channels are the axis of size 1, 3 or 4 at either end; when both ends could be channels (e.g. shape (3, 5, 4))
    the array is refused as ambiguous rather than guessed.
    """
    if array.ndim == 3:
        first_is_channels, last_is_channels = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if first_is_channels and last_is_channels:
            raise ValueError(
                f"Image array of shape {array.shape} is ambiguous: either end could hold the colour channels. Pass "
                "a PIL image (PIL.Image.fromarray on an HWC array) or an array whose other axes are not 1, 3 or 4"
            )
        if first_is_channels:
            array = np.moveaxis(array, 0, -1)  # CHW → HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"Image array must be HW, HWC or CHW with 1, 3 or 4 channels, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"Image array has zero size (shape {array.shape})")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array.astype(np.uint32) // 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError("Float images must hold finite values in [0, 1]")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"Image arrays must be uint8, uint16, bool or float in [0, 1], got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def _float_image_to_pil(image: Image.Image) -> Image.Image:
    """Mode "F" (32-bit float) → 8-bit: values in [0, 1] are scaled by 255; values up to 255 (what PIL's own
    `convert("F")` gives) are taken as they are."""
    array = np.asarray(image, dtype=np.float64)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise ValueError("Mode 'F' images must hold finite values in [0, 1] or [0, 255]")
    return _array_to_pil(array if array.max() <= 1 else array / 255.0)


def _integer_image_to_pil(image: Image.Image) -> Image.Image:
    """Mode "I" (32-bit int) → 8-bit: values up to 255 are 8-bit data, larger ones (up to 65535) 16-bit data."""
    array = np.asarray(image)
    if array.min() < 0 or array.max() > 65535:
        raise ValueError(f"Mode 'I' image values must lie in [0, 65535], got [{array.min()}, {array.max()}]")
    return _array_to_pil(array.astype(np.uint16) if array.max() > 255 else array.astype(np.uint8))


def to_rgb_image(image, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Any supported input (PIL image of any mode, numpy array, torch tensor, file path) → PIL RGB image.

    The EXIF orientation is applied (a phone photo is seen upright); transparent pixels are composited onto white;
    16-bit images are scaled to 8 bits (v // 257); float images ("F" mode, float arrays) must lie in [0, 1]; CMYK,
    palette, grey and other modes use PIL's own conversion. The same input always gives the same pixels.
    """
    max_image_pixels = _check_max_image_pixels(max_image_pixels)
    if isinstance(image, (str, os.PathLike)):
        image = _open_image_source(os.fspath(image), max_image_pixels)
    elif type(image).__module__.startswith("torch") and hasattr(image, "detach"):
        if image.device.type == "meta":
            raise ValueError("The image is a meta tensor: it has a shape but no data")
        image = image.detach().cpu()
        image = _array_to_pil((image.float() if image.is_floating_point() else image).numpy())  # numpy has no bfloat16
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(
            f"Unsupported image type {type(image).__name__}: pass a PIL image, numpy array, torch tensor or file path"
        )
    _check_size(image.width, image.height, max_image_pixels, "Image")

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        image = _array_to_pil(np.asarray(image).astype(np.uint16))
    elif image.mode == "I":
        image = _integer_image_to_pil(image)
    elif image.mode == "F":
        image = _float_image_to_pil(image)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    elif image.mode == "La":  # premultiplied alpha: PIL converts it to LA only
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


class LeoMiniImageProcessor(PilBackend):
    r"""
    Produces LEO-MINI's canonical `pixel_values` (n_images, 3, size, size). As in EAGLE, images are padded to a
    square with the mean colour before resizing, so nothing is cropped away.

    Args:
        size (`dict`, default `{"height": 224, "width": 224}`): output side (square).
        image_mean, image_std: normalisation (CLIP's by default).
        do_pad (`bool`, default True): pad to square with the mean colour.
        max_image_pixels (`int`, default 64 MP): larger images are refused (decompression bombs).
    """

    valid_kwargs = LeoMiniImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_pad = True
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS

    def preprocess(self, images, *args, **kwargs) -> BatchFeature:
        """transformers' `preprocess`, with integer `image_mean` / `image_std` read as floats (as at init), and
        statistics that are not 3 numbers refused by `_check_statistics`' error rather than a type-validation one."""
        for name in ("image_mean", "image_std"):
            if name in kwargs:
                kwargs[name] = _statistics_as_floats(kwargs[name])
        return super().preprocess(images, *args, **kwargs)

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        """A single image, a list of images, or a list of per-sample lists → flat list (no URL fetching)."""
        if isinstance(images, (list, tuple)):
            flat = []
            for item in images:
                flat.extend(item if isinstance(item, (list, tuple)) else [item])
            images = flat
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif type(images).__module__.startswith("torch") and getattr(images, "ndim", 0) == 4:
            images = list(images)
        else:
            images = [images]
        if not images:
            raise ValueError("No images given")
        return images

    def process_image(self, image, max_image_pixels: int | None = None, **kwargs) -> np.ndarray:
        """One image of any supported kind → (3, H, W) uint8."""
        rgb = to_rgb_image(image, self.max_image_pixels if max_image_pixels is None else max_image_pixels)
        return np.moveaxis(np.asarray(rgb), -1, 0)

    @staticmethod
    def pad_to_square(image: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
        """(3, H, W) → (3, S, S), S = max(H, W), the image centred on the fill colour."""
        _, height, width = image.shape
        side = max(height, width)
        if height == width:
            return image
        canvas = np.empty((3, side, side), dtype=image.dtype)
        canvas[:] = np.asarray(fill, dtype=image.dtype).reshape(3, 1, 1)
        top, left = (side - height) // 2, (side - width) // 2
        canvas[:, top : top + height, left : left + width] = image
        return canvas

    @staticmethod
    def _check_statistics(image_mean, image_std) -> None:
        for name, values in (("image_mean", image_mean), ("image_std", image_std)):
            if (not isinstance(values, (list, tuple, np.ndarray)) or len(values) != 3
                    or not all(isinstance(v, numbers.Real) and np.isfinite(v) for v in values)):
                raise ValueError(f"{name} must hold 3 finite numbers (R, G, B), got {values!r}")
        if min(image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {image_std!r}")

    @staticmethod
    def _check_output_size(size) -> None:
        if isinstance(size, dict):
            height, width = size.get("height"), size.get("width")
        else:  # transformers' SizeDict
            height, width = getattr(size, "height", None), getattr(size, "width", None)
        if not (isinstance(height, int) and height == width and height > 0):
            raise ValueError(f"size must be {{'height': n, 'width': n}}, one side n > 0 (the model's image_size), got "
                             f"height={height}, width={width}")

    def _preprocess(self, images, do_resize, size, resample, do_rescale, rescale_factor, do_normalize, image_mean,
                    image_std, do_pad=None, return_tensors=None, max_image_pixels=None, **kwargs) -> BatchFeature:
        self._check_statistics(image_mean, image_std)
        if do_resize:
            self._check_output_size(size)
        max_image_pixels = _check_max_image_pixels(self.max_image_pixels if max_image_pixels is None
                                                   else max_image_pixels)
        processed = []
        for image in images:
            if do_pad:
                side = max(image.shape[1:])
                if side * side > max_image_pixels:  # a thin image padded to a square can be a bomb
                    raise ValueError(
                        f"Image of {image.shape[2]}x{image.shape[1]} pixels would be padded to {side}x{side} = "
                        f"{side * side:,} pixels, over the limit of {max_image_pixels:,} (max_image_pixels)"
                    )
                image = self.pad_to_square(image, tuple(int(round(m * 255)) for m in image_mean))
            if do_resize:
                image = self.resize(image=image, size=size, resample=resample)
            image = image.astype(np.float32)
            if do_rescale:
                image = image * np.float32(rescale_factor)
            if do_normalize:
                mean = np.asarray(image_mean, dtype=np.float32).reshape(3, 1, 1)
                std = np.asarray(image_std, dtype=np.float32).reshape(3, 1, 1)
                image = (image - mean) / std
            processed.append(image)
        return BatchFeature(data={"pixel_values": np.stack(processed)}, tensor_type=return_tensors)


__all__ = ["LeoMiniImageProcessor"]
