"""Errors of the caption path. Whether an error is worth retrying is part of its type, decided where it happens."""


class CaptionError(Exception):
    """A captioning attempt failed. ``permanent`` errors fail the task at once; others are retried with backoff."""

    permanent = False

    def __init__(self, message: str, *, permanent: bool | None = None):
        super().__init__(message)
        if permanent is not None:
            self.permanent = permanent


class TransientCaptionError(CaptionError):
    """Worth retrying: timeouts, refused connections, HTTP 5xx, 429."""

    permanent = False


class CaptionTimeout(TransientCaptionError):
    """A time limit ran out: the image download, the captioning server's answer, or the attempt's own budget. Counted
    apart (rq_task_timeouts_total) because a run of them says the limits or the servers need looking at."""


class PermanentCaptionError(CaptionError):
    """Retrying cannot help: not an image, 404, too large, a scheme or address we refuse."""

    permanent = True


class CaptionerMisconfigured(CaptionError):
    """The captioning service is set up wrong (its model is missing, say): no task's fault, and no reason to spend
    tasks' retries or fill the dead letters. The task is held (back to its queue without using an attempt) and the
    problem is reported until the service is fixed."""

    permanent = False


class BrokerUnavailable(Exception):
    """Redis could not be reached. Callers keep the database row and let the relay publish it later."""


class JobStopped(Exception):
    """Raised inside a running caption job when an operator stops it (rq's stop-job command)."""


class WorkerInterrupted(BaseException):
    """Raised inside a running caption when its worker is told to stop at once (a second stop signal).

    A BaseException so that no captioner's error handling swallows it; ``task_execute`` gives the attempt back as a
    retry."""
