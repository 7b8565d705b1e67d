"""Caption tasks on Redis Queue: the task rows and their events (``models``), submission and the relay to Redis
(``services``, ``dispatch``, ``broker``), one attempt's execution and its stop (``execution``, ``cancel``,
``captioners``), pauses and suspension (``control``), the RQ job callables (``jobs``), the audit trail (``audit``),
the fleet that runs the work (``fleet``), bulk operations (``operations``), the roles, the fleet API and the admin
pages of tasks.
"""
