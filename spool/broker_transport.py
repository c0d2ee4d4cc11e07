"""kombu's Redis transport, with one reusable client per channel instead of one per call.

kombu builds a new `redis.Redis` for every publish, and a worker builds two more per
message it receives (the unacked record, then the ack). Each construction copies
redis-py's table of ~170 response callbacks: ~110 µs of CPU, paid on the API's submit
path and twice on the worker's pick-up path. A `redis.Redis` is safe to share between
threads (each command checks a connection out of the pool), so one per channel and
pool does the same work. The blocking (asynchronous) client of the consumer is left
as kombu makes it.

Selected by `broker_transport` in celery_config.py; the URL still says where Redis is.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None
    _shared_for: Any = None  # the pool the shared client was made for

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        if self._shared_for is not pool:  # first use, or kombu made a new pool
            self._shared_client = super()._create_client()
            self._shared_for = pool
        return self._shared_client


class Transport(kombu_redis.Transport):
    Channel = Channel
