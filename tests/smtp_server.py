"""A small real SMTP server on 127.0.0.1 for the tests (standard library only).

It speaks enough of RFC 5321 for ``smtplib``: EHLO/HELO, MAIL, RCPT, DATA
(with dot-unstuffing), RSET, NOOP, QUIT, and keeps every message it received
as an ``email.message.EmailMessage`` with its envelope. ``slow_seconds`` makes
it a slow server: it answers the end of DATA one byte every ``slow_seconds``
and notes when the client goes away (``closed_at``, ``time.monotonic()``). It serves from a
thread of the test process, so subprocesses (``airflow dags test``) reach it too.
"""

from __future__ import annotations

import email
import email.policy
import select
import socketserver
import threading
import time
from dataclasses import dataclass


@dataclass
class Received:
    sender: str
    recipients: list[str]
    message: email.message.EmailMessage

    def body(self) -> str:
        """The text of every text part, decoded."""
        parts = [part.get_content() for part in self.message.walk() if part.get_content_maintype() == "text"]
        return "\n".join(parts)


class _Handler(socketserver.StreamRequestHandler):
    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def drip(self, data: bytes, server: SMTPServer) -> None:
        """Send ``data`` one byte every ``server.slow_seconds``; note when the client hangs up."""
        for value in data:
            try:
                self.wfile.write(bytes([value]))
                self.wfile.flush()
                readable, _, _ = select.select([self.connection], [], [], server.slow_seconds)
                if readable and not self.connection.recv(1024):
                    break
            except OSError:
                break
        server.closed_at = time.monotonic()

    def handle(self) -> None:
        server: SMTPServer = self.server  # type: ignore[assignment]
        self.reply("220 127.0.0.1 test SMTP ready")
        sender, recipients = None, []
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line[:4].upper()
            if verb == "EHLO":
                self.reply("250-127.0.0.1")
                self.reply("250 8BITMIME")
            elif verb == "HELO":
                self.reply("250 127.0.0.1")
            elif verb == "MAIL":
                sender, recipients = line.split(":", 1)[1].strip().strip("<>"), []
                self.reply("250 OK")
            elif verb == "RCPT":
                if sender is None:
                    self.reply("503 MAIL first")
                    continue
                recipients.append(line.split(":", 1)[1].strip().strip("<>"))
                self.reply("250 OK")
            elif verb == "DATA":
                if not recipients:
                    self.reply("503 RCPT first")
                    continue
                self.reply("354 end data with <CR><LF>.<CR><LF>")
                lines = []
                while True:
                    data = self.rfile.readline()
                    if not data or data in (b".\r\n", b".\n"):
                        break
                    lines.append(data[1:] if data.startswith(b"..") else data)
                message = email.message_from_bytes(b"".join(lines), policy=email.policy.default)
                server.deliver(Received(sender, list(recipients), message))
                sender, recipients = None, []
                if server.slow_seconds:
                    self.drip(b"250 OK queued\r\n", server)
                    return
                self.reply("250 OK queued")
            elif verb == "RSET":
                sender, recipients = None, []
                self.reply("250 OK")
            elif verb == "NOOP":
                self.reply("250 OK")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("502 command not implemented")


class SMTPServer(socketserver.ThreadingTCPServer):
    """``SMTPServer()`` listens on 127.0.0.1 on a free port; ``start()`` serves in a thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, slow_seconds: float | None = None):
        super().__init__(("127.0.0.1", port), _Handler)
        self.slow_seconds = slow_seconds
        self.closed_at: float | None = None
        self.port = self.server_address[1]
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def deliver(self, received: Received) -> None:
        with self._lock:
            self.messages.append(received)

    def start(self) -> SMTPServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

