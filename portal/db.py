"""Database helpers shared by the apps.

MariaDB resolves a lock cycle by rolling back the cheaper transaction (error 1213), and gives up a row lock after
``innodb_lock_wait_timeout`` (1205). Both mean "try again", not "the database is away": a single statement run in
autocommit mode can simply be run again. Inside a transaction the whole transaction was rolled back, so only its
owner can retry it (``retry_lock_conflicts`` refuses to retry there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from django.db import OperationalError, connection

T = TypeVar("T")

# MySQL/MariaDB error codes: ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT.
LOCK_CONFLICT_CODES = {1213, 1205}


def is_lock_conflict(error: BaseException) -> bool:
    """True for a deadlock or lock-wait timeout (MariaDB) and a busy database (SQLite)."""
    if not isinstance(error, OperationalError):
        return False
    code = error.args[0] if error.args else None
    if code in LOCK_CONFLICT_CODES:
        return True
    return isinstance(code, str) and "database is locked" in code


def retry_lock_conflicts(statement: Callable[[], T], *, attempts: int = 5, pause: float = 0.05) -> T:
    """Runs ``statement`` (one statement in autocommit mode) and runs it again after a lock conflict, up to
    ``attempts`` times in all, with a growing pause. Any other error, the last conflict, or a conflict inside a
    transaction (which the database has rolled back whole) is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return statement()
        except OperationalError as error:
            if attempt == attempts or connection.in_atomic_block or not is_lock_conflict(error):
                raise
            time.sleep(pause * attempt)
    raise AssertionError("unreachable")


def insert_statement(instance, *, using: str = "default") -> tuple[str, list]:
    """The INSERT that ``instance.save()`` would run for a new row (its pk left to the database), compiled now, so a
    caller can run only the statement inside a transaction: on SQLite a transaction holds the writers' lock
    (portal/sqlite3) from its BEGIN, and compiling a model's INSERT costs several times running it."""
    from django.db.models.sql import InsertQuery

    meta = instance._meta
    fields = [field for field in meta.local_concrete_fields
              if field is not meta.auto_field and not getattr(field, "generated", False)]
    query = InsertQuery(type(instance))
    query.insert_values(fields, [instance])
    [(sql, params)] = query.get_compiler(using=using).as_sql()
    return sql, list(params)
