from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from hangar.agent.context import StepContext
from hangar.agent.engine import Plan, RunEngine, Step
from hangar.agent.platform import GuestPlatform
from hangar.agent.steps import new_run
from hangar.clock import ManualClock
from hangar.store.protocol import RunRecord, RunStatus
from hangar.store.sqlite import SqliteStore


@dataclass
class World:
    """What the test steps act on: a set of facts, and a log of what actually ran."""

    facts: set[str] = field(default_factory=set)
    ran: list[str] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)


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
    return Plan("op", steps, rollback)


def context(store: SqliteStore, run: RunRecord, tmp_path: Path) -> StepContext:
    return StepContext(
        run=run,
        store=store,
        clock=ManualClock(),
        platform=cast(GuestPlatform, None),
        machines_dir=tmp_path,
        notify=lambda: None,
        submit=lambda _run: True,
    )


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "db.sqlite")


async def execute(store: SqliteStore, world: World, run: RunRecord, tmp_path: Path) -> RunRecord:
    engine = RunEngine({"op": make_plan(world)})
    return await engine.execute(run, context(store, run, tmp_path))


def fresh_run(store: SqliteStore) -> RunRecord:
    run = new_run("m1", "op", 1.0)
    assert store.insert_run(run)
    return run


async def test_runs_every_step_and_records_each(store: SqliteStore, tmp_path: Path) -> None:
    world = World()
    run = await execute(store, world, fresh_run(store), tmp_path)
    assert world.ran == ["a", "b", "c"]
    stored = store.get_run(run.id)
    assert stored is not None
    assert stored.status == RunStatus.SUCCEEDED
    assert stored.steps_done == ["a", "b", "c"]


async def test_resume_skips_done_steps_and_asks_the_step_in_flight_again(
    store: SqliteStore, tmp_path: Path
) -> None:
    # As left by a crash inside step "b" after its effect happened but before it was recorded.
    world = World(facts={"a", "b"})
    run = fresh_run(store)
    run.steps_done = ["a"]
    run.data["current_step"] = "b"
    store.save_run(run)
    resumed = store.get_run(run.id)
    assert resumed is not None
    await execute(store, world, resumed, tmp_path)
    assert world.ran == ["c"]
    assert resumed.status == RunStatus.SUCCEEDED


async def test_failed_step_rolls_back_what_was_done(store: SqliteStore, tmp_path: Path) -> None:
    world = World(failing={"c"})
    run = await execute(store, world, fresh_run(store), tmp_path)
    assert run.status == RunStatus.FAILED
    assert run.error == "c: c broke"
    assert world.ran == ["a", "b", "c", "undo_b", "undo_a"]
    assert world.facts == set()


async def test_rollback_resumes_after_a_crash(store: SqliteStore, tmp_path: Path) -> None:
    world = World(facts={"a"})
    run = fresh_run(store)
    run.status = RunStatus.ROLLING_BACK
    run.rollback_done = ["undo_b"]
    store.save_run(run)
    await execute(store, world, run, tmp_path)
    assert world.ran == ["undo_a"]
    assert run.status == RunStatus.FAILED


def test_plan_rejects_repeated_step_names() -> None:
    world = World()
    with pytest.raises(ValueError):
        Plan("op", [EnsureFact("a", world), EnsureFact("a", world)], [])


def test_unfinished_runs_are_listed_in_order(store: SqliteStore) -> None:
    first, second = new_run("m1", "op", 1.0), new_run("m1", "op", 2.0)
    done: Any = new_run("m1", "op", 0.5)
    done.status = RunStatus.SUCCEEDED
    for run in (second, done, first):
        store.insert_run(run)
    assert [run.id for run in store.list_runs("m1", unfinished_only=True)] == [first.id, second.id]
    assert not store.insert_run(first)
