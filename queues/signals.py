"""Signals the queue system sends for whoever measures it (the monitoring app records them as metrics).

queues does not know monitoring (dependencies point inward); it only announces what happened.
"""

from django.dispatch import Signal

# An attempt of a task ended. kwargs: queue, outcome ("completed", "retry", "failed", "worker_lost"),
# processing_seconds (float or None), wait_seconds (publication to start, float or None), error_class (the class
# name of the error that ended it, "" for a success).
attempt_ended = Signal()

# New tasks were committed. kwargs: counts ({queue: how many}).
tasks_submitted = Signal()

# The supervisor recorded a fleet event (sent from its main loop: receivers must not block). kwargs: kind (a
# FleetEvent.Kind value), pool.
fleet_event = Signal()

# A component could not reach a backing service. kwargs: service ("redis" or "database"), where (str).
service_unavailable = Signal()
