"""Backups of the task rows, their checksums, and restore.

A backup is a directory with ``tasks.jsonl.gz`` (one JSON object per task row, every column, in id order) and
``manifest.json`` (counts and checksums per status, the data file's SHA-256, the columns). JSON lines and gzip are
readable anywhere: the backup does not need this portal, or the same database engine, to be read.

A task's *fingerprint* is what the migration must never change about it: id, image reference, priority, idempotency
key and creation time. A group's checksum is the sum, modulo 2^64, of its rows' fingerprint hashes: independent of
order (it is computed while streaming) and, unlike XOR, a row counted twice changes it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connections, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from migration.dispatch import targets_for
from migration.state import system_mode
from queues.models import CaptionTask, Dispatch, TaskStatus

PAGE = 5000
MASK = (1 << 64) - 1
FINGERPRINT_FIELDS = ("id", "image_ref", "priority", "idempotency_key", "created_at")
FORMAT = "rq-ops-portal task backup 1"


class BackupError(Exception):
    """A backup cannot be written or read; the message says why."""


def fingerprint(row: dict) -> int:
    created = row["created_at"]
    created = created.isoformat() if isinstance(created, datetime) else str(created)
    text = f"{row['id']}|{row['image_ref']}|{row['priority']}|{row['idempotency_key'] or ''}|{created}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Tally:
    """Counts and checksums per group (status, usually)."""

    def __init__(self):
        self.groups: dict[str, dict[str, int]] = {}

    def add(self, group: str, row: dict) -> None:
        entry = self.groups.setdefault(group, {"count": 0, "checksum": 0})
        entry["count"] += 1
        entry["checksum"] = (entry["checksum"] + fingerprint(row)) & MASK

    def as_dict(self) -> dict[str, dict[str, str | int]]:
        return {group: {"count": entry["count"], "checksum": f"{entry['checksum']:016x}"}
                for group, entry in sorted(self.groups.items())}


def iterate_rows(queryset=None, *, fields: tuple[str, ...] | None = None):
    """Task rows as dicts, in id order, a page at a time (keyset pagination: no OFFSET)."""
    queryset = (queryset if queryset is not None else CaptionTask.objects.all()).order_by("pk")
    fields = fields or tuple(field.attname for field in CaptionTask._meta.concrete_fields)
    last = 0
    while True:
        page = list(queryset.filter(pk__gt=last).values(*fields)[:PAGE])
        if not page:
            return
        yield from page
        last = page[-1]["id"]


def backup_write(*, directory: Path | None = None, label: str = "",
                 on_rows: Callable[[int, int], None] | None = None) -> dict:
    """Writes a backup of every task row; returns its manifest (with ``path``). ``on_rows(done, total)``."""
    base = Path(directory or settings.MIGRATION_BACKUP_DIR)
    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    target = base / f"tasks-{stamp}{('-' + label) if label else ''}"
    try:
        # Only the portal's user may read a backup: it holds every task's image reference (URLs may carry signatures
        # or credentials), caption and correlation id. Modes are set, not left to the process' umask.
        target.mkdir(parents=True, exist_ok=False, mode=0o700)
        target.chmod(0o700)
    except OSError as error:
        raise BackupError(f"cannot create the backup directory {target}: {error}") from None
    total = CaptionTask.objects.count()
    columns = [field.attname for field in CaptionTask._meta.concrete_fields]
    tally, digest, done = Tally(), hashlib.sha256(), 0
    data_path = target / "tasks.jsonl.gz"
    try:
        with _private_file(data_path) as raw:
            with gzip.GzipFile(fileobj=_Hashing(raw, digest), mode="wb", compresslevel=5, mtime=0) as handle:
                for row in iterate_rows():
                    handle.write(json.dumps(row, default=_json_value, separators=(",", ":")).encode() + b"\n")
                    tally.add(row["status"], row)
                    done += 1
                    if on_rows and done % PAGE == 0:
                        on_rows(done, total)
            raw.flush()
            os.fsync(raw.fileno())
        manifest = {"format": FORMAT, "created_at": timezone.now().isoformat(), "rows": done,
                    "by_status": tally.as_dict(), "columns": columns, "data_file": data_path.name,
                    "data_sha256": digest.hexdigest(),
                    "database_vendor": connections[CaptionTask.objects.db].vendor}
        with _private_file(target / "manifest.json") as handle:
            handle.write((json.dumps(manifest, indent=2) + "\n").encode())
    except OSError as error:
        raise BackupError(f"cannot write the backup in {target}: {error}") from None
    if on_rows:
        on_rows(done, total)
    pruned = backups_prune(base, keep=settings.MIGRATION_BACKUP_KEEP)
    return {**manifest, "path": str(target), "pruned": [str(path) for path in pruned]}


def backups_prune(base: Path, *, keep: int) -> list[Path]:
    """Deletes the oldest complete backups in ``base`` beyond the newest ``keep`` (a backup is a ``tasks-*``
    directory with a manifest; nothing else there is touched). Returns what was deleted."""
    complete = sorted((path for path in base.glob("tasks-*") if (path / "manifest.json").is_file()),
                      key=lambda path: (path / "manifest.json").stat().st_mtime_ns)  # written last
    deleted = []
    for path in complete[:-keep] if len(complete) > keep else []:
        try:
            shutil.rmtree(path)
            deleted.append(path)
        except OSError:
            pass  # left for the next backup to try again
    return deleted


def _private_file(path: Path):
    """A new file only its owner can read or write (0600 whatever the umask), opened for binary writing."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


class _Hashing:
    """A file wrapper hashing what is written through it (the manifest's SHA-256 of the data file)."""

    def __init__(self, raw, digest):
        self.raw, self.digest = raw, digest

    def write(self, data):
        self.digest.update(data)
        return self.raw.write(data)

    def flush(self):
        self.raw.flush()


def _json_value(value):
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__}")


def manifest_read(path: Path) -> tuple[dict, Path]:
    """The manifest of a backup (its directory or its manifest.json) and the data file, checked."""
    path = Path(path)
    manifest_path = path / "manifest.json" if path.is_dir() else path
    if not manifest_path.is_file():
        raise BackupError(f"{path} is not a backup: no manifest.json there")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise BackupError(f"cannot read {manifest_path}: {error}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{manifest_path} is not a task backup (format {manifest.get('format')!r})")
    data_path = manifest_path.parent / manifest.get("data_file", "tasks.jsonl.gz")
    digest = hashlib.sha256()
    try:
        with open(data_path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise BackupError(f"cannot read the data file {data_path}: {error}") from None
    if digest.hexdigest() != manifest.get("data_sha256"):
        raise BackupError(f"{data_path} does not match its manifest (SHA-256 differs): the backup is damaged")
    return manifest, data_path


def backup_restore(*, path: Path, on_rows: Callable[[int, int], None] | None = None) -> dict:
    """Inserts the backup's rows that the database lacks (by id); rows present are left as they are and counted
    (``differing``: present with another fingerprint; ``conflicting``: absent, but their idempotency key belongs to
    another row now, so they are skipped). The whole file is checked against the manifest before anything is
    written, and the rows go in in one transaction: a restore that fails writes nothing.

    Restored rows keep their status and dispatch but have no job in Redis: ``published_at`` is cleared, so the relay
    publishes restored queued RQ tasks, and a restored PROCESSING task goes back to QUEUED (its worker is gone). A row
    held by a pause when the backup was taken is dispatched the way a submission would be now: held only if
    submission is paused now (the resume releases it), else to the mode's systems.
    """
    manifest, data_path = manifest_read(path)
    try:
        expected_rows, expected_tally = int(manifest["rows"]), manifest["by_status"]
    except (KeyError, TypeError, ValueError):
        raise BackupError(f"the manifest in {data_path.parent} lacks its row counts") from None
    rows_seen, tally = 0, Tally()
    for row in _read_rows(data_path):
        tally.add(row["status"], row)
        rows_seen += 1
    if rows_seen != expected_rows or tally.as_dict() != expected_tally:
        raise BackupError("the data file's rows do not match the manifest's counts and checksums")
    known_fields = {field.attname: field for field in CaptionTask._meta.concrete_fields}
    counts = {"inserted": 0, "present": 0, "differing": 0, "conflicting": 0}
    done = 0
    batch: list[dict] = []

    def flush():
        ids = [row["id"] for row in batch]
        existing = {row["id"]: row for row in CaptionTask.objects.filter(pk__in=ids).values(*FINGERPRINT_FIELDS)}
        keys = [row["idempotency_key"] for row in batch if row["id"] not in existing and row["idempotency_key"]]
        taken_keys = set(CaptionTask.objects.filter(idempotency_key__in=keys).values_list("idempotency_key",
                                                                                          flat=True)) if keys else set()
        new = []
        for row in batch:
            if row["id"] in existing:
                counts["present"] += 1
                if fingerprint(existing[row["id"]]) != fingerprint({**row, "created_at":
                                                                    parse_datetime(row["created_at"])}):
                    counts["differing"] += 1
            elif row["idempotency_key"] and row["idempotency_key"] in taken_keys:
                counts["conflicting"] += 1
            else:
                new.append(_restored(row, known_fields))
        held = [task for task in new if task.dispatch == Dispatch.HELD and task.status == TaskStatus.QUEUED]
        if held:  # held while the backup was taken: dispatched as a submission now would be (held if paused now)
            for task, target in zip(held, targets_for(system_mode(), len(held))):
                task.dispatch = target
        CaptionTask.objects.bulk_create(new, batch_size=500)
        counts["inserted"] += len(new)
        batch.clear()

    try:
        with transaction.atomic():
            for row in _read_rows(data_path):
                batch.append(row)
                done += 1
                if len(batch) >= 1000:
                    flush()
                    if on_rows:
                        on_rows(done, rows_seen)
            if batch:
                flush()
    except (IntegrityError, ValidationError, ValueError) as error:
        raise BackupError(f"the backup's rows cannot be inserted ({error}); nothing was restored") from None
    if on_rows:
        on_rows(done, rows_seen)
    return {"rows": rows_seen, **counts, "path": str(data_path.parent)}


def _read_rows(data_path: Path):
    """The data file's rows, each checked to be an object with the fingerprint's fields."""
    try:
        with gzip.open(data_path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    row = json.loads(line)
                except ValueError:
                    raise BackupError(f"line {number} of {data_path.name} is not JSON: the backup is damaged") \
                        from None
                if not isinstance(row, dict) or not all(name in row for name in (*FINGERPRINT_FIELDS, "status")):
                    raise BackupError(f"line {number} of {data_path.name} is not a task row")
                yield row
    except (OSError, EOFError) as error:
        raise BackupError(f"cannot read {data_path}: {error}") from None


def _restored(row: dict, fields: dict) -> CaptionTask:
    values = {}
    for name, value in row.items():
        field = fields.get(name)
        if field is None:
            continue  # a column this version does not have
        values[name] = field.to_python(value) if value is not None else None
    values["published_at"] = None
    if values.get("status") == TaskStatus.PROCESSING:
        values.update(status=TaskStatus.QUEUED, claim_token="", heartbeat_at=None)
    return CaptionTask(**values)
