"""Hostile image files: each decodes to an RGB array the transforms accept, or is a one-line
DataError naming the file; through `minialex` a bad image is exit 2 naming the list line, or with
-skip_bad a counted warning."""
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from minialex.data import MAX_PIXELS, EvalTransform, TrainTransform, load_image
from minialex.errors import DataError

from .conftest import FAST, assert_one_line_error, run_cli, write_list
from .limits import run_python_limited


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width, height):
    """A valid PNG signature and IHDR claiming width x height, with a token IDAT: 67 bytes that
    would decode to width*height*3 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _encoded(array, fmt, mode=None, **kw):
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, fmt, **kw) if mode else Image.fromarray(array).save(out, fmt, **kw)
    return out.getvalue()


def make_corpus(folder):
    """{name: (bytes, None if it must decode else words of its error)}."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    jpeg = _encoded(photo, "JPEG")
    gif = io.BytesIO()
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)).convert("P") for v in (51, 204, 102)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    cmyk = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk, "JPEG")
    png16 = io.BytesIO()
    Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)).save(png16, "PNG")
    return {
        "truncated.jpeg": (jpeg[: len(jpeg) // 3], "cannot decode image"),
        "zero.jpeg": (b"", "empty file (0 bytes)"),
        "random.jpeg": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not an image"),
        "text.png": (b"just some text\n", "not an image"),
        "bomb.png": (png_header_only(100_000, 100_000), "decompression bomb guard"),
        "wide_bomb.png": (png_header_only(2 ** 31 - 1, 1), "decompression bomb guard"),
        "png_named.jpeg": (_encoded(photo, "PNG"), None),          # the content decides, not the name
        "one_pixel.png": (_encoded(photo[:1, :1], "PNG"), None),
        "one_by_many.png": (_encoded(photo[:1, :], "PNG"), None),
        "animated.gif": (gif.getvalue(), None),
        "sixteen_bit.png": (png16.getvalue(), None),
        "cmyk.jpeg": (cmyk.getvalue(), None),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    cases = make_corpus(folder)
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    return folder, cases


def test_every_corpus_file_decodes_or_is_a_one_line_data_error(corpus):
    folder, cases = corpus
    train_t = TrainTransform(32, 36, [0.5] * 3, [0.25] * 3)
    eval_t = EvalTransform(224, 256, [0.5] * 3, [0.25] * 3)
    for name, (_, words) in cases.items():
        path = str(folder / name)
        if words is None:
            img = load_image(path)
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
            for x in (train_t(img, np.random.default_rng(0)), eval_t(img)):
                assert x.dtype == np.float32 and np.isfinite(x).all(), name
            assert x.shape == (3, 224, 224)
            continue
        with pytest.raises(DataError) as e:
            load_image(path)
        message = str(e.value)
        assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message


def test_bomb_is_refused_from_the_header_alone(corpus):
    folder, cases = corpus
    assert len(cases["bomb.png"][0]) < 100
    with pytest.raises(DataError, match=f"over the limit of {MAX_PIXELS:,}"):
        load_image(folder / "bomb.png")


def test_animated_gif_is_its_first_frame_and_sixteen_bit_keeps_the_top_byte(corpus):
    folder, _ = corpus
    assert (load_image(folder / "animated.gif") == 51).all()  # web-palette grey: no dithering
    grey = load_image(folder / "sixteen_bit.png")[..., 0]
    expected = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.int64)
    assert np.array_equal(grey, ((expected * 255 + 32767) // 65535).astype(np.uint8))


def test_fifo_and_device_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpeg")  # opening a FIFO for reading blocks until a writer comes
    with pytest.raises(DataError, match="not a regular file"):
        load_image(tmp_path / "pipe.jpeg")
    with pytest.raises(DataError, match="not a regular file"):
        load_image("/dev/zero")


# -- through the command line ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(demo16, tmp_path_factory):
    folder = tmp_path_factory.mktemp("w")
    r = run_cli(["train", "-list", demo16[0], "-epochs", 1, "-save", "w.npz", *FAST], cwd=folder, timeout=90)
    assert r.returncode == 0, r.stderr
    return folder / "w.npz"


@pytest.mark.parametrize("name", ["bomb.png", "zero.jpeg", "truncated.jpeg", "random.jpeg"])
def test_cli_inference_on_a_bad_image_is_one_line(corpus, weights, tmp_path, name):
    folder, cases = corpus
    r = run_cli(["inference", "-input", folder / name, "-load", weights], cwd=tmp_path, timeout=60)
    assert_one_line_error(r, name, cases[name][1])
    assert r.stdout == ""


def test_cli_inference_on_odd_but_valid_images(corpus, weights, tmp_path):
    folder, _ = corpus
    names = ["png_named.jpeg", "one_pixel.png", "animated.gif", "sixteen_bit.png", "cmyk.jpeg"]
    r = run_cli(["inference", "-input", *[folder / n for n in names], "-load", weights, "-topk", 2],
                cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sum(line.startswith(str(folder)) for line in r.stdout.splitlines()) == len(names)


def test_cli_training_stops_on_a_bad_image_naming_its_list_line(corpus, demo16, tmp_path):
    folder, _ = corpus
    samples = demo16[1][:7]
    lst = write_list(tmp_path / "train.list", samples)
    with open(lst, "a") as f:
        f.write(f"3 {folder / 'truncated.jpeg'}\n")
    r = run_cli(["train", "-list", lst, "-epochs", 1, "-save", "w.npz", *FAST], cwd=tmp_path, timeout=90)
    assert_one_line_error(r, "train.list:8", "truncated.jpeg")
    assert not (tmp_path / "w.npz").exists()


def test_cli_skip_bad_counts_and_warns_once_per_file(corpus, demo16, tmp_path):
    folder, _ = corpus
    lst = write_list(tmp_path / "train.list", demo16[1][:12])
    bad = ["truncated.jpeg", "zero.jpeg", "bomb.png", "random.jpeg"]
    with open(lst, "a") as f:
        f.writelines(f"{i} {folder / n}\n" for i, n in enumerate(bad))
    r = run_cli(["train", "-list", lst, "-epochs", 2, "-skip_bad", "-save", "w.npz", "-log", "log.jsonl", *FAST],
                cwd=tmp_path, timeout=90)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning: skipping bad image" in line]
    assert len(warnings) == len(bad)  # once per file, not once per epoch
    for n in bad:
        assert sum(n in w for w in warnings) == 1
    assert f"skipping bad image: {lst}:13: " in r.stderr and "skipped 4" in r.stdout
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [rec["skipped"] for rec in records] == [4, 4]


# -- decode and resize costs: bounded before the work starts ---------------------------------------

def test_extreme_aspect_ratio_is_cut_to_its_centre_before_resizing(tmp_path):
    """A 120-byte 12000 x 1 PNG: resizing it whole to a shorter side of 256 would make a
    256 x 3,072,000 picture (2.4 GB); its centre 4:1 part is resized instead."""
    Image.fromarray(np.arange(12000, dtype=np.uint8)[None, :].repeat(3, 0).T[None].copy()).save(tmp_path / "strip.png")
    assert (tmp_path / "strip.png").stat().st_size < 2000
    code = ("import numpy as np\n"
            "from minialex.data import load_image, EvalTransform, TrainTransform\n"
            "from minialex.data.transforms import resize_shorter_side\n"
            "img = load_image('strip.png')\n"
            "assert img.shape == (1, 12000, 3), img.shape\n"
            "print(resize_shorter_side(img, 256).shape)\n"
            "print(EvalTransform(224, 256, [0.5] * 3, [0.2] * 3)(img).shape)\n"
            "print(TrainTransform(224, 256, [0.5] * 3, [0.2] * 3)(img, np.random.default_rng(0)).shape)\n")
    r = run_python_limited(code, cwd=tmp_path, megabytes=1000)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["(256, 1024, 3)", "(3, 224, 224)", "(3, 224, 224)"]


def test_statistics_pass_makes_no_float64_copy_of_whole_images(tmp_path):
    """Two 6000 x 6000 images: a float64 copy of each is 864 MB (the unchunked pass peaked at
    4.3 GB); the chunked pass needs a decoded image per worker (~250 MB with Pillow's copy) and a
    1.5 MB block."""
    for i in range(2):
        Image.new("RGB", (6000, 6000), (10 * i, 100, 200)).save(tmp_path / f"big{i}.png")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec, so
    # a child of a pytest that has grown to gigabytes would report the parent's peak.
    code = ("from minialex.data import Sample, compute_stats\n"
            "from minialex._memory import memory_use\n"
            "s = compute_stats([Sample(0, 'big0.png', 1), Sample(0, 'big1.png', 2)], num_workers=2)\n"
            "print([round(v * 255, 3) for v in s.mean])\n"
            "print(int(memory_use()['peak_rss_mb']))\n")
    r = run_python_limited(code, cwd=tmp_path, megabytes=3000)
    assert r.returncode == 0, r.stderr
    mean, peak_mb = r.stdout.split("\n")[:2]
    assert mean == "[5.0, 100.0, 200.0]"
    assert int(peak_mb) < 1500, peak_mb  # measured ~800 MB; two float64 copies alone are 1.7 GB


def test_ico_frame_larger_than_its_directory_entry_is_refused_before_decoding(tmp_path):
    """Pillow decodes an ICO's frame while opening it; a PNG frame of 12000 x 12000 (144 Mpixel)
    behind a 256 x 256 directory entry is refused from the frame's own header."""
    frame = png_header_only(12000, 12000)
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(frame), 22) + frame
    (tmp_path / "big.ico").write_bytes(ico)
    code = ("from minialex.data import load_image\n"
            "from minialex.errors import DataError\n"
            "try:\n    load_image('big.ico')\nexcept DataError as e:\n    print(e)\n")
    r = run_python_limited(code, cwd=tmp_path, megabytes=600)
    assert r.returncode == 0, r.stderr
    assert "big.ico: icon frame of 12000x12000 = 144,000,000 pixels, over the limit" in r.stdout


def test_small_ico_still_decodes(tmp_path):
    Image.new("RGB", (48, 48), (1, 2, 3)).save(tmp_path / "small.ico", sizes=[(48, 48), (16, 16)])
    img = load_image(tmp_path / "small.ico")
    assert img.shape == (48, 48, 3) and (img == (1, 2, 3)).all()


def _tiff_with_pages(pages):
    """A little-endian TIFF of `pages` 1x1 greyscale pages, all sharing one byte of pixel data."""
    entries = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (278, 3, 1, 1), (279, 4, 1, 1)]
    ifd_size = 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 9) + b"\x80")
    for page in range(pages):
        start = 9 + page * ifd_size
        out += struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack("<HHII", tag, kind, count, value)
        out += struct.pack("<I", start + ifd_size if page + 1 < pages else 0)
    return bytes(out)


def test_multi_page_tiff_is_not_paged_through(tmp_path, monkeypatch):
    """Counting pages (n_frames) reads every page's directory: 150,000 pages took a minute. Only
    the first page is read, so the pages behind it cost nothing."""
    from PIL import TiffImagePlugin
    (tmp_path / "pages.tiff").write_bytes(_tiff_with_pages(5000))
    seeks = []
    original = TiffImagePlugin.TiffImageFile._seek
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_seek",
                        lambda self, frame: (seeks.append(frame), original(self, frame))[1])
    img = load_image(tmp_path / "pages.tiff")
    assert img.shape == (1, 1, 3) and (img == 128).all()
    assert seeks == [0]


def _progressive_jpeg_with_scans(extra):
    """A progressive JPEG whose last scan is repeated `extra` more times before the end marker."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        out, "JPEG", progressive=True)
    data = out.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    scan = data[last_scan:-2]
    return data[:-2] + scan * extra + b"\xff\xd9"


def test_jpeg_with_thousands_of_scans_is_refused_before_decoding(tmp_path):
    (tmp_path / "scans.jpeg").write_bytes(_progressive_jpeg_with_scans(3000))
    with pytest.raises(DataError, match=r"scans\.jpeg: JPEG of more than 100 scans"):
        load_image(tmp_path / "scans.jpeg")
    (tmp_path / "normal.jpeg").write_bytes(_progressive_jpeg_with_scans(0))
    assert load_image(tmp_path / "normal.jpeg").shape == (32, 32, 3)


def test_unsupported_format_is_one_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.pcx")
    with pytest.raises(DataError, match="formats read: JPEG, PNG"):
        load_image(tmp_path / "a.pcx")
