"""Prometheus metrics of ``vptune serve`` (text exposition at ``GET /metrics``)."""

# (no "from __future__ import annotations", as in vptune.serve)


class Metrics:
    """The server's counters, gauges and histograms, on a registry of their own.

    Per-task series are labelled only with names of tasks that were resolved (loaded), never with a name
    a client made up, so the number of series stays bounded by the task folders on disk."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "vptune_http_requests", "HTTP requests by method, route and status", ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vptune_http_request_duration_seconds", "HTTP request latency", ["route"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30), registry=r,
        )
        self.task_requests = Counter(
            "vptune_task_requests", "Predict requests by task and status", ["task", "status"], registry=r
        )
        self.task_latency = Histogram(
            "vptune_task_request_duration_seconds", "Predict latency by task", ["task"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30), registry=r,
        )
        self.batch_size = Histogram(
            "vptune_batch_size", "Samples per backbone batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_tasks = Histogram(
            "vptune_batch_tasks", "Distinct tasks per backbone batch", buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "vptune_batch_duration_seconds", "Model time per batch",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=r,
        )
        self.queue_depth = Gauge("vptune_queue_depth", "Requests waiting for a batching worker", registry=r)
        self.in_flight = Gauge("vptune_batches_in_flight", "Batches being computed now", registry=r)
        self.predictions = Counter("vptune_predictions", "Served predictions by task", ["task"], registry=r)
        self.tasks_loaded = Gauge("vptune_tasks_loaded", "Resident (loaded) tasks", registry=r)
        self.resident_bytes = Gauge("vptune_resident_task_bytes", "Memory of the resident tasks", registry=r)
        self.task_loads = Counter(
            "vptune_task_loads", "Task folder loads by outcome (loaded, reloaded, failed)", ["outcome"],
            registry=r,
        )
        self.evictions = Counter("vptune_task_evictions", "Least recently used tasks unloaded", registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
