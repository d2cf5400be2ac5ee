"""Real servers on the loopback that receive what the worker's notification
delivery sends (src/notify.c): an SMTP server (aiosmtpd) that records every
message it accepts, an HTTP receiver that verifies each event's signature
with Stripe's own library (the code a platform already has for Stripe's
webhooks), and a black hole that accepts connections and never answers.

Each can inject faults: SMTP replies (4xx, 5xx) at RCPT or DATA, HTTP
statuses, and delays after a message was received but before it is
acknowledged (for crashes between sending and recording).
"""
import asyncio
import email
import email.policy
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmtpSink:
    """An SMTP server on 127.0.0.1.  `messages` holds what it accepted:
    dicts with mail_from, rcpt_tos, raw (bytes) and msg (a parsed
    email.message.EmailMessage).  Faults: `rcpt_replies` and `data_replies`
    are lists of SMTP replies given to the next RCPT / DATA commands (one
    each, in order; empty: accept); `reply_for` maps a recipient to a reply
    for every RCPT to it.  `hold_seconds` delays the answer to DATA after
    the message was recorded."""

    def __init__(self, port=None, starttls_context=None, implicit_tls_context=None, logins=None):
        """starttls_context: offer (and require) STARTTLS; implicit_tls_context:
        TLS from the first byte (smtps://); logins: {user: password} to
        require AUTH (after TLS when TLS is offered)."""
        self.port = port or free_port()
        self.messages = []
        self.attempts = 0
        self.rcpt_replies = []
        self.data_replies = []
        self.reply_for = {}
        self.hold_seconds = 0.0
        self.logins = logins
        self.auth_attempts = []
        self.implicit_tls = implicit_tls_context is not None
        self.lock = threading.Lock()
        kwargs = {}
        if starttls_context is not None:
            kwargs.update(tls_context=starttls_context, require_starttls=True)
        if implicit_tls_context is not None:
            kwargs.update(ssl_context=implicit_tls_context)
        if logins is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True,
                          auth_require_tls=starttls_context is not None)   # (implicit TLS: it is, aiosmtpd cannot tell)
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult
        login = auth_data.login.decode() if isinstance(auth_data.login, bytes) else auth_data.login
        password = auth_data.password.decode() if isinstance(auth_data.password, bytes) else auth_data.password
        ok = self.logins.get(login) == password
        self.auth_attempts.append({"mechanism": mechanism, "login": login, "ok": ok})
        return AuthResult(success=ok, handled=False)

    def start(self):
        self.controller.start()
        return self

    def stop(self):
        self.controller.stop()

    @property
    def url(self):
        return f"{'smtps' if self.implicit_tls else 'smtp'}://127.0.0.1:{self.port}"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            reply = self.reply_for.get(address) or (self.rcpt_replies.pop(0) if self.rcpt_replies else None)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.attempts += 1
            reply = self.data_replies.pop(0) if self.data_replies else None
        if reply:
            return reply
        raw = envelope.original_content or envelope.content
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        tls = session.ssl is not None or self.implicit_tls
        with self.lock:
            self.messages.append({"mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos),
                                  "raw": raw, "msg": msg, "at": time.time(), "tls": tls,
                                  "authenticated": bool(session.authenticated)})
        if self.hold_seconds:
            await asyncio.sleep(self.hold_seconds)
        return "250 Message accepted for delivery"

    def by_event(self):
        """Messages by X-QES-Event-Id: what a receiver that deduplicates keeps."""
        out = {}
        for m in self.messages:
            out.setdefault(m["msg"]["X-QES-Event-Id"], []).append(m)
        return out

    def wait_for(self, count, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.messages) >= count:
                return True
            time.sleep(0.02)
        return False


def parts(msg):
    """The plain-text and HTML parts of a multipart/alternative message."""
    text = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    return (text.get_content() if text else None, html.get_content() if html else None)


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 receiving the platform's notification
    events.  Every request is kept in `requests` with its headers, body,
    parsed event and whether its QES-Signature verified (Stripe's verifier,
    with the shared secret).  `statuses` lists the statuses of the next
    answers (empty: 200); `hold_seconds` delays each answer."""

    def __init__(self, secret, port=None):
        self.secret = secret
        self.port = port or free_port()
        self.requests = []
        self.statuses = []
        self.hold_seconds = 0.0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                verified, error = receiver.verify(body, self.headers.get("QES-Signature"))
                try:
                    event = json.loads(body)
                except ValueError:
                    event = None
                with receiver.lock:
                    receiver.requests.append({"headers": dict(self.headers), "body": body, "event": event,
                                              "verified": verified, "error": error, "at": time.time()})
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                if receiver.hold_seconds:
                    time.sleep(receiver.hold_seconds)
                if not verified:
                    status = 400
                out = json.dumps({"received": verified}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def verify(self, body, header):
        import stripe
        try:
            verifier = stripe.WebhookSignature
        except AttributeError:  # older layouts
            from stripe.webhook import WebhookSignature as verifier
        try:
            verifier.verify_header(body.decode(), header, self.secret, tolerance=300)
            return True, None
        except Exception as e:  # noqa: BLE001 - any refusal is recorded
            return False, str(e)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/qes/notifications"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def events(self):
        """Verified events, deduplicated by id as a receiver would."""
        out = {}
        for r in self.requests:
            if r["verified"] and r["event"]:
                out.setdefault(r["event"]["id"], r["event"])
        return out

    def wait_for(self, count, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.requests) >= count:
                return True
            time.sleep(0.02)
        return False


def self_signed_cert(directory):
    """A certificate for 127.0.0.1 and localhost (openssl), readable by the
    server's user: returns (cert, key) paths."""
    import subprocess
    cert, key = os.path.join(directory, "smtp-cert.pem"), os.path.join(directory, "smtp-key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    os.chmod(directory, 0o755)
    os.chmod(cert, 0o644)
    return cert, key


def server_tls_context(cert, key):
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


class BlackHole:
    """Accepts TCP connections and never says a word (an SMTP server that
    hangs before its greeting)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while self.running:
            try:
                c, _ = self.sock.accept()
                self.conns.append(c)
            except OSError:
                return

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.running = False
        self.sock.close()
        for c in self.conns:
            c.close()
