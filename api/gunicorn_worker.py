"""The API's gunicorn worker: gunicorn's `gevent_pywsgi` (its processes, timeouts and
graceful restarts; gevent's own WSGI server parsing and answering the HTTP).

gunicorn's `gevent` worker parses and answers each request with gunicorn's own HTTP code,
which cost the API ~10 % more CPU per request than gevent's `pywsgi` in an alternating
A/B of echo jobs (BENCHMARKS.md, 2026-12-05). pywsgi also sends a response's head with
its body in one write. What gunicorn's worker did around that is kept here:

- An idle keep-alive connection closes after gunicorn's `keepalive` seconds (5).
- A keep-alive connection closes after `SPOOL_API_KEEPALIVE_REQUESTS` requests (like
  nginx's `keepalive_requests`), so the client's next connection goes to whichever
  process accepts it first, the least busy one. Without it, connections opened in a
  burst (a batch client's pool, a proxy's upstream keep-alives) can all land on one
  process and stay there: one process at 100 % of a core, the other idle.
- A request body the app did not read (a 413) is not read off the socket afterwards
  when it is large: the connection closes instead.
- A process accepts one connection at a time when there are several processes, so a
  burst spreads over them.

Spool logs its own line per request (spool.logs.hot): pywsgi's access line is off.
"""

from __future__ import annotations

import os

import gevent
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler, PyWSGIServer

KEEPALIVE_REQUESTS = int(os.environ.get("SPOOL_API_KEEPALIVE_REQUESTS", "20"))
UNREAD_MAX = 64 * 1024  # bytes of a request's body read off and dropped after the app


class Handler(PyWSGIHandler):
    """One client connection's requests (pywsgi makes one handler per connection)."""

    served = 0
    idle_s = 5.0  # gunicorn's `keepalive`, set by the worker

    def read_requestline(self) -> str:
        if not self.served:
            return super().read_requestline()
        with gevent.Timeout(self.idle_s, False):  # silent: the block just ends
            return super().read_requestline()
        return ""  # idle too long: pywsgi closes the connection

    def read_request(self, raw_requestline: str) -> bool:
        ok = super().read_request(raw_requestline)
        self.served += 1
        if KEEPALIVE_REQUESTS and self.served % KEEPALIVE_REQUESTS == 0:
            self.close_connection = True  # answered with `Connection: close`
        return ok

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info=None):
        if self._body_left_unread():
            self.close_connection = True
        # pywsgi says `Connection: close` only to HTTP/1.0 clients; an HTTP/1.1 client must
        # hear it too, or it may send its next request on the closing connection.
        if self.close_connection and not any(k.lower() == "connection" for k, _ in headers):
            headers = [*headers, ("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def _body_left_unread(self) -> bool:
        """Whether the app answers with more of the request's body unread than is worth
        reading off the socket (a 413 for the 10 GB a client declared): pywsgi would
        read it all before the next request; the connection closes instead, as with
        gunicorn's worker."""
        body = self.wsgi_input
        if body is None:
            return False
        if body.chunked_input:
            return body.chunk_length != 0  # 0 once its last chunk was read; unknown length
        return (body.content_length or 0) - body.position > UNREAD_MAX

    def run_application(self) -> None:
        try:
            super().run_application()
        finally:
            body = self.wsgi_input
            if self.close_connection and body is not None:
                # nothing left for pywsgi to read off a connection that closes
                body.content_length, body.position, body.chunked_input = 0, 0, False

    def log_request(self) -> None:
        pass


class Server(PyWSGIServer):
    max_accept = 1


class Worker(GeventPyWSGIWorker):
    server_class = Server
    wsgi_handler = Handler

    def init_process(self) -> None:
        Handler.idle_s = float(self.cfg.keepalive or 0) or Handler.idle_s
        super().init_process()
