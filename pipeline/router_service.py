"""`slm-router`: an OpenAI-compatible service that answers with the promoted SLMs where they are
sure and forwards everything else to the fallback LLM (decisions in `pipeline.router`).

    slm-router [--registry DIR|URL] [--landing DIR] [--host 127.0.0.1] [--port 8000]

    POST /v1/chat/completions   OpenAI chat completions: messages, tools, tool_calls, stream
    GET  /v1/models             the served routes and the fallback model
    GET  /healthz               liveness and the router.yaml version served (no token needed)
    GET  /metrics               Prometheus text: requests by path, fallback reasons, latencies

Every response says which path served it: `X-SLM-Served-By` (slm or fallback), `X-SLM-Route`
(route@version, or none), `X-SLM-Reason` (why it was escalated), `X-SLM-Confidence`,
`X-SLM-Latency-Ms` and `X-SLM-Routing-Ms` (embedding and match). The same fields go to the log,
one JSON line per request, and each answered call goes to the landing folder as a trace.

Environment: SLM_ROUTER_TOKENS (comma-separated bearer tokens the API accepts), the fallback's
key in the variable router.yaml names (`fallback.api_key_env`, SLM_FALLBACK_API_KEY by default),
SLM_RAW_ENCRYPTION_KEY and SLM_PSEUDONYM_KEY (the raw zone's keys: the trace log is sealed with
the first, session and user ids in it are pseudonymized with the second), SLM_OUTPUT_DIR and
SLM_LANDING_DIR (where the registry and the landing folder are). A registry on object storage
(an fsspec URL such as s3://bucket/prefix/registry) is served from a local copy under
SLM_WORK_DIR, pulled again at every look for a changed router.yaml.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import anyio
import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from pipeline import promote, rawzone
from pipeline.calls import ROUTER_SLM_MODEL_PREFIX, arguments_problem, json_problem
from pipeline.formats import json_text
from pipeline.router import (
    EmbeddingCache, Match, RouteTable, RouterConfigError, SlmAnswer, SlmEngine, SlmTimeout, TraceWriter,
    slm_model_name, trace_record,
)
from pipeline.remote import Mirror, is_remote, local_copy
from pipeline.store import write_owner_only

log = logging.getLogger("slm_router")

TOKENS_ENV = "SLM_ROUTER_TOKENS"
# Request `model` values that mean "whatever the router picks": forwarded as the fallback model
# (so are the router's own model names from /v1/models, which the fallback does not know).
ROUTER_MODEL_NAMES = ("", "auto", "slm-router")


@dataclass
class RouterSettings:
    registry: Path
    landing_dir: Path | None  # where the trace log goes (None: not written)
    tokens: tuple[str, ...]  # bearer tokens the API accepts; empty: no authentication
    pseudonym_key: str | None = None
    encryption_key: str | None = None  # the raw zone's: trace files are sealed with it (None: plain)
    slm_timeout: float = 10.0  # seconds a request waits for the SLM (queue included) before falling back
    fallback_timeout: float = 120.0
    max_request_bytes: int = 4 * 1024 * 1024
    reload_interval: float = 2.0  # seconds between looks at router.yaml
    registry_mirror: Mirror | None = None  # the registry on object storage, `registry` its local copy
    log_max_records: int = 1000  # a trace file is closed (and visible to ingestion) after this many calls
    log_max_age: float = 300.0  # or after this many seconds
    # the fallback's base URL instead of router.yaml's (a staging endpoint; the demo's replay of logged answers)
    fallback_base_url: str | None = None
    max_concurrency: int = 64  # chat requests in flight; more are answered 503 at once (health and models are not counted)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("slm_router_requests", "Chat completion requests by the path that served them",
                                ["served_by", "route"], registry=self.registry)
        self.fallbacks = Counter("slm_router_fallbacks", "Requests forwarded to the fallback, by reason",
                                 ["reason"], registry=self.registry)
        self.latency = Histogram("slm_router_request_seconds", "Time to answer a request", ["served_by"],
                                 registry=self.registry, buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30, 60, 120))
        self.routing = Histogram("slm_router_routing_seconds", "Embedding and route matching per request",
                                 registry=self.registry, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, 1))
        self.slm = Histogram("slm_router_slm_seconds", "SLM answer time (queue included)", ["route"],
                             registry=self.registry, buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30))
        self.config_version = Gauge("slm_router_config_version", "router.yaml version served", registry=self.registry)
        self.reloads = Counter("slm_router_reloads", "router.yaml reloads by result", ["result"], registry=self.registry)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}},
                            status_code=self.status, headers=headers)


@dataclass
class Decision:
    """How one request was served; becomes response headers and the log line."""

    served_by: str = "fallback"
    route: str | None = None
    nearest: str | None = None
    similarity: float | None = None
    confidence: float | None = None
    reason: str = ""
    routing_ms: float = 0.0

    def headers(self, latency_ms: float) -> dict[str, str]:
        headers = {"X-SLM-Served-By": self.served_by, "X-SLM-Route": self.route or "none",
                   "X-SLM-Latency-Ms": f"{latency_ms:.1f}", "X-SLM-Routing-Ms": f"{self.routing_ms:.2f}"}
        if self.reason:
            headers["X-SLM-Reason"] = self.reason
        if self.confidence is not None:
            headers["X-SLM-Confidence"] = f"{self.confidence:.4f}"
        return headers

    def fields(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


class Router:
    """What requests share: the route table (replaced whole when router.yaml changes, so a request
    sees one version from start to end), the SLM engine, the trace log, the metrics."""

    def __init__(self, settings: RouterSettings, engine: SlmEngine | None = None):
        self.settings = settings
        self.engine = engine or SlmEngine()
        self.embeddings = EmbeddingCache()
        self.metrics = Metrics()
        self.traces = TraceWriter(settings.landing_dir, settings.pseudonym_key, settings.encryption_key,
                                  settings.log_max_records, settings.log_max_age) if settings.landing_dir else None
        self.table: RouteTable | None = None
        self._seen: tuple[int, int] | None = None  # router.yaml's (mtime, size) last read
        self._reload_lock = threading.Lock()
        self.client: httpx.AsyncClient | None = None
        self._in_flight = 0  # chat requests being answered (one event loop: no lock needed)

    # -- router.yaml ---------------------------------------------------------------------------

    def reload(self) -> bool:
        """Serve router.yaml anew if it changed: new adapters are loaded before the new table
        replaces the old one, so no request finds a route whose adapter is missing. A config
        that cannot be served leaves the old one serving (and is counted and logged)."""
        with self._reload_lock:
            if self.settings.registry_mirror:
                try:  # router.yaml is uploaded after the versions it names: a pull never finds it ahead
                    self.settings.registry_mirror.pull(lambda message: log.info(json.dumps({"event": "registry pull",
                                                                                             "message": message})))
                except Exception as err:  # noqa: BLE001 - the bucket out of reach keeps the current config serving
                    log.error(json.dumps({"event": "registry pull failed", "error": f"{type(err).__name__}: {err}"}))
            path = self.settings.registry / promote.ROUTER_CONFIG
            stat = path.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
            if seen == self._seen:
                return False
            try:
                table = RouteTable.load(self.settings.registry)
                self.engine.prepare(table.routes)
                # the embedding models load now, not on the first request
                table.match(json_text([{"role": "user", "content": "warm-up"}]), None, self.embeddings)
            except Exception as err:  # noqa: BLE001 - any failure keeps the old config serving
                self.metrics.reloads.labels("failed").inc()
                log.error(json.dumps({"event": "reload failed", "error": f"{type(err).__name__}: {err}"}))
                if self.table is None:
                    raise
                self._seen = seen  # not retried until the file changes again
                return False
            previous, self.table, self._seen = self.table, table, seen
            keep = {r.key for r in table.routes} | ({r.key for r in previous.routes} if previous else set())
            self.engine.retire(keep)  # the previous version stays loaded for requests still on it
            self.metrics.config_version.set(table.version)
            self.metrics.reloads.labels("ok").inc()
            log.info(json.dumps({"event": "serving", "router_version": table.version,
                                 "routes": [r.key for r in table.routes]}))
            return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            with contextlib.suppress(FileNotFoundError):
                await anyio.to_thread.run_sync(self.reload)
            if self.traces:
                self.traces.rotate_if_old()

    # -- requests ------------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if not self.settings.tokens:
            return
        header = request.headers.get("authorization", "")
        # compared as bytes: the header is any bytes (Starlette decodes it as latin-1), and
        # compare_digest refuses text that is not ASCII
        token = header[7:].strip().encode("latin-1") if header.lower().startswith("bearer ") else b""
        if not token or not any(hmac.compare_digest(token, t.encode()) for t in self.settings.tokens):
            raise ApiError(401, "Missing or invalid bearer token (Authorization: Bearer <token>).", "authentication_error")

    async def read_json(self, request: Request) -> tuple[dict, bytes]:
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"Request body of {int(declared)} bytes is over the limit of {limit} bytes.")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"Request body is over the limit of {limit} bytes.")
        try:
            payload = json.loads(body)
        except RecursionError as err:
            raise ApiError(400, "Request body is not valid JSON: nested too deeply.") from err
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
            raise ApiError(400, f"Request body is not valid JSON: {str(err)[:200]}") from err
        return validate_chat_request(payload), bytes(body)

    async def chat_completions(self, request: Request) -> Response:
        if self._in_flight >= self.settings.max_concurrency:
            self.metrics.requests.labels("rejected", "none").inc()
            return ApiError(503, f"The router is answering {self._in_flight} requests, its limit; retry shortly.",
                            "server_busy").response({"Retry-After": "1"})
        self._in_flight += 1
        try:
            return await self._chat_completion(request)
        finally:
            self._in_flight -= 1

    async def _chat_completion(self, request: Request) -> Response:
        started = time.perf_counter()
        called_at = datetime.now(timezone.utc)
        try:
            self.authorize(request)
            payload, body = await self.read_json(request)
        except ApiError as err:
            self.metrics.requests.labels("rejected", "none").inc()
            return err.response()
        table = self.table
        decision = Decision()
        messages_json = json_text(payload["messages"])
        tools_json = json_text(payload["tools"]) if payload.get("tools") else None
        match = await self.match(table, messages_json, tools_json, decision)
        answer = await self.try_slm(match, payload, messages_json, tools_json, decision)
        context = {"request": request, "payload": payload, "decision": decision, "started": started,
                   "called_at": called_at}
        if answer is not None:
            return self.slm_response(answer, match, context)
        self.metrics.fallbacks.labels(decision.reason.split(":")[0]).inc()
        return await self.forward(table, body, context)

    async def match(self, table: RouteTable, messages_json: str, tools_json: str | None, decision: Decision) -> Match:
        started = time.perf_counter()
        match = await anyio.to_thread.run_sync(table.match, messages_json, tools_json, self.embeddings)
        seconds = time.perf_counter() - started
        self.metrics.routing.observe(seconds)
        decision.routing_ms = seconds * 1000
        decision.nearest, decision.similarity = match.nearest, round(match.similarity, 4)
        return match

    async def try_slm(self, match: Match, payload: dict, messages_json: str, tools_json: str | None,
                      decision: Decision) -> SlmAnswer | None:
        """The SLM's answer when it may serve this call, else None with the reason in `decision`."""
        route = match.route
        if route is None:
            decision.reason = "no route" if match.nearest is None else (
                f"no route: nearest {match.nearest} at similarity {match.similarity:.3f}")
            return None
        decision.route = route.key
        if not route.serves_instructions_of(messages_json, tools_json):
            decision.reason = "instructions changed: the call's system prompt or tools are not those the route was trained with"
            return None
        unsupported = [p for p in ("n", "logprobs", "response_format") if payload.get(p) not in (None, 1, False)]
        if unsupported:
            decision.reason = f"unsupported: {', '.join(unsupported)}"
            return None
        try:
            answer = await anyio.to_thread.run_sync(
                self.engine.answer, route, messages_json, tools_json,
                payload.get("max_completion_tokens") or payload.get("max_tokens"), self.settings.slm_timeout)
        except SlmTimeout as err:
            decision.reason = f"slm timeout: {err}"
            return None
        except Exception as err:  # noqa: BLE001 - any SLM failure is escalated, never returned
            log.exception("SLM failed on %s", route.key)
            decision.reason = f"slm error: {type(err).__name__}"
            return None
        self.metrics.slm.labels(route.key).observe(answer.seconds)
        decision.confidence = round(answer.confidence, 4)
        if answer.message is None:
            decision.reason = f"unreadable answer: {answer.finish_reason}"
        elif answer.finish_reason == "length":
            decision.reason = "cut answer: the answer reached the route's token budget"
        elif answer.confidence < route.threshold:
            decision.reason = f"low confidence: {answer.confidence:.3f} < {route.threshold:.3f}"
        elif payload.get("tool_choice") == "required" and not answer.message.get("tool_calls"):
            decision.reason = "tool call required: the SLM answered without one"
        else:
            decision.served_by = "slm"
            return answer
        return None

    def finish(self, context: dict, status: int, message: dict | None, model: str, finish_reason: str | None,
               usage: dict | None, trace_id: str) -> dict[str, str]:
        """Count, log and trace a served request; the response headers."""
        decision: Decision = context["decision"]
        latency_ms = (time.perf_counter() - context["started"]) * 1000
        served_by = decision.served_by if status < 400 else "error"
        self.metrics.requests.labels(served_by, decision.route or "none").inc()
        self.metrics.latency.labels(served_by).observe(latency_ms / 1000)
        log.info(json.dumps({"event": "request", "id": trace_id, "status": status, "latency_ms": round(latency_ms, 1),
                             **decision.fields()}))
        if self.traces and message is not None and status < 400:
            request, payload = context["request"], context["payload"]
            origin = self.traces.origin({"session_id": request.headers.get("x-session-id"), "user": payload.get("user")})
            self.traces.write(trace_record(
                payload, message, trace_id=trace_id, called_at=context["called_at"], model=model,
                finish_reason=finish_reason, usage=usage, latency_ms=latency_ms, origin=origin,
                decision=decision.fields(), agent=request.headers.get("x-agent-name")))
        return decision.headers(latency_ms)

    def slm_response(self, answer: SlmAnswer, match: Match, context: dict) -> Response:
        trace_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        model = slm_model_name(match.route)
        usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                 "total_tokens": answer.prompt_tokens + answer.completion_tokens}
        created = int(context["called_at"].timestamp())
        headers = self.finish(context, 200, answer.message, model, answer.finish_reason, usage, trace_id)
        if not context["payload"].get("stream"):
            return JSONResponse({"id": trace_id, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [{"index": 0, "message": answer.message, "logprobs": None,
                                              "finish_reason": answer.finish_reason}],
                                 "usage": usage}, headers=headers)
        include_usage = bool((context["payload"].get("stream_options") or {}).get("include_usage"))
        chunks = stream_chunks(answer.message, answer.finish_reason, trace_id, created, model,
                               usage if include_usage else None)
        # The whole answer exists before the first byte is sent (its confidence decides whether it
        # is sent at all), so the stream is its chunks at once, in the OpenAI event format.
        events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
        return StreamingResponse(iter(events), media_type="text/event-stream", headers=headers)

    async def forward(self, table: RouteTable, body: bytes, context: dict) -> Response:
        """The original request, sent to the fallback endpoint; its answer returned as it came."""
        fallback, payload = table.fallback, context["payload"]
        model = payload.get("model")
        if model in ROUTER_MODEL_NAMES or model is None or str(model).startswith(ROUTER_SLM_MODEL_PREFIX):
            model = fallback["model"]
            body = json.dumps({**payload, "model": model}).encode()
        base_url = self.settings.fallback_base_url or fallback["base_url"]
        url = base_url.rstrip("/") + "/chat/completions"
        outgoing = {"content-type": "application/json"}
        key = os.environ.get(fallback.get("api_key_env") or "", "")
        if key:
            outgoing["authorization"] = f"Bearer {key}"
        request = self.client.build_request("POST", url, content=body, headers=outgoing,
                                            timeout=self.settings.fallback_timeout)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as err:
            headers = self.finish(context, 502, None, fallback["model"], None, None, "none")
            return ApiError(502, f"The fallback at {_without_credentials(base_url)} did not answer: {type(err).__name__}",
                            "fallback_error").response(headers)
        if payload.get("stream") and response.status_code < 400:
            return StreamingResponse(self.relay(response, model, context), status_code=response.status_code,
                                     media_type=response.headers.get("content-type", "text/event-stream"),
                                     headers=context["decision"].headers((time.perf_counter() - context["started"]) * 1000))
        content = await response.aread()
        await response.aclose()
        message, finish_reason, usage, trace_id = None, None, None, "none"
        if response.status_code < 400:
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                completion = json.loads(content)
                choice = completion["choices"][0]
                message, finish_reason = choice["message"], choice.get("finish_reason")
                usage, trace_id = completion.get("usage"), completion.get("id") or trace_id
        headers = self.finish(context, response.status_code, message, model, finish_reason, usage, trace_id)
        return Response(content, status_code=response.status_code,
                        media_type=response.headers.get("content-type", "application/json"), headers=headers)

    async def relay(self, response: httpx.Response, model: str, context: dict):
        """Pass the fallback's event stream through as it comes, and trace the answer it spelled."""
        stream = StreamedAnswer()
        try:
            async for chunk in response.aiter_raw():
                stream.feed(chunk)
                yield chunk
        finally:
            await response.aclose()
            self.finish(context, response.status_code, stream.message(), model, stream.finish_reason, stream.usage,
                        stream.id or "none")

    # -- app -----------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        table = self.table
        data = [{"id": slm_model_name(r), "object": "model", "owned_by": "slm-router", "route": r.name, "label": r.label}
                for r in table.routes]
        data.append({"id": table.fallback["model"], "object": "model", "owned_by": "fallback"})
        return JSONResponse({"object": "list", "data": data})

    async def healthz(self, request: Request) -> Response:
        table = self.table
        return JSONResponse({"status": "ok", "router_version": table.version, "routes": [r.key for r in table.routes]})

    async def metrics_text(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        if self.table is None:
            await anyio.to_thread.run_sync(self.reload)
        self.client = httpx.AsyncClient(timeout=self.settings.fallback_timeout)
        watcher = asyncio.create_task(self.watch())
        try:
            yield
        finally:
            watcher.cancel()
            await self.client.aclose()
            if self.traces:
                self.traces.close()

    def app(self) -> Starlette:
        return Starlette(routes=[
            HttpRoute("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            HttpRoute("/v1/models", self.token_required(self.models), methods=["GET"]),
            HttpRoute("/healthz", self.healthz, methods=["GET"]),
            HttpRoute("/metrics", self.token_required(self.metrics_text), methods=["GET"]),
        ], lifespan=self.lifespan)

    def token_required(self, handler):
        """`handler` behind the bearer-token check (chat completions checks it with its body)."""
        async def checked(request: Request) -> Response:
            try:
                self.authorize(request)
            except ApiError as err:
                return err.response()
            return await handler(request)
        return checked


def validate_chat_request(payload) -> dict:
    """The request, if it is a chat completion request the router can route; else a 400."""
    if not isinstance(payload, dict):
        raise ApiError(400, "Request body must be a JSON object.")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of messages.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'.", param=f"messages[{i}]")
    if payload.get("tools") is not None and not isinstance(payload["tools"], list):
        raise ApiError(400, "'tools' must be an array.", param="tools")
    if not isinstance(payload.get("stream", False), bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream")
    # what collection would quarantine: never served, never logged
    if problem := json_problem(payload) or arguments_problem(messages):
        raise ApiError(400, f"Request body cannot be served: {problem}.")
    return payload


def _without_credentials(url: str) -> str:
    """A URL as an error message may show it: no user, password or query (where keys go)."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(userinfo=b"", query=None, fragment=None))


def stream_chunks(message: dict, finish_reason: str, trace_id: str, created: int, model: str,
                  usage: dict | None) -> list[dict]:
    """An answer as the chunks of an OpenAI chat completion stream."""
    def chunk(delta: dict, finish: str | None) -> dict:
        return {"id": trace_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    chunks = [chunk({"role": "assistant", "content": message.get("content") or ""}, None)]
    for index, call in enumerate(message.get("tool_calls") or []):
        chunks.append(chunk({"tool_calls": [{"index": index, **call}]}, None))
    chunks.append(chunk({}, finish_reason))
    if usage is not None:
        chunks.append({"id": trace_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage})
    return chunks


class StreamedAnswer:
    """The assistant message that a chat completion event stream spells out, delta by delta."""

    def __init__(self):
        self._buffer = b""
        self.id: str | None = None
        self.content: list[str] = []
        self.tool_calls: dict[int, dict] = {}
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.complete = False

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            event = line[5:].strip()
            if event == b"[DONE]":
                self.complete = True
                continue
            with contextlib.suppress(ValueError):
                self._chunk(json.loads(event))

    def _chunk(self, chunk: dict) -> None:
        self.id = self.id or chunk.get("id")
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                merged = self.tool_calls.setdefault(call.get("index", 0), {"type": "function", "function": {"arguments": ""}})
                merged["id"] = call.get("id") or merged.get("id")
                function = call.get("function") or {}
                if function.get("name"):
                    merged["function"]["name"] = function["name"]
                merged["function"]["arguments"] += function.get("arguments") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def message(self) -> dict | None:
        """The whole answer, or None when the stream ended before its end."""
        if not self.complete and self.finish_reason is None:
            return None
        message = {"role": "assistant", "content": "".join(self.content) or None}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return message


# A connection must send its request line and headers within HEADER_SECONDS of opening (or of its
# first byte after a keep-alive pause), and its body within BODY_SECONDS after that; one that does
# not is closed. uvicorn times out neither, so without these a few sockets sending half a request
# hold connections open for good (issue 30 found 4 locking every client out). MAX_CONNECTIONS caps
# open connections on their own, apart from the requests in flight (`max_concurrency`): health
# checks and clients with a whole request keep being answered while slow ones wait to be closed.
HEADER_SECONDS, BODY_SECONDS, MAX_CONNECTIONS = 10.0, 60.0, 1024


def guarded_http(header_seconds: float = HEADER_SECONDS, body_seconds: float = BODY_SECONDS):
    """uvicorn's h11 protocol with the header and body deadlines above."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase: str = ""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm("headers", header_seconds)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.SEND_BODY and self._phase != "body":
                self._arm("body", body_seconds)
            elif state is h11.IDLE and self._phase == "":  # the first bytes of the next request on a kept-alive connection
                self._arm("headers", header_seconds)
            elif state not in (h11.IDLE, h11.SEND_BODY):  # the whole request is in: the app has it
                self._disarm()

        def on_response_complete(self) -> None:
            self._disarm()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase, self._deadline = phase, self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline, self._phase = None, ""

        def _too_slow(self) -> None:
            if not self.transport.is_closing():
                log.warning(json.dumps({"event": "connection closed", "reason": f"{self._phase} not received in time",
                                        "client": "%s:%d" % self.client if self.client else None}))
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_options(max_connections: int = MAX_CONNECTIONS, header_seconds: float = HEADER_SECONDS,
                    body_seconds: float = BODY_SECONDS) -> dict:
    """The uvicorn settings the router runs with (the CLI, the demo's replay, the tests)."""
    return {"http": guarded_http(header_seconds, body_seconds), "limit_concurrency": max_connections,
            "timeout_keep_alive": 5}


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, **options):
    """Run an ASGI app on uvicorn in a background thread (with `uvicorn_options`, which `options`
    override); yields its base URL (tests, benchmarks, the demo's replay)."""
    import uvicorn

    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", **{**uvicorn_options(), **options}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def settings_from_args(args: argparse.Namespace) -> RouterSettings:
    tokens = tuple(t.strip() for t in os.environ.get(TOKENS_ENV, "").split(",") if t.strip())
    if not tokens and not args.no_auth:
        raise SystemExit(f"slm-router: set {TOKENS_ENV} to the bearer tokens the API accepts (comma-separated), "
                         "or pass --no-auth to serve without authentication (loopback only)")
    if args.no_auth and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"slm-router: --no-auth is for loopback only; {args.host} is reachable from elsewhere")
    location = args.registry or f"{os.environ.get('SLM_OUTPUT_DIR', 'output').rstrip('/')}/registry"
    registry_mirror = None
    if is_remote(location):  # served from a local copy, pulled now and at each look for changes
        registry_mirror = Mirror(location, local_copy(location, Path(os.environ.get("SLM_WORK_DIR", ".cache/work"))))
        registry_mirror.pull(print)
    registry = registry_mirror.local if registry_mirror else Path(location)
    if not (registry / promote.ROUTER_CONFIG).is_file():
        raise SystemExit(f"slm-router: no {promote.ROUTER_CONFIG} in {registry}; run `slm-convert run` first "
                         "(it writes one even when nothing is promoted) or pass --registry")
    landing = None if args.no_trace_log else Path(args.landing or os.environ.get("SLM_LANDING_DIR", "data/landing"))
    encryption_key = os.environ.get(rawzone.ENCRYPTION_KEY_ENV) or None
    if landing and not args.unencrypted_trace_log and not encryption_key:
        raise SystemExit(f"slm-router: set {rawzone.ENCRYPTION_KEY_ENV} (and {rawzone.PSEUDONYM_KEY_ENV}), the raw zone's "
                         "keys, so that the trace log is sealed and pseudonymized as collection stores calls; or pass "
                         "--unencrypted-trace-log or --no-trace-log")
    return RouterSettings(
        registry=registry, registry_mirror=registry_mirror, landing_dir=landing, tokens=tokens,
        pseudonym_key=os.environ.get(rawzone.PSEUDONYM_KEY_ENV) or None, encryption_key=encryption_key,
        slm_timeout=args.slm_timeout, max_request_bytes=args.max_request_bytes, reload_interval=args.reload_interval,
        fallback_base_url=args.fallback_url, max_concurrency=args.max_concurrency)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="slm-router", description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", help="the model registry (default: $SLM_OUTPUT_DIR/registry)")
    parser.add_argument("--landing", help="landing folder for the trace log (default: $SLM_LANDING_DIR)")
    parser.add_argument("--no-trace-log", action="store_true", help="do not write served calls to the landing folder")
    parser.add_argument("--unencrypted-trace-log", action="store_true",
                        help=f"write the trace log in the clear when {rawzone.ENCRYPTION_KEY_ENV} is not set")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-auth", action="store_true", help="accept requests without a token (loopback only)")
    parser.add_argument("--slm-timeout", type=float, default=10.0, help="seconds to wait for the SLM before falling back")
    parser.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--max-concurrency", type=int, default=64, help="chat requests in flight; more get 503")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                        help="open connections; more get 503 (a connection that has not sent its headers within "
                             "--header-timeout seconds, or its body within --body-timeout, is closed)")
    parser.add_argument("--header-timeout", type=float, default=HEADER_SECONDS)
    parser.add_argument("--body-timeout", type=float, default=BODY_SECONDS)
    parser.add_argument("--reload-interval", type=float, default=2.0, help="seconds between looks at router.yaml")
    parser.add_argument("--fallback-url", help="the fallback's base URL instead of router.yaml's (e.g. a staging endpoint)")
    args = parser.parse_args(argv)
    write_owner_only()  # the trace log and a pulled registry copy
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    router = Router(settings_from_args(args))
    try:
        router.reload()
    except RouterConfigError as err:
        raise SystemExit(f"slm-router: {err}") from None
    uvicorn.run(router.app(), host=args.host, port=args.port, log_level="warning",
                **uvicorn_options(args.max_connections, args.header_timeout, args.body_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
