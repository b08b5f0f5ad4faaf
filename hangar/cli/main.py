"""The ``hangar`` command."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape

from hangar.cli.bench import bench_app
from hangar.cli.client import ApiError, HangarClient
from hangar.cli.host import host_app
from hangar.cli.llm import llm_app
from hangar.cli.output import (
    AppOption,
    JsonFlag,
    api_error_line,
    call,
    console,
    errors,
    fail,
    print_json,
    unreachable_line,
)
from hangar.cli.progress import follow_boot
from hangar.cli.proxy import proxy
from hangar.cli.secrets import secrets_app
from hangar.cli.tables import Col, fit_table
from hangar.cli.tenancy import admin_app, audit_app, orgs_app, tokens_app
from hangar.cli.usage import usage
from hangar.cli.views import machine_status_view
from hangar.cli.volumes import resolve_mounts, volumes_app
from hangar.settings import DEFAULT_PORT, Settings

app = typer.Typer(
    help="hangar: GPU Machines on your own servers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
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
app.add_typer(volumes_app, name="volumes")
app.add_typer(llm_app, name="llm")
app.command("proxy")(proxy)
app.command("usage")(usage)

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
    # httpx logs every request at INFO: one line per call the model gateway forwards.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = Settings() if home is None else Settings(home=home)
    serve(settings, host, port, init=init)


EtcdOption = Annotated[
    str | None,
    typer.Option("--etcd", help="The fleet's etcd: client URLs, comma-separated ($HANGAR_ETCD)."),
]


def _fleet_settings(home: Path | None, etcd: str | None, **updates: Any) -> Settings:
    base = Settings() if home is None else Settings(home=home)
    values = {key: value for key, value in updates.items() if value is not None}
    if etcd is not None:
        values["etcd"] = tuple(url.strip() for url in etcd.split(",") if url.strip())
    settings = Settings.model_validate({**base.model_dump(), **values})
    if not settings.etcd:
        fail("no etcd endpoints: pass --etcd URL[,URL...] or set HANGAR_ETCD")
    return settings


@app.command("api")
def api_replica(
    etcd: EtcdOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    home: Annotated[Path | None, typer.Option(help="State directory ($HANGAR_HOME).")] = None,
) -> None:
    """Run a stateless Machines API replica over the fleet's etcd (run several)."""
    from hangar.fleet.replica import serve_replica

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve_replica(_fleet_settings(home, etcd), host, port)


@app.command("agent")
def host_agent(
    etcd: EtcdOption = None,
    host_id: Annotated[
        str | None, typer.Option("--host-id", help="This host's id ($HANGAR_HOST_ID).")
    ] = None,
    region: Annotated[str | None, typer.Option(help="This host's region.")] = None,
    zone: Annotated[str | None, typer.Option(help="This host's zone.")] = None,
    pool: Annotated[
        str | None,
        typer.Option(help="gpu (GPU machines only) or general (default: gpu if it has GPUs)."),
    ] = None,
    home: Annotated[Path | None, typer.Option(help="State directory ($HANGAR_HOME).")] = None,
) -> None:
    """Run this host's agent in a fleet: registers it in etcd, runs the machines placed here."""
    from hangar.fleet.host_agent import run_host_agent

    if pool not in (None, "gpu", "general"):
        fail(f"--pool must be gpu or general, not {pool!r}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_host_agent(
        _fleet_settings(home, etcd, host_id=host_id, region=region, zone=zone, pool=pool)
    )


@apps_app.command("create")
def apps_create(
    name: str,
    org: Annotated[
        str | None, typer.Option("--org", help="Org slug (default: the token's org, or personal).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    created = call(client().create_app, name, org)
    if as_json:
        print_json(created)
        return
    console.print(f"created app [bold]{name}[/bold] in org {created['organization']['slug']}")


@apps_app.command("list")
def apps_list(
    org: Annotated[str | None, typer.Option("--org")] = None, as_json: JsonFlag = False
) -> None:
    body = call(client().list_apps, org)
    if as_json:
        print_json(body)
        return
    rows = [
        [item["name"], item["organization"]["slug"], str(item["machine_count"])]
        for item in body["apps"]
    ]
    columns = [Col("NAME", whole=True), Col("ORG", whole=True), Col("MACHINES")]
    console.print(fit_table(columns, rows, console))


@apps_app.command("destroy")
def apps_destroy(name: str, as_json: JsonFlag = False) -> None:
    body = call(client().delete_app, name)
    if as_json:
        print_json(body)
        return
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
    app_name: AppOption = DEFAULT_APP,
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
    as_json: JsonFlag = False,
    volume: Annotated[
        list[str] | None,
        typer.Option(
            "--volume", "-v", help="NAME:/path (or vol_ID:/path): mount a volume of the app"
        ),
    ] = None,
) -> None:
    """Run IMAGE as a machine; arguments after -- replace the image's command. Shows each
    stage of the boot (pull, root filesystem, initramfs, boot), then the machine's output;
    with --detach, prints the machine's id (its JSON with --json) and returns."""
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
    if volume:
        config["mounts"] = call(resolve_mounts, api, app_name, volume)
    started_at = time.monotonic()
    machine = call(api.create_machine, app_name, body)
    machine_id = machine["id"]
    errors.print(f"machine [bold]{machine_id}[/bold] ({machine['name']}) created")
    if detach:
        if as_json:
            print_json(machine)
        else:
            typer.echo(machine_id)
        return
    machine = call(follow_boot, api, app_name, machine_id, errors)
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


MACHINE_COLUMNS = (
    Col("ID", whole=True),
    Col("NAME", whole=True),
    Col("STATE"),
    Col("REGION", drop=3),
    Col("ADDRESS", drop=2),
    Col("CHECKS", drop=1),
    Col("IMAGE", shrink=True),
    Col("UPDATED", drop=0),
)


@machine_app.command("list")
def machine_list(
    app_name: AppOption = DEFAULT_APP,
    all_machines: Annotated[bool, typer.Option("--all", help="Include destroyed.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """The app's machines; ids and names are printed whole, the image column is cut to fit."""
    machines = call(client().list_machines, app_name, all_machines)
    if as_json:
        print_json(machines)
        return
    rows = [
        [
            item["id"],
            item["name"],
            item["state"],
            item["region"],
            item.get("private_ip") or "",
            checks_summary(item.get("checks") or []),
            item["config"]["image"],
            item["updated_at"],
        ]
        for item in machines
    ]
    columns = [
        column
        for index, column in enumerate(MACHINE_COLUMNS)
        if column.drop is None or any(row[index] for row in rows)
    ]
    shown = [
        [row[index] for index, column in enumerate(MACHINE_COLUMNS) if column in columns]
        for row in rows
    ]
    console.print(fit_table(columns, shown, console))


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
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    as_json: JsonFlag = False,
) -> None:
    """The machine: state, addresses, checks and its latest events."""
    api = client()
    machine = call(api.get_machine, app_name, machine_id)
    if as_json:
        print_json(machine)
        return
    events = call(api.events, app_name, machine_id, 10)
    console.print(machine_status_view(machine, events, console))


def _simple_action(
    verb: str, machine_id: str, app_name: str, as_json: bool, body: Any = None
) -> None:
    answer = call(client().machine_action, app_name, machine_id, verb, body)
    if as_json:
        print_json(answer)
        return
    console.print(f"{verb} requested for {machine_id}")


@machine_app.command("start")
def machine_start(
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    as_json: JsonFlag = False,
) -> None:
    _simple_action("start", machine_id, app_name, as_json)


@machine_app.command("stop")
def machine_stop(
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    signal: Annotated[str | None, typer.Option("--signal", "-s")] = None,
    timeout: Annotated[str | None, typer.Option("--timeout", help="e.g. 10s")] = None,
    as_json: JsonFlag = False,
) -> None:
    body = {k: v for k, v in {"signal": signal, "timeout": timeout}.items() if v is not None}
    _simple_action("stop", machine_id, app_name, as_json, body)


@machine_app.command("suspend")
def machine_suspend(
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    as_json: JsonFlag = False,
) -> None:
    """Save the machine's memory and devices and end its VM; `start` resumes it."""
    _simple_action("suspend", machine_id, app_name, as_json)


@machine_app.command("cordon")
def machine_cordon(
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    as_json: JsonFlag = False,
) -> None:
    """Take the machine out of the proxy's rotation (it runs on)."""
    _simple_action("cordon", machine_id, app_name, as_json)


@machine_app.command("uncordon")
def machine_uncordon(
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    as_json: JsonFlag = False,
) -> None:
    _simple_action("uncordon", machine_id, app_name, as_json)


@machine_app.command(
    "exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def machine_exec(
    ctx: typer.Context,
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
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
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    as_json: JsonFlag = False,
) -> None:
    """The processes running inside the machine."""
    processes = call(client().processes, app_name, machine_id)
    if as_json:
        print_json(processes)
        return
    rows = [
        [
            str(process["pid"]),
            str(process["ppid"]),
            process["user"],
            process["state"],
            f"{process['rss'] // 1024} KiB",
            f"{process['rtime'] / 1000:.2f}s",
            process["command"],
        ]
        for process in processes
    ]
    columns = [
        Col("PID"),
        Col("PPID", drop=1),
        Col("USER", drop=2),
        Col("STATE", drop=3),
        Col("RSS"),
        Col("CPU", drop=4),
        Col("COMMAND"),
    ]
    console.print(fit_table(columns, rows, console))


@machine_app.command("restart")
def machine_restart(
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    as_json: JsonFlag = False,
) -> None:
    _simple_action("restart", machine_id, app_name, as_json)


@machine_app.command("destroy")
def machine_destroy(
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    force: Annotated[bool, typer.Option("--force", "-f")] = False,
    as_json: JsonFlag = False,
) -> None:
    answer = call(client().destroy_machine, app_name, machine_id, force)
    if as_json:
        print_json(answer)
        return
    console.print(f"destroy requested for {machine_id}")


def print_logs(machine_id: str, app_name: str, follow: bool) -> None:
    api = client()
    if follow:
        call(_write_all, call(api.follow_logs, app_name, machine_id))
    else:
        _write(call(api.logs, app_name, machine_id))


def _write_all(chunks: Iterable[str]) -> None:
    for chunk in chunks:
        _write(chunk)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@machine_app.command("logs")
def machine_logs(
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow until it stops.")] = False,
) -> None:
    """A machine's console output (``-f`` follows it until the machine stops)."""
    print_logs(machine_id, app_name, follow)


app.command("logs")(machine_logs)


@machine_app.command("wait")
def machine_wait(
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    state: Annotated[str, typer.Option("--state")] = "started",
    timeout: Annotated[int, typer.Option("--timeout", help="seconds, 1..60")] = 60,
    as_json: JsonFlag = False,
) -> None:
    answer = call(client().wait, app_name, machine_id, state, timeout)
    if as_json:
        print_json(answer)
        return
    console.print(f"{machine_id} is {state}")


@machine_app.command("events")
def machine_events(
    machine_id: str,
    app_name: AppOption = DEFAULT_APP,
    limit: Annotated[int | None, typer.Option("--limit")] = None,
    as_json: JsonFlag = False,
) -> None:
    events = call(client().events, app_name, machine_id, limit)
    if as_json:
        print_json(events)
        return
    rows = []
    for event in events:
        stamp = time.strftime("%H:%M:%S", time.localtime(event["timestamp"] / 1000))
        request = event.get("request")
        detail = event.get("reason") or (json.dumps(request) if request else "")
        rows.append([stamp, event["type"], event["status"], event["source"], detail])
    columns = [Col("TIME"), Col("TYPE"), Col("STATUS"), Col("SOURCE", drop=0), Col("DETAIL")]
    console.print(fit_table(columns, rows, console))


def main() -> None:
    """The ``hangar`` command: an API error or an unreachable API is one line and exit 1,
    never a traceback (also for errors met while streaming)."""
    try:
        app()
    except ApiError as exc:
        errors.print(f"[red]error:[/red] {escape(api_error_line(exc))}", highlight=False)
        raise SystemExit(1) from None
    except (OSError, httpx.TransportError) as exc:
        errors.print(f"[red]error:[/red] {escape(unreachable_line(exc))}", highlight=False)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
