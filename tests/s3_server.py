"""The S3 server of the tests: moto's S3 backend served one request at a time on 127.0.0.1.

moto speaks the S3 REST protocol, conditional writes included
(``If-None-Match: *`` and ``If-Match`` on PutObject answer 412
PreconditionFailed). Its own ``ThreadedMotoServer`` handles requests on
concurrent threads, and moto's PutObject checks the condition and stores the
object in separate steps under no common lock (moto/s3/responses.py), so its
atomicity there would rest on thread scheduling. Served here by a
single-threaded werkzeug server, each request runs to its end before the next
begins: every conditional write is atomic by construction, as on S3
(tests/test_store.py races eight clients for one key). Requests use HTTP/1.0
(one request per connection), so no idle client holds the server.

Run it alone (``python tests/s3_server.py --port 9000``) for a store that
outlives one test process.
"""

from __future__ import annotations

import argparse
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


class S3Server:
    """moto's S3 on ``host:port`` (0: a free port), from a thread of this process; ``endpoint`` once started."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, threaded: bool = False):
        application = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(host, port, application, threaded=threaded, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> S3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    arguments = parser.parse_args()
    server = make_server(arguments.host, arguments.port, DomainDispatcherApplication(create_backend_app),
                         threaded=False, request_handler=MotoRequestHandler)
    print(f"S3 on http://{arguments.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
