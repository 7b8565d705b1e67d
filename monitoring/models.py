from django.db import models


class MetricSample(models.Model):
    """Figures of one queue (or of the fleet, queue "") over one minute, or one hour once downsampled.

    ``minutes`` is how much time the counts cover, the denominator of every rate read from samples: 1 for a minute
    sample, more for the sample a sampler writes after a gap (the deltas since its last sample), and for an hourly
    sample the sum over the minute samples folded into it (less than 60 when the sampler was down for part of it).
    """

    class Resolution(models.TextChoices):
        MINUTE = "1m", "minute"
        HOUR = "1h", "hour"

    at = models.DateTimeField(help_text="Start of the period.")
    resolution = models.CharField(max_length=2, choices=Resolution.choices, default=Resolution.MINUTE)
    minutes = models.PositiveIntegerField(default=1, help_text="Minutes the counts cover (rates divide by this).")
    queue = models.CharField(max_length=10, blank=True, help_text="Empty for fleet-wide figures.")
    depth = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    retried = models.PositiveIntegerField(default=0)
    processing_p50 = models.FloatField(null=True, blank=True)
    processing_p95 = models.FloatField(null=True, blank=True)
    processing_sum = models.FloatField(default=0)
    processing_count = models.PositiveIntegerField(
        default=0, help_text="Attempts timed in the period, whatever their outcome (the average's denominator).")
    wait_p50 = models.FloatField(null=True, blank=True)
    wait_p95 = models.FloatField(null=True, blank=True)
    workers = models.PositiveIntegerField(default=0)
    busy_ratio = models.FloatField(default=0)

    class Meta:
        ordering = ["at"]
        constraints = [models.UniqueConstraint(fields=["resolution", "queue", "at"], name="sample_unique_period")]
        indexes = [models.Index(fields=["queue", "at"], name="sample_queue_at_idx")]

    def __str__(self) -> str:
        return f"{self.queue or 'fleet'} {self.at:%Y-%m-%d %H:%M} ({self.resolution})"
