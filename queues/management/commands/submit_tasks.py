from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from queues.dispatch import get_policy
from queues.models import Priority
from queues.samples import ensure_samples
from queues.services import TaskSpec, tasks_submit_many


class Command(BaseCommand):
    help = ("Submits caption tasks: by default on generated sample images of varied colours and sizes, or all on "
            "one --image (an http(s) URL or a path under the media root).")

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=10, help="How many tasks to submit (default 10).")
        parser.add_argument("--priority", default=Priority.NORMAL,
                            help=f"One of {', '.join(Priority.values)} (default normal).")
        parser.add_argument("--image", default=None, help="Image URL or media path for every task.")
        parser.add_argument("--no-progress", action="store_true", help="Do not draw a progress bar.")

    def handle(self, *args, count, priority, image, no_progress, **options):
        if count < 1:
            raise CommandError(f"--count must be at least 1; got {count}")
        if priority not in Priority.values:
            raise CommandError(f"--priority must be one of {', '.join(Priority.values)}; got {priority!r}")
        references = [image] if image else ensure_samples()
        specs = [TaskSpec(image_ref=references[index % len(references)], priority=priority) for index in range(count)]
        with tqdm(total=count, unit="task", desc="Submitting", disable=no_progress or options["verbosity"] == 0,
                  file=self.stderr._out) as bar:
            try:
                result = tasks_submit_many(specs=specs, on_batch=bar.update)
            except ValidationError as error:
                raise CommandError(_describe(error)) from None
        first, last = (min(result.created), max(result.created)) if result.created else (None, None)
        self.stdout.write(self.style.SUCCESS(
            f"Submitted {result.created_count} task(s) on queue {Priority(priority).value!r}"
            + (f" (ids {first}..{last})" if first is not None else "")
            + (f" on {len(references)} sample image(s) under the media root" if not image else f" for {image}")
            + "."))
        status = get_policy().status()
        if status.submission_paused:
            self.stdout.write(self.style.WARNING(f"Submission is paused ({status.paused_reason}): the tasks are held "
                                                 "and run once submission resumes."))


def _describe(error: ValidationError) -> str:
    parts = []
    for field, messages in error.message_dict.items():
        name = {"image_ref": "--image", "priority": "--priority"}.get(field.split(": ")[-1], field)
        parts.append(f"{name}: {' '.join(messages)}")
    return "; ".join(parts)
