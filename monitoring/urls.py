from django.urls import path

from monitoring import views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    path("api/rq/health", views.api_health, name="api-health"),
    path("api/rq/metrics", views.api_metrics, name="api-metrics"),
    path("api/rq/performance", views.api_performance, name="api-performance"),
    path("api/rq/alerts", views.api_alerts, name="api-alerts"),
    path("api/alerts/alertmanager", views.alertmanager_webhook, name="alertmanager-webhook"),
]
