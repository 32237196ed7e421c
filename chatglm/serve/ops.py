# What sits around the routes: the browser guard (Host allow-list against DNS rebinding, JSON-only POSTs against
# cross-site form posts, which a browser sends without a preflight), one access-log line per request, and the
# Prometheus metrics behind /metrics.
from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .openai import error_response

log = logging.getLogger("chatglm.access")
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]


def default_allowed_hosts(host: str) -> list[str] | None:
    """The Host names a server bound to `host` answers to: loopback names for a loopback bind, the address and the
    loopback names for a specific address, anything (None) for a wildcard bind (name them with --allowed-hosts)."""
    if host in ("", "0.0.0.0", "::"):
        return None
    if host in LOOPBACK_NAMES or host.startswith("127."):
        return LOOPBACK_NAMES + ([host] if host not in LOOPBACK_NAMES else [])
    return [host] + LOOPBACK_NAMES


def host_name(header: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(name: str, allowed: list[str]) -> bool:
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class Record:
    """One request as the access log and the metrics see it; the handlers fill in the tokens."""

    def __init__(self, method: str, path: str):
        self.method, self.path = method, path
        self.start = time.perf_counter()
        self.status = 0
        self.stream = None  # the engine stream: its prompt and generated token counts
        self.first_token: float | None = None
        self.prompt_text: str | None = None

    def token(self):
        if self.first_token is None:
            self.first_token = time.perf_counter()

    @property
    def tokens(self) -> tuple[int, int]:
        s = self.stream
        return (len(s.request.prompt), s.num_generated) if s is not None else (0, 0)


def record(request) -> Record | None:
    """The access-log record of a request (None outside the Guard middleware)."""
    return request.scope.get("chatglm.record")


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("chatglm_requests", "HTTP requests", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("chatglm_prompt_tokens", "prompt tokens of generation requests", registry=r)
        self.completion_tokens = Counter("chatglm_completion_tokens", "generated tokens", registry=r)
        Gauge("chatglm_queue_depth", "requests waiting for a slot", registry=r).set_function(lambda: engine.waiting)
        Gauge("chatglm_active_slots", "requests being decoded", registry=r).set_function(lambda: engine.active)
        Gauge("chatglm_max_batch", "decode slots", registry=r).set(engine.max_batch)
        self.ttft = Histogram("chatglm_time_to_first_token_seconds", "request start to first generated token",
                              registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.rate = Histogram("chatglm_decode_tokens_per_second", "tokens/s of each request after its first token",
                              registry=r, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))

    def observe(self, rec: Record, route: str):
        self.requests.labels(route, str(rec.status)).inc()
        prompt, completion = rec.tokens
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)
        if rec.first_token is not None:
            self.ttft.observe(rec.first_token - rec.start)
            took = time.perf_counter() - rec.first_token
            if completion > 1 and took > 0:
                self.rate.observe((completion - 1) / took)


class Guard:
    """ASGI middleware: the Host check, the JSON-only POSTs, the access-log line and the metrics."""

    def __init__(self, app, metrics: Metrics, routes: set[str], allowed_hosts: list[str] | None,
                 log_prompts: bool = False):
        self.app, self.metrics, self.routes = app, metrics, routes
        self.allowed_hosts, self.log_prompts = allowed_hosts, log_prompts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rec = scope["chatglm.record"] = Record(scope["method"], scope["path"])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                rec.status = message["status"]
            await send(message)

        try:
            rejection = self.check(scope["method"], headers)
            if rejection is not None:
                await rejection(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            self.done(rec, scope.get("client"))

    def check(self, method: str, headers: dict):
        host = host_name(headers.get("host", ""))
        if self.allowed_hosts is not None and not host_allowed(host, self.allowed_hosts):
            return error_response(400, f"Host {host!r} is not served here (DNS rebinding guard); start the server "
                                       f"with --allowed-hosts {host or 'NAME'} to allow it", code="host_not_allowed")
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if method == "POST" and media != "application/json":
            return error_response(415, f"send the body as Content-Type: application/json (got {media or 'none'})",
                                  code="unsupported_media_type")
        return None

    def done(self, rec: Record, client):
        route = rec.path if rec.path in self.routes else "other"
        self.metrics.observe(rec, route)
        prompt, completion = rec.tokens
        line = (f"{client[0] if client else '-'} {rec.method} {rec.path} {rec.status or 499} prompt_tokens={prompt} "
                f"completion_tokens={completion} {time.perf_counter() - rec.start:.3f}s")
        if self.log_prompts and rec.prompt_text is not None:
            line += f" prompt={rec.prompt_text!r:.2000}"
        log.info(line)
