import base64
import json

import pytest
from django.utils import timezone

from queues.captioners import get_captioner
from queues.captioners.local import LocalCaptioner, colour_name
from queues.captioners.ollama import OllamaCaptioner
from queues.errors import PermanentCaptionError, TransientCaptionError
from tests.conftest import respond


def test_local_caption_describes_shape_colours_and_light(png_bytes):
    captioner = LocalCaptioner()
    assert captioner.caption_bytes(png_bytes(colour=(20, 40, 200), size=(400, 900))) == (
        "Tall image (400×900 px), almost entirely blue. Overall dark, low contrast, smooth, plain areas.")
    assert captioner.caption_bytes(png_bytes(colour=(250, 250, 250), size=(2000, 800))).startswith(
        "Panoramic image (2000×800 px), almost entirely white. Overall very bright")


def test_local_caption_reports_each_dominant_colour_and_contrast():
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (800, 800), (0, 0, 0))
    ImageDraw.Draw(image).rectangle([0, 0, 399, 799], fill=(255, 255, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    caption = LocalCaptioner().caption_bytes(buffer.getvalue())
    assert caption.startswith("Square image (800×800 px), mostly ")
    assert "yellow" in caption and "black" in caption
    assert "high contrast" in caption


def test_local_caption_is_deterministic(png_bytes):
    data = png_bytes(colour=(10, 160, 90), size=(640, 480))
    assert LocalCaptioner().caption_bytes(data) == LocalCaptioner().caption_bytes(data)


@pytest.mark.parametrize("rgb, name", [
    ((230, 30, 30), "red"), ((250, 140, 20), "orange"), ((120, 70, 20), "brown"), ((30, 30, 40), "black"),
    ((128, 128, 128), "grey"), ((220, 80, 130), "pink"), ((30, 60, 140), "blue"), ((200, 230, 250), "light blue"),
])
def test_colour_names(rgb, name):
    assert colour_name(rgb) == name


def test_local_captioner_refuses_non_images_and_pixel_bombs(png_bytes, settings):
    with pytest.raises(PermanentCaptionError, match="not a readable image"):
        LocalCaptioner().caption_bytes(b"%PDF-1.4 definitely not an image")
    settings.IMAGE_MAX_PIXELS = 1000
    with pytest.raises(PermanentCaptionError, match="more than the limit of 1000 pixels"):
        LocalCaptioner().caption_bytes(png_bytes(size=(100, 100)))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown caption backend 'gpt'"):
        get_captioner("gpt")


def test_ollama_sends_image_and_returns_its_caption(http_server, png_bytes, settings):
    image = png_bytes()
    image_url = http_server.route("/cat.png", respond(200, image, "image/png"))
    answer = json.dumps({"model": "llava", "response": " A red rectangle. ", "done": True}).encode()
    http_server.route("/api/generate", respond(200, answer, "application/json"))

    caption = OllamaCaptioner(url=http_server.url, model="llava:13b").caption(image_url, timeout=10)

    assert caption == "A red rectangle."
    request = next(r for r in http_server.requests if r["path"] == "/api/generate")
    body = json.loads(request["body"])
    assert request["method"] == "POST" and body["model"] == "llava:13b" and body["stream"] is False
    assert base64.b64decode(body["images"][0]) == image
    assert "alt text" in body["prompt"]


@pytest.mark.parametrize("status, error", [(500, TransientCaptionError), (503, TransientCaptionError),
                                           (400, PermanentCaptionError)])
def test_ollama_http_errors_are_classified(http_server, png_bytes, status, error):
    image_url = http_server.route("/cat.png", respond(200, png_bytes(), "image/png"))
    http_server.route("/api/generate", respond(status, b'{"error": "model not loaded"}', "application/json"))
    with pytest.raises(error, match=f"HTTP {status}"):
        OllamaCaptioner(url=http_server.url).caption(image_url, timeout=10)


def test_ollama_slower_than_the_task_timeout_is_transient(http_server, png_bytes):
    image_url = http_server.route("/cat.png", respond(200, png_bytes(), "image/png"))
    http_server.route("/api/generate", respond(200, b'{"response": "late"}', "application/json", delay=3))
    with pytest.raises(TransientCaptionError, match="did not answer within 1 s|timed out"):
        OllamaCaptioner(url=http_server.url).caption(image_url, timeout=1)


def test_ollama_unreachable_is_transient(png_bytes, http_server):
    from portal.embedded_redis import free_port

    image_url = http_server.route("/cat.png", respond(200, png_bytes(), "image/png"))
    with pytest.raises(TransientCaptionError, match="cannot reach Ollama"):
        OllamaCaptioner(url=f"http://127.0.0.1:{free_port()}").caption(image_url, timeout=5)


@pytest.mark.django_db(transaction=True)
def test_ollama_backend_through_the_worker(redis, http_server, png_bytes, settings):
    from queues.models import TaskStatus
    from queues.services import task_submit
    from tests.conftest import run_worker

    settings.CAPTION_BACKEND = "ollama"
    settings.OLLAMA_URL = http_server.url
    http_server.route("/api/generate", respond(200, b'{"response": "A sunset over water."}', "application/json"))
    task = task_submit(image_ref=http_server.route("/sunset.png", respond(200, png_bytes(), "image/png")))
    run_worker()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED and task.caption == "A sunset over water."


@pytest.mark.django_db(transaction=True)
def test_missing_ollama_model_holds_the_backlog_instead_of_dead_lettering_it(redis, http_server, png_bytes,
                                                                             settings, client, admin_user):
    from queues import broker
    from queues.models import CaptionTask, TaskEvent, TaskStatus
    from queues.services import TaskSpec, tasks_relay_once, tasks_submit_many
    from tests.conftest import run_worker

    settings.CAPTION_BACKEND, settings.OLLAMA_URL, settings.OLLAMA_MODEL = "ollama", http_server.url, "llava"
    image_url = http_server.route("/cat.png", respond(200, png_bytes(), "image/png"))
    http_server.route("/api/generate", respond(404, b'{"error":"model \\"llava\\" not found, try pulling it first"}',
                                               "application/json"))
    created = tasks_submit_many(specs=[TaskSpec(image_url) for _ in range(5)]).created
    run_worker()
    tasks = CaptionTask.objects.filter(pk__in=created)
    assert {(task.status, task.attempts, task.published_at) for task in tasks} == {(TaskStatus.QUEUED, 0, None)}
    assert not CaptionTask.objects.filter(status=TaskStatus.FAILED).exists()
    assert redis.zcard("rq:failed:normal") == 0
    assert TaskEvent.objects.filter(kind=TaskEvent.Kind.HELD).count() == 5
    problem = broker.captioner_problem()
    assert "no model 'llava'" in problem["message"] and "OLLAMA_MODEL" in problem["message"]
    client.force_login(admin_user)
    health = client.get("/api/rq/health").json()
    assert health["components"]["captioner"] == "unhealthy"
    assert "no model 'llava'" in health["component_details"]["captioner"]["reason"]
    assert "Captioning is held" in client.get("/admin/").content.decode()  # the banner on every admin page

    http_server.route("/api/generate", respond(200, b'{"response": "A cat."}', "application/json"))  # pulled
    CaptionTask.objects.update(publish_after=timezone.now())  # the hold is over
    assert tasks_relay_once() == 1  # while the problem stands, one task per pass probes it
    run_worker()  # the probe succeeds: the problem is over
    assert broker.captioner_problem() is None
    assert tasks_relay_once() == 4
    run_worker()
    assert set(tasks.values_list("status", "attempts", "caption")) == {(TaskStatus.COMPLETED, 1, "A cat.")}
