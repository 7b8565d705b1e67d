"""Monitoring of the queue system, in three wings: ``metrics`` (what is measured, health, the history, who may read
it), ``alerts`` (rules, evaluation, actions, notifications; builds on metrics) and ``live`` (the dashboard pushed
over WebSockets; builds on metrics). The models, the matcher syntax they validate with (``matchers``, pure), the
RQ job callables (``jobs``), the commands and the URL table stay at this level, where Django finds them.
"""
