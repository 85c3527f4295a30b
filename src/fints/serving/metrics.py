"""Prometheus metrics of one server, on a registry of its own (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class ServingMetrics:
    """Counters and histograms of the serving layer.

    ``steering_seconds`` is the time spent retrieving and aggregating each
    batch's vectors (key encoding included); ``generation_seconds`` is the
    decoding itself, where the steering hooks add one addition per site.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fints_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "fints_http_request_seconds",
            "HTTP request latency (until the response starts)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generations = Counter(
            "fints_generations",
            "Finished generations by steering outcome",
            ["steered"],
            registry=r,
        )
        self.generation_errors = Counter(
            "fints_generation_errors",
            "Generation requests the worker answered with an error (a row that could not be "
            "prepared, a prompt over the token limit, a batch that raised)",
            registry=r,
        )
        self.write_errors = Counter(
            "fints_write_errors",
            "Writes (adding history, forgetting a user) that raised, unknown users included",
            registry=r,
        )
        self.batch_size = Histogram(
            "fints_batch_size",
            "Requests per shared forward pass",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "fints_queue_seconds",
            "Time from enqueueing to the start of the batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.steering_seconds = Histogram(
            "fints_steering_seconds",
            "Per batch: retrieval, aggregation and prompt building",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.generation_seconds = Histogram(
            "fints_generation_seconds",
            "Per batch: decoding time",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "fints_tokens_per_second",
            "Per batch: completion tokens per second of decoding",
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("fints_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter(
            "fints_completion_tokens", "Completion tokens generated", registry=r
        )
        self.queue_depth = Gauge(
            "fints_queue_depth", "Jobs waiting for the model worker", registry=r
        )
        self.interactions_added = Counter(
            "fints_interactions_added", "History items stored", registry=r
        )
        self.extraction_seconds = Histogram(
            "fints_extraction_seconds",
            "Per step of a write: extracting a chunk of history items, or a piece of training",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.users_deleted = Counter("fints_users_deleted", "Users forgotten", registry=r)
        self.items_expired = Counter(
            "fints_items_expired", "History items forgotten for their age", registry=r
        )
        self.write_seconds = Histogram(
            "fints_write_seconds",
            "Per write: from its arrival to its answer (waiting, steps and the batches decoded "
            "between them)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.write_step_seconds = Histogram(
            "fints_write_step_seconds",
            "Per step of a write: how long it held the model (what a request may wait behind)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
