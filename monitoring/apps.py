from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "monitoring"
    verbose_name = "Monitoring"

    def ready(self):
        from monitoring.metrics.recorder import note_unavailable, record_attempt, record_fleet_event, record_submitted
        from queues.signals import attempt_ended, fleet_event, service_unavailable, tasks_submitted

        attempt_ended.connect(record_attempt, dispatch_uid="monitoring.record_attempt")
        service_unavailable.connect(note_unavailable, dispatch_uid="monitoring.note_unavailable")
        tasks_submitted.connect(record_submitted, dispatch_uid="monitoring.record_submitted")
        fleet_event.connect(record_fleet_event, dispatch_uid="monitoring.record_fleet_event")

        from monitoring.live.events import connect_signals

        connect_signals()
