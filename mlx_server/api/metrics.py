"""Prometheus metrics, one registry per app (no process-global collectors, so tests and apps don't collide).

Request counts come from an ASGI middleware (route, model, status); token counts and latencies from the
engine's event hook; queue depth, resident models and load statistics are read from engine snapshots at
scrape time, so nothing on the hot path keeps gauges in sync.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mlx_server.contract.events import Delta, Done, Event, Failed, Started
from mlx_server.contract.requests import EngineRequest
from mlx_server.contract.status import EngineClient

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _EngineCollector(Collector):
    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        status = self.engine.status()
        counters, stats, memory = status.counters, status.pool, status.memory
        snapshot = [r for r in status.models if not r.is_loading]
        yield GaugeMetricFamily(
            "mlx_queue_depth", "Requests waiting for admission or a model load", value=counters.queue_size
        )
        yield GaugeMetricFamily("mlx_active_requests", "Sequences decoding now", value=counters.active_requests)
        yield GaugeMetricFamily("mlx_resident_models", "Models resident in memory", value=len(snapshot))
        yield GaugeMetricFamily(
            "mlx_resident_bytes", "Estimated bytes of resident models", value=sum(r.size for r in snapshot)
        )
        yield GaugeMetricFamily(
            "mlx_memory_budget_bytes", "Memory budget: weights + reserved KV + prompt caches", value=memory.budget
        )
        yield GaugeMetricFamily("mlx_kv_reserved_bytes", "KV reserved for admitted sequences", value=memory.kv_reserved)
        yield GaugeMetricFamily("mlx_prompt_cache_bytes", "Stored prompt caches", value=memory.prompt_cache)
        yield GaugeMetricFamily("mlx_budget_used_bytes", "Weights + reserved KV + prompt caches", value=memory.used)
        yield GaugeMetricFamily("mlx_active_memory_bytes", "MLX allocator: memory in use", value=memory.mlx_active)
        yield GaugeMetricFamily("mlx_peak_memory_bytes", "MLX allocator: peak memory in use", value=memory.mlx_peak)
        yield GaugeMetricFamily(
            "mlx_cache_memory_bytes", "MLX allocator: freed buffers kept for reuse", value=memory.mlx_cache
        )
        yield CounterMetricFamily("mlx_model_loads", "Model loads completed", value=stats.loads)
        yield CounterMetricFamily("mlx_model_load_failures", "Model loads that failed", value=stats.load_failures)
        yield CounterMetricFamily("mlx_model_evictions", "Models evicted to make room", value=stats.evictions)
        yield CounterMetricFamily("mlx_model_unloads", "Models unloaded (keep_alive or request)", value=stats.unloads)
        yield CounterMetricFamily("mlx_model_load_seconds", "Seconds spent loading models", value=stats.load_seconds)
        yield CounterMetricFamily("mlx_engine_steps", "Decode steps run", value=counters.steps)
        yield GaugeMetricFamily(
            "mlx_prefill_queue_tokens",
            "Prompt tokens admitted and not yet prefilled",
            value=status.prefill_queue_tokens,
        )
        progress = GaugeMetricFamily(
            "mlx_prefill_progress_ratio", "Share of each long prompt already prefilled", labels=["model", "request_id"]
        )
        for p in status.prefill:
            progress.add_metric([p.model, str(p.request_id)], p.prefilled / max(1, p.total))
        yield progress
        yield CounterMetricFamily(
            "mlx_prefill_tokens", "Prompt tokens prefilled (cached prefixes excluded)", value=counters.prefill_tokens
        )
        yield CounterMetricFamily("mlx_prefill_chunks", "Prompt prefill chunks run", value=counters.prefill_chunks)


class Metrics:
    def __init__(self, engine: EngineClient, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.clock = clock
        self.requests = Counter(
            "mlx_requests",
            "HTTP requests by route, model and status",
            ["route", "model", "status"],
            registry=self.registry,
        )
        self.tokens_in = Counter(
            "mlx_prompt_tokens", "Prompt tokens by model (cached included)", ["model"], registry=self.registry
        )
        self.tokens_cached = Counter(
            "mlx_cached_prompt_tokens", "Prompt tokens served from the prompt cache", ["model"], registry=self.registry
        )
        self.tokens_out = Counter(
            "mlx_generated_tokens", "Generated tokens by model", ["model"], registry=self.registry
        )
        self.tools_ignored = Counter(
            "mlx_tools_ignored",
            "Requests offering tools to a model with no tool-call format (not called)",
            ["model"],
            registry=self.registry,
        )
        self.drafted = Counter(
            "mlx_server_draft_tokens", "Tokens drafted for speculative decoding", ["model"], registry=self.registry
        )
        self.accepted = Counter(
            "mlx_server_draft_accepted",
            "Drafted tokens the target model accepted",
            ["model"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "mlx_time_to_first_token_seconds",
            "From submission to the first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.token_latency = Histogram(
            "mlx_inter_token_seconds",
            "Time between a request's tokens",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))
        self._last: dict[int, float] = {}  # request_id → time of its last token (inference thread only)

    def observe(self, request: EngineRequest, event: Event) -> None:
        """Called by the engine on the inference thread for every event."""
        if not request.generates:
            return
        model = request.model
        if isinstance(event, Started):
            self.tokens_in.labels(model).inc(event.prompt_tokens)
            self.tokens_cached.labels(model).inc(event.cached_tokens)
        elif isinstance(event, Delta):
            now = self.clock()
            last = self._last.get(request.request_id)
            if last is None:
                self.ttft.labels(model).observe(now - request.created)
            else:
                self.token_latency.labels(model).observe(now - last)
            self._last[request.request_id] = now
        elif isinstance(event, (Done, Failed)):
            self._last.pop(request.request_id, None)
            if isinstance(event, Done):
                self.tokens_out.labels(model).inc(event.usage.completion_tokens)
                if event.usage.draft_tokens:
                    self.drafted.labels(model).inc(event.usage.draft_tokens)
                    self.accepted.labels(model).inc(event.usage.draft_accepted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
