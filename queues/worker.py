"""The worker class every caption worker uses (settings.RQ['WORKER_CLASS'], and ``manage.py rqworker``).

It runs jobs in its own process like rq's SimpleWorker: forking a work horse per job costs about 4x the
throughput here, and the supervisor isolates failures at the process level instead. It always dequeues with the
JSON serializer and ``CaptionJob`` whatever it is given, so pickled or forged jobs fail without running.
"""

from django.db import close_old_connections
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from queues.broker import CaptionJob


class CaptionWorker(SimpleWorker):
    job_class = CaptionJob

    def __init__(self, queues, *args, **kwargs):
        kwargs["serializer"] = JSONSerializer
        kwargs["job_class"] = CaptionJob
        super().__init__(queues, *args, **kwargs)

    def perform_job(self, job, queue):
        # The database may have closed an idle connection while we waited for this job (MySQL wait_timeout):
        # drop stale connections before the job and after it, as Django does around each request.
        close_old_connections()
        try:
            return super().perform_job(job, queue)
        finally:
            close_old_connections()
