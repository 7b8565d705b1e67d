"""Settings come from the environment and a bad value stops start-up with a message naming the variable."""

import json
import os
import subprocess
import sys

import pytest
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured

from portal.env import check_redis_url, env_bool, env_choice, env_int, env_list, parse_database_url


def load_settings(tmp_path, **variables):
    """Imports portal.settings in a fresh interpreter with exactly these variables; returns (ok, output)."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in {"DATABASE_URL", "REDIS_URL", "RQ_REDIS_URL", "SECRET_KEY", "DEBUG", "PORTAL_LOCAL",
                                 "REDIS_SENTINELS"}}
    environment.update({"PORTAL_VAR_DIR": str(tmp_path / "var"), "SECRET_KEY": "s" * 40, **variables})
    code = ("import portal.settings as s; "
            "print(s.DATABASES['default']['ENGINE'], s.REDIS_URL, s.RQ_DEFAULT_TIMEOUT, s.RQ_MAX_RETRIES, "
            "s.CAPTION_BACKEND, s.RQ_QUEUES['low'].get('URL'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=django_settings.BASE_DIR, env=environment,
                            capture_output=True, text=True, timeout=60)
    return result.returncode == 0, (result.stdout + result.stderr).strip()


@pytest.mark.parametrize("name, value, message", [
    ("DATABASE_URL", "postgres://db/portal", "DATABASE_URL must start with sqlite:// or mysql://"),
    ("DATABASE_URL", "mysql://user@/", "DATABASE_URL must look like mysql://"),
    ("REDIS_URL", "http://localhost:6379", "REDIS_URL must start with redis://"),
    ("RQ_REDIS_URL", "localhost:6379", "RQ_REDIS_URL must start with redis://"),
    ("REDIS_SENTINELS", "10.0.0.1", "REDIS_SENTINELS must be a comma-separated list of host:port pairs, e.g. "
     "10.0.0.1:26379,10.0.0.2:26379; '10.0.0.1' is not one"),
    ("REDIS_SENTINELS", "a:26379,b:263790", "'b:263790' is not one"),
    ("REDIS_SENTINELS", " , ", "REDIS_SENTINELS must be a comma-separated list with at least one entry"),
    ("REDIS_MAX_CONNECTIONS", "1", "REDIS_MAX_CONNECTIONS must be at least 2"),
    ("REDIS_POOL_TIMEOUT", "soon", "REDIS_POOL_TIMEOUT must be a number"),
    ("RQ_DEFAULT_TIMEOUT", "ninety", "RQ_DEFAULT_TIMEOUT must be a whole number; got 'ninety'"),
    ("RQ_DEFAULT_TIMEOUT", "0", "RQ_DEFAULT_TIMEOUT must be at least 1"),
    ("RQ_MAX_RETRIES", "-1", "RQ_MAX_RETRIES must be at least 0"),
    ("RQ_RESULT_TTL", "1h", "RQ_RESULT_TTL must be a whole number"),
    ("DEBUG", "maybe", "DEBUG must be one of true/false"),
    ("CAPTION_BACKEND", "gpt", "CAPTION_BACKEND must be one of local, ollama; got 'gpt'"),
    ("OLLAMA_URL", "ollama:11434", "OLLAMA_URL must be an http:// or https:// URL"),
    ("IMAGE_FETCH_ALLOW_PRIVATE", "sometimes", "IMAGE_FETCH_ALLOW_PRIVATE must be one of true/false"),
    ("SECRET_KEY", "short", "SECRET_KEY must be at least 32 characters"),
    ("SECURE_HSTS_SECONDS", "1y", "SECURE_HSTS_SECONDS must be a whole number; got '1y'"),
    ("SECURE_HSTS_SECONDS", "-5", "SECURE_HSTS_SECONDS must be at least 0"),
    ("SECURE_HSTS_INCLUDE_SUBDOMAINS", "all", "SECURE_HSTS_INCLUDE_SUBDOMAINS must be one of true/false"),
    ("SECURE_HSTS_PRELOAD", "please", "SECURE_HSTS_PRELOAD must be one of true/false"),
    ("SECURE_SSL_REDIRECT", "https", "SECURE_SSL_REDIRECT must be one of true/false"),
    ("SECURE_PROXY_SSL_HEADER", "X-Forwarded-Proto: https",
     "SECURE_PROXY_SSL_HEADER must be an HTTP header name such as X-Forwarded-Proto"),
    ("SECURE_PROXY_SSL_HEADER", "X_FORWARDED_PROTO",
     "SECURE_PROXY_SSL_HEADER must be an HTTP header name such as X-Forwarded-Proto"),
    ("TRUSTED_PROXY_HEADER", "X-Forwarded-For, X-Real-IP", "TRUSTED_PROXY_HEADER must be an HTTP header name"),
    ("TRUSTED_PROXY_COUNT", "0", "TRUSTED_PROXY_COUNT must be at least 1"),
    ("RQ_MIN_WORKERS", "12", "RQ_MIN_WORKERS (12) must not be above RQ_MAX_WORKERS (10)"),
    ("RQ_SCALE_DOWN_THRESHOLD", "150", "RQ_SCALE_DOWN_THRESHOLD must be below RQ_SCALE_UP_THRESHOLD"),
    ("RQ_AUTO_SCALING_ENABLED", "yes please", "RQ_AUTO_SCALING_ENABLED must be one of true/false"),
    ("CSRF_TRUSTED_ORIGINS", "ops.example.com",
     "CSRF_TRUSTED_ORIGINS must list origins with their scheme, e.g. https://ops.example.com; got 'ops.example.com'"),
    ("CSRF_TRUSTED_ORIGINS", "https://ops.example.com/admin/",
     "CSRF_TRUSTED_ORIGINS must list origins with their scheme, e.g. https://ops.example.com; got "
     "'https://ops.example.com/admin/'"),
])
def test_bad_value_raises_improperly_configured_naming_the_variable(tmp_path, name, value, message):
    ok, output = load_settings(tmp_path, **{name: value})
    assert not ok
    assert "ImproperlyConfigured" in output and message in output


def test_database_polling_off_needs_rq_and_leaves_the_fallback_alone(tmp_path):
    ok, output = load_settings(tmp_path, DATABASE_POLLING_ENABLED="false", RQ_ENABLED="false")
    assert not ok and "RQ_ENABLED and DATABASE_POLLING_ENABLED are both false" in output
    ok, output = load_settings(tmp_path, DATABASE_POLLING_ENABLED="false", RQ_HYBRID_MODE="true")
    assert not ok and "RQ_HYBRID_MODE needs both RQ_ENABLED and DATABASE_POLLING_ENABLED" in output
    # The old system's usual setting after its migration: RQ only, the poller only as Redis' fallback.
    ok, output = load_settings(tmp_path, DATABASE_POLLING_ENABLED="false", RQ_FALLBACK_ENABLED="true")
    assert ok, output


def test_defaults_are_embedded_sqlite_and_redis_with_old_task_settings(tmp_path):
    ok, output = load_settings(tmp_path, SECRET_KEY="")
    assert ok, output
    engine, redis_url, timeout, retries, backend, queue_url = output.splitlines()[-1].split()
    assert engine == "portal.sqlite3"
    assert redis_url == f"unix://{tmp_path / 'var' / 'redis' / 'redis.sock'}?db=0" == queue_url
    assert (timeout, retries, backend) == ("90", "3", "local")
    assert (tmp_path / "var" / "secret_key").stat().st_mode & 0o777 == 0o600


def test_legacy_redis_variable_and_database_url_are_accepted(tmp_path):
    ok, output = load_settings(tmp_path, RQ_REDIS_URL="redis://cache.internal:6380/2",
                               DATABASE_URL="mysql://portal:s3cret@db.internal:3306/portal",
                               RQ_DEFAULT_TIMEOUT="120", CAPTION_BACKEND="ollama")
    assert ok, output
    assert output.splitlines()[-1].split() == [
        "django_prometheus.db.backends.mysql", "redis://cache.internal:6380/2", "120", "3", "ollama",
        "redis://cache.internal:6380/2"]


def test_production_refuses_to_start_without_secret_key(tmp_path):
    ok, output = load_settings(tmp_path, SECRET_KEY="", DATABASE_URL="mysql://portal:pw@db:3306/portal")
    assert not ok and "SECRET_KEY must be set when DATABASE_URL, REDIS_URL or REDIS_SENTINELS is" in output
    ok, output = load_settings(tmp_path, SECRET_KEY="", REDIS_URL="redis://r:6379/0")
    assert not ok and "SECRET_KEY must be set" in output
    ok, output = load_settings(tmp_path, DEBUG="false", SECRET_KEY="x" * 40, REDIS_URL="redis://r:6379/0")
    assert ok, output
    assert not (tmp_path / "var" / "secret_key").exists()


def test_sentinel_settings_replace_redis_url(tmp_path):
    ok, output = load_settings(tmp_path, SECRET_KEY="", REDIS_SENTINELS="10.0.0.1:26379")
    assert not ok and "SECRET_KEY must be set" in output  # a deployment, like REDIS_URL
    ok, output = load_settings(tmp_path, REDIS_SENTINELS="10.0.0.1:26379", REDIS_URL="redis://r:6379/0")
    assert not ok and "REDIS_URL and REDIS_SENTINELS are both set; set one" in output
    code = ("import portal.settings as s; print(s.REDIS_URL, s.EMBEDDED_REDIS, s.REDIS_SENTINELS, "
            "s.RQ_QUEUES['low']['SENTINELS'], s.RQ_QUEUES['low']['MASTER_NAME'], s.RQ_QUEUES['low']['PASSWORD'])")
    environment = {key: value for key, value in os.environ.items() if key not in {"REDIS_URL", "RQ_REDIS_URL"}}
    environment.update({"PORTAL_VAR_DIR": str(tmp_path / "var"), "SECRET_KEY": "s" * 40,
                        "REDIS_SENTINELS": "10.0.0.1:26379, [::1]:26380", "REDIS_SENTINEL_MASTER": "captions",
                        "REDIS_DB": "3", "REDIS_PASSWORD": "data-secret"})
    result = subprocess.run([sys.executable, "-c", code], cwd=django_settings.BASE_DIR, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "sentinel://10.0.0.1:26379,::1:26380/captions/3", "False", "[('10.0.0.1',", "26379),", "('::1',", "26380)]",
        "[('10.0.0.1',", "26379),", "('::1',", "26380)]", "captions", "data-secret"]


def test_env_helpers_parse_strictly():
    assert env_bool("FLAG", False, environ={"FLAG": "Yes"}) is True
    assert env_bool("FLAG", True, environ={"FLAG": "off"}) is False
    assert env_bool("FLAG", True, environ={}) is True
    assert env_int("N", 3, environ={"N": " 7 "}) == 7
    with pytest.raises(ImproperlyConfigured, match="N must be at most 5"):
        env_int("N", 3, maximum=5, environ={"N": "6"})
    assert env_list("HOSTS", [], environ={"HOSTS": "a.example, b.example,"}) == ["a.example", "b.example"]
    with pytest.raises(ImproperlyConfigured, match="HOSTS must be a comma-separated list"):
        env_list("HOSTS", [], environ={"HOSTS": " , "})
    assert env_choice("B", "local", ("local", "ollama"), environ={}) == "local"
    assert check_redis_url("REDIS_URL", "unix:///run/redis.sock") == "unix:///run/redis.sock"
    with pytest.raises(ImproperlyConfigured, match="REDIS_URL has an invalid port"):
        check_redis_url("REDIS_URL", "redis://localhost:99999999/0")


def test_database_url_parsing(tmp_path):
    sqlite = parse_database_url("DATABASE_URL", "sqlite:///data/portal.db", base_dir=tmp_path)
    assert sqlite["NAME"] == str(tmp_path / "data" / "portal.db")
    mysql = parse_database_url("DATABASE_URL", "mysql://u%40x:p%2Fw@db:3307/jobs?unix_socket=/run/m.sock",
                               base_dir=tmp_path)
    assert (mysql["USER"], mysql["PASSWORD"], mysql["HOST"], mysql["PORT"], mysql["NAME"]) == (
        "u@x", "p/w", "db", "3307", "jobs")
    assert mysql["OPTIONS"]["unix_socket"] == "/run/m.sock"


def settings_values(tmp_path, names, **variables) -> dict:
    """The named settings as portal.settings computes them in a fresh interpreter from exactly these variables."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in {"DATABASE_URL", "REDIS_URL", "RQ_REDIS_URL", "SECRET_KEY", "DEBUG", "PORTAL_LOCAL"}
                   and not key.startswith(("SECURE_", "CSRF_", "TRUSTED_PROXY_"))}
    environment.update({"PORTAL_VAR_DIR": str(tmp_path / "var"), "SECRET_KEY": "s" * 40, **variables})
    code = f"import json, portal.settings as s; print(json.dumps({{n: getattr(s, n, None) for n in {names!r}}}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=django_settings.BASE_DIR, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


HTTPS_SETTINGS = ["SECURE_PROXY_SSL_HEADER", "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS",
                  "SECURE_HSTS_PRELOAD", "SECURE_SSL_REDIRECT", "CSRF_TRUSTED_ORIGINS"]


def test_https_settings_are_off_unless_set(tmp_path):
    assert settings_values(tmp_path, HTTPS_SETTINGS) == {
        "SECURE_PROXY_SSL_HEADER": None, "SECURE_HSTS_SECONDS": 0, "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_HSTS_PRELOAD": False, "SECURE_SSL_REDIRECT": False, "CSRF_TRUSTED_ORIGINS": []}


def test_https_settings_come_from_the_environment(tmp_path):
    values = settings_values(tmp_path, HTTPS_SETTINGS, SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
                             SECURE_HSTS_SECONDS="31536000", SECURE_HSTS_INCLUDE_SUBDOMAINS="true",
                             SECURE_HSTS_PRELOAD="yes", SECURE_SSL_REDIRECT="on",
                             CSRF_TRUSTED_ORIGINS="https://ops.example.com, https://*.ops.example.com:8443")
    assert values == {
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"], "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True, "SECURE_HSTS_PRELOAD": True, "SECURE_SSL_REDIRECT": True,
        "CSRF_TRUSTED_ORIGINS": ["https://ops.example.com", "https://*.ops.example.com:8443"]}


def test_trusted_proxy_settings(tmp_path):
    names = ["TRUSTED_PROXY_HEADER", "TRUSTED_PROXY_COUNT"]
    assert settings_values(tmp_path, names) == {"TRUSTED_PROXY_HEADER": None, "TRUSTED_PROXY_COUNT": 1}
    assert settings_values(tmp_path, names, TRUSTED_PROXY_HEADER="X-Forwarded-For", TRUSTED_PROXY_COUNT="2") == {
        "TRUSTED_PROXY_HEADER": "HTTP_X_FORWARDED_FOR", "TRUSTED_PROXY_COUNT": 2}


@pytest.mark.django_db
def test_the_old_autoscaling_variables_seed_the_default_pool_when_it_is_created(settings):
    import importlib

    from django.apps import apps

    from queues.models import WorkerPool

    seed = importlib.import_module("queues.migrations.0003_default_pool")
    WorkerPool.objects.filter(name="default").delete()
    settings.DEFAULT_POOL_SEED = {"autoscale": True, "minimum": 3, "maximum": 8, "scale_up_threshold": 40,
                                  "scale_down_threshold": 5, "scale_up_cooldown": 60, "scale_down_cooldown": 120}
    seed.create_default_pool(apps, None)
    pool = WorkerPool.objects.get(name="default")
    assert (pool.autoscale, pool.desired, pool.minimum, pool.maximum, pool.scale_up_threshold,
            pool.scale_down_threshold, pool.scale_up_cooldown, pool.scale_down_cooldown) == (
        True, 3, 3, 8, 40, 5, 60, 120)
    settings.DEFAULT_POOL_SEED = {**settings.DEFAULT_POOL_SEED, "maximum": 20}
    seed.create_default_pool(apps, None)  # a second start leaves the row (and the admin's changes) alone
    assert WorkerPool.objects.get(name="default").maximum == 8
