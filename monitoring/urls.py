from django.urls import path

from monitoring.alerts import views as alerts
from monitoring.metrics import views as metrics

urlpatterns = [
    path("healthz", metrics.healthz, name="healthz"),
    path("readyz", metrics.readyz, name="readyz"),
    path("metrics", metrics.metrics, name="metrics"),
    path("api/rq/health", metrics.api_health, name="api-health"),
    path("api/rq/metrics", metrics.api_metrics, name="api-metrics"),
    path("api/rq/performance", metrics.api_performance, name="api-performance"),
    path("api/rq/alerts", alerts.api_alerts, name="api-alerts"),
    path("api/alerts/alertmanager", alerts.alertmanager_webhook, name="alertmanager-webhook"),
]
