from django.db import migrations

# The rules the monitoring documents ask for that the first catalogue lacked (seed 004's queue growth, tasks per
# worker, retries per task, host CPU and memory; seed 000's host memory above 90 %; seed 002's safe range of Redis
# connections). Written out here, not read from the rule catalogue, so that later edits of the catalogue do not change
# what this migration did. name, title, signal, comparison, threshold, for (s), severity, component, inhibited by,
# runbook.
RULES = [
    ("queue-growing", "The backlog has grown for 10 minutes", "backlog_growth", ">", 0, 600, "warning", "queues",
     ["redis-unreachable", "no-active-workers"],
     "Tasks arrive faster than the workers finish them. Scale the pools up (Worker pools, `manage.py workers scale`) "
     "or look for slow or failing captions (the live dashboard, the dead letters)."),
    ("tasks-per-worker-high", "More than 10 jobs waiting or running per caption slot", "tasks_per_worker", ">", 10,
     600, "warning", "workers", ["redis-unreachable", "no-active-workers"],
     "The load is more than the workers can take soon: scale the pools up, or give them more caption slots."),
    ("retries-high", "More than 2 retries per task", "retries_per_task", ">", 2, 0, "warning", "tasks",
     ["redis-unreachable", "database-unreachable"],
     "Attempts keep failing and being retried: see the retries by error class (rq_task_errors_total, the task list "
     "filtered by error class). A captioning server that times out shows as CaptionTimeout."),
    ("host-cpu-high", "A host running the portal uses more than 80 % of its CPU", "host_cpu_ratio", ">", 0.8, 300,
     "warning", "hosts", [],
     "The alert names the host. Workers on it share its CPU: move some (fewer on this host, more elsewhere) or give "
     "the host more CPU. Inside a container, this is its quota."),
    ("host-memory-critical", "A host running the portal uses more than 90 % of its memory", "host_memory_ratio", ">",
     0.9, 300, "critical", "hosts", [],
     "The host is close to running out of memory: the kernel will kill processes (workers first). Stop workers on it "
     "or give it memory now. Inside a container, this is its limit."),
    ("host-memory-high", "A host running the portal uses more than 85 % of its memory", "host_memory_ratio", ">",
     0.85, 0, "warning", "hosts", ["host-memory-critical"],
     "Memory is getting short on the host the alert names: see rq_portal_process_memory_bytes for which processes "
     "use it, and the workers' memory on the live workers page."),
    ("redis-pool-busy", "A process uses more than 80 % of its Redis connections", "redis_pool_use_ratio", ">", 0.8,
     300, "warning", "redis", ["redis-unreachable"],
     "Beyond the safe range (30-40 of 50 connections): callers will soon wait for a connection and then fail "
     "(rq_redis_pool_exhausted_total). Raise REDIS_MAX_CONNECTIONS within Redis' maxclients, or find the process "
     "kind that holds them (rq_redis_pool_connections_in_use)."),
]


def seed(apps, schema_editor):
    rule_model = apps.get_model("monitoring", "AlertRule")
    created = []
    for name, title, signal, comparison, threshold, for_seconds, severity, component, _, runbook in RULES:
        rule, was_created = rule_model.objects.get_or_create(name=name, defaults=dict(
            title=title, signal=signal, comparison=comparison, threshold=threshold, for_seconds=for_seconds,
            severity=severity, component=component, labels={}, runbook=runbook))
        if was_created:
            created.append(rule.name)
    for name, *_rest, inhibitors, _runbook in RULES:
        if name in created:
            rule_model.objects.get(name=name).inhibited_by.set(rule_model.objects.filter(name__in=inhibitors))


def unseed(apps, schema_editor):
    apps.get_model("monitoring", "AlertRule").objects.filter(name__in=[rule[0] for rule in RULES]).delete()


class Migration(migrations.Migration):
    dependencies = [("monitoring", "0012_alert_queue_column")]
    operations = [migrations.RunPython(seed, unseed)]
