from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "monitoring"
    verbose_name = "Monitoring"

    def ready(self):
        from monitoring.metrics.recorder import note_unavailable, record_attempt
        from queues.signals import attempt_ended, service_unavailable

        attempt_ended.connect(record_attempt, dispatch_uid="monitoring.record_attempt")
        service_unavailable.connect(note_unavailable, dispatch_uid="monitoring.note_unavailable")

        from monitoring.live.events import connect_signals

        connect_signals()
