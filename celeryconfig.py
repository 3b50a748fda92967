"""Celery configuration: plain lowercase settings, read from the one Settings object.

Choices, each deliberate:
- JSON only: a pickled message is refused (pickle from a broker is remote code execution).
- acks_late + reject_on_worker_lost: a job is acknowledged after it ran; if the pool child
  dies mid-job the message goes back to the queue instead of being lost.
- prefetch above 1, yet no job parked on a busy worker: the parent holds the messages of
  unfinished jobs back from its busy child and acknowledges those a batch-mate ran
  (tasks/parent_gate.py); the child takes its work from the shared ready lists.
- no ack emulation: kombu's Redis transport would keep every fetched message in an
  "unacked" hash (a MULTI to fetch, another to acknowledge: two round trips and eight
  commands a job, a fifth of the broker's work in `inferq bench fleet`) only to bring it back
  after `visibility_timeout` if the whole worker died. inferq does not need that: a job's id
  waits in its lane's ready list (core.recovery) until a worker takes it, what a dead worker
  took goes back through its processing list, and an idle worker child that sees ready jobs
  with no message left in their broker queue sends one (`tasks.child`). A pool child that
  dies still has its message given back by the parent (reject_on_worker_lost), and a warm
  shutdown gives back every message the parent held.
"""

from kombu import Exchange, Queue

from core import redis_conn
from core.config import get_settings

_s = get_settings()

broker_url = _s.redis_url
broker_connection_retry_on_startup = True
broker_transport_options = {
    "ack_emulation": False,
    "socket_timeout": 30,
    "socket_connect_timeout": 5,
    "health_check_interval": 30,
    # Queues listed first are served first (see worker -Q order in Settings.queues).
    "queue_order_strategy": "priority",
}
if redis_conn.is_sentinel(broker_url):  # Celery's sentinel:// transport, as core.redis_conn reads it
    broker_transport_options["master_name"] = _s.redis_sentinel_master
    broker_transport_options["sentinel_kwargs"] = redis_conn.sentinel_timeouts(_s.redis_timeout_s)
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"
task_ignore_result = True  # the job record in Redis is the result store
task_acks_late = True
task_reject_on_worker_lost = True
task_acks_on_failure_or_timeout = True
worker_prefetch_multiplier = _s.worker_prefetch or 4 * _s.max_batch_size + 1  # concurrency 1
worker_concurrency = 1
worker_pool = "prefork"
worker_proc_alive_timeout = _s.worker_proc_alive_timeout_s
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True
task_time_limit = _s.job_time_limit_s
worker_hijack_root_logger = False
# One direct exchange per lane: a message sent to one lane lands in that lane only. A worker
# declares its own model's lanes (core.lanes); other models' lanes are named when sent.
task_queues = [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in _s.queues]
task_default_queue = _s.queues[1]  # this model's jobs lane (core.lanes)
task_create_missing_queues = False
