"""Django settings. Every value that differs between deployments comes from the environment.

REVIEWAPP_ENV selects the defaults: ``production`` (the default: strict, nothing assumed),
``demo`` (the embedded first run) or ``test``. See .env.example for every variable.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from kombu import Queue as KombuQueue

from reviewapp.queues import ALL_QUEUES

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    """An empty value counts as unset, so a blank line in a .env file keeps the default."""
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from exc


def env_list(name: str, default: str = "") -> list[str]:
    return [part.strip() for part in env_str(name, default).split(",") if part.strip()]


# pytest (>= 8.2) announces itself with PYTEST_VERSION, so a bare `pytest` gets test defaults.
REVIEWAPP_ENV = env_str("REVIEWAPP_ENV", "test" if os.environ.get("PYTEST_VERSION") else "production")
if REVIEWAPP_ENV not in {"production", "demo", "test"}:
    raise ImproperlyConfigured("REVIEWAPP_ENV must be one of production, demo, test")
IS_PRODUCTION = REVIEWAPP_ENV == "production"

VAR_DIR = Path(env_str("REVIEWAPP_VAR_DIR", str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if IS_PRODUCTION:
        raise ImproperlyConfigured(
            "SECRET_KEY is required in production (set REVIEWAPP_ENV=demo for a local trial)"
        )
    SECRET_KEY = f"insecure-{REVIEWAPP_ENV}-key-not-for-production"

DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "" if IS_PRODUCTION else "127.0.0.1,localhost")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "django_htmx",
    "reviewapp.core",
    "reviewapp.ingest",
    "reviewapp.review",
    "scoring",
    "actions",
    "reviewapp.exports",
    "reviewapp.observability",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "reviewapp.core.logging.CorrelationIdMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "reviewapp.core.middleware.ContentSecurityPolicyMiddleware",
    "reviewapp.core.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "reviewapp.urls"
WSGI_APPLICATION = "reviewapp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "reviewapp.core.context_processors.roles",
            ],
        },
    },
]

# --- Database: PostgreSQL in production, an SQLite file as the embedded default ---------------
DEFAULT_SQLITE = f"sqlite:///{VAR_DIR / 'reviewapp.sqlite3'}"
DATABASE_URL = env_str("DATABASE_URL", DEFAULT_SQLITE)
_db = dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 60), conn_health_checks=True)
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # Web and worker share the file: wait for locks instead of failing, and take the write
    # lock at BEGIN so two writers never deadlock upgrading from a read lock.
    _db["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    _db["CONN_MAX_AGE"] = 0
    # A file, not memory, so that a live worker process can share the test database.
    _db["TEST"] = {"NAME": str(VAR_DIR / "test-reviewapp.sqlite3")}
if env_str("TEST_DATABASE_NAME"):
    _db["TEST"] = {"NAME": env_str("TEST_DATABASE_NAME")}
DATABASES = {"default": _db}
IS_POSTGRES = _db["ENGINE"] == "django.db.backends.postgresql"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
if REVIEWAPP_ENV == "test":
    # Hashing is the slowest part of making test users; the suite never stores real passwords.
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# ModelBackend with the permission set in one query (reviewapp/core/roles.py): every signed-in request
# checks capabilities.
AUTHENTICATION_BACKENDS = ["reviewapp.core.roles.CapabilityBackend"]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
# Outside production, serve straight from the app directories without collectstatic.
WHITENOISE_USE_FINDERS = not IS_PRODUCTION
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / "media")))
ARTIFACT_ROOT = Path(env_str("ARTIFACT_ROOT", str(VAR_DIR / "artifacts")))
UPLOAD_ROOT = MEDIA_ROOT / "uploads"
EXPORT_ROOT = MEDIA_ROOT / "exports"
MAX_UPLOAD_BYTES = env_int("MAX_UPLOAD_BYTES", 1024**3)
# Streamed uploads go to disk past this size instead of memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024**2
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024**2
SHARED_DATA_DIR = Path(env_str("REVIEWAPP_SHARED_DATA", str(BASE_DIR.parent / "shared" / "data")))

# --- Security ----------------------------------------------------------------------------------
_secure_default = IS_PRODUCTION and not DEBUG
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", _secure_default)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", _secure_default)
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
# A working day; a reviewer idle past it signs in again.
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 8 * 3600)
CSRF_COOKIE_SAMESITE = "Lax"
# htmx reads the token from the page (hx-headers on <body>), never from the cookie.
CSRF_COOKIE_HTTPONLY = True
SESSION_COOKIE_NAME = "__Host-sessionid" if SESSION_COOKIE_SECURE else "sessionid"
CSRF_COOKIE_NAME = "__Host-csrftoken" if CSRF_COOKIE_SECURE else "csrftoken"
# Login rate limit (reviewapp/core/ratelimit.py): failures per username + address within the window.
LOGIN_RATE_LIMIT_FAILURES = env_int("LOGIN_RATE_LIMIT_FAILURES", 10)
LOGIN_RATE_LIMIT_WINDOW = env_int("LOGIN_RATE_LIMIT_WINDOW", 300)
# The limiter's counts. locmem is per process; with several web processes set CACHE_REDIS_URL.
CACHE_REDIS_URL = env_str("CACHE_REDIS_URL")
CACHES = {
    "default": (
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_REDIS_URL}
        if CACHE_REDIS_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "reviewapp"}
    )
}
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", _secure_default)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if _secure_default else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# Preloading is a domain-wide, hard-to-undo commitment the operator opts into (SECURE_HSTS_PRELOAD=true);
# until then its deploy warning is expected.
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("BEHIND_TLS_PROXY") else None
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# --- REST framework ----------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "reviewapp.core.api.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    # `?format=` is ours (csv/jsonl/parquet exports), not DRF's renderer override.
    "URL_FORMAT_OVERRIDE": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "reviewapp API",
    "DESCRIPTION": "Human-in-the-loop review of machine-learning decisions.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Two models have a `mode` choice set; name both enums instead of a generated hash name.
    "ENUM_NAME_OVERRIDES": {
        "PolicyModeEnum": "reviewapp.review.models.Policy.Mode",
        "BatchModeEnum": "reviewapp.ingest.models.IngestBatch.Mode",
    },
}

# --- Celery --------------------------------------------------------------------------------------
# The embedded default is kombu's filesystem transport: no server, but a real separate worker.
BROKER_DIR = VAR_DIR / "broker"
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    for sub in ("queue", "processed", "control"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        # Broadcast (pidbox) files; kombu's default is ./control in the working directory.
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
elif CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # Unacked messages are redelivered after this; task time limits stay below it.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_QUEUES = [KombuQueue(name) for name in ALL_QUEUES]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_TIME_LIMIT = 1800
CELERY_TASK_SOFT_TIME_LIMIT = 1700
CELERY_TASK_DEFAULT_QUEUE = "maintenance"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_TASK_ROUTES = {
    "ingest.*": {"queue": "ingest"},
    "scoring.score_items": {"queue": "scoring"},
    "scoring.train_model": {"queue": "training"},
    "actions.*": {"queue": "actions"},
    "exports.*": {"queue": "exports"},
    "review.*": {"queue": "maintenance"},
}
CELERY_BEAT_SCHEDULE = {
    "reconcile": {"task": "review.reconcile", "schedule": 30.0},
    "release-expired-leases": {"task": "review.release_expired_leases", "schedule": 30.0},
    "scoring-check-retraining": {"task": "scoring.check_retraining", "schedule": 300.0},
    "observability-evaluate-alerts": {"task": "observability.evaluate_alerts", "schedule": 60.0},
    "observability-compute-drift": {"task": "observability.compute_drift", "schedule": 3600.0},
}

# --- Domain knobs ----------------------------------------------------------------------------
CLAIM_LEASE_SECONDS = env_int("CLAIM_LEASE_SECONDS", 600)
REVIEW_UNDO_SECONDS = env_int("REVIEW_UNDO_SECONDS", 300)
# Independent hash chains of the audit trail: up to this many transactions write audit events at once.
AUDIT_CHAINS = env_int("AUDIT_CHAINS", 32)
SCORING_CHUNK_SIZE = env_int("SCORING_CHUNK_SIZE", 2000)
RECONCILE_STUCK_SECONDS = env_int("RECONCILE_STUCK_SECONDS", 120)
MAX_TASK_ATTEMPTS = env_int("MAX_TASK_ATTEMPTS", 5)

LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
# JSON lines (one object per record, with the correlation id) in production; readable text elsewhere.
LOG_FORMAT = env_str("LOG_FORMAT", "json" if IS_PRODUCTION else "plain")
if LOG_FORMAT not in {"json", "plain"}:
    raise ImproperlyConfigured("LOG_FORMAT must be json or plain")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"correlation": {"()": "reviewapp.core.logging.CorrelationIdFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] %(message)s"},
        "json": {"()": "reviewapp.core.logging.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["correlation"]},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
# The worker keeps the LOGGING above (JSON lines, correlation ids) instead of installing its own format.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
