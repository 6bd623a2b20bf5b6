"""Conversion of Python image objects into what the native module reads.

Every image argument voken takes goes through :func:`as_image_source`, which gives one of
  ("file", path)                 a path to an image file (str or os.PathLike)
  ("bytes", data, name)          encoded bytes (JPEG, PNG, WebP, BMP)
  ("pixels", array)              a C-contiguous uint8 numpy array [H, W, 3] (RGB)
PIL is optional: PIL images are recognised only when PIL is already imported (a PIL image
cannot exist otherwise), so importing voken never imports PIL.
"""

import os
import sys

import numpy as np


class ImageFile:
    """An image given by its file path, for places where a plain ``str`` means text.

    In ``Pipeline.generate_interleaved`` a ``str`` segment is text; wrap a path in
    ``voken.ImageFile(path)`` (or pass a ``pathlib.Path``) to make it an image.
    """

    __slots__ = ("path",)

    def __init__(self, path):
        self.path = os.fspath(path)

    def __fspath__(self):
        return self.path

    def __eq__(self, other):
        return isinstance(other, ImageFile) and other.path == self.path

    def __hash__(self):
        return hash(("ImageFile", self.path))

    def __repr__(self):
        return f"voken.ImageFile({self.path!r})"


class Text:
    """A text segment. A plain ``str`` is text too; ``Text`` makes it explicit."""

    __slots__ = ("text",)

    def __init__(self, text):
        if not isinstance(text, str):
            raise TypeError(f"voken.Text takes a str, got {type(text).__name__}")
        self.text = text

    def __eq__(self, other):
        return isinstance(other, Text) and other.text == self.text

    def __hash__(self):
        return hash(("Text", self.text))

    def __repr__(self):
        return f"voken.Text({self.text!r})"


def is_pil_image(obj):
    pil_image = sys.modules.get("PIL.Image")
    return pil_image is not None and isinstance(obj, pil_image.Image)


def rgb_array(array, what="image array"):
    """A uint8 [H, W, 3] C-contiguous copy/view of an image array: HWC RGB, HW or HWC1 gray
    (replicated to three channels), HWC4 RGBA (alpha dropped, as PIL's convert("RGB") does)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(
            f"{what}: expected dtype uint8, got {array.dtype} (convert floats in [0, 1] with "
            "(a * 255).round().astype(numpy.uint8))")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"{what}: expected shape [H, W, 3], [H, W, 4] or [H, W], got {list(array.shape)}")
    channels = array.shape[2]
    if channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 4:
        array = array[:, :, :3]
    elif channels != 3:
        raise ValueError(f"{what}: expected 1, 3 or 4 channels (HWC layout), got shape {list(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what}: the image is empty (shape {list(array.shape)})")
    return np.ascontiguousarray(array)


def as_image_source(obj):
    """The native module's view of one image object (see the module docstring)."""
    if isinstance(obj, ImageFile):
        return ("file", obj.path)
    if isinstance(obj, (str, os.PathLike)):
        return ("file", os.fspath(obj))
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return ("bytes", bytes(obj), "image bytes")
    if is_pil_image(obj):
        image = obj if obj.mode == "RGB" else obj.convert("RGB")
        return ("pixels", rgb_array(np.asarray(image), "PIL image"))
    if isinstance(obj, np.ndarray):
        return ("pixels", rgb_array(obj))
    raise TypeError(
        f"cannot use a {type(obj).__module__}.{type(obj).__name__} as an image: expected a path "
        "(str, pathlib.Path or voken.ImageFile), encoded bytes, a PIL image or a uint8 numpy array")


def as_segment(obj):
    """One segment of a conversation: ("text", str) or an image source as above. A plain str is
    text; a path must be a pathlib.Path or voken.ImageFile."""
    if isinstance(obj, str):
        return ("text", obj)
    if isinstance(obj, Text):
        return ("text", obj.text)
    try:
        return as_image_source(obj)
    except TypeError:
        raise TypeError(
            f"cannot use a {type(obj).__module__}.{type(obj).__name__} as a segment: expected text "
            "(str or voken.Text) or an image (pathlib.Path / voken.ImageFile, encoded bytes, a PIL "
            "image or a uint8 numpy array)") from None


def to_output_image(array, use_pil=True):
    """A result image: PIL.Image when PIL is importable (and use_pil), else the numpy array."""
    if use_pil:
        try:
            from PIL import Image
        except ImportError:
            return array
        return Image.fromarray(np.ascontiguousarray(array))  # uint8 [H, W, 3] -> mode "RGB"
    return array
