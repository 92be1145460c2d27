"""CI's set-up scripts: ``.ci/install-vulkan`` takes the archive from the
machine's own apt sources (``.ci/bookworm-source``), and no package-host
address is carried by the repository."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / ".ci" / "bookworm-source"
# Addresses below are TEST-NET-1 (RFC 5737) and file: URIs: no host name enters the repository, not even in tests.
MAIN, SECURITY = "http://192.0.2.10/debian", "http://192.0.2.20/debian-security"

pytestmark = pytest.mark.skipif(shutil.which("sh") is None or shutil.which("awk") is None, reason="needs sh and awk")


def _source(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess:
    for rel, text in files.items():
        p = tmp_path / "etc" / "apt" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return subprocess.run([str(HELPER), str(tmp_path)], capture_output=True, text=True, timeout=30)


DEB822 = f"""Types: deb
# a comment inside the stanza
URIs: {SECURITY}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

types: deb deb-src
URIs: {MAIN} file:/srv/other
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


@pytest.mark.parametrize("files, expected", [
    ({"sources.list.d/debian.sources": DEB822}, f"{MAIN}\t/usr/share/keyrings/debian-archive-keyring.gpg"),
    ({"sources.list": f"# deb {SECURITY} bookworm main\ndeb-src {SECURITY} bookworm main\n"
                      f"deb {SECURITY} bookworm-security main\n  deb   {MAIN}  bookworm main # trailing\n"},
     MAIN),
    ({"sources.list": f"deb [arch=amd64 signed-by=/etc/apt/keyrings/d.gpg] {MAIN} bookworm main\n"},
     f"{MAIN}\t/etc/apt/keyrings/d.gpg"),
    ({"sources.list": f"deb [ signed-by=/k.gpg ] {MAIN} bookworm main\n"}, f"{MAIN}\t/k.gpg"),
    ({"sources.list.d/local.list": "deb file:///srv/mirror/debian bookworm main\n"}, "file:///srv/mirror/debian"),
    # A disabled stanza and an inline key block are skipped / not named; the last stanza needs no blank line.
    ({"sources.list.d/a.sources": f"Types: deb\nURIs: {SECURITY}\nSuites: bookworm\nEnabled: no\n\n"
                                  f"Types: deb\nURIs: {MAIN}\nSuites: bookworm\nSigned-By:\n -----BEGIN PGP\n ."},
     MAIN),
    # The one-line sources.list is read before sources.list.d.
    ({"sources.list": f"deb {MAIN} bookworm main\n", "sources.list.d/z.sources": DEB822.replace(MAIN, SECURITY)},
     MAIN),
])
def test_bookworm_source_found(tmp_path, files, expected):
    r = _source(tmp_path, files)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


@pytest.mark.parametrize("files", [
    {},
    {"sources.list": f"deb {SECURITY} bookworm-security main\n# deb {MAIN} bookworm main\n"},
    {"sources.list.d/x.sources": f"Types: deb-src\nURIs: {MAIN}\nSuites: bookworm\n"},
    {"sources.list.d/x.list.disabled": f"deb {MAIN} bookworm main\n"},
])
def test_bookworm_source_missing_is_one_line(tmp_path, files):
    r = _source(tmp_path, files)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "bookworm" in r.stderr


def test_install_vulkan_names_no_host_and_uses_the_helper():
    script = (ROOT / ".ci" / "install-vulkan").read_text()
    assert "bookworm-source" in script and "Suites: bookworm-backports" in script
    assert not re.search(r"URIs:\s*\S+://", script)


def test_repository_names_no_package_host():
    """No tracked file carries an apt archive address (``deb http...`` or ``URIs: http...``) or a
    Debian mirror's host name."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"(^|\s)(deb|URIs:)\s+(\[[^]]*\]\s+)?[a-z+]+://[a-z]|debian\.org|ubuntu\.com", re.I | re.M)
    hits = []
    for rel in files:
        p = ROOT / rel
        if p.suffix in {".npz", ".gz", ".png"} or not p.is_file():
            continue
        if pattern.search(p.read_text(errors="replace")):
            hits.append(rel)
    assert hits == []
