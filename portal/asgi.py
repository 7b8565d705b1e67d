"""ASGI entry point: WebSockets for the live dashboards (and, for the local runner, plain HTTP too)."""
import logging
import os
import warnings

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
# WhiteNoise serves static files as synchronous file iterators; under ASGI Django warns on every one of them.
# Production serves pages (and static files) with gunicorn; only the local runner takes this path.
warnings.filterwarnings("ignore", message="StreamingHttpResponse must consume synchronous iterators")
django_application = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs the app registry ready)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import reverse  # noqa: E402

from monitoring.alerts.views import WEBHOOK_MAX_BYTES  # noqa: E402
from monitoring.live.routing import websocket_urlpatterns  # noqa: E402
from portal.body_limits import BodyLimit  # noqa: E402
from portal.legacy_variables import log_not_read  # noqa: E402
from portal.logs import adopt_server_loggers  # noqa: E402

adopt_server_loggers(settings.LOG_FORMAT)  # uvicorn's or daphne's own lines in the portal's format
log_not_read(logging.getLogger("portal"))  # the old system's variables that are set but not read

application = ProtocolTypeRouter({
    # The webhook's and the API's caps while the body arrives: Django would spool a chunked body of any size before
    # the view (the API's is Django's own limit, which a body with a Content-Length meets in the view).
    "http": BodyLimit(django_application, {reverse("alertmanager-webhook"): WEBHOOK_MAX_BYTES,
                                           "/api/v1/": settings.DATA_UPLOAD_MAX_MEMORY_SIZE}),
    "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
})
