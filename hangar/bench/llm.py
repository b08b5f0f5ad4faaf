"""``hangar bench llm``: a model replica called directly against the same replica called
through the gateway, side by side, and the first token from zero against a plain start.

A ``hangar server`` child process (its own private network) deploys the tiny model with the
llama.cpp engine; its first request creates and boots the replica (timed). Then, in alternating
rounds on one replica: (a) straight to the machine's private address, (b) through the gateway,
each with a keep-alive client of its own: the latency of a short completion (p50, p99) and the
time to the first streamed token. Last, from zero: the replica is stopped, and (c) the time
from a request through the gateway to its first token is set against (d) a plain start through
the API, polling the engine's health at its address until it answers and then asking it
directly for a first token; and (e) the replica suspended (how an idle replica sleeps), the
time from a request through the gateway, which resumes it, to its first token, against (f) a
plain resume through the API, timed as (d). The ratios end the report, each on a line of its
own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from hangar.agent.guest import find_vmm_processes
from hangar.llm.tinymodel import write_tiny_model
from hangar.localhost import free_port
from hangar.server_process import ServerProcess
from hangar.settings import env_name

ORG = "bench"
MODEL = "tiny"
DEPLOY_TIMEOUT_S = 1800.0
CALL_TIMEOUT_S = 300.0
WAKE_TIMEOUT_S = 300.0
HEALTH_POLL_S = 0.05
COMPLETION = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 4, "temperature": 0}
STREAMED = {**COMPLETION, "stream": True, "max_tokens": 8}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _ratio(values: list[float], baseline: list[float]) -> float:
    return statistics.median(values) / statistics.median(baseline)


@dataclass
class LlmBenchResult:
    rounds: int
    first_from_zero_s: float = 0.0
    direct_s: list[float] = field(default_factory=list)
    gateway_s: list[float] = field(default_factory=list)
    direct_ttft_s: list[float] = field(default_factory=list)
    gateway_ttft_s: list[float] = field(default_factory=list)
    wake_ttft_s: list[float] = field(default_factory=list)
    plain_start_ttft_s: list[float] = field(default_factory=list)
    resume_ttft_s: list[float] = field(default_factory=list)
    plain_resume_ttft_s: list[float] = field(default_factory=list)

    def ratio(self) -> float:
        return _ratio(self.gateway_s, self.direct_s)

    def report(self) -> str:
        def ms(values: list[float]) -> str:
            return (
                f"p50 {statistics.median(values) * 1000:8.1f} ms   "
                f"p99 {percentile(values, 0.99) * 1000:8.1f} ms"
            )

        def s(values: list[float]) -> str:
            return f"median {statistics.median(values):6.2f} s  (n={len(values)})"

        lines = [
            f"llm bench: tiny model, llama.cpp engine in a guest; {self.rounds} rounds each",
            f"first token, new replica (create + boot + load): {self.first_from_zero_s:.2f} s",
            f"short completion  (a) direct:          {ms(self.direct_s)}",
            f"short completion  (b) gateway:         {ms(self.gateway_s)}",
            f"first token       (a) direct:          {ms(self.direct_ttft_s)}",
            f"first token       (b) gateway:         {ms(self.gateway_ttft_s)}",
            f"from stopped      (c) gateway request: {s(self.wake_ttft_s)}",
            f"from stopped      (d) plain start:     {s(self.plain_start_ttft_s)}",
            f"from suspended    (e) gateway request: {s(self.resume_ttft_s)}",
            f"from suspended    (f) plain resume:    {s(self.plain_resume_ttft_s)}",
            f"ratio gateway/direct: {self.ratio():.2f}",
            f"ratio ttft gateway/direct: {_ratio(self.gateway_ttft_s, self.direct_ttft_s):.2f}",
            f"ratio wake/start: {_ratio(self.wake_ttft_s, self.plain_start_ttft_s):.2f}",
            f"ratio wake from suspended/start: "
            f"{_ratio(self.resume_ttft_s, self.plain_start_ttft_s):.2f}",
            f"ratio wake from suspended/resume: "
            f"{_ratio(self.resume_ttft_s, self.plain_resume_ttft_s):.2f}",
        ]
        return "\n".join(lines)


def _completion_s(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    response = client.post(url, json=COMPLETION)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    if not response.json()["choices"]:
        raise RuntimeError(f"no choices from {url}")
    return elapsed


def _first_token_s(client: httpx.Client, url: str) -> float:
    """From sending a streamed completion to its first event with text. The stream is read
    to its end, so that no abandoned generation slows the engine for the next request."""
    started = time.perf_counter()
    first: float | None = None
    with client.stream("POST", url, json=STREAMED) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is not None or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line.removeprefix("data: ")).get("choices") or []
            if choices and choices[0].get("text"):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"{url} streamed no token")
    return first


def _until(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(HEALTH_POLL_S)


def _healthy(client: httpx.Client, address: str) -> bool:
    try:
        return client.get(f"{address}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def run_llm_bench(rounds: int, wake_runs: int, home: Path) -> LlmBenchResult:
    result = LlmBenchResult(rounds)
    model = write_tiny_model(home / "models" / "tiny.gguf")
    gateway_port = free_port()
    env = {env_name("llm_port"): str(gateway_port), env_name("llm_idle_s"): "3600"}
    server = ServerProcess(home, extra_env=env)
    try:
        with server, server.client() as api:
            api.post("/v1/orgs", json={"slug": ORG}).raise_for_status()
            token = api.post("/v1/tokens", json={"org_slug": ORG}).json()["token"]
            deployments = f"/v1/orgs/{ORG}/llm/deployments"
            api.post(
                deployments,
                json={"name": MODEL, "model": str(model), "max_replicas": 1},
                timeout=DEPLOY_TIMEOUT_S,
            ).raise_for_status()
            headers = {"Authorization": f"Bearer {token}"}
            gateway_url = f"http://127.0.0.1:{gateway_port}/v1/completions"
            with (
                httpx.Client(headers=headers, timeout=CALL_TIMEOUT_S) as via_gateway,
                httpx.Client(timeout=CALL_TIMEOUT_S) as direct,
            ):
                result.first_from_zero_s = _first_token_s(via_gateway, gateway_url)
                deployment = api.get(f"{deployments}/{MODEL}").json()
                (replica,) = deployment["replicas"]
                address = f"http://[{replica['private_ip']}]:8080"
                direct_url = f"{address}/v1/completions"
                for _ in range(2):  # warm both paths' connections
                    _completion_s(direct, direct_url)
                    _completion_s(via_gateway, gateway_url)
                for _ in range(rounds):
                    result.direct_s.append(_completion_s(direct, direct_url))
                    result.gateway_s.append(_completion_s(via_gateway, gateway_url))
                    result.direct_ttft_s.append(_first_token_s(direct, direct_url))
                    result.gateway_ttft_s.append(_first_token_s(via_gateway, gateway_url))
                machine = f"/v1/apps/{deployment['app']}/machines/{replica['id']}"

                def stop() -> None:
                    api.post(f"{machine}/stop", json={}).raise_for_status()
                    _wait(api, machine, "stopped")

                def plain_start() -> float:
                    """A start through the API until the engine answers a first token."""
                    started = time.perf_counter()
                    api.post(f"{machine}/start").raise_for_status()
                    with httpx.Client(timeout=CALL_TIMEOUT_S) as fresh:
                        _until(lambda: _healthy(fresh, address), "the engine", WAKE_TIMEOUT_S)
                        _first_token_s(fresh, direct_url)
                    return time.perf_counter() - started

                def suspend() -> None:
                    api.post(f"{machine}/suspend").raise_for_status()
                    _wait(api, machine, "suspended")

                for _ in range(wake_runs):
                    stop()
                    result.wake_ttft_s.append(_first_token_s(via_gateway, gateway_url))
                    suspend()  # how an idle replica sleeps: the gateway resumes it
                    result.resume_ttft_s.append(_first_token_s(via_gateway, gateway_url))
                    suspend()
                    result.plain_resume_ttft_s.append(plain_start())
                    stop()
                    result.plain_start_ttft_s.append(plain_start())
            api.delete(f"{deployments}/{MODEL}", timeout=DEPLOY_TIMEOUT_S).raise_for_status()
    finally:
        server.stop()
        for pid in find_vmm_processes(home / "machines"):  # none should outlive the bench
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.remove_network()
    return result


def _wait(api: httpx.Client, machine: str, state: str) -> None:
    response = api.get(f"{machine}/wait", params={"state": state, "timeout": 60}, timeout=90)
    response.raise_for_status()


def llm_bench(rounds: int, wake_runs: int, home: Path | None = None) -> str:
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="hangar-bench-llm-")) if home is None else home
    try:
        return run_llm_bench(rounds, wake_runs, scratch).report()
    finally:
        if home is None:
            shutil.rmtree(scratch, ignore_errors=True)
