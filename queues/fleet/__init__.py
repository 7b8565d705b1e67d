"""The fleet: the processes that run caption work and the services that steer them.

``supervisor`` keeps each pool's worker processes running on a host (lease, restarts, scaling, the relay);
``worker`` is the RQ worker with its caption slots; ``reconcile`` finds attempts whose worker died and gives their
tasks back; ``services`` are the operators' fleet actions (scale, restart, stop a job, suspend, autoscale) and the
fleet's state; ``admin`` their pages. The pauses they obey (``queues.control``) and the stop of one attempt
(``queues.cancel``) are lower: the broker and the attempt's execution read them too.
"""
