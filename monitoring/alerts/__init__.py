"""The alerts wing: alert rules, their evaluation, the operators' actions, and who is told.

``rules`` says which figures rules watch (read from the metrics wing's snapshot); ``evaluate`` judges every rule
on each pass (one evaluator per deployment, a lease in the database); ``actions`` are the operators' acknowledge,
shelve and silence; ``ingest`` records Prometheus Alertmanager's alerts; ``timeline`` is what evaluate and ingest
share (an alert's fingerprint, timeline rows, resolving); ``notify`` plans and delivers the messages through
``transports``; ``watch`` lets the sampler judge a silent evaluator; ``retention``, ``selectors``, ``exports``
(Prometheus rules, Alertmanager configuration), ``views`` and ``admin`` (one module per page) complete it. Builds
on the metrics wing; never on the live wing (its events reach the dashboards through signals the models send).
"""
