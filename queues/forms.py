from django import forms
from django.core.exceptions import ValidationError

from queues.models import CaptionTask
from queues.services import TaskSpec, validate_spec


class TaskSubmitForm(forms.ModelForm):
    """Submitting one task from the admin: the same validation as every other way in, errors on their fields."""

    class Meta:
        model = CaptionTask
        fields = ["image_ref", "priority", "idempotency_key"]

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        try:
            spec = validate_spec(TaskSpec(
                image_ref=cleaned.get("image_ref", ""), priority=cleaned.get("priority", ""),
                idempotency_key=cleaned.get("idempotency_key") or None,
            ))
        except ValidationError as error:
            for name, messages in error.message_dict.items():
                self.add_error(name if name in self.fields else None, messages)
            return cleaned
        cleaned["image_ref"], cleaned["idempotency_key"] = spec.image_ref, spec.idempotency_key
        return cleaned

    def validate_unique(self):
        # A repeated idempotency key is not an error: submission returns the existing task.
        pass
