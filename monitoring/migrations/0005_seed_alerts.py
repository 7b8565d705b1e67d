"""The alert rules and the escalation policy a fresh install starts with (operators edit them in the admin after).

Written out here, not read from live code, so that this migration does what it did whatever the code becomes. The
roles are synced after every migrate (queues.apps), no longer here."""

from django.db import migrations

# name, title, signal, comparison, threshold, for (s), severity, component, labels, inhibited by, runbook.
REDIS_RUNBOOK = ("Check the Redis server (systemctl status redis, `redis-cli ping`). Tasks are not lost: they wait "
                 "in the database and the relay publishes them when Redis answers again.")
DEFAULT_RULES = [
    ("no-active-workers", "No caption worker is alive", "workers_alive", "<", 1, 0, "critical", "workers", {},
     ["redis-unreachable"], "Nothing processes tasks. Check `manage.py runworkers` on the worker hosts and the "
                            "pools' desired counts in the admin."),
    ("redis-unreachable", "Redis is unreachable", "redis_up", "<", 1, 0, "critical", "redis", {}, [], REDIS_RUNBOOK),
    ("database-unreachable", "The database is unreachable", "database_up", "<", 1, 0, "critical", "database", {}, [],
     "Check the database server. Workers put jobs back and wait; nothing completes until it answers."),
    ("health-unhealthy", "The health check says unhealthy", "health_unhealthy", ">", 0, 0, "critical", "health", {},
     ["redis-unreachable", "database-unreachable", "no-active-workers"],
     "Open /api/rq/health: it names the component that is unhealthy."),
    ("backlog-high", "More than 100 jobs wait", "backlog_total", ">", 100, 15 * 60, "warning", "queues", {},
     ["redis-unreachable", "no-active-workers"], "Scale the pools up in the admin, or look for stuck workers."),
    ("dead-letters-high", "More than 10 dead letters", "dead_letters", ">", 10, 30 * 60, "error", "tasks", {},
     ["redis-unreachable"], "Open the dead letters in the admin, grouped by error class; fix the cause, requeue."),
    ("processing-slow", "p95 caption time above 5 minutes", "processing_p95_seconds", ">", 300, 3600, "warning",
     "tasks", {}, [], "The captioning backend is slow or overloaded; check the Ollama server."),
    ("processing-stuck", "A task has been PROCESSING for more than 2 hours", "oldest_processing_seconds", ">",
     7200, 0, "warning", "tasks", {}, ["database-unreachable"],
     "Find the task in the admin (status PROCESSING, oldest first) and its worker in the live workers page."),
    ("redis-memory-high", "Redis uses more than 80 % of maxmemory", "redis_memory_ratio", ">", 0.8, 3600,
     "warning", "redis", {}, ["redis-unreachable"],
     "Clean up finished jobs (tasks cleanup) or give Redis more memory."),
    ("throughput-low", "Fewer than 5 tasks a minute complete while tasks wait", "throughput_per_minute", "<", 5,
     2 * 3600, "warning", "queues", {}, ["redis-unreachable", "no-active-workers", "database-unreachable"],
     "Workers are stuck or slow: see the live workers page and the captioner's health."),
    ("error-rate-high", "More than 5 % of attempts end in an error", "error_rate", ">", 0.05, 30 * 60, "warning",
     "tasks", {}, ["redis-unreachable", "database-unreachable"], "See the dead letters and retries by error class."),
    ("normal-backlog-high", "More than 200 jobs wait in the normal queue", "queue_backlog", ">", 200, 0,
     "critical", "queues", {"queue": "normal"}, ["redis-unreachable", "no-active-workers"],
     "Scale the pool that serves normal, or pause submissions."),
    ("few-workers", "Fewer than 2 workers are alive", "workers_alive", "<", 2, 5 * 60, "warning", "workers", {},
     ["redis-unreachable", "no-active-workers"], "The fleet runs below its usual minimum; check the pools."),
    ("workers-saturated", "More than 90 % of workers are busy", "busy_ratio", ">", 0.9, 5 * 60, "warning",
     "workers", {}, ["redis-unreachable"], "Add workers before the backlog grows."),
    ("success-rate-low", "Task success rate below 95 %", "success_rate", "<", 0.95, 5 * 60, "warning", "tasks", {},
     ["redis-unreachable", "database-unreachable"], "See the dead letters grouped by error class in the admin."),
    ("wait-long", "p95 queue wait above 30 s", "wait_p95_seconds", ">", 30, 0, "warning", "queues", {},
     ["redis-unreachable", "no-active-workers"], "Tasks wait too long for a worker: scale up."),
    ("redis-clients-high", "Redis clients above 90 % of maxclients", "redis_clients_ratio", ">", 0.9, 0,
     "critical", "redis", {}, ["redis-unreachable"], "Too many connections: check pools and worker counts."),
    ("fallback-active", "Tasks cannot be published to Redis", "fallback_active", ">", 0, 120, "critical", "redis",
     {}, ["redis-unreachable"], "Tasks wait in the database; the relay publishes them when Redis takes them again."),
]


def rules_seed(apps) -> int:
    """Writes the default rules that do not exist yet (by name); returns how many it wrote."""
    rule_model = apps.get_model("monitoring", "AlertRule")
    created = 0
    for (name, title, signal, comparison, threshold, for_seconds, severity, component, labels, _inhibitors,
         runbook) in DEFAULT_RULES:
        _, was_created = rule_model.objects.get_or_create(name=name, defaults=dict(
            title=title, signal=signal, comparison=comparison, threshold=threshold, for_seconds=for_seconds,
            severity=severity, component=component, labels=labels, runbook=runbook))
        created += was_created
    by_name = {rule.name: rule for rule in rule_model.objects.all()}
    for name, *_rest, inhibitors, _runbook in DEFAULT_RULES:
        if name in by_name and not by_name[name].inhibited_by.exists():
            by_name[name].inhibited_by.set([by_name[other] for other in inhibitors if other in by_name])
    return created


# The four levels of the old system's escalation list, each notified when a firing alert is still unacknowledged
# that many minutes after it fired (the routes notify at once). Their channels are left empty: an Admin attaches
# the channels each level uses (the timeline records an escalation to a level without channels as such).
ESCALATION_LEVELS = [(1, "System administrator", 5), (2, "Development team", 15), (3, "Database administrator", 30),
                     (4, "Management", 60)]


def escalation_seed(apps) -> None:
    policy_model = apps.get_model("monitoring", "EscalationPolicy")
    step_model = apps.get_model("monitoring", "EscalationStep")
    policy, created = policy_model.objects.get_or_create(name="Default escalation",
                                                         defaults={"severities": ["critical", "error"]})
    if created:
        for level, title, after in ESCALATION_LEVELS:
            step_model.objects.create(policy=policy, level=level, title=title, after_minutes=after)


def seed(apps, schema_editor):
    rules_seed(apps)
    escalation_seed(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("monitoring", "0004_alerts"),
        ("queues", "0010_task_event_held"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
