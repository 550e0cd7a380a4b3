"""Read an enrollment URI from a picture of its QR code (a phone screenshot,
a webcam photo, the PNG that `spa-server enroll --png` wrote).

Decoding is zxing-cpp's (a real decoder: rotation, perspective, inverted
codes); Pillow opens the image.  Both are optional for the client (extra
`qr`): without them `--qr-image` says how to install them.  Errors are one
line (QrImageError); the decoded text is never echoed, since it holds a secret.
"""

from __future__ import annotations

from pathlib import Path


class QrImageError(Exception):
    """The image cannot be read or holds no single enrollment code; one line."""


def read_uri(path: Path) -> str:
    """The text of the one QR code in the image at `path`.  Raises QrImageError."""
    try:
        import zxingcpp
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise QrImageError("reading QR images needs zxing-cpp and Pillow: "
                           "pip install zxing-cpp pillow (or the client's [qr] extra)") from None
    try:
        with Image.open(path) as image:
            image.load()
            codes = zxingcpp.read_barcodes(image.convert("L"))
    except FileNotFoundError:
        raise QrImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QrImageError(f"{path} is a directory; give the image file") from None
    except UnidentifiedImageError:
        raise QrImageError(f"{path} is not an image Pillow can read (PNG, JPEG, ...)") from None
    except OSError as exc:
        raise QrImageError(f"cannot read {path}: {exc.strerror or exc}") from None
    texts = [code.text for code in codes if code.format == zxingcpp.BarcodeFormat.QRCode]
    if not texts:
        raise QrImageError(f"no QR code found in {path}; photograph it straight on, in focus, "
                           "with the whole code in the picture")
    if len(set(texts)) > 1:
        raise QrImageError(f"{path} holds {len(set(texts))} different QR codes; crop it to the "
                           "enrollment code")
    return texts[0]
