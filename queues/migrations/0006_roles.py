from django.db import migrations

# The roles were synced here; they are synced after every migrate now (queues.apps), so this does nothing.


class Migration(migrations.Migration):
    dependencies = [
        ("queues", "0005_operations"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]
    operations = []
