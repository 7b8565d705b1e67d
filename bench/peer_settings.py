"""The portal's settings with bench/peer_urls.py as the URL table: for benchmarks that start a web server serving
the portal and its peers side by side (bench/api.py)."""

from portal.settings import *  # noqa: F401,F403

ROOT_URLCONF = "bench.peer_urls"
