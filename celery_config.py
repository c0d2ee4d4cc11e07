"""Celery settings (lowercase keys), read by both the API's sender and the workers.

The design keeps Celery out of the correctness path: PostgreSQL holds every job,
a worker *claims* its job with one conditional UPDATE and keeps a lease on it,
and the sweeper (beat) re-sends what Redis lost. Each non-default value says why.
"""

from __future__ import annotations

from spool import settings as _settings

_s = _settings.get()

broker_url = _s.redis_url
# kombu's Redis transport, minus a new Redis client object per call (see the module).
# Plain redis:// only: rediss:// and sentinel:// keep kombu's own scheme handling.
broker_transport = "spool.broker_transport:Transport" if broker_url.startswith("redis://") else None
# PostgreSQL holds results; Celery's result backend would only duplicate them.
result_backend = None
task_ignore_result = True

# Ack when the task starts, not when it ends. With Redis, late acks plus a long GPU
# job means the message reappears after `visibility_timeout` and a second worker
# runs the job again. Here a lost message is harmless: the running job holds a
# lease in PostgreSQL, and the sweeper re-sends a job whose worker died.
task_acks_late = False
task_reject_on_worker_lost = False
# One reserved message per slot. Not `worker_disable_prefetch`: with it, kombu only
# re-polls Redis on its 1 s timer after a slot frees, capping a slot at ~1 job/s.
# A message reserved by a worker that is then SIGKILLed is not lost: the worker
# cleared the job's sent-marker on receipt, so the sweeper re-sends the job.
worker_prefetch_multiplier = 1

broker_transport_options = {
    # Emulated priorities: one Redis list per step, popped in order (0 first).
    "priority_steps": [0, 3, 6],
    "sep": ":",
    # No unacked record per message (kombu's ack emulation: one MULTI when a worker
    # takes a message, another when it acks, each on the pick-up path). A message is a
    # token, not the job: one a SIGKILLed worker had reserved is made up by the sweeper's
    # top-up (jobs queued past SPOOL_RESEND_GRACE_S), sooner than a visibility timeout
    # would restore it; a worker shutting down puts its reserved ones back itself.
    "ack_emulation": False,
    # A dead Redis must fail a publish in seconds (the API still answers 202:
    # the job is in PostgreSQL and the sweeper sends it later).
    "socket_timeout": 5,
    "socket_connect_timeout": 2,
    "health_check_interval": 10,
    "retry_on_timeout": True,
}
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # workers wait for Redis forever
broker_pool_limit = 50
# A running job survives a broker blip: it lives in PostgreSQL, not in the message.
worker_cancel_long_running_tasks_on_connection_loss = False

task_serializer = "json"
accept_content = ["json"]
task_default_queue = "spool.default"
task_create_missing_queues = True
task_publish_retry = False  # the sweeper is the retry; never block the API on Redis
worker_hijack_root_logger = False
worker_redirect_stdouts = False
worker_send_task_events = False
task_send_sent_event = False
worker_enable_remote_control = True

task_routes = {
    "spool.sweep": {"queue": "spool.cpu"},
    "spool.deliver_webhook": {"queue": "spool.cpu"},
}
beat_schedule = {
    "sweep": {"task": "spool.sweep", "schedule": _s.sweep_interval_s, "options": {"expires": 30}},
}
