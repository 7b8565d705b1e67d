"""The move from the old database-polling worker to RQ: the dispatch mode and submission pause (``dispatch``), the
shared state they and the runs read (``state``), the database poller itself (``legacy``), and the migration and
rollback runs with their phases (``runs``, ``preflight``, ``backup``, ``verify``).
"""
