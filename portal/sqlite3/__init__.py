"""The portal's SQLite database backend (``ENGINE = "portal.sqlite3"``, which portal.env sets for every ``sqlite://``
DATABASE_URL): django-prometheus's SQLite backend, so queries are counted and timed as on MySQL and MariaDB, with one
change in ``base``: processes that write (web, workers, the sampler) take turns on a lock file beside the database,
each woken as soon as it is free, instead of sleeping 1, 2, 5, 10... ms at a time in SQLite's busy handler.
Django loads the backend's classes from ``base`` by that name; nothing in the project imports this package.
"""
