import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from queues import broker
from queues.models import CaptionTask

pytestmark = pytest.mark.django_db(transaction=True)


def test_submit_tasks_uses_varied_sample_images(redis, settings, tmp_path, capsys):
    settings.MEDIA_ROOT = tmp_path / "media"
    call_command("submit_tasks", "--count", "30", "--priority", "high")
    output = capsys.readouterr()
    assert "Submitted 30 task(s) on queue 'high'" in output.out
    assert "Submitting: 100%" in output.err  # the progress bar
    assert CaptionTask.objects.count() == 30
    assert CaptionTask.objects.values("image_ref").distinct().count() == 12
    assert broker.queue_lengths()["high"] == 30
    assert len(list((settings.MEDIA_ROOT / "samples").glob("*.png"))) == 12


def test_submit_tasks_with_one_image(redis, media_image, capsys):
    reference = media_image("photos/cat.png")
    call_command("submit_tasks", "--count", "3", "--image", reference, "--no-progress")
    assert f"for {reference}" in capsys.readouterr().out
    assert list(CaptionTask.objects.order_by().values_list("image_ref", flat=True).distinct()) == [reference]


@pytest.mark.parametrize("arguments, message", [
    (["--count", "0"], "--count must be at least 1"),
    (["--priority", "asap"], "--priority must be one of urgent, high, normal, low"),
    (["--image", "ftp://example.com/a.png"], "--image: Unsupported URL scheme 'ftp'"),
    (["--image", "nope.png"], "--image: No file 'nope.png'"),
])
def test_submit_tasks_bad_arguments(redis, media_image, arguments, message):
    media_image()
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call_command("submit_tasks", *arguments, "--no-progress")
    assert CaptionTask.objects.count() == 0
