#!/usr/bin/env python3
"""The set-up commands of the README, for a fresh machine with only Python 3.11+.

    python3 dev.py run    # the portal with embedded SQLite and Redis: web, workers, relay; Ctrl-C stops it all
    python3 dev.py test   # the whole test suite against a real Redis server it starts (pytest args pass through)
    python3 dev.py lock   # compiles the lock files again from the ranges (uv args pass through: --upgrade, ...)

``run`` and ``test`` create ``.venv`` and install the lock files (exact versions, with hashes) when the venv is
missing or a lock changed: requirements.lock always; requirements-mysql.lock with DATABASE_URL set to a mysql://
URL (it needs MySQL client headers); requirements-browser.lock where Debian's Chromium is installed.
PORTAL_LOCK=floors installs requirements-floors.lock instead of requirements.lock: the declared floors of rq,
redis-py and django-rq, which CI tests the workers on.

The ranges live in requirements*.txt; ``lock`` resolves them with uv (pinned below) into the .lock files, which are
what gets installed. tests/portal/test_lock.py fails when a lock and its ranges disagree.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("PORTAL_VENV", ROOT / ".venv"))
PYTHON = VENV / "bin" / "python"
UV = "uv==0.13.8"  # the tool that writes the locks (dev.py lock); installs use pip alone
# The packages whose declared floors requirements-floors.lock pins (the worker's stack).
FLOOR_PACKAGES = ("rq", "redis", "django-rq")
# Each lock: the ranges it is compiled from. The extras are constrained by requirements.lock, so what they share
# with it is the same version; each lists only what it adds.
LOCKS = {
    "requirements.lock": ["requirements.txt"],
    "requirements-mysql.lock": ["requirements-mysql.txt"],
    "requirements-browser.lock": ["requirements-browser.txt"],
    "requirements-floors.lock": ["requirements.txt"],
}


def lock_files() -> list[Path]:
    files = [ROOT / ("requirements-floors.lock" if os.environ.get("PORTAL_LOCK") == "floors"
                     else "requirements.lock")]
    if os.environ.get("DATABASE_URL", "").startswith(("mysql://", "mariadb://")):
        files.append(ROOT / "requirements-mysql.lock")
    if os.environ.get("PORTAL_BROWSER_TESTS", "") or Path("/usr/bin/chromium").exists():
        files.append(ROOT / "requirements-browser.lock")
    return files


def create_venv() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"Creating the virtual environment in {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)


def ensure_venv() -> None:
    create_venv()
    files = lock_files()
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()
    stamp = VENV / ".requirements.sha256"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print("Installing " + ", ".join(path.name for path in files) + " ...", flush=True)
    # --require-hashes: every package, dependencies included, must be in a lock with its hashes; --no-deps: nothing
    # outside the locks is resolved; the environment's own pip constraints (PIP_CONSTRAINT) are not ours.
    command = [str(PYTHON), "-m", "pip", "install", "--quiet", "--require-hashes", "--no-deps",
               "--disable-pip-version-check"]
    for path in files:
        command += ["-r", str(path)]
    if subprocess.run(command, env={**os.environ, "PIP_CONSTRAINT": ""}).returncode != 0:
        sys.exit("Installing the locked requirements failed (see above).")
    # A lock that lacks a dependency installs (--no-deps) but leaves it missing: say so now, not at an import.
    if subprocess.run([str(PYTHON), "-m", "pip", "check", "--disable-pip-version-check"]).returncode != 0:
        sys.exit(f"The installed packages do not fit together (see above). If a package the locks no longer name "
                 f"is left in {VENV}, remove that folder and run again; if a lock lacks a dependency, run "
                 f"`python3 dev.py lock`.")
    stamp.write_text(digest)


def floor_constraints(main_lock: Path) -> str:
    """The floors lock's constraints: ``name==floor`` for FLOOR_PACKAGES, read from requirements.txt's ranges, and
    every other pin of the main lock, so the two locks differ only where the floors make them."""
    text = (ROOT / "requirements.txt").read_text()
    lines = []
    for name in FLOOR_PACKAGES:
        match = re.search(rf"^{re.escape(name)}(?:\[[^\]]*\])?\s*>=\s*([^,\s]+)", text, re.MULTILINE | re.IGNORECASE)
        if not match:
            sys.exit(f"requirements.txt declares no floor (>=) for {name}")
        lines.append(f"{name}=={match.group(1)}")
    for line in main_lock.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)(\s*;[^\\]+)?", line)
        if pin and pin.group(1).lower().replace("_", "-") not in FLOOR_PACKAGES:
            lines.append(pin.group(0).strip())
    return "\n".join(lines) + "\n"


def lock(arguments: list[str]) -> int:
    """Compiles every lock with uv (UV, pinned; no user or project uv configuration): universal (any platform,
    Python 3.11+), with hashes. The locks change together or not at all."""
    create_venv()
    uv = VENV / "bin" / "uv"
    version = subprocess.run([str(uv), "--version"], capture_output=True, text=True).stdout if uv.exists() else ""
    if version.split()[1:2] != [UV.split("==")[1]]:
        subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", UV],
                       check=True, env={**os.environ, "PIP_CONSTRAINT": ""})
    environment = {key: value for key, value in os.environ.items() if not key.startswith("UV_")}
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)  # the ranges and the current locks are copied here; the locks' comments name them
        for path in {source for sources in LOCKS.values() for source in sources} | set(LOCKS):
            if (ROOT / path).exists():  # uv keeps what it can of a current lock
                shutil.copy(ROOT / path, directory / path)
        for output, sources in LOCKS.items():
            constraints = []
            if output in ("requirements-mysql.lock", "requirements-browser.lock"):
                constraints = ["--constraint", "requirements.lock"]
            elif output == "requirements-floors.lock":
                (directory / "floors.txt").write_text(floor_constraints(directory / "requirements.lock"))
                constraints = ["--constraint", "floors.txt"]
            command = [str(uv), "pip", "compile", "--quiet", "--no-config", "--universal", "--python-version", "3.11",
                       "--generate-hashes", "--no-header", "--output-file", output, *constraints, *sources,
                       *arguments]
            print("Locking", output, "from", ", ".join(sources), flush=True)
            if subprocess.run(command, cwd=directory, env=environment).returncode != 0:
                print("Nothing was changed.")
                return 1
        for output in LOCKS:
            shutil.copy(directory / output, ROOT / output)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test", "lock"):
        print(__doc__)
        return 2
    if argv[0] == "lock":
        return lock(argv[1:])
    ensure_venv()
    os.chdir(ROOT)
    if argv[0] == "run":
        command = [str(PYTHON), "manage.py", "runportal", *argv[1:]]
    else:
        command = [str(PYTHON), "-m", "portal.testing", *argv[1:]]
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
