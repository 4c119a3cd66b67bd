"""Decoding any image Pillow reads into an RGB uint8 array.

JPEG, PNG, BMP, GIF, WebP, TIFF and ICO in every mode become (H, W, 3) uint8, upright:

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

What is decoded is bounded before any decoding starts:
- an image of more than MAX_PIXELS pixels is refused from its header (a "decompression bomb": a
  tiny file that would expand to gigabytes); for an ICO, every frame's own header is checked,
  since Pillow decodes an ICO's largest frame while opening it and a frame can be bigger than the
  icon directory says;
- a JPEG of more than MAX_JPEG_SCANS scans is refused before decoding: each progressive scan is a
  pass over the whole image, and a 1.7 MB file of 15,000 scans takes a minute to decode;
- a multi-page file (TIFF, GIF, WebP) is never paged through: only the first frame is read, so a
  TIFF of 150,000 pages costs what its first page costs.
Only the formats minialex prepares datasets from are opened (SUPPORTED_FORMATS); anything that
cannot be decoded (missing, empty, truncated, corrupt, not an image, a folder, a FIFO or device, a
symbolic link loop) is a DataError naming the file. The file's extension is never trusted: the
format is read from its content.
"""
import errno
import mmap
import os
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from minialex.errors import DataError, at_line
from minialex.files import open_input

# 64 Mpixel (8192 x 8192): an RGB decode of that is 200 MB, already far beyond any training image;
# lower than Pillow's own warning threshold (89.5 Mpixel) so that our clear error comes first.
MAX_PIXELS = 64 * 1024 * 1024
# A progressive JPEG has about 10 scans (libjpeg's default script); 100 leaves room for any encoder
# while keeping the decode of a maximal image to seconds.
MAX_JPEG_SCANS = 100
# Pillow's names of the formats read (its JPEG reader also opens camera MPO files).
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "ICO")
Image.init()  # registers every plugin, so that Image.open(formats=...) knows all of the above

_WHITE = (255, 255, 255, 255)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_image(path) -> np.ndarray:
    """Decode `path` into an (H, W, 3) uint8 RGB array; DataError naming the file if it can't."""
    try:
        # Regular files only: opening a FIFO named by mistake would block forever, and a device
        # such as /dev/zero would be read without end.
        with open_input(path, "rb", what="image", error=DataError) as f:
            _check_decode_cost(path, f)
            with Image.open(f, formats=SUPPORTED_FORMATS) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise DataError(at_line(path, None, f"image is {width}x{height} = "
                                            f"{width * height:,} pixels, over the limit of "
                                            f"{MAX_PIXELS:,} (decompression bomb guard)"))
                # Opened at its first frame; asking for n_frames would page through the file.
                im.load()
                rgb = _to_rgb(_upright(im))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(at_line(path, None, "image not found")) from None
    except UnidentifiedImageError:
        size = _size_or_none(path)
        what = ("empty file (0 bytes)" if size == 0
                else f"not an image Pillow can read (unknown format or corrupt header; formats read: "
                     f"{', '.join(SUPPORTED_FORMATS)})")
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


def _check_decode_cost(path, f):
    """Refuse, from the file's structure alone, what Pillow would spend unbounded work decoding."""
    head = f.read(8)
    f.seek(0)
    if head.startswith(b"\xff\xd8"):
        scans = _jpeg_scans(f, MAX_JPEG_SCANS)
        if scans > MAX_JPEG_SCANS:
            raise DataError(at_line(path, None, f"JPEG of more than {MAX_JPEG_SCANS} scans (each a "
                                    f"pass over the whole image); refusing to decode it"))
    elif head.startswith(b"\0\0\1\0"):
        for width, height in _ico_frame_sizes(f):
            if width * height > MAX_PIXELS:
                raise DataError(at_line(path, None, f"icon frame of {width}x{height} = "
                                        f"{width * height:,} pixels, over the limit of {MAX_PIXELS:,} "
                                        f"(decompression bomb guard)"))
    f.seek(0)


def _jpeg_scans(f, limit):
    """Start-of-scan segments in a JPEG stream, counted up to limit + 1 by walking its segments.

    Marker segments are skipped by their length; inside a scan's entropy-coded data a 0xFF byte is
    always followed by 0x00 (stuffing) or a restart marker, so the next other marker ends the scan.
    """
    size = os.fstat(f.fileno()).st_size
    if size < 4:
        return 0
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos, scans = 2, 0
        while pos + 4 <= size:
            if data[pos] != 0xFF:
                pos = data.find(b"\xff", pos)
                if pos < 0:
                    break
                continue
            marker = data[pos + 1]
            if marker == 0xFF:                                  # fill byte
                pos += 1
                continue
            if marker == 0xD9:                                  # end of image
                break
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:        # no length field
                pos += 2
                continue
            pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
            if marker != 0xDA:
                continue
            scans += 1
            if scans > limit:
                break
            while True:                                         # the scan's entropy-coded data
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= size:
                    return scans
                following = data[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos += 2
                elif following == 0xFF:
                    pos += 1
                else:
                    break
    return scans


def _ico_frame_sizes(f):
    """(width, height) of every frame of an ICO, from each frame's own PNG or BMP header."""
    header = f.read(6)
    count = struct.unpack("<H", header[4:6])[0]
    entries = f.read(16 * count)
    sizes = []
    for i in range(len(entries) // 16):
        offset = struct.unpack("<I", entries[16 * i + 12:16 * i + 16])[0]
        f.seek(offset)
        frame = f.read(24)
        if frame.startswith(_PNG_MAGIC) and len(frame) >= 24:
            sizes.append(struct.unpack(">II", frame[16:24]))
        elif len(frame) >= 12:
            # BITMAPINFOHEADER: width, then the height of the colour and mask bitmaps together.
            width, height = struct.unpack("<ii", frame[4:12])
            sizes.append((abs(width), abs(height) // 2))
    return sizes


def _upright(im: Image.Image) -> Image.Image:
    """`im` turned upright by its EXIF orientation, in place: an upright image is not copied."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # noqa: BLE001 - a mangled EXIF block should not cost us a good image
        pass
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
