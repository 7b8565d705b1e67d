"""The portal's HTTP API (``/api/v1/``): tasks, submission, alerts and silences for scripts, deploy hooks and
on-call tools, described by OpenAPI 3.1 at ``/api/schema/`` (and readable at ``/api/docs/``).

Django Ninja builds the description from the operations' signatures and schemas. Every operation acts as an API
token's user (``access``), answers errors as JSON (``errors``), and calls the same services as the admin."""
