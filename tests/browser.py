"""Headless Chromium for the report tests: screenshots and the count of images that loaded."""
import os
import re
import shutil
import subprocess

import pytest


def browser_path() -> str:
    """The headless browser; fails under CI (which installs one), skips elsewhere."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    msg = "no chromium / chromium-browser / google-chrome on PATH (apt-get install chromium)"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


def chrome(browser, profile, *args):
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def image_counts(browser, profile, url):
    dom = chrome(browser, profile, "--virtual-time-budget=10000", "--dump-dom", url)
    loaded = re.search(r'data-images="(\d+)"', dom)
    broken = re.search(r'data-broken-images="(\d+)"', dom)
    assert loaded and broken, "the report's load script did not run:\n" + dom[:500]
    return int(loaded.group(1)), int(broken.group(1))
