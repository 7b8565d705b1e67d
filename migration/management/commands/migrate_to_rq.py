import json
import sys
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from migration import dispatch, runs, state
from migration.backup import BackupError, backup_restore
from migration.models import MigrationRun, Mode
from migration.preflight import preflight_report
from migration.verify import verification
from queues.audit import audit, audit_via, command_account


def parse_duration(text: str) -> timedelta:
    try:
        return dispatch.duration_parse(text)
    except ValueError as error:
        raise CommandError(f"--for: {error}") from None


class Command(BaseCommand):
    help = ("The migration from the database-polling worker to RQ, and back: checks, runs with phases that resume "
            "after a crash, verification, rollback, the dispatch mode and submission pauses. "
            "See the README's migration procedure.")

    def add_arguments(self, parser):
        commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        commands.add_parser("preflight", help="Check that the migration can run now (exit 1 if not).")
        start = commands.add_parser("start", help="Create a migration run and execute all its phases.")
        self._run_options(start)
        start.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
        commands.add_parser("status", help="The latest run, phase by phase.")
        for name, text in (("resume", "Continue the open run from its checkpoint (after a failure or a crash)."),
                           ("advance", "Execute only the next phase of the open run.")):
            sub = commands.add_parser(name, help=text)
            sub.add_argument("--run", type=int, default=None, help="The run's id (default: the open run).")
            sub.add_argument("--actor", default=None, help="The user the phases are recorded for (the admin "
                                                           "passes the person who clicked).")
        commands.add_parser("verify", help="Check jobs against tasks (and the open or latest run's baseline); "
                                           "exit 1 when anything does not match.")
        rollback = commands.add_parser("rollback", help="Return every task not yet completed to the database "
                                                        "poller (a recorded run of its own).")
        rollback.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
        rollback.add_argument("--timeout", type=int, default=None,
                              help="Seconds to wait for RQ workers to finish what they run (default 300).")
        mode = commands.add_parser("mode", help="Show, or set (Admins' decision), where new tasks go.")
        mode.add_argument("mode", nargs="?", choices=Mode.values)
        mode.add_argument("--rq-percent", type=int, default=None, help="Hybrid mode: the percentage sent to RQ.")
        pause = commands.add_parser("pause-submission", help="Hold new submissions (accepted, not dispatched).")
        pause.add_argument("--reason", required=True, help="Shown in the admin and in /api/rq/health.")
        pause.add_argument("--for", dest="duration", default=None, help="End the pause after 90s, 30m, 2h, 1d.")
        commands.add_parser("resume-submission", help="End the pause and release the held tasks.")
        restore = commands.add_parser("restore", help="Insert the task rows of a backup that the database lacks.")
        restore.add_argument("file", help="The backup's directory or its manifest.json.")
        restore.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
        for sub in commands.choices.values():
            sub.add_argument("--no-progress", action="store_true", help="Do not draw progress bars.")
            sub.add_argument("--json", action="store_true", help="Print the result as JSON.")

    @staticmethod
    def _run_options(parser):
        parser.add_argument("--soak", type=int, default=0, metavar="S",
                            help="Seconds of hybrid mode before the cutover (default 0: no soak).")
        parser.add_argument("--batch-size", type=int, default=1000, help="Tasks moved per batch (default 1000).")
        parser.add_argument("--drain-timeout", type=int, default=120,
                            help="Seconds the database pollers get to finish their tasks (default 120).")
        parser.add_argument("--validate-tasks", type=int, default=5,
                            help="Test tasks that must complete through RQ at the end (default 5; 0 skips).")
        parser.add_argument("--validate-timeout", type=int, default=120,
                            help="Seconds the test tasks get (default 120).")

    def handle(self, *args, action, **options):
        self.options = options
        handler = getattr(self, "do_" + action.replace("-", "_"))
        try:
            # What it changes (mode, pauses, runs) is audited as coming from this command and the account running it.
            with audit_via(f"manage.py migrate_to_rq {action} (account {command_account()})"):
                return handler(**options)
        except runs.RunError as error:
            raise CommandError(str(error)) from None
        except ValidationError as error:
            messages = error.message_dict if hasattr(error, "error_dict") else {"": error.messages}
            raise CommandError("; ".join(f"{name}: {' '.join(texts)}" if name else " ".join(texts)
                                         for name, texts in messages.items())) from None

    # --- helpers ---------------------------------------------------------------------------------------------
    def _confirm(self, question: str, yes: bool) -> None:
        if yes:
            return
        if not sys.stdin.isatty():
            raise CommandError(f"{question} Add --yes to confirm (no terminal to ask on).")
        answer = input(f"{question} Type 'yes' to continue: ")
        if answer.strip().lower() != "yes":
            raise CommandError("Cancelled; nothing was changed.")

    def _json(self, value) -> bool:
        if self.options.get("json"):
            self.stdout.write(json.dumps(value, indent=2, default=str))
            return True
        return False

    def _execute(self, run: MigrationRun, *, one_phase: bool = False, user=None) -> MigrationRun:
        quiet = self.options.get("no_progress") or self.options.get("verbosity", 1) == 0 or self.options.get("json")
        bars: dict[int, tqdm] = {}

        def on_progress(phase):
            if quiet or not phase.progress_total:
                return
            bar = bars.get(phase.pk)
            if bar is None:
                bar = bars[phase.pk] = tqdm(total=phase.progress_total, desc=runs.PHASE_TITLES.get(phase.name),
                                            unit="task" if phase.name in ("migrate", "backup", "return_tasks")
                                            else "step", file=self.stderr._out, leave=True)
            bar.total = max(bar.total or 0, phase.progress_total)
            bar.n = phase.progress_done
            bar.refresh()

        def on_log(level, message):
            if not self.options.get("json") and self.options.get("verbosity", 1) > 0:
                (self.stderr if level == "error" else self.stdout).write(f"  {message}")

        def on_phase(phase):
            bar = bars.pop(phase.pk, None)
            if bar is not None:
                bar.close()
            if not self.options.get("json"):
                self.stdout.write(f"{runs.PHASE_TITLES.get(phase.name, phase.name)}: {phase.state}")

        run = runs.run_execute(run=run, user=user, one_phase=one_phase, on_progress=on_progress, on_log=on_log,
                               on_phase=on_phase)
        for bar in bars.values():
            bar.close()
        if not self._json({"run": run.pk, "state": run.state, "failure_reason": run.failure_reason}):
            for line in runs.run_status_lines(run):
                self.stdout.write(line)
        if run.state == MigrationRun.State.FAILED:
            raise CommandError(f"{run} stopped: {run.failure_reason}. Fix the cause, then: "
                               "manage.py migrate_to_rq resume (or rollback).")
        return run

    def _open_or_given(self, run_id):
        if run_id is not None:
            run = MigrationRun.objects.filter(pk=run_id).first()
            if run is None:
                raise CommandError(f"No migration run {run_id}.")
            return run
        run = state.open_run()
        if run is None:
            raise CommandError("No run is open: start one with manage.py migrate_to_rq start.")
        return run

    # --- actions -------------------------------------------------------------------------------------------------
    def do_preflight(self, **options):
        report = preflight_report()
        if not self._json(report.as_dict()):
            for check in report.checks:
                self.stdout.write(f"{'ok    ' if check.ok else 'FAILED'} {check.name:<22} {check.detail}")
        if not report.ok:
            raise CommandError(f"{len(report.failures)} check(s) failed: "
                               + ", ".join(check.name for check in report.failures))

    def do_start(self, *, yes, soak, batch_size, drain_timeout, validate_tasks, validate_timeout, **options):
        run_options = {"soak_seconds": soak, "batch_size": batch_size, "drain_timeout": drain_timeout,
                       "validate_tasks": validate_tasks, "validate_timeout": validate_timeout}
        current = state.open_run()
        if current is not None:
            raise CommandError(f"{current} is {current.get_state_display().lower()}: "
                               "manage.py migrate_to_rq resume (or rollback) first.")
        runs.options_clean(run_options)
        self._confirm("This pauses submission, stops the database pollers and moves every queued database task to "
                      "RQ.", yes)
        run = runs.run_create(user=None, options=run_options)
        self.stdout.write(f"{run} created.")
        self._execute(run)

    def do_status(self, **options):
        run = MigrationRun.objects.order_by("-pk").first()
        row = state.system_mode()
        status = dispatch.ModePolicy().status().as_dict()
        if self._json({"dispatch": status, "run": None if run is None else {
                "id": run.pk, "kind": run.kind, "state": run.state, "failure_reason": run.failure_reason,
                "phases": [{"name": p.name, "state": p.state, "done": p.progress_done, "total": p.progress_total,
                            "counts": p.counts} for p in run.phases.order_by("order")]}}):
            return
        paused = f"paused ({row.paused_reason})" if row.paused_now() else "open"
        self.stdout.write(f"Mode: {row.mode}; submission {paused}; fallback "
                          f"{'ACTIVE' if row.fallback_active else 'off'}.")
        if run is None:
            self.stdout.write("No migration run yet.")
            return
        for line in runs.run_status_lines(run):
            self.stdout.write(line)

    def do_resume(self, *, run=None, actor=None, **options):
        target, user = self._open_or_given(run), self._actor(actor)
        audit(user=user, action="migration_run_resume", target=str(target))
        self._execute(target, user=user)

    def do_advance(self, *, run=None, actor=None, **options):
        target, user = self._open_or_given(run), self._actor(actor)
        audit(user=user, action="migration_run_advance", target=str(target))
        self._execute(target, one_phase=True, user=user)

    @staticmethod
    def _actor(username):
        if not username:
            return None
        from django.contrib.auth import get_user_model

        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"--actor: no user {username!r}")
        return user

    def do_verify(self, **options):
        run = state.open_run() or MigrationRun.objects.order_by("-pk").first()
        direction = "to_database" if run is not None and run.kind == MigrationRun.Kind.ROLLBACK else "to_rq"
        if run is None and state.system_mode().mode == Mode.LEGACY:
            direction = "to_database"
        # The baseline is compared only while its run is open: once the run has ended (its own verification stands),
        # requeues and clean-ups legitimately change the tasks it counted.
        compared = run is not None and run.state in state.OPEN_STATES and bool(run.baseline)
        report = verification(direction=direction, baseline=run.baseline if compared else None)
        if not self._json(report):
            jobs = report["jobs"]
            if "error" in jobs:
                self.stdout.write(jobs["error"])
            else:
                self.stdout.write(f"{jobs['waiting_tasks']} queued RQ task(s), {jobs['queue_entries']} job(s) in "
                                  f"the queues; missing {jobs['missing_jobs']}, duplicated {jobs['duplicate_jobs']}, "
                                  f"without a task {jobs['jobs_without_task']}")
            for name, count in report["left_behind"].items():
                self.stdout.write(f"{name.replace('_', ' ')}: {count}")
            for group in report.get("tally", {}).get("groups", []):
                self.stdout.write(f"{group['group']:<18} before {group['before']:>8} now {group['after']:>8} "
                                  f"{'ok' if group['ok'] else 'MISMATCH'}")
            self.stdout.write(f"completed more than once: {report['ran_twice']}")
        if not report["ok"]:
            raise CommandError("Verification failed: " + "; ".join(report["problems"]))
        if not options.get("json"):
            if compared:
                self.stdout.write(self.style.SUCCESS(f"Verified: jobs match tasks, nothing is left behind, and the "
                                                     f"counts and checksums match the baseline of {run}."))
            else:
                why = f"{run} has ended" if run is not None else "no migration run has taken one"
                self.stdout.write(self.style.SUCCESS(f"Verified: jobs match tasks and nothing is left behind (no "
                                                     f"baseline compared: {why})."))

    def do_rollback(self, *, yes, timeout, **options):
        if timeout is not None and timeout < 1:
            raise CommandError("--timeout must be at least 1 second")
        target = state.open_run()
        self._confirm("This sets the mode to legacy and returns every queued RQ task to the database poller "
                      "(their jobs are removed from Redis).", yes)
        run = runs.rollback_create(user=None, of=target if target and target.kind == "migration" else None,
                                   options={"rollback_timeout": timeout} if timeout is not None else None)
        self.stdout.write(f"{run} created.")
        self._execute(run)

    def do_mode(self, *, mode=None, rq_percent=None, **options):
        if mode is None:
            row = state.system_mode()
            if not self._json(dispatch.ModePolicy().status().as_dict()):
                self.stdout.write(f"{row.mode} (hybrid RQ share {row.hybrid_rq_percent} %)")
            return
        row = dispatch.mode_set(mode=mode, user=None, hybrid_rq_percent=rq_percent)
        self.stdout.write(f"Mode is now {row.mode}" + (f" ({row.hybrid_rq_percent} % to RQ)"
                                                        if row.mode == Mode.HYBRID else "") + ".")

    def do_pause_submission(self, *, reason, duration=None, **options):
        length = parse_duration(duration) if duration else None
        row = dispatch.submission_pause(reason=reason, user=None, duration=length)
        until = f" until {row.paused_until:%Y-%m-%d %H:%M:%S} UTC" if row.paused_until else " until resumed"
        self.stdout.write(f"Submission paused{until}: new tasks are accepted and held.")

    def do_resume_submission(self, **options):
        released = dispatch.submission_resume(user=None)
        self.stdout.write(f"Submission resumed; {released} held task(s) released.")

    def do_restore(self, *, file, yes, **options):
        self._confirm(f"Insert the task rows of {file} that this database lacks?", yes)
        quiet = options.get("no_progress") or options.get("verbosity", 1) == 0
        with tqdm(desc="Restoring", unit="task", disable=quiet, file=self.stderr._out) as bar:
            def on_rows(done, total):
                bar.total = total
                bar.n = done
                bar.refresh()

            try:
                result = backup_restore(path=file, on_rows=on_rows)
            except BackupError as error:
                raise CommandError(str(error)) from None
        from migration.models import MigrationEvent

        MigrationEvent.objects.create(kind=MigrationEvent.Kind.RESTORED, detail=result["path"][:500], figures=result)
        audit(user=None, action="migration_restore", target=result["path"][:300], count=result["inserted"],
              detail={name: result[name] for name in ("rows", "inserted", "present", "differing", "conflicting")})
        if not self._json(result):
            self.stdout.write(f"{result['inserted']} task(s) restored; {result['present']} already present"
                              + (f" ({result['differing']} differ from the backup)" if result["differing"] else "")
                              + ".")
        if result["conflicting"]:
            raise CommandError(f"{result['conflicting']} task(s) of the backup were not restored: their idempotency "
                               "key belongs to another task in the database now (the others were restored)")
