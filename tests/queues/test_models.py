"""Bulk insertion of tasks: the ids it returns are the rows' own, in order, even with other inserts at the same time
(one multi-row INSERT per batch; on MySQL/MariaDB its ids are read from LAST_INSERT_ID())."""

import threading

import pytest
from django.db import connection
from django.utils import timezone

from queues.models import CaptionTask, Dispatch

pytestmark = pytest.mark.django_db(transaction=True)


def test_insert_new_returns_each_rows_id_in_order_beside_concurrent_inserts():
    returned: dict[str, list[int]] = {}
    errors = []

    def insert(name: str) -> None:
        try:
            rows = [(f"https://images.example/{name}/{index}.png", "normal", f"{name}-{index}")
                    for index in range(2500)]
            returned[name] = CaptionTask.objects.insert_new(rows, publish_after=timezone.now(),
                                                            dispatch=[Dispatch.DATABASE] * len(rows))
        except Exception as error:  # reported below, with the thread's name
            errors.append((name, error))
        finally:
            connection.close()

    threads = [threading.Thread(target=insert, args=(name,)) for name in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for name, ids in returned.items():
        stored = dict(CaptionTask.objects.filter(pk__in=ids).values_list("pk", "idempotency_key"))
        assert [stored[pk] for pk in ids] == [f"{name}-{index}" for index in range(2500)], name
    assert CaptionTask.objects.count() == 5000
