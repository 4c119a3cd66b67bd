"""Decoding any image Pillow reads into an RGB uint8 array.

JPEG, PNG, BMP, GIF, WebP and TIFF in every mode become (H, W, 3) uint8, upright:

- EXIF orientation is applied, so a phone photo stored sideways is seen the way its owner saw it.
- Greyscale, bilevel, palette, CMYK, YCbCr, LAB and HSV are converted by Pillow.
- 16-bit greyscale ("I;16", and "I", which is how Pillow opens 16-bit PNG and TIFF) keeps its top
  8 bits (value * 255 / 65535, rounded); float images ("F") are taken as 0..1 when they fit in it,
  else as 0..255, clipped.
- Transparent images (RGBA, LA, palette with transparency) are composited on WHITE: transparency
  in photos and product shots stands for "background", which viewers show as a light page, and
  the colour stored under fully transparent pixels is arbitrary (often black), so dropping alpha
  would show the network garbage the author never saw.
- Animated GIF/WebP/multi-page TIFF: the first frame.

An image of more than MAX_PIXELS pixels is refused before it is decoded (a "decompression bomb":
a tiny file that would expand to gigabytes). Anything that cannot be decoded (missing, empty,
truncated, corrupt, not an image, a folder, a FIFO or device, a symbolic link loop) is a DataError
naming the file. The file's extension is never trusted: the format is read from its content.
"""
import errno
import os
import stat

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from minialex.errors import DataError, at_line

# 64 Mpixel (8192 x 8192): an RGB decode of that is 200 MB, already far beyond any training image;
# lower than Pillow's own warning threshold (89.5 Mpixel) so that our clear error comes first.
MAX_PIXELS = 64 * 1024 * 1024

_WHITE = (255, 255, 255, 255)


def load_image(path) -> np.ndarray:
    """Decode `path` into an (H, W, 3) uint8 RGB array; DataError naming the file if it can't."""
    try:
        # Regular files only: opening a FIFO named by mistake would block forever, and a device
        # such as /dev/zero would be read without end.
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError
        if not stat.S_ISREG(mode):
            raise DataError(at_line(path, None, "not a regular file (a device, FIFO or socket)"))
        with open(path, "rb") as f:
            with Image.open(f) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise DataError(at_line(path, None, f"image is {width}x{height} = "
                                            f"{width * height:,} pixels, over the limit of "
                                            f"{MAX_PIXELS:,} (decompression bomb guard)"))
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                im.load()
                rgb = _to_rgb(_upright(im))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(at_line(path, None, "no such image file")) from None
    except IsADirectoryError:
        raise DataError(at_line(path, None, "is a folder, not an image")) from None
    except UnidentifiedImageError:
        size = _size_or_none(path)
        what = ("empty file (0 bytes)" if size == 0
                else "not an image Pillow can read (unknown format or corrupt header)")
        raise DataError(at_line(path, None, what)) from None
    except Image.DecompressionBombError as e:
        # Pillow's own check fires inside Image.open, before ours, past twice its warning size.
        raise DataError(at_line(path, None, f"image over the limit of {MAX_PIXELS:,} pixels "
                                f"(decompression bomb guard): {e}")) from None
    except PermissionError:
        raise DataError(at_line(path, None, "permission denied")) from None
    except MemoryError:
        raise DataError(at_line(path, None, "out of memory decoding the image")) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(at_line(path, None, "symbolic link loop")) from None
        raise DataError(at_line(path, None, f"cannot decode image ({type(e).__name__}: {e})")) from None
    except Exception as e:  # noqa: BLE001 - corrupt files make Pillow's decoders raise anything
        raise DataError(at_line(path, None, f"cannot decode image ({type(e).__name__}: {e})")) from None
    return rgb


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a mangled EXIF block should not cost us a good image
        return im


def _size_or_none(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    keyed = mode in ("1", "L", "P", "RGB") and "transparency" in im.info  # one colour marked clear
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or keyed:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        out = np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    elif mode == "RGB":
        out = np.asarray(im)
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(im).astype(np.int64)
        grey = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        out = np.repeat(grey[:, :, None], 3, axis=2)
    elif mode == "F":
        values = np.asarray(im, dtype=np.float32)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        grey = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
        out = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        # L, 1, P, CMYK, YCbCr, LAB, HSV: Pillow knows how; anything it does not is reported.
        out = np.asarray(im.convert("RGB"))
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
        raise ValueError(f"unsupported image mode {mode}")
    return np.ascontiguousarray(out)
