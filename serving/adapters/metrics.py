"""The adapter metrics, on the gateway's Prometheus registry. Labels are bounded: model
and version names from the configuration, adapter names from the store, results."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class AdapterMetrics:
    loads: Counter  # every load on an engine, by result (ok | failed)
    evictions: Counter  # least recently used adapters unloaded to make room (max_loras)
    held: Gauge  # adapters an engine holds now

    @classmethod
    def create(cls, registry: CollectorRegistry) -> AdapterMetrics:
        labels = ["model", "model_version", "adapter", "result"]
        return cls(
            loads=Counter("weir_adapter_loads", "LoRA adapter loads on engines", labels,
                          registry=registry),
            evictions=Counter("weir_adapter_evictions", "Adapters unloaded to make room"
                              " (max_loras, least recently used)", ["model", "model_version"],
                              registry=registry),
            held=Gauge("weir_adapters_held", "LoRA adapters each engine holds", ["replica"],
                       registry=registry, multiprocess_mode="max"),
        )  # fmt: skip
