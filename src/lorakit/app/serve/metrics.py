"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Requests by adapter and status, generated tokens, queue depth, running sequences, resident
    adapters, adapter loads and evictions, time to first token and request latency (seconds)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "Requests answered, by model (base id or adapter) and HTTP status",
                                ["model", "status"], registry=r)
        self.tokens = Counter("lorakit_generated_tokens", "Tokens generated, by model", ["model"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens prefilled, by model", ["model"], registry=r)
        self.queue = Gauge("lorakit_queue_depth", "Requests waiting to join the running batch", registry=r)
        self.running = Gauge("lorakit_running_sequences", "Sequences decoding in the running batch", registry=r)
        self.resident = Gauge("lorakit_resident_adapters", "Adapters resident in the model", registry=r)
        self.loads = Counter("lorakit_adapter_loads", "Adapters loaded into the model", registry=r)
        self.evictions = Counter("lorakit_adapter_evictions", "Adapters evicted (least recently used)", registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("lorakit_request_seconds", "From request arrival to its last token",
                                 buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
