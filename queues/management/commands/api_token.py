from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import IntegrityError, transaction
from django.utils import timezone

from queues.audit import audit, audit_via, command_account
from queues.fleet.admin import MANAGE_FLEET
from queues.models import ApiToken

DEFAULT_DAYS = 90


class Command(BaseCommand):
    help = ("Tokens for the HTTP API (/api/v1/, described at /api/schema/; the fleet calls /api/rq/workers/*). A token "
            "acts as its user, an active staff member, with that user's permissions: a Support user's token reads, an "
            "Operator's acts, an Admin's configures. The token is shown once.")

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True, metavar="create|list|revoke")
        create = actions.add_parser("create", help="Issue a token and print it (once).")
        create.add_argument("name", help="What will use it, e.g. 'runbook on ops-1' (unique).")
        create.add_argument("--user", required=True, help="The username the token acts as.")
        lifetime = create.add_mutually_exclusive_group()
        lifetime.add_argument("--days", type=int, default=DEFAULT_DAYS,
                              help=f"Days until it expires and is refused (default {DEFAULT_DAYS}).")
        lifetime.add_argument("--no-expiry", action="store_true", help="It never expires (revoke it by hand).")
        create.add_argument("--rate", type=int, default=None,
                            help="Requests a second it may make on /api/v1/, bursts of twice that (default: the "
                                 "API_RATE_LIMIT setting).")
        actions.add_parser("list", help="The tokens, without their secret.")
        revoke = actions.add_parser("revoke", help="Revoke a token by name: its calls are refused from now on.")
        revoke.add_argument("name")

    def handle(self, *args, action, **options):
        # Audited as this command and the account running it: the token's owner did not issue or revoke it.
        with audit_via(f"manage.py api_token {action} (account {command_account()})"):
            getattr(self, f"_{action}")(**options)

    def _create(self, *, name, user, days=DEFAULT_DAYS, no_expiry=False, rate=None, **options):
        name = name.strip()
        if not no_expiry and not 1 <= days <= 3650:
            raise CommandError(f"--days must be between 1 and 3650; got {days} (or give --no-expiry)")
        if rate is not None and not 1 <= rate <= 10000:
            raise CommandError(f"--rate must be between 1 and 10000 requests a second; got {rate}")
        expires_at = None if no_expiry else timezone.now() + timedelta(days=days)
        if not name or len(name) > 100:
            raise CommandError("name: give 1 to 100 characters")
        try:
            owner = get_user_model().objects.get(username=user)
        except get_user_model().DoesNotExist:
            raise CommandError(f"--user: no user named {user!r}") from None
        if not owner.is_active or not owner.is_staff:
            raise CommandError(f"--user: {user!r} is not an active staff member, so the token would be refused")
        try:
            with transaction.atomic():  # a savepoint: a taken name leaves the caller's transaction usable
                token, raw = ApiToken.issue(name=name, user=owner, expires_at=expires_at, rate_limit=rate)
        except IntegrityError:
            raise CommandError(f"name: a token named {name!r} exists already") from None
        audit(user=None, action="api_token_create", target=token.name,
              detail={"token_user": owner.username, "rate_limit": rate})
        self.stdout.write(raw)
        lasts = f"expires {expires_at:%Y-%m-%d %H:%M %Z}" if expires_at else "never expires"
        self.stderr.write(f"Token {token.name!r} for {owner.username} ({lasts}): keep it now, it is not shown again. "
                          "Send it as 'Authorization: Bearer <token>'.")
        if not owner.has_perm(MANAGE_FLEET):
            self.stderr.write(f"{owner.username} lacks {MANAGE_FLEET}: the token reads and acts on /api/v1/ as far "
                              "as their role allows, but cannot call the fleet API (/api/rq/workers/*).")

    def _list(self, **options):
        tokens = list(ApiToken.objects.select_related("user"))
        if not tokens:
            self.stdout.write("No API tokens.")
        for token in tokens:
            if token.revoked_at:
                state = f"revoked {token.revoked_at:%Y-%m-%d %H:%M}"
            elif token.expires_at and token.expires_at <= timezone.now():
                state = f"expired {token.expires_at:%Y-%m-%d %H:%M}"
            else:
                state = f"active until {token.expires_at:%Y-%m-%d %H:%M}" if token.expires_at else "active"
            used = f"last used {token.last_used_at:%Y-%m-%d %H:%M}" if token.last_used_at else "never used"
            rate = f"{token.rate_limit}/s" if token.rate_limit else "default rate"
            self.stdout.write(f"{token.name}\t{token.prefix}…\t{token.user.username}\t{state}\t{used}\t{rate}")

    def _revoke(self, *, name, **options):
        updated = ApiToken.objects.filter(name=name, revoked_at__isnull=True).update(revoked_at=timezone.now())
        if not updated:
            raise CommandError(f"no active token named {name!r} (manage.py api_token list)")
        token = ApiToken.objects.select_related("user").get(name=name)
        audit(user=None, action="api_token_revoke", target=name, detail={"token_user": token.user.username})
        self.stdout.write(f"Revoked {name!r}.")
