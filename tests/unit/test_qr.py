"""Enrollment QR codes: terminal and PNG out, a real decoder (zxing-cpp) back in."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image

from spa.core.uri import Enrollment, ServiceRef, parse, render
from spa.server import admin
from spa.server.qr import BORDER, terminal_text, write_png
from spa_client.qrimage import QrImageError, read_uri

LONGEST = render(Enrollment(
    "spa-gateway.eu-west-3.compute.internal.example.org", 62201, bytes(range(16)),
    "a" * 64, os.urandom(32),
    (ServiceRef("ssh", "tcp", 22), ServiceRef("https", "tcp", 443),
     ServiceRef("webmail", "tcp", 8443)), otp=True, expires=1_800_000_900))


def decode_terminal(text: str) -> list[str]:
    """Turn half-block art back into pixels (a full block is light on top and
    bottom) and let zxing-cpp read it, as a camera would."""
    rows = [line.replace("\x1b[97;40m", "").replace("\x1b[0m", "")
            for line in text.rstrip("\n").split("\n")]
    width, scale = max(len(r) for r in rows), 6
    image = Image.new("L", (width * scale, 2 * len(rows) * scale), 0)
    for y, row in enumerate(rows):
        for x, char in enumerate(row):
            top = char in "█▀"
            bottom = char in "█▄"
            for half, light in ((0, top), (1, bottom)):
                if light:
                    image.paste(255, (x * scale, (2 * y + half) * scale,
                                      (x + 1) * scale, (2 * y + half + 1) * scale))
    padded = Image.new("L", (image.width + 8 * scale, image.height + 8 * scale), 255)
    padded.paste(image, (4 * scale, 4 * scale))
    return [code.text for code in zxingcpp.read_barcodes(padded)]


@pytest.mark.parametrize("ansi", [False, True])
def test_terminal_code_fits_80_columns_and_decodes_to_the_same_uri(ansi: bool) -> None:
    text = terminal_text(LONGEST, ansi=ansi)
    visible = [line.replace("\x1b[97;40m", "").replace("\x1b[0m", "")
               for line in text.splitlines()]
    assert max(len(line) for line in visible) <= 80
    assert set("".join(visible)) <= set("█▀▄ ")
    assert visible[0] == "█" * len(visible[0]), f"a light quiet zone of {BORDER} modules"
    assert decode_terminal(text) == [LONGEST]
    if ansi:  # explicit colours: the same in light and dark terminal themes
        assert all(line.startswith("\x1b[97;40m") and line.endswith("\x1b[0m")
                   for line in text.splitlines())


def test_png_is_private_and_round_trips_through_a_real_decoder(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    admin.init(config, listen_port=62201, backend="memory", state_dir=tmp_path / "state",
               force=False, services=("ssh", "https"))
    uri = admin.enroll(config, "alice-phone", ["ssh", "https"], "203.0.113.10")
    png = tmp_path / "alice.png"
    write_png(uri, png)
    assert stat.S_IMODE(png.stat().st_mode) == 0o600
    assert read_uri(png) == uri
    assert parse(read_uri(png)) == parse(uri)


def test_a_photo_like_picture_still_decodes(tmp_path: Path) -> None:
    """Rotated, shrunk and grey on grey, as a phone camera might give it."""
    png = tmp_path / "code.png"
    write_png(LONGEST, png)
    with Image.open(png) as image:
        photo = image.convert("L").rotate(17, expand=True, fillcolor=255)
        photo = photo.resize((photo.width * 2 // 3, photo.height * 2 // 3))
        photo = photo.point(lambda v: 60 + v * 140 // 255)
    jpeg = tmp_path / "photo.jpg"
    photo.save(jpeg, quality=70)
    assert read_uri(jpeg) == LONGEST


def test_unreadable_images_give_one_line_without_the_secret(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("L", (200, 200), 255).save(blank)
    text = tmp_path / "notes.txt"
    text.write_text("spa1://not-an-image")
    two = tmp_path / "two.png"
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    write_png(LONGEST, a)
    write_png(LONGEST.replace("a" * 64, "b" * 64), b)
    with Image.open(a) as left, Image.open(b) as right:
        both = Image.new("L", (left.width + right.width, left.height), 255)
        both.paste(left.convert("L"), (0, 0))
        both.paste(right.convert("L"), (left.width, 0))
        both.save(two)
    cases = {tmp_path / "missing.png": "no such file", tmp_path: "is a directory",
             text: "not an image", blank: "no QR code found", two: "2 different QR codes"}
    for path, expected in cases.items():
        with pytest.raises(QrImageError, match=expected) as caught:
            read_uri(path)
        assert "\n" not in str(caught.value) and "key=" not in str(caught.value)
