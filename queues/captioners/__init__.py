"""Captioning backends behind one small interface: ``caption(image_ref, *, timeout) -> str``.

``local`` (default) describes the pixels with Pillow; ``ollama`` asks an Ollama server. Both raise
``queues.errors.PermanentCaptionError`` or ``TransientCaptionError`` so the job knows whether to retry.
"""

from __future__ import annotations

from django.conf import settings
from django.utils.module_loading import import_string

BACKENDS = {
    "local": "queues.captioners.local.LocalCaptioner",
    "ollama": "queues.captioners.ollama.OllamaCaptioner",
    "noop": "queues.captioners.noop.NoopCaptioner",  # benchmarks only; see noop.py
}


class Captioner:
    name = "base"

    def caption(self, image_ref: str, *, timeout: float) -> str:
        raise NotImplementedError


def get_captioner(name: str | None = None) -> Captioner:
    name = name or settings.CAPTION_BACKEND
    try:
        path = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown caption backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    return import_string(path)()
