"""``hangar llm deploy|list|status|scale|destroy|key``: model deployments behind the
OpenAI-compatible gateway."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from hangar.cli.client import HangarClient
from hangar.cli.output import JsonFlag, call, console, print_json

DEFAULT_ORG = "personal"

llm_app = typer.Typer(help="Models served with OpenAI's API.", no_args_is_help=True)
OrgOption = Annotated[str, typer.Option("--org", "-o", help="The deployment's org.")]


def _table(deployments: list[dict[str, Any]]) -> Table:
    table = Table(
        "NAME", "MODEL", "ENGINE", "REPLICAS", "MIN", "MAX", "REGION", "PROMPT", "COMPLETION"
    )
    for d in deployments:
        running = sum(1 for r in d["replicas"] if r["state"] == "started")
        table.add_row(
            d["name"],
            d["model"],
            d["engine"],
            f"{running}/{len(d['replicas'])}",
            str(d["min_replicas"]),
            str(d["max_replicas"]),
            d["region"],
            str(d["usage"]["prompt_tokens"]),
            str(d["usage"]["completion_tokens"]),
        )
    return table


@llm_app.command("deploy")
def llm_deploy(
    name: str,
    model: Annotated[
        str,
        typer.Option(
            "--model", help="PATH (a GGUF file on the server's host) or vol:VOLUME[:FILE]."
        ),
    ],
    org: OrgOption = DEFAULT_ORG,
    engine: Annotated[str, typer.Option("--engine", help="llama.cpp")] = "llama.cpp",
    image: Annotated[
        str | None, typer.Option("--image", help="An OpenAI-compatible server image instead.")
    ] = None,
    port: Annotated[int, typer.Option("--port", help="The port the engine listens on.")] = 8080,
    cpus: Annotated[int, typer.Option("--cpus")] = 1,
    memory_mb: Annotated[int, typer.Option("--memory-mb")] = 512,
    gpu_kind: Annotated[str | None, typer.Option("--gpu-kind", help="e.g. l40s")] = None,
    gpus: Annotated[int | None, typer.Option("--gpus")] = None,
    min_replicas: Annotated[int, typer.Option("--min")] = 0,
    max_replicas: Annotated[int, typer.Option("--max")] = 1,
    region: Annotated[str | None, typer.Option("--region", "-r")] = None,
    app_name: Annotated[
        str | None, typer.Option("--app", "-a", help="The replicas' app (default llm-NAME).")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Deploy a model: replicas are machines of an app, asleep when nobody calls."""
    body: dict[str, Any] = {
        "name": name,
        "model": model,
        "engine": "image" if image is not None else engine,
        "port": port,
        "cpus": cpus,
        "memory_mb": memory_mb,
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
    }
    for key, value in (
        ("image", image),
        ("region", region),
        ("app_name", app_name),
        ("gpu_kind", gpu_kind),
        ("gpus", gpus),
    ):
        if value is not None:
            body[key] = value
    deployment = call(HangarClient().create_deployment, org, body)
    if json_output:
        print_json(deployment)
        return
    console.print(_table([deployment]))


@llm_app.command("list")
def llm_list(org: OrgOption = DEFAULT_ORG, json_output: JsonFlag = False) -> None:
    """The org's deployments."""
    deployments = call(HangarClient().list_deployments, org)
    if json_output:
        print_json(deployments)
        return
    console.print(_table(deployments))


@llm_app.command("status")
def llm_status(name: str, org: OrgOption = DEFAULT_ORG, json_output: JsonFlag = False) -> None:
    """One deployment, its replicas (where they run) and the tokens it served."""
    deployment = call(HangarClient().get_deployment, org, name)
    if json_output:
        print_json(deployment)
        return
    console.print(_table([deployment]))
    replicas = Table("REPLICA", "STATE", "REGION", "HOST", "ADDRESS")
    for replica in deployment["replicas"]:
        replicas.add_row(
            replica["id"],
            replica["state"],
            replica["region"],
            replica["host"],
            replica["private_ip"],
        )
    console.print(replicas)


@llm_app.command("scale")
def llm_scale(
    name: str,
    org: OrgOption = DEFAULT_ORG,
    min_replicas: Annotated[int | None, typer.Option("--min")] = None,
    max_replicas: Annotated[int | None, typer.Option("--max")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Change how few replicas stay awake and how many may run."""
    body = {
        key: value
        for key, value in (("min_replicas", min_replicas), ("max_replicas", max_replicas))
        if value is not None
    }
    deployment = call(HangarClient().scale_deployment, org, name, body)
    if json_output:
        print_json(deployment)
        return
    console.print(_table([deployment]))


@llm_app.command("destroy")
def llm_destroy(name: str, org: OrgOption = DEFAULT_ORG) -> None:
    """Destroy a deployment, its replicas and their copies of the weights."""
    call(HangarClient().delete_deployment, org, name)
    console.print(f"destroyed {name}")


@llm_app.command("key")
def llm_key(name: str, org: OrgOption = DEFAULT_ORG) -> None:
    """A new API key that reaches this deployment only (shown once)."""
    created = call(HangarClient().create_deployment_key, org, name)
    console.print(created["key"])
