"""Caption tasks on Redis Queue: the task rows and their events (``models``), submission and the relay to Redis
(``services``, ``dispatch``, ``broker``), one attempt's execution and its stop (``execution``, ``cancel``,
``captioners``), pauses and suspension (``control``), the RQ job callables (``jobs``), the audit trail (``audit``),
the fleet that runs the work (``fleet``), bulk operations (``operations``), the roles, the API tokens and the admin
pages of tasks.

The tasks' own modules stay at this level rather than in a ``tasks`` package: they are what ``fleet``,
``operations`` and the other apps build on (``models`` must stay here for Django anyway), and ``cancel`` and
``control`` are among them because the broker and an attempt's execution read them, not only the fleet.
"""
