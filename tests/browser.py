"""Open a page in a real headless Chromium (Debian's package): its DOM after rendering and a
screenshot. Skipped where Chromium is missing, except under CI, which installs it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def render(page: Path, workdir: Path, size: tuple[int, int] = (1280, 2000)):
    """(DOM after rendering, RGB screenshot as a PIL image)."""
    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but `chromium` is not on PATH: the CI image must install it")
        pytest.skip("`chromium` is not installed (apt install chromium); CI runs this test")
    from PIL import Image

    png = workdir / f"{page.stem}.png"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
              f"--user-data-dir={workdir / 'chromium-profile'}", f"--window-size={size[0]},{size[1]}"]  # fmt: skip
    subprocess.run([*common, f"--screenshot={png}", page.as_uri()], capture_output=True, timeout=60, check=True)
    dumped = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60, check=True)
    return dumped.stdout, Image.open(png).convert("RGB")


def colour_pixels(image, colour: str, tolerance: int = 6) -> int:
    """How many pixels of the screenshot have this ``#rrggbb`` colour."""
    target = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return sum(n for n, rgb in image.getcolors(maxcolors=1 << 24) if all(abs(a - b) <= tolerance for a, b in zip(rgb, target)))
