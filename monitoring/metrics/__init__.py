"""The metrics wing: what the queue system measures and how healthy it is.

One snapshot of Redis and the database (``snapshot``) feeds the scrape-time Prometheus metrics (``collectors``), the
health report and readiness (``health``) and the JSON APIs (``views``); every process adds to counters and histograms
shared in Redis (``recorder``); ``sampler`` keeps the per-minute history and the figures computed from it;
``monitors`` records the passes of the portal's own monitors; ``access`` says who may read any of it. Nothing here
knows about alerts or the live dashboard: both build on this wing.
"""
