"""The ``hangar`` command."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from hangar.cli.bench import bench_app
from hangar.cli.client import ApiError, HangarClient
from hangar.cli.host import host_app
from hangar.cli.output import call, console, errors, fail
from hangar.cli.proxy import proxy
from hangar.cli.secrets import secrets_app
from hangar.cli.tenancy import admin_app, audit_app, orgs_app, tokens_app
from hangar.settings import DEFAULT_PORT, Settings

app = typer.Typer(help="hangar: GPU Machines on your own servers.", no_args_is_help=True)
apps_app = typer.Typer(help="Apps own machines.", no_args_is_help=True)
machine_app = typer.Typer(help="Run and manage machines.", no_args_is_help=True)
app.add_typer(apps_app, name="apps")
app.add_typer(machine_app, name="machine")
app.add_typer(bench_app, name="bench")
app.add_typer(orgs_app, name="orgs")
app.add_typer(tokens_app, name="tokens")
app.add_typer(audit_app, name="audit")
app.add_typer(admin_app, name="admin")
app.add_typer(host_app, name="host")
app.add_typer(secrets_app, name="secrets")
app.command("proxy")(proxy)

DEFAULT_APP = "default"


def client() -> HangarClient:
    return HangarClient()


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    home: Annotated[Path | None, typer.Option(help="State directory ($HANGAR_HOME).")] = None,
    init: Annotated[
        bool,
        typer.Option(
            "--init", help="Mint a new operator token (revoking the previous file's) and print it."
        ),
    ] = False,
) -> None:
    """Run API + scheduler + agent in one process (state in SQLite under $HANGAR_HOME)."""
    from hangar.server import serve

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings() if home is None else Settings(home=home)
    serve(settings, host, port, init=init)


@apps_app.command("create")
def apps_create(
    name: str,
    org: Annotated[
        str | None, typer.Option("--org", help="Org slug (default: the token's org, or personal).")
    ] = None,
) -> None:
    created = call(client().create_app, name, org)
    console.print(f"created app [bold]{name}[/bold] in org {created['organization']['slug']}")


@apps_app.command("list")
def apps_list(org: Annotated[str | None, typer.Option("--org")] = None) -> None:
    body = call(client().list_apps, org)
    table = Table("NAME", "ORG", "MACHINES")
    for item in body["apps"]:
        table.add_row(item["name"], item["organization"]["slug"], str(item["machine_count"]))
    console.print(table)


@apps_app.command("destroy")
def apps_destroy(name: str) -> None:
    call(client().delete_app, name)
    console.print(f"destroyed app {name}")


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            fail(f"--env takes KEY=VALUE, got {pair!r}", 2)
        env[key] = value
    return env


def ensure_app(api: HangarClient, name: str) -> None:
    try:
        api.get_app(name)
    except ApiError as exc:
        if exc.status_code != 404:
            raise
        api.create_app(name)
        errors.print(f"created app {name}")


def wait_until(
    api: HangarClient, app_name: str, machine_id: str, states: set[str], timeout_s: float = 600.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        machine: dict[str, Any] = api.get_machine(app_name, machine_id)
        if machine["state"] in states:
            return machine
        if time.monotonic() > deadline:
            fail(f"machine {machine_id} still {machine['state']} after {timeout_s:.0f}s")
        time.sleep(0.1)


def last_exit_code(api: HangarClient, app_name: str, machine_id: str) -> int | None:
    for event in api.events(app_name, machine_id):
        if event["type"] == "exit":
            code = (event.get("request") or {}).get("exit_event", {}).get("exit_code")
            return int(code) if code is not None else None
    return None


@machine_app.command(
    "run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def machine_run(
    ctx: typer.Context,
    image: str,
    app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP,
    name: Annotated[str | None, typer.Option("--name")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")] = None,
    cpus: Annotated[int, typer.Option("--cpus")] = 1,
    memory: Annotated[int, typer.Option("--memory", help="MB")] = 256,
    region: Annotated[str | None, typer.Option("--region", "-r")] = None,
    remove: Annotated[
        bool, typer.Option("--rm", help="Destroy the machine when it exits.")
    ] = False,
    detach: Annotated[bool, typer.Option("--detach", "-d")] = False,
    port: Annotated[
        list[str] | None,
        typer.Option(
            "--port",
            "-p",
            help="PORT[:MACHINE_PORT][/PROTOCOL[:HANDLER...]], e.g. 80:8080/tcp:http",
        ),
    ] = None,
    autostop: Annotated[
        str | None, typer.Option("--autostop", help="off, stop or suspend (with --port)")
    ] = None,
) -> None:
    """Run IMAGE as a machine; arguments after -- replace the image's command."""
    from hangar.model.services import services_from_port_flags

    api = client()
    command = list(ctx.args)
    try:
        services = services_from_port_flags(port or [])
    except ValueError as exc:
        fail(str(exc), 2)
    config: dict[str, Any] = {
        "image": image,
        "env": parse_env(env or []),
        "guest": {"cpus": cpus, "memory_mb": memory, "cpu_kind": "shared"},
        "restart": {"policy": "no"},
        "auto_destroy": remove,
    }
    if command:
        config["init"] = {"cmd": command}
    if services:
        config["services"] = [
            {
                **s.model_dump(mode="json", exclude_none=True),
                **({"autostop": autostop} if autostop else {}),
            }
            for s in services
        ]
    body: dict[str, Any] = {"config": config}
    if name:
        body["name"] = name
    if region:
        body["region"] = region
    call(ensure_app, api, app_name)
    started_at = time.monotonic()
    machine = call(api.create_machine, app_name, body)
    machine_id = machine["id"]
    errors.print(f"machine [bold]{machine_id}[/bold] ({machine['name']}) created")
    if detach:
        console.print(machine_id)
        return
    with errors.status("booting (pulling the image if needed)..."):
        machine = call(
            wait_until,
            api,
            app_name,
            machine_id,
            {"started", "stopped", "failed", "launch_failed", "destroyed"},
        )
    boot_s = time.monotonic() - started_at
    if machine["state"] in ("failed", "launch_failed"):
        fail(f"machine {machine_id} {machine['state']}: {machine.get('failure_reason', '')}")
    errors.print(f"started in {boot_s:.2f}s; output:")
    try:
        for chunk in api.follow_logs(app_name, machine_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except ApiError as exc:
        if exc.status_code != 404:
            raise
    machine = call(wait_until, api, app_name, machine_id, {"stopped", "destroyed", "failed"})
    total_s = time.monotonic() - started_at
    code = call(last_exit_code, api, app_name, machine_id)
    errors.print(
        f"machine {machine_id} {machine['state']}: exit code {code}; "
        f"create->started {boot_s:.2f}s, total {total_s:.2f}s"
    )
    raise typer.Exit(code if code is not None and 0 <= code < 256 else 1)


@machine_app.command("list")
def machine_list(
    app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP,
    all_machines: Annotated[bool, typer.Option("--all", help="Include destroyed.")] = False,
) -> None:
    machines = call(client().list_machines, app_name, all_machines)
    table = Table("ID", "NAME", "STATE", "REGION", "ADDRESS", "CHECKS", "IMAGE", "UPDATED")
    for item in machines:
        table.add_row(
            item["id"],
            item["name"],
            item["state"],
            item["region"],
            item.get("private_ip") or "",
            checks_summary(item.get("checks") or []),
            item["config"]["image"],
            item["updated_at"],
        )
    console.print(table)


def checks_summary(checks: list[dict[str, Any]]) -> str:
    """``2/3 passing; web critical`` from a machine's ``checks[]``; empty without checks."""
    if not checks:
        return ""
    passing = sum(1 for check in checks if check.get("status") == "passing")
    failing = [str(c.get("name")) for c in checks if c.get("status") not in ("passing", None)]
    summary = f"{passing}/{len(checks)} passing"
    return summary + (f"; {', '.join(failing)} failing" if failing else "")


@machine_app.command("status")
def machine_status(
    machine_id: str, app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP
) -> None:
    machine = call(client().get_machine, app_name, machine_id)
    console.print_json(json.dumps(machine))


def _simple_action(verb: str, machine_id: str, app_name: str, body: Any = None) -> None:
    call(client().machine_action, app_name, machine_id, verb, body)
    console.print(f"{verb} requested for {machine_id}")


@machine_app.command("start")
def machine_start(
    machine_id: str, app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP
) -> None:
    _simple_action("start", machine_id, app_name)


@machine_app.command("stop")
def machine_stop(
    machine_id: str,
    app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP,
    signal: Annotated[str | None, typer.Option("--signal", "-s")] = None,
    timeout: Annotated[str | None, typer.Option("--timeout", help="e.g. 10s")] = None,
) -> None:
    body = {k: v for k, v in {"signal": signal, "timeout": timeout}.items() if v is not None}
    _simple_action("stop", machine_id, app_name, body)


@machine_app.command("suspend")
def machine_suspend(
    machine_id: str, app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP
) -> None:
    """Save the machine's memory and devices and end its VM; `start` resumes it."""
    _simple_action("suspend", machine_id, app_name)


@machine_app.command("cordon")
def machine_cordon(
    machine_id: str, app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP
) -> None:
    """Take the machine out of the proxy's rotation (it runs on)."""
    _simple_action("cordon", machine_id, app_name)


@machine_app.command("uncordon")
def machine_uncordon(
    machine_id: str, app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP
) -> None:
    _simple_action("uncordon", machine_id, app_name)


@machine_app.command(
    "exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def machine_exec(
    ctx: typer.Context,
    machine_id: str,
    app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP,
    timeout: Annotated[int, typer.Option("--timeout", help="seconds", min=1, max=3600)] = 30,
    stdin: Annotated[
        str | None, typer.Option("--stdin", help="text for the command's stdin ('-': read it)")
    ] = None,
) -> None:
    """Run the command after -- inside the machine (never on the host); exits with its code."""
    command = list(ctx.args)
    if not command:
        fail("give the command after --, e.g. hangar machine exec ID -- uname -a", 2)
    text = sys.stdin.read() if stdin == "-" else stdin or ""
    result = call(client().exec, app_name, machine_id, command, timeout, text)
    sys.stdout.write(result.get("stdout", ""))
    sys.stdout.flush()
    sys.stderr.write(result.get("stderr", ""))
    for stream in ("stdout", "stderr"):
        if result.get(f"{stream}_truncated"):
            errors.print(f"({stream} cut at 1 MiB)")
    if result.get("timed_out"):
        errors.print(f"(killed after {timeout}s)")
    raise typer.Exit(int(result.get("exit_code", 0)) & 0xFF)


@machine_app.command("ps")
def machine_ps(
    machine_id: str, app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP
) -> None:
    """The processes running inside the machine."""
    table = Table("PID", "PPID", "USER", "STATE", "RSS", "CPU", "COMMAND")
    for process in call(client().processes, app_name, machine_id):
        table.add_row(
            str(process["pid"]),
            str(process["ppid"]),
            process["user"],
            process["state"],
            f"{process['rss'] // 1024} KiB",
            f"{process['rtime'] / 1000:.2f}s",
            process["command"],
        )
    console.print(table)


@machine_app.command("restart")
def machine_restart(
    machine_id: str, app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP
) -> None:
    _simple_action("restart", machine_id, app_name)


@machine_app.command("destroy")
def machine_destroy(
    machine_id: str,
    app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP,
    force: Annotated[bool, typer.Option("--force", "-f")] = False,
) -> None:
    call(client().destroy_machine, app_name, machine_id, force)
    console.print(f"destroy requested for {machine_id}")


@machine_app.command("logs")
def machine_logs(
    machine_id: str,
    app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
) -> None:
    api = client()
    if follow:
        for chunk in call(api.follow_logs, app_name, machine_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    else:
        sys.stdout.write(call(api.logs, app_name, machine_id))


@machine_app.command("wait")
def machine_wait(
    machine_id: str,
    app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP,
    state: Annotated[str, typer.Option("--state")] = "started",
    timeout: Annotated[int, typer.Option("--timeout", help="seconds, 1..60")] = 60,
) -> None:
    call(client().wait, app_name, machine_id, state, timeout)
    console.print(f"{machine_id} is {state}")


@machine_app.command("events")
def machine_events(
    machine_id: str,
    app_name: Annotated[str, typer.Option("--app", "-a")] = DEFAULT_APP,
    limit: Annotated[int | None, typer.Option("--limit")] = None,
) -> None:
    events = call(client().events, app_name, machine_id, limit)
    table = Table("TIME", "TYPE", "STATUS", "SOURCE", "DETAIL")
    for event in events:
        stamp = time.strftime("%H:%M:%S", time.localtime(event["timestamp"] / 1000))
        request = event.get("request")
        detail = event.get("reason") or (json.dumps(request) if request else "")
        table.add_row(stamp, event["type"], event["status"], event["source"], detail)
    console.print(table)


if __name__ == "__main__":
    app()
