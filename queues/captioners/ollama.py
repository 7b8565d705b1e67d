"""Captioning with an Ollama server: ``POST {OLLAMA_URL}/api/generate`` with the image, non-streaming."""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request

from django.conf import settings

from queues.captioners import Captioner
from queues.captioners.fetch import StoppableHTTPHandler, StoppableHTTPSHandler, classify_http_status, fetch_image
from queues.captioners.local import open_image
from queues.errors import CaptionerMisconfigured, CaptionTimeout, PermanentCaptionError, TransientCaptionError

# urllib's default opener (proxies from the environment, redirects), with connections a caption slot's stop can shut.
_opener = urllib.request.build_opener(StoppableHTTPHandler, StoppableHTTPSHandler)

PROMPT = ("Write one or two sentences of alt text for this image: what it shows, for someone who cannot see it. "
          "Answer with the alt text only.")


class OllamaCaptioner(Captioner):
    name = "ollama"

    def __init__(self, url: str | None = None, model: str | None = None):
        self.url = (url or settings.OLLAMA_URL).rstrip("/")
        self.model = model or settings.OLLAMA_MODEL

    def caption(self, image_ref: str, *, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        data = fetch_image(image_ref, timeout=min(timeout, settings.IMAGE_FETCH_TIMEOUT))
        open_image(data)  # refuse non-images before spending model time on them
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CaptionTimeout(f"fetching the image used up the task timeout of {timeout:g} s")
        body = json.dumps({
            "model": self.model,
            "prompt": PROMPT,
            "images": [base64.b64encode(data).decode("ascii")],
            "stream": False,
        }).encode()
        request = urllib.request.Request(
            f"{self.url}/api/generate", data=body, method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with _opener.open(request, timeout=remaining) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read(500).decode(errors="replace")
            if error.code == 404:
                # Ollama answers /api/generate with 404 when the model is not pulled: a configuration error.
                raise CaptionerMisconfigured(
                    f"Ollama at {self.url} has no model {self.model!r} (OLLAMA_MODEL): {detail}") from error
            exception = classify_http_status(error.code, f"Ollama at {self.url}")
            exception.args = (f"{exception.args[0]}: {detail}",)
            raise exception from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, (TimeoutError, socket.timeout)):
                raise CaptionTimeout(f"Ollama did not answer within {timeout:g} s") from error
            raise TransientCaptionError(f"cannot reach Ollama at {self.url}: {error.reason}") from error
        except (TimeoutError, socket.timeout) as error:
            raise CaptionTimeout(f"Ollama did not answer within {timeout:g} s") from error
        except json.JSONDecodeError as error:
            raise TransientCaptionError(f"Ollama answered with something that is not JSON: {error}") from error
        except OSError as error:
            raise TransientCaptionError(f"connection to Ollama failed: {error}") from error
        if payload.get("error"):
            raise PermanentCaptionError(f"Ollama refused the request: {payload['error']}")
        text = (payload.get("response") or "").strip()
        if not text:
            raise TransientCaptionError("Ollama answered with an empty caption")
        return text
