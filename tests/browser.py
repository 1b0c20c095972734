"""Open a report in headless Chromium and read back what loaded (see ASSETS.md for the flags and pitfalls)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

_PROBE = """<script>window.addEventListener('load', () => {
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.style.display = 'none';
  pre.textContent = JSON.stringify({images: [...document.images].map(i => i.naturalWidth),
                                    tables: [...document.querySelectorAll('table')].map(t => t.id)});
  document.body.appendChild(pre);
});</script>"""


def browser() -> str:
    """The headless Chromium binary; skips the test where it cannot be installed, fails under CI."""
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    reason = ("no headless Chromium: install it with `apt-get install -y --no-install-recommends "
              "chromium-headless-shell`")
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def probe(report: Path, timeout: float = 60.0) -> dict:
    """Each image's naturalWidth and each table's id, as the browser saw them after `load`."""
    exe = browser()
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(report.read_text().replace("</body>", _PROBE + "</body>"))
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
               "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp}/profile",
               "--window-size=1200,4000", f"--screenshot={tmp}/shot.png", "--dump-dom", page.as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    found = re.search(r'<pre id="probe"[^>]*>(.*?)</pre>', done.stdout, re.S)
    assert found, f"the browser did not run the probe (exit {done.returncode}): {done.stderr[-800:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
