"""Signals the queue system sends for whoever measures it (the monitoring app records them as metrics).

queues does not know monitoring (dependencies point inward); it only announces what happened.
"""

from django.dispatch import Signal

# An attempt of a task ended. kwargs: queue, outcome ("completed", "retry", "failed", "worker_lost"),
# processing_seconds (float or None), wait_seconds (publication to start, float or None).
attempt_ended = Signal()

# A component could not reach a backing service. kwargs: service ("redis" or "database"), where (str).
service_unavailable = Signal()
