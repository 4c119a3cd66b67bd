import numpy as np
import pytest
from PIL import Image

from minialex.data import images, load_image
from minialex.errors import DataError

H, W = 12, 20


def gradient_rgb() -> np.ndarray:
    """A (H, W, 3) uint8 image whose pixels are all different, so orientation mistakes show."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 12, y * 20, (x + y) * 5], axis=2).astype(np.uint8)


def check_rgb(arr, shape=(H, W)):
    assert arr.dtype == np.uint8 and arr.shape == (*shape, 3) and arr.flags.c_contiguous


def data_error(path) -> str:
    with pytest.raises(DataError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": ") and "\n" not in message
    return message


@pytest.mark.parametrize("ext, lossless", [("png", True), ("bmp", True), ("tiff", True),
                                           ("webp", False), ("jpeg", False), ("gif", False)])
def test_formats_decode_to_rgb(tmp_path, ext, lossless):
    path = tmp_path / f"img.{ext}"
    src = gradient_rgb()
    Image.fromarray(src).save(path, **({"lossless": True} if ext == "webp" else {}))
    arr = load_image(path)
    check_rgb(arr)
    if lossless or ext == "webp":
        np.testing.assert_array_equal(arr, src)
    else:
        assert np.abs(arr.astype(int) - src).mean() < 12


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "YCbCr", "I;16", "I", "F"])
def test_modes_become_rgb(tmp_path, mode):
    grey = (np.arange(H * W).reshape(H, W) % 256).astype(np.uint8)
    if mode == "I;16":
        im = Image.fromarray(grey.astype(np.uint16) * 257)
    elif mode == "I":
        im = Image.fromarray(grey.astype(np.int32) * 257)
    elif mode == "F":
        im = Image.fromarray(grey.astype(np.float32) / 255)
    else:
        im = Image.fromarray(grey).convert(mode)
    assert im.mode == mode
    path = tmp_path / ("img.jpeg" if mode in ("CMYK", "YCbCr") else "img.tiff")
    im.save(path)
    arr = load_image(path)
    check_rgb(arr)
    if mode in ("L", "I;16", "I", "F"):
        # 16-bit and float greyscale keep their scale: v * 257 comes back as v.
        for c in range(3):
            np.testing.assert_array_equal(arr[:, :, c], grey)
    elif mode == "1":
        assert set(np.unique(arr)) <= {0, 255}


def test_sixteen_bit_png(tmp_path):
    values = np.linspace(0, 65535, H * W).reshape(H, W).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    arr = load_image(path)
    check_rgb(arr)
    np.testing.assert_array_equal(arr[:, :, 1], np.round(values / 257).astype(np.uint8))


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0] = 200          # red everywhere underneath
    rgba[:, : W // 2, 3] = 255  # left half opaque, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    arr = load_image(tmp_path / "a.png")
    check_rgb(arr)
    np.testing.assert_array_equal(arr[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(arr[0, -1], [255, 255, 255])

    Image.fromarray(rgba[..., [0, 3]].copy(), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png")[0, -1], [255, 255, 255])

    pal = Image.fromarray(np.zeros((H, W), np.uint8), "L").convert("P")
    pal.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_array_equal(load_image(tmp_path / "p.png")[0, 0], [255, 255, 255])


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (W, H), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    arr = load_image(tmp_path / "anim.gif")
    check_rgb(arr)
    assert arr[..., 0].min() > 200 and arr[..., 2].max() < 50


@pytest.mark.parametrize("orientation, expected", [
    (1, lambda a: a), (3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)),
    (8, lambda a: np.rot90(a, 1)), (2, lambda a: a[:, ::-1]),
])
def test_exif_orientation_is_applied(tmp_path, orientation, expected):
    src = gradient_rgb()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(src).save(tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(load_image(tmp_path / "o.png"), expected(src))


def test_decompression_bomb_cap(tmp_path, monkeypatch):
    Image.new("L", (W, H)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", H * W - 1)
    message = data_error(tmp_path / "big.png")
    assert f"{W}x{H}" in message and "decompression bomb" in message
    monkeypatch.setattr(images, "MAX_PIXELS", H * W)
    check_rgb(load_image(tmp_path / "big.png"))


def test_pillow_bomb_error_is_a_data_error(tmp_path, monkeypatch):
    Image.new("L", (W, H)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow raises past twice this
    assert "decompression bomb" in data_error(tmp_path / "big.png")


def test_truncated_and_corrupt_files(tmp_path):
    Image.fromarray(gradient_rgb()).resize((200, 120)).save(tmp_path / "full.jpeg", quality=90)
    data = (tmp_path / "full.jpeg").read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(data[: len(data) // 2])
    assert "cannot decode" in data_error(tmp_path / "cut.jpeg")
    Image.fromarray(gradient_rgb()).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) - 30])
    data_error(tmp_path / "cut.png")
    garbled = bytearray(data)
    garbled[60:90] = b"\xff" * 30
    (tmp_path / "garbled.png").write_bytes(bytes(garbled))
    data_error(tmp_path / "garbled.png")


def test_not_images(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert data_error(tmp_path / "empty.jpg").endswith("empty file (0 bytes)")
    (tmp_path / "text.png").write_text("this is not a picture\n")
    assert "not an image" in data_error(tmp_path / "text.png")
    assert data_error(tmp_path / "missing.png").endswith("image not found")
    (tmp_path / "folder.png").mkdir()
    assert data_error(tmp_path / "folder.png").endswith("image is a folder, not a regular file")


def test_real_photos(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    for name in ("astronaut", "chelsea"):
        photo = getattr(skdata, name)()
        Image.fromarray(photo).save(tmp_path / f"{name}.jpeg", quality=95)
        Image.fromarray(photo).rotate(90, expand=True).save(tmp_path / f"{name}.png")
        arr = load_image(tmp_path / f"{name}.jpeg")
        check_rgb(arr, photo.shape[:2])
        assert np.abs(arr.astype(int) - photo).mean() < 4
        np.testing.assert_array_equal(load_image(tmp_path / f"{name}.png"), np.rot90(photo))
