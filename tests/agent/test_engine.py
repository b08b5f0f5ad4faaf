"""The run engine on plans of test steps over a real SQLite run store, with a manual clock:
resume after a crash, rollback, bounded retries of retryable errors, typed requests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import ValidationError

from hangar.agent.context import StepContext
from hangar.agent.engine import Plan, RetryPolicy, RunEngine, Step
from hangar.agent.steps import new_run
from hangar.clock import ManualClock
from hangar.errors import StoreError
from hangar.model.run import RunRecord, RunStatus, StartRequest, StopRequest
from hangar.store.machines import SqliteMachineStore
from hangar.store.runs import SqliteRunStore


@dataclass
class World:
    """What the test steps act on: a set of facts, and a log of what actually ran."""

    facts: set[str] = field(default_factory=set)
    ran: list[str] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)
    busy: dict[str, int] = field(default_factory=dict)
    """step -> how many more times it fails with a retryable error before it works."""


@dataclass
class EnsureFact:
    name: str
    world: World

    async def should_run(self, ctx: StepContext) -> bool:
        return self.name not in self.world.facts

    async def run(self, ctx: StepContext) -> None:
        self.world.ran.append(self.name)
        if self.name in self.world.failing:
            raise RuntimeError(f"{self.name} broke")
        if self.world.busy.get(self.name, 0) > 0:
            self.world.busy[self.name] -= 1
            raise StoreError(f"{self.name}: store busy")
        self.world.facts.add(self.name)


@dataclass
class DropFact:
    name: str
    fact: str
    world: World

    async def should_run(self, ctx: StepContext) -> bool:
        return self.fact in self.world.facts

    async def run(self, ctx: StepContext) -> None:
        self.world.ran.append(self.name)
        self.world.facts.discard(self.fact)


def make_plan(world: World) -> Plan:
    steps: list[Step] = [EnsureFact(name, world) for name in ("a", "b", "c")]
    rollback: list[Step] = [DropFact("undo_b", "b", world), DropFact("undo_a", "a", world)]
    return Plan("start", steps, rollback)


@dataclass
class Stores:
    runs: SqliteRunStore
    machines: SqliteMachineStore
    clock: ManualClock = field(default_factory=ManualClock)

    def context(self, run: RunRecord) -> StepContext:
        return StepContext(
            run=run,
            machines=self.machines,
            runs=self.runs,
            clock=self.clock,
            notify=lambda: None,
            submit=lambda _run: True,
        )

    def stored(self, run: RunRecord) -> RunRecord:
        [found] = [item for item in self.runs.list_runs("m1") if item.id == run.id]
        return found


@pytest.fixture
def stores(tmp_path: Path) -> Stores:
    path = tmp_path / "db.sqlite"
    return Stores(SqliteRunStore(path), SqliteMachineStore(path))


async def execute(
    stores: Stores, world: World, run: RunRecord, retry: RetryPolicy | None = None
) -> RunRecord:
    engine = RunEngine(lambda _run: make_plan(world), retry=retry)
    return await engine.execute(run, stores.context(run))


def fresh_run(stores: Stores) -> RunRecord:
    run = new_run("m1", StartRequest(), 1.0)
    assert stores.runs.insert_run(run)
    return run


async def test_runs_every_step_and_records_each(stores: Stores) -> None:
    world = World()
    run = await execute(stores, world, fresh_run(stores))
    assert world.ran == ["a", "b", "c"]
    stored = stores.stored(run)
    assert stored.status == RunStatus.SUCCEEDED
    assert stored.steps_done == ["a", "b", "c"]


async def test_resume_skips_done_steps_and_asks_the_step_in_flight_again(stores: Stores) -> None:
    # As left by a crash inside step "b" after its effect happened but before it was recorded.
    world = World(facts={"a", "b"})
    run = fresh_run(stores)
    run.steps_done = ["a"]
    run.progress.current_step = "b"
    stores.runs.save_run(run)
    resumed = stores.stored(run)
    await execute(stores, world, resumed)
    assert world.ran == ["c"]
    assert resumed.status == RunStatus.SUCCEEDED


async def test_failed_step_rolls_back_what_was_done(stores: Stores) -> None:
    world = World(failing={"c"})
    run = await execute(stores, world, fresh_run(stores))
    assert run.status == RunStatus.FAILED
    assert run.error == "c: c broke"
    assert world.ran == ["a", "b", "c", "undo_b", "undo_a"]
    assert world.facts == set()
    assert run.progress.retries == []


async def test_rollback_resumes_after_a_crash(stores: Stores) -> None:
    world = World(facts={"a"})
    run = fresh_run(stores)
    run.status = RunStatus.ROLLING_BACK
    run.rollback_done = ["undo_b"]
    stores.runs.save_run(run)
    await execute(stores, world, run)
    assert world.ran == ["undo_a"]
    assert run.status == RunStatus.FAILED


async def _run_while_advancing(stores: Stores, world: World, retry: RetryPolicy) -> RunRecord:
    """Execute, moving the manual clock past each backoff the engine sleeps on."""
    task = asyncio.create_task(execute(stores, world, fresh_run(stores), retry))
    for _ in range(100):
        if task.done():
            break
        await asyncio.sleep(0)
        stores.clock.advance(retry.max_delay_s)
    return await task


async def test_a_retryable_error_is_retried_with_backoff_and_recorded(stores: Stores) -> None:
    world = World(busy={"b": 2})
    retry = RetryPolicy(attempts=4, first_delay_s=0.5, factor=2.0, max_delay_s=4.0)
    run = await _run_while_advancing(stores, world, retry)
    assert run.status == RunStatus.SUCCEEDED
    assert world.ran == ["a", "b", "b", "b", "c"]
    retries = stores.stored(run).progress.retries
    assert [(r.step, r.attempt, r.delay_s) for r in retries] == [("b", 1, 0.5), ("b", 2, 1.0)]
    assert "store busy" in retries[0].error


async def test_retries_are_bounded_then_the_run_rolls_back(stores: Stores) -> None:
    world = World(busy={"b": 10})
    retry = RetryPolicy(attempts=3, first_delay_s=0.5, factor=2.0, max_delay_s=4.0)
    run = await _run_while_advancing(stores, world, retry)
    assert run.status == RunStatus.FAILED
    assert world.ran.count("b") == 3
    assert len(run.progress.retries) == 2
    assert "undo_a" in world.ran


def test_plan_rejects_repeated_step_names() -> None:
    world = World()
    with pytest.raises(ValueError):
        Plan("op", [EnsureFact("a", world), EnsureFact("a", world)], [])


def test_unfinished_runs_are_listed_in_order(stores: Stores) -> None:
    first, second = new_run("m1", StartRequest(), 1.0), new_run("m1", StartRequest(), 2.0)
    done = new_run("m1", StartRequest(), 0.5)
    done.status = RunStatus.SUCCEEDED
    for run in (second, done, first):
        stores.runs.insert_run(run)
    listed = stores.runs.list_runs("m1", unfinished_only=True)
    assert [run.id for run in listed] == [first.id, second.id]
    assert not stores.runs.insert_run(first)


def test_a_request_is_typed_and_refuses_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        StopRequest.model_validate({"operation": "stop", "force": True})
    with pytest.raises(ValidationError):
        StopRequest.model_validate({"operation": "stop", "signal": 99})
    run = new_run("m1", StopRequest(signal=2, timeout_s=1.5), 1.0)
    assert RunRecord.model_validate_json(run.model_dump_json()).request == run.request
