"""A captioner that does no work, for measuring the queue path alone (bench/worker.py). Not selectable through
CAPTION_BACKEND: a deployment cannot end up writing empty captions by a typo."""

from queues.captioners import Captioner


class NoopCaptioner(Captioner):
    name = "noop"

    def caption(self, image_ref: str, *, timeout: float) -> str:
        return "no-op caption"
