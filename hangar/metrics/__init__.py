"""Prometheus metrics of one hangar server: counters and histograms fed by narrow observer
seams (the run engine, the request guard, the scheduler, the image cache) and gauges read
from the stores at scrape time. Each server has its own registry."""

from hangar.metrics.registry import HangarMetrics
from hangar.metrics.state import StateCollector

__all__ = ["HangarMetrics", "StateCollector"]
