"""The project: settings, URL tables, the ASGI and WSGI entry points, the admin site, and the infrastructure every
app shares (Redis pools, database helpers, logs, checked outbound destinations, request body limits, the embedded
Redis, the admin pages' shared pieces). The shared infrastructure imports no app (.importlinter)."""
