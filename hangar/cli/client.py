"""The CLI's only way to hangar: HTTP to the Machines API.

Configured by ``HANGAR_API_URL`` and ``HANGAR_API_TOKEN``. Without a token, and only when the
API URL is this host's loopback, it uses the operator token the local server wrote to
``$HANGAR_HOME/operator.token``: the operator's secret never goes to another address.
A 429 is waited out (its ``Retry-After``) and retried a few times.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx

from hangar.settings import Settings

DEPLOY_TIMEOUT_S = 1800.0
RATE_LIMIT_RETRIES = 5
MAX_RETRY_WAIT_S = 10.0


def is_loopback_url(url: str) -> bool:
    """True for ``http(s)://`` URLs whose host is ``localhost`` or a loopback address."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_token(settings: Settings) -> str | None:
    """``HANGAR_API_TOKEN``, else (for a loopback API URL only) the local operator token
    file, else none."""
    if settings.api_token:
        return settings.api_token
    if not is_loopback_url(settings.api_url):
        return None
    try:
        return settings.operator_token_file.read_text().strip() or None
    except OSError:
        return None


def retry_after_s(response: httpx.Response) -> float:
    try:
        return min(MAX_RETRY_WAIT_S, max(0.0, float(response.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


class ApiError(Exception):
    def __init__(self, status_code: int, message: str, code: str) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.message = message
        self.code = code


class HangarClient:
    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        settings: Settings | None = None,
    ) -> None:
        headers = {}
        self._sleep = sleep
        if base_url is None or token is None:
            settings = settings or Settings()
            base_url = base_url or settings.api_url
            token = token if token is not None else default_token(settings)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(75.0, connect=5.0),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        for _ in range(RATE_LIMIT_RETRIES):
            if response.status_code != 429:
                break
            self._sleep(retry_after_s(response))
            response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
                raise ApiError(response.status_code, body.get("error", ""), body.get("status", ""))
            except ValueError:
                raise ApiError(response.status_code, response.text, "") from None
        if not response.content:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def stream_text(self, path: str, params: dict[str, Any] | None = None) -> Iterator[str]:
        with self._http.stream("GET", path, params=params, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                body = response.json()
                raise ApiError(response.status_code, body.get("error", ""), body.get("status", ""))
            yield from response.iter_text()

    # apps
    def create_app(self, name: str, org_slug: str | None = None) -> Any:
        body = {"app_name": name} | ({"org_slug": org_slug} if org_slug else {})
        return self.request("POST", "/v1/apps", json=body)

    def get_app(self, name: str) -> Any:
        return self.request("GET", f"/v1/apps/{name}")

    def list_apps(self, org_slug: str | None = None) -> Any:
        params = {"org_slug": org_slug} if org_slug else {}
        return self.request("GET", "/v1/apps", params=params)

    def delete_app(self, name: str) -> Any:
        return self.request("DELETE", f"/v1/apps/{name}")

    # machines
    def machines_path(self, app: str, machine_id: str = "", verb: str = "") -> str:
        path = f"/v1/apps/{app}/machines"
        if machine_id:
            path += f"/{machine_id}"
        if verb:
            path += f"/{verb}"
        return path

    def create_machine(self, app: str, body: dict[str, Any]) -> Any:
        return self.request("POST", self.machines_path(app), json=body)

    def get_machine(self, app: str, machine_id: str) -> Any:
        return self.request("GET", self.machines_path(app, machine_id))

    def list_machines(self, app: str, include_deleted: bool = False) -> Any:
        return self.request(
            "GET", self.machines_path(app), params={"include_deleted": include_deleted}
        )

    def machine_action(self, app: str, machine_id: str, verb: str, body: Any = None) -> Any:
        return self.request("POST", self.machines_path(app, machine_id, verb), json=body)

    def destroy_machine(self, app: str, machine_id: str, force: bool = False) -> Any:
        return self.request(
            "DELETE", self.machines_path(app, machine_id), params={"force": str(force).lower()}
        )

    def exec(
        self, app: str, machine_id: str, command: list[str], timeout_s: int, stdin: str = ""
    ) -> Any:
        body = {"command": command, "timeout": timeout_s, "stdin": stdin}
        # The command may run for timeout_s: the request waits that long and a margin.
        return self.request(
            "POST",
            self.machines_path(app, machine_id, "exec"),
            json=body,
            timeout=httpx.Timeout(timeout_s + 60.0, connect=5.0),
        )

    def processes(self, app: str, machine_id: str) -> Any:
        return self.request("GET", self.machines_path(app, machine_id, "ps"))

    # secrets
    def list_secrets(self, app: str) -> Any:
        return self.request("GET", f"/v1/apps/{app}/secrets")

    def update_secrets(self, app: str, values: dict[str, str | None]) -> Any:
        return self.request("POST", f"/v1/apps/{app}/secrets", json={"values": values})

    def wait(self, app: str, machine_id: str, state: str, timeout_s: int = 60) -> Any:
        return self.request(
            "GET",
            self.machines_path(app, machine_id, "wait"),
            params={"state": state, "timeout": timeout_s},
        )

    def events(self, app: str, machine_id: str, limit: int | None = None) -> Any:
        params = {"limit": limit} if limit else {}
        return self.request("GET", self.machines_path(app, machine_id, "events"), params=params)

    def logs(self, app: str, machine_id: str) -> str:
        return str(self.request("GET", self.machines_path(app, machine_id, "logs")) or "")

    def follow_logs(self, app: str, machine_id: str) -> Iterator[str]:
        return self.stream_text(self.machines_path(app, machine_id, "logs"), {"follow": "true"})

    def runs(self, app: str, machine_id: str) -> Any:
        return self.request("GET", self.machines_path(app, machine_id, "runs"))

    # usage
    def usage(
        self, org_slug: str, start: str | None, end: str | None, group_by: str = "app"
    ) -> Any:
        params = {"group_by": group_by}
        if start is not None:
            params["from"] = start
        if end is not None:
            params["to"] = end
        return self.request("GET", f"/v1/orgs/{org_slug}/usage", params=params)

    # volumes
    def volumes_path(self, app: str, volume_id: str = "", verb: str = "") -> str:
        path = f"/v1/apps/{app}/volumes"
        if volume_id:
            path += f"/{volume_id}"
        if verb:
            path += f"/{verb}"
        return path

    def create_volume(self, app: str, body: dict[str, Any]) -> Any:
        return self.request("POST", self.volumes_path(app), json=body)

    def list_volumes(self, app: str, include_deleted: bool = False) -> Any:
        return self.request(
            "GET", self.volumes_path(app), params={"include_deleted": include_deleted}
        )

    def get_volume(self, app: str, volume_id: str) -> Any:
        return self.request("GET", self.volumes_path(app, volume_id))

    def update_volume(self, app: str, volume_id: str, body: dict[str, Any]) -> Any:
        return self.request("POST", self.volumes_path(app, volume_id), json=body)

    def extend_volume(self, app: str, volume_id: str, size_gb: int) -> Any:
        return self.request(
            "PUT", self.volumes_path(app, volume_id, "extend"), json={"size_gb": size_gb}
        )

    def delete_volume(self, app: str, volume_id: str) -> Any:
        return self.request("DELETE", self.volumes_path(app, volume_id))

    def list_snapshots(self, app: str, volume_id: str) -> Any:
        return self.request("GET", self.volumes_path(app, volume_id, "snapshots"))

    def create_snapshot(self, app: str, volume_id: str) -> Any:
        return self.request("POST", self.volumes_path(app, volume_id, "snapshots"))

    # orgs, tokens, audit
    def create_org(self, slug: str, name: str | None = None) -> Any:
        return self.request("POST", "/v1/orgs", json={"slug": slug, "name": name})

    def list_orgs(self) -> Any:
        return self.request("GET", "/v1/orgs")

    def get_org(self, slug: str) -> Any:
        return self.request("GET", f"/v1/orgs/{slug}")

    def set_quotas(self, slug: str, quotas: dict[str, Any]) -> Any:
        return self.request("PUT", f"/v1/orgs/{slug}/quotas", json=quotas)

    def create_token(self, body: dict[str, Any]) -> Any:
        return self.request("POST", "/v1/tokens", json=body)

    def list_tokens(self, org_slug: str | None = None) -> Any:
        return self.request("GET", "/v1/tokens", params={"org_slug": org_slug} if org_slug else {})

    def revoke_token(self, token_id: str) -> Any:
        return self.request("DELETE", f"/v1/tokens/{token_id}")

    def audit(self, org_slug: str | None = None, limit: int = 100) -> Any:
        params: dict[str, Any] = {"limit": limit}
        if org_slug:
            params["org_slug"] = org_slug
        return self.request("GET", "/v1/audit", params=params)

    # model deployments
    def llm_path(self, org: str, name: str = "", verb: str = "") -> str:
        path = f"/v1/orgs/{org}/llm/deployments"
        return path + (f"/{name}" if name else "") + (f"/{verb}" if verb else "")

    def create_deployment(self, org: str, body: dict[str, Any]) -> Any:
        # The first deploy on a host builds the engine (minutes).
        return self.request("POST", self.llm_path(org), json=body, timeout=DEPLOY_TIMEOUT_S)

    def list_deployments(self, org: str) -> Any:
        return self.request("GET", self.llm_path(org))

    def get_deployment(self, org: str, name: str) -> Any:
        return self.request("GET", self.llm_path(org, name))

    def scale_deployment(self, org: str, name: str, body: dict[str, Any]) -> Any:
        return self.request("POST", self.llm_path(org, name, "scale"), json=body)

    def delete_deployment(self, org: str, name: str) -> Any:
        return self.request("DELETE", self.llm_path(org, name), timeout=DEPLOY_TIMEOUT_S)

    def create_deployment_key(self, org: str, name: str) -> Any:
        return self.request("POST", self.llm_path(org, name, "keys"))
