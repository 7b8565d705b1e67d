"""The API's one NinjaAPI: its routers under ``/api/v1/`` and the older calls at their own paths (api/runbook.py),
the token check on every operation, the JSON error handlers, the OpenAPI description at ``/api/schema/`` and its
page at ``/api/docs/`` (Swagger UI from the package's own static files, no CDN)."""

from ninja import NinjaAPI

from api import alerts, errors, fleet, runbook, submission, tasks
from api.access import TokenAuth

DESCRIPTION = """Tasks, submission, alerts, silences and the worker fleet of the RQ Ops Portal.

Every operation needs `Authorization: Bearer <token>`: an API token an Admin issues with
`manage.py api_token create NAME --user USER`. The token acts as its user, with that user's role: Support reads,
Operators act, Admins configure. Every change is audited as that user, via the token's name.

Each token may make `rate_limit` requests a second (its own, or `API_RATE_LIMIT`), in bursts of twice that; beyond,
the answer is 429 with `Retry-After`. Errors are JSON: `{"error": "...", "field": "..."}` (`field` names the input
at fault, or is null). While Redis or the database is unreachable the answer is 503 with `Retry-After`."""

# Headers the answers carry that Django Ninja does not describe by itself: clients generated from the description
# see them, and the contract test checks that every answer of those codes sends them.
RESPONSE_HEADERS = {
    429: {"Retry-After": "Seconds to wait before this token's next request."},
    503: {"Retry-After": "Seconds to wait before trying again (Redis or the database is unreachable)."},
}
LOCATION = {"task_submit": "/api/v1/tasks/{id}", "silence_create": "/api/v1/silences/{id}"}


class PortalApi(NinjaAPI):
    def get_openapi_schema(self, *args, **kwargs):
        schema = super().get_openapi_schema(*args, **kwargs)  # its response codes are ints until rendered
        for methods in schema["paths"].values():
            for operation in methods.values():
                answers = operation.get("responses", {})
                for code, headers in RESPONSE_HEADERS.items():
                    if code in answers:
                        answers[code]["headers"] = {name: {"description": text, "schema": {"type": "integer"}}
                                                    for name, text in headers.items()}
                if operation.get("operationId") in LOCATION and 201 in answers:
                    answers[201]["headers"] = {"Location": {
                        "description": f"The new resource: {LOCATION[operation['operationId']]}.",
                        "schema": {"type": "string"}}}
        return schema


api = PortalApi(
    title="RQ Ops Portal API", version="1", description=DESCRIPTION, auth=TokenAuth(), urls_namespace="api",
    openapi_url="/api/schema/", docs_url="/api/docs/",
)
errors.install(api)
for module in (tasks, submission, alerts, fleet):
    api.add_router("/api/v1/", module.router)
# The older calls, at the paths scripts and the old system's runbooks use (mounted at the site's root, portal/urls.py).
api.add_router("/api/rq/workers/", runbook.fleet)
api.add_router("/admin/rq/", runbook.old_fleet)
api.add_router("/admin/maintenance/", runbook.maintenance)
