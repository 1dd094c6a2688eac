"""A local HTTP server for the download tests: files by name, failures on demand, requests counted.

It listens on 127.0.0.1 only, on a port the OS picks, in a daemon thread.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
import contextlib
import http.server
import socket
import threading


class FileServer:
  """Serves ``files`` at ``url + name``.

  ``failures[name]`` is a list of what the next requests of ``name`` get, one
  entry each, then the file itself: ``404`` or ``500`` (that status),
  ``"cut"`` (the headers of the whole file, half its bytes, then the
  connection closed) or ``bytes`` (served instead of the file).
  """

  def __init__(self, files: dict[str, bytes]):
    self.files = dict(files)
    self.failures: dict[str, list] = collections.defaultdict(list)
    self.requests: collections.Counter[str] = collections.Counter()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        server.requests[name] += 1
        failure = server.failures[name].pop(0) if server.failures[name] else None
        if name not in server.files or failure == 404:
          self.send_error(404)
          return
        if failure == 500:
          self.send_error(500)
          return
        body = failure if isinstance(failure, bytes) else server.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if failure == "cut":
          self.wfile.write(body[:len(body) // 2])
          self.wfile.flush()
          self.connection.shutdown(socket.SHUT_RDWR)
          self.close_connection = True
          return
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._httpd.server_port}/"
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
    self._thread.start()

  def close(self) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()


@contextlib.contextmanager
def serving(files: dict[str, bytes]) -> Iterator[FileServer]:
  server = FileServer(files)
  try:
    yield server
  finally:
    server.close()


def closed_port_url() -> str:
  """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/"
