"""`w2w serve`'s upload check (pipeline.serve.check_upload), without a browser: images only, size limits."""
import pytest
from PIL import Image

from pipeline.serve import MAX_UPLOAD_BYTES, UploadError, check_upload


def test_png_and_jpeg_pass_as_rgb(tmp_path):
    for name in ("a.png", "a.jpg"):
        Image.new("L", (40, 30), 128).save(tmp_path / name)
        image = check_upload(tmp_path / name)
        assert image.mode == "RGB" and image.size == (40, 30)


@pytest.mark.parametrize("content, message", [
    (b"import os; os.system('echo owned')\n", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not a readable image"),  # a PNG signature, then garbage
])
def test_non_images_are_refused(tmp_path, content, message):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with pytest.raises(UploadError, match=message):
        check_upload(path)


def test_other_formats_pixel_bombs_and_big_files_are_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.gif")
    with pytest.raises(UploadError, match="GIF file; accepted formats: PNG, JPEG"):
        check_upload(tmp_path / "a.gif")
    Image.new("1", (5000, 4000)).save(tmp_path / "wide.png")  # 20 Mpixels, a few kB on disk
    with pytest.raises(UploadError, match="5000x4000 pixels; the limit is"):
        check_upload(tmp_path / "wide.png")
    (tmp_path / "big.png").write_bytes(b"\x00" * (MAX_UPLOAD_BYTES + 1))
    with pytest.raises(UploadError, match="the limit is 10 MiB"):
        check_upload(tmp_path / "big.png")
    with pytest.raises(UploadError, match="no image uploaded"):
        check_upload(None)
