"""The gateway's seams wired to real things for tests: tokens from a table, deployments from a
list, and replicas that are real ``llama-server`` processes on loopback (waking starts a
stopped process or continues a stopped-by-signal one; sleeping stops it by signal)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hangar.errors import Conflict, InsufficientCapacity
from hangar.llm.native import EngineArgs, EngineProcess
from hangar.llm.seams import Caller, Deployment, Replica, ReplicaState, Usage


class TokenTable:
    def __init__(self, tokens: dict[str, Caller]) -> None:
        self.tokens = tokens

    async def authenticate(self, token: str) -> Caller | None:
        return self.tokens.get(token)


class DeploymentList:
    def __init__(self, deployments: Sequence[Deployment] = ()) -> None:
        self.deployments = list(deployments)

    async def of_org(self, org: str) -> Sequence[Deployment]:
        return [deployment for deployment in self.deployments if deployment.org == org]

    async def all(self) -> Sequence[Deployment]:
        return list(self.deployments)


class UsageLog:
    def __init__(self) -> None:
        self.records: list[Usage] = []

    async def record(self, usage: Usage) -> None:
        self.records.append(usage)


@dataclass
class _Instance:
    id: str
    engine: EngineProcess
    suspended: bool = False
    owned: bool = True  # stopped at teardown; a shared engine is not


@dataclass
class ProcessReplicas:
    """Each replica a ``llama-server`` process; the counters say what the gateway asked for."""

    binary: Path
    model: Path
    workdir: Path
    room: int = 4  # processes this may run in all (shared engines not counted)
    parallel: int = 2
    context: int = 1024
    wakes: list[str] = field(default_factory=list)
    sleeps: list[str] = field(default_factory=list)
    scale_outs: int = 0
    _instances: dict[str, list[_Instance]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def add(self, deployment: Deployment, *, started: bool) -> str:
        """A new replica of ``deployment``: running now, or stopped until woken."""
        replica_id = f"r{next(self._ids)}"
        args = EngineArgs(
            model=self.model,
            alias=deployment.name,
            parallel=self.parallel,
            context=self.context,
        )
        engine = EngineProcess(self.binary, args, self.workdir / f"{replica_id}.log")
        instance = _Instance(replica_id, engine)
        self._instances.setdefault(deployment.id, []).append(instance)
        if started:
            engine.start()
        return replica_id

    def adopt(self, deployment: Deployment, engine: EngineProcess) -> str:
        """An engine already running (shared by several tests) as a replica of ``deployment``."""
        replica_id = f"r{next(self._ids)}"
        self._instances.setdefault(deployment.id, []).append(
            _Instance(replica_id, engine, owned=False)
        )
        return replica_id

    def engine(self, replica_id: str) -> EngineProcess:
        return self._find(replica_id).engine

    def _find(self, replica_id: str) -> _Instance:
        for instances in self._instances.values():
            for instance in instances:
                if instance.id == replica_id:
                    return instance
        raise KeyError(replica_id)

    @staticmethod
    def _state(instance: _Instance) -> ReplicaState:
        if not instance.engine.alive():
            return ReplicaState.STOPPED
        return ReplicaState.SUSPENDED if instance.suspended else ReplicaState.STARTED

    def replica(self, replica_id: str, deployment_id: str) -> Replica:
        instance = self._find(replica_id)
        return Replica(
            id=instance.id,
            deployment=deployment_id,
            address=instance.engine.address or "",
            state=self._state(instance),
        )

    async def list(self, deployment: Deployment) -> Sequence[Replica]:
        return [
            self.replica(instance.id, deployment.id)
            for instance in self._instances.get(deployment.id, [])
        ]

    async def wake(self, replica: Replica) -> Replica:
        instance = self._find(replica.id)
        self.wakes.append(replica.id)
        if instance.engine.alive() and instance.suspended:
            instance.engine.resume()
        elif not instance.engine.alive():
            await asyncio.to_thread(instance.engine.start)
        instance.suspended = False
        return self.replica(replica.id, replica.deployment)

    async def sleep(self, replica: Replica) -> None:
        instance = self._find(replica.id)
        if not instance.owned:
            raise Conflict(f"replica {replica.id} is a shared engine: it is never suspended")
        self.sleeps.append(replica.id)
        instance.engine.suspend()
        instance.suspended = True

    async def scale_out(self, deployment: Deployment) -> Replica:
        owned = [i for instances in self._instances.values() for i in instances if i.owned]
        if len(owned) >= self.room:
            raise InsufficientCapacity("no room for another replica", deployment=deployment.id)
        self.scale_outs += 1
        replica_id = self.add(deployment, started=False)
        return self.replica(replica_id, deployment.id)

    def stop_all(self) -> None:
        for instances in self._instances.values():
            for instance in instances:
                if instance.owned:
                    instance.engine.stop()
