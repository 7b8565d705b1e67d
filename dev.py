#!/usr/bin/env python3
"""The two set-up commands of the README, for a fresh machine with only Python 3.11+.

    python3 dev.py run    # the portal with embedded SQLite and Redis: web, workers, relay; Ctrl-C stops it all
    python3 dev.py test   # the whole test suite against a real Redis server it starts (pytest args pass through)

Both create ``.venv`` and install requirements.txt when it is missing or the requirements changed. With
DATABASE_URL set to a mysql:// URL, requirements-mysql.txt is installed too (it needs MySQL client headers).
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("PORTAL_VENV", ROOT / ".venv"))
PYTHON = VENV / "bin" / "python"


def requirement_files() -> list[Path]:
    files = [ROOT / "requirements.txt"]
    if os.environ.get("DATABASE_URL", "").startswith(("mysql://", "mariadb://")):
        files.append(ROOT / "requirements-mysql.txt")
    if os.environ.get("PORTAL_BROWSER_TESTS", "") or Path("/usr/bin/chromium").exists():
        files.append(ROOT / "requirements-browser.txt")
    return [path for path in files if path.exists()]


def ensure_venv() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"Creating the virtual environment in {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    files = requirement_files()
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()
    stamp = VENV / ".requirements.sha256"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print("Installing requirements (" + ", ".join(path.name for path in files) + ") ...", flush=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    command = [str(PYTHON), "-m", "pip", "install", "--quiet"]
    for path in files:
        command += ["-r", str(path)]
    if subprocess.run(command).returncode != 0:
        sys.exit("Installing the requirements failed (see above).")
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test"):
        print(__doc__)
        return 2
    ensure_venv()
    os.chdir(ROOT)
    if argv[0] == "run":
        command = [str(PYTHON), "manage.py", "runportal", *argv[1:]]
    else:
        command = [str(PYTHON), "-m", "portal.testing", *argv[1:]]
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
