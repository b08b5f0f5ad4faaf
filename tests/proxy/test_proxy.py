"""Through the proxy from the host, to real backend processes: routing, TLS, raw TCP and UDP,
balancing, limits, autostart, autostop and checks."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from hangar.clock import ManualClock
from hangar.proxy.checks import CheckRunner
from hangar.proxy.proxy import Proxy
from hangar.proxy.settings import ProxySettings
from hangar.proxy.static import MemoryBackends
from tests.proxy.conftest import (
    DOMAIN,
    BackendProcess,
    ProcessBackends,
    eventually,
    free_port,
    loopback_address,
    machine,
    service,
    start_backend,
)

PORTS = {80: 0, 443: 0, 5432: 0, 6000: 0, 5353: 0}


def settings(tmp_path: Path, **overrides: object) -> ProxySettings:
    values: dict[str, object] = {
        "domain": DOMAIN,
        "bind_host": "127.0.0.1",
        "port_map": PORTS,
        "state_dir": tmp_path / "proxy",
    }
    values.update(overrides)
    return ProxySettings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(
    backends: MemoryBackends, tmp_path: Path, clock: ManualClock | None = None, **overrides: object
) -> AsyncIterator[Proxy]:
    proxy = Proxy(backends, settings(tmp_path, **overrides), clock)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def client(proxy: Proxy, port: int = 80) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.host_port(port)}", timeout=20)


def host(app: str) -> dict[str, str]:
    return {"host": f"{app}.{DOMAIN}"}


async def started_machine(
    backends: ProcessBackends, machine_id: str, app: str, address: str, port: int, **svc: object
) -> BackendProcess:
    handlers = svc.pop("handlers", None)
    assert handlers is None or isinstance(handlers, list)
    published = int(svc.pop("published", 80))  # type: ignore[call-overload]
    item = machine(machine_id, app, address, [service(published, port, handlers, **svc)])
    backend = await backends.launch(item)
    backends.put(item)
    return backend


async def test_http_routes_by_host_with_keepalive_and_streaming(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    port = free_port(address)
    await started_machine(backends, "web-1", "web", address, port)
    await started_machine(backends, "api-1", "api", loopback_address(), port)
    async with running(backends, tmp_path) as proxy, client(proxy) as http:
        assert (await http.get("/", headers=host("web"))).text == "web-1"
        assert (await http.get("/", headers=host("api"))).text == "api-1"
        missing = await http.get("/", headers=host("nope"))
        assert missing.status_code == 404
        assert "nope" in missing.text
        # keep-alive: many requests on one connection, each answered in order
        for _ in range(5):
            assert (await http.get("/", headers=host("web"))).text == "web-1"
        spoofed = {"fly-client-ip": "6.6.6.6", "connection": "keep-alive, x-hop", "x-hop": "1"}
        seen = (await http.get("/headers", headers={**host("web"), **spoofed})).json()
        assert "x-hop" not in seen  # named by Connection: hop-by-hop, not forwarded
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["fly-client-ip"] == "127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"

        # a chunked request body and a chunked response stream through
        async def parts() -> AsyncIterator[bytes]:
            for index in range(50):
                yield f"piece {index};".encode()

        echoed = await http.post("/echo", headers=host("web"), content=parts())
        assert echoed.text == "".join(f"piece {i};" for i in range(50))
        sized = await http.post("/echo", headers=host("web"), content=b"x" * 300_000)
        assert sized.content == b"x" * 300_000
        streamed = await http.get("/stream?n=40", headers=host("web"))
        assert streamed.text.count("from web-1") == 40
        head = await http.head("/", headers=host("web"))
        assert head.status_code == 200 and head.headers["content-length"] == "5"
        assert (await http.get("/", headers=host("web"))).text == "web-1"


async def test_tls_with_a_generated_certificate_per_app(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    await started_machine(
        backends,
        "web-1",
        "web",
        address,
        free_port(address),
        handlers=["tls", "http"],
        published=443,
    )
    async with running(backends, tmp_path) as proxy:
        ca = tmp_path / "proxy" / "tls" / "ca.crt"
        context = ssl.create_default_context(cafile=str(await _ca_after_handshake(proxy, ca)))
        async with httpx.AsyncClient(verify=context, timeout=20) as https:
            url = f"https://127.0.0.1:{proxy.host_port(443)}/headers"
            response = await https.get(
                url, headers=host("web"), extensions={"sni_hostname": f"web.{DOMAIN}"}
            )
            assert response.json()["x-forwarded-proto"] == "https"
        async with httpx.AsyncClient(verify=context, timeout=20) as fresh:
            with pytest.raises(httpx.ConnectError):
                await fresh.get(url, extensions={"sni_hostname": f"other.{DOMAIN}"})
        for name in ("ca.key", "web.key", "web.crt"):
            mode = (tmp_path / "proxy" / "tls" / name).stat().st_mode
            assert stat.S_IMODE(mode) == 0o600, name


async def _ca_after_handshake(proxy: Proxy, ca: Path) -> Path:
    # The CA is made on the first handshake that needs it: make one, unverified.
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.host_port(443), ssl=insecure, server_hostname=f"web.{DOMAIN}"
    )
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    assert ca.exists()
    return ca


async def test_tls_with_an_operator_certificate(backends: ProcessBackends, tmp_path: Path) -> None:
    from hangar.proxy.tls import CertificateAuthority

    operator_ca = CertificateAuthority(tmp_path / "operator")
    cert_pem, key_pem = operator_ca.issue(f"web.{DOMAIN}")
    (tmp_path / "op.crt").write_bytes(cert_pem)
    (tmp_path / "op.key").write_bytes(key_pem)
    address = loopback_address()
    await started_machine(
        backends,
        "web-1",
        "web",
        address,
        free_port(address),
        handlers=["tls", "http"],
        published=443,
    )
    async with running(
        backends, tmp_path, tls_cert=tmp_path / "op.crt", tls_key=tmp_path / "op.key"
    ) as proxy:
        context = ssl.create_default_context(cafile=str(tmp_path / "operator" / "ca.crt"))
        async with httpx.AsyncClient(verify=context, timeout=20) as https:
            response = await https.get(
                f"https://127.0.0.1:{proxy.host_port(443)}/",
                headers=host("web"),
                extensions={"sni_hostname": f"web.{DOMAIN}"},
            )
            assert response.text == "web-1"
    assert not (tmp_path / "proxy" / "tls" / "web.crt").exists()


async def test_raw_tcp_and_tls_to_tcp_pass_bytes_through(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    port = free_port(address)
    item = machine(
        "db-1",
        "db",
        address,
        [service(5432, port, []), service(6000, port, ["tls"])],
    )
    await backends.launch(item)
    backends.put(item)
    request = b"GET / HTTP/1.1\r\nhost: anything\r\nconnection: close\r\n\r\n"
    async with running(backends, tmp_path) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.host_port(5432))
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        assert answer.startswith(b"HTTP/1.") and answer.endswith(b"db-1")
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.host_port(6000), ssl=insecure, server_hostname=f"db.{DOMAIN}"
        )
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        assert answer.endswith(b"db-1")


async def test_udp_is_relayed_per_client(backends: ProcessBackends, tmp_path: Path) -> None:
    address = loopback_address()
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]

    echo_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=(address, 0))
    port = echo_transport.get_extra_info("sockname")[1]
    try:
        backends.put(machine("dns-1", "dns", address, [service(5353, port, [], protocol="udp")]))
        async with running(backends, tmp_path) as proxy:
            answers: asyncio.Queue[bytes] = asyncio.Queue()

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                    answers.put_nowait(data)

            transport, _ = await loop.create_datagram_endpoint(
                Client, remote_addr=("127.0.0.1", proxy.host_port(5353))
            )
            try:
                transport.sendto(b"hello")
                assert await asyncio.wait_for(answers.get(), 20) == b"echo:hello"
                transport.sendto(b"again")
                assert await asyncio.wait_for(answers.get(), 20) == b"echo:again"
            finally:
                transport.close()
    finally:
        echo_transport.close()


async def test_balances_over_two_machines(backends: ProcessBackends, tmp_path: Path) -> None:
    address = loopback_address()
    port = free_port(address)
    await started_machine(backends, "web-1", "web", address, port)
    await started_machine(backends, "web-2", "web", loopback_address(), port)
    async with running(backends, tmp_path) as proxy, client(proxy) as http:
        answers = [(await http.get("/", headers=host("web"))).text for _ in range(10)]
    assert sorted(answers) == ["web-1"] * 5 + ["web-2"] * 5


async def test_past_hard_limit_requests_queue_then_get_503(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    backend = await started_machine(
        backends,
        "web-1",
        "web",
        address,
        free_port(address),
        concurrency={"type": "requests", "soft_limit": 1, "hard_limit": 1},
    )
    async with (
        running(backends, tmp_path, queue_limit=1, queue_timeout_s=30.0) as proxy,
        client(proxy) as first,
        client(proxy) as second,
        client(proxy) as third,
    ):
        held = asyncio.create_task(first.get("/hold", headers=host("web")))
        pool = proxy.pools[("web", 80)]
        await eventually(lambda: pool.load.get("web-1") == 1)
        queued = asyncio.create_task(second.get("/", headers=host("web")))
        await eventually(lambda: len(pool._waiters) == 1)
        rejected = await third.get("/", headers=host("web"))
        assert rejected.status_code == 503
        assert "queue is full" in rejected.text
        async with httpx.AsyncClient(timeout=20) as direct:
            await direct.get(f"http://{backend.host}:{backend.port}/release")
        assert (await held).text == "web-1 released"
        assert (await queued).text == "web-1"
    async with (
        running(backends, tmp_path, queue_limit=4, queue_timeout_s=0.2) as proxy,
        client(proxy) as first,
        client(proxy) as second,
    ):
        # /hold is released already: hold the machine with a request that has not ended.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.host_port(80))
        writer.write(
            f"POST /echo HTTP/1.1\r\nhost: web.{DOMAIN}\r\ncontent-length: 10\r\n\r\n".encode()
        )
        pool = proxy.pools[("web", 80)]
        await eventually(lambda: pool.load.get("web-1") == 1)
        timed_out = await second.get("/", headers=host("web"))
        assert timed_out.status_code == 503
        assert "within" in timed_out.text
        writer.write(b"0123456789")
        assert (await asyncio.wait_for(reader.readuntil(b"0123456789"), 20)).endswith(b"0123456789")
        writer.close()


async def test_a_stopped_machine_is_woken_by_a_request(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    item = machine("web-1", "web", address, [service(80, free_port(address))], state="stopped")
    backends.put(item)
    async with running(backends, tmp_path) as proxy, client(proxy) as http:
        response = await http.get("/", headers=host("web"))
        assert response.status_code == 200 and response.text == "web-1"
        assert backends.starts == ["web-1"]
        assert backends.get("web-1").state == "started"


async def test_a_woken_machine_with_a_check_gets_traffic_once_it_passes(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    item = machine(
        "web-1",
        "web",
        address,
        [
            service(
                80,
                free_port(address),
                checks=[
                    {"type": "http", "path": "/health", "interval": "1s", "grace_period": "0s"}
                ],
            )
        ],
        state="stopped",
    )
    backends.put(item)
    runner = CheckRunner(backends.set_checks, ManualClock())
    follower = asyncio.create_task(_feed_checks(backends, runner))
    try:
        async with running(backends, tmp_path) as proxy, client(proxy) as http:
            pending = asyncio.create_task(http.get("/", headers=host("web")))
            await eventually(lambda: "web-1" in backends.processes)
            await eventually(lambda: bool(backends.get("web-1").checks))
            # the first check may have run before the process listened: move the clock on
            clock = runner.clock
            assert isinstance(clock, ManualClock)
            while not pending.done():
                clock.advance(1.0)
                await asyncio.sleep(0.05)
            response = await pending
            assert response.text == "web-1"
            assert backends.get("web-1").check_state(0) == "passing"
    finally:
        follower.cancel()
        await runner.close()


async def _feed_checks(backends: MemoryBackends, runner: CheckRunner) -> None:
    async for machines in backends.watch():
        runner.update(machines)


async def test_idle_machines_stop_but_never_below_min_machines_running(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    port = free_port(address)
    options = {"autostop": "stop", "min_machines_running": 1}
    await started_machine(backends, "web-1", "web", address, port, **options)
    await started_machine(backends, "web-2", "web", loopback_address(), port, **options)
    clock = ManualClock()
    async with (
        running(
            backends, tmp_path, clock=clock, idle_stop_s=60.0, autostop_interval_s=10.0
        ) as proxy,
        client(proxy) as http,
    ):
        clock.advance(30.0)
        await asyncio.sleep(0)
        # web-2 served 30 s later than web-1 started: web-1 is the longer idle.
        answers = {(await http.get("/", headers=host("web"))).text for _ in range(1)}
        served = answers.pop()
        other = "web-2" if served == "web-1" else "web-1"
        for _ in range(4):  # 40 s: the other one passes 60 s idle, the served one does not
            clock.advance(10.0)
            await asyncio.sleep(0.01)
        await eventually(lambda: backends.get(other).state == "stopped")
        for _ in range(30):  # far past idle: the last one stays, for min_machines_running
            clock.advance(10.0)
            await asyncio.sleep(0.01)
        assert backends.get(served).state == "started"
        assert backends.stops == [(other, "stop")]
        assert (await http.get("/", headers=host("web"))).text == served


async def test_suspend_is_asked_for_when_autostop_says_so(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    await started_machine(backends, "web-1", "web", address, free_port(address), autostop=True)
    await started_machine(
        backends, "job-1", "job", loopback_address(), free_port(address), autostop="suspend"
    )
    clock = ManualClock()
    async with running(
        backends, tmp_path, clock=clock, idle_stop_s=60.0, autostop_interval_s=10.0
    ) as proxy:
        for _ in range(7):
            clock.advance(10.0)
            await asyncio.sleep(0.01)
        await eventually(lambda: len(backends.stops) == 2)
        assert sorted(backends.stops) == [("job-1", "suspend"), ("web-1", "stop")]
        async with client(proxy) as http:
            assert (await http.get("/", headers=host("job"))).text == "job-1"  # resumed


async def test_a_failing_check_takes_a_machine_out_of_rotation(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    port = free_port(address)
    check = {"type": "http", "path": "/health", "interval": "5s", "grace_period": "1s"}
    await started_machine(backends, "web-1", "web", address, port, checks=[check])
    second = await started_machine(
        backends, "web-2", "web", loopback_address(), port, checks=[check]
    )
    clock = ManualClock()
    runner = CheckRunner(backends.set_checks, clock)
    follower = asyncio.create_task(_feed_checks(backends, runner))
    try:
        async with running(backends, tmp_path) as proxy, client(proxy) as http:
            not_yet = await http.get("/", headers=host("web"))
            assert not_yet.status_code == 503  # checks not run yet: nobody in rotation
            clock.advance(1.0)
            await eventually(
                lambda: all(backends.get(m).check_state(0) == "passing" for m in ("web-1", "web-2"))
            )
            answers = {(await http.get("/", headers=host("web"))).text for _ in range(4)}
            assert answers == {"web-1", "web-2"}
            async with httpx.AsyncClient(timeout=20) as direct:
                await direct.get(f"http://{second.host}:{second.port}/fail")
            clock.advance(5.0)
            await eventually(lambda: backends.get("web-2").check_state(0) == "critical")
            status = backends.get("web-2").checks[0]
            assert status.status == "critical" and "500" in status.output
            assert status.name == f"servicecheck-00-http-{port}"
            await eventually(lambda: proxy.scaler.machines["web-2"].check_state(0) == "critical")
            answers = {(await http.get("/", headers=host("web"))).text for _ in range(6)}
            assert answers == {"web-1"}
            async with httpx.AsyncClient(timeout=20) as direct:
                await direct.get(f"http://{second.host}:{second.port}/heal")
            clock.advance(5.0)
            await eventually(lambda: backends.get("web-2").check_state(0) == "passing")
            answers = {(await http.get("/", headers=host("web"))).text for _ in range(4)}
            assert answers == {"web-1", "web-2"}
    finally:
        follower.cancel()
        await runner.close()


async def test_a_backend_in_a_network_namespace(
    backends: ProcessBackends, tmp_path: Path, netns: object
) -> None:
    from hangar.bench.netns import NamespaceLink

    assert isinstance(netns, NamespaceLink)
    backend = await start_backend("guest-1", netns.guest_ip, 8080, netns.command())
    try:
        backends.put(machine("guest-1", "guest", netns.guest_ip, [service(80, 8080)]))
        async with running(backends, tmp_path) as proxy, client(proxy) as http:
            assert (await http.get("/", headers=host("guest"))).text == "guest-1"
            seen = (await http.get("/headers", headers=host("guest"))).json()
            assert seen["fly-client-ip"] == "127.0.0.1"
    finally:
        await backend.stop()


async def test_limits_answer_with_4xx_and_5xx(backends: ProcessBackends, tmp_path: Path) -> None:
    address = loopback_address()
    await started_machine(backends, "web-1", "web", address, free_port(address))
    async with running(
        backends, tmp_path, max_header_bytes=1024, header_timeout_s=0.2, max_connections=2
    ) as proxy:
        port = proxy.host_port(80)
        async with client(proxy) as http:
            big = await http.get("/", headers={**host("web"), "x-big": "y" * 2000})
            assert big.status_code == 431
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: web.")  # and nothing more
        answer = await asyncio.wait_for(reader.read(), 20)
        assert answer.startswith(b"HTTP/1.1 408")
        writer.close()
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(reader.read(), 20)).startswith(b"HTTP/1.1 503")
        writer.close()
        for _, held_writer in held:
            held_writer.close()


async def test_pipelined_requests_are_answered_in_order(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    port = free_port(address)
    await started_machine(backends, "web-1", "web", address, port)
    await started_machine(backends, "web-2", "web", loopback_address(), port)
    async with running(backends, tmp_path) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.host_port(80))
        one = f"GET /stream?n=2 HTTP/1.1\r\nhost: web.{DOMAIN}\r\n\r\n"
        two = f"POST /echo HTTP/1.1\r\nhost: web.{DOMAIN}\r\ncontent-length: 6\r\n\r\nsecond"
        three = f"GET / HTTP/1.1\r\nhost: web.{DOMAIN}\r\nconnection: close\r\n\r\n"
        writer.write((one + two + three).encode())
        answer = await asyncio.wait_for(reader.read(), 20)
        writer.close()
    assert answer.count(b"HTTP/1.1 200") == 3
    first, second, third = (answer.index(m) for m in (b"part 1 from", b"second", b"\r\n\r\nweb-"))
    assert first < second < third


async def test_a_dead_or_silent_machine_gets_502_or_504(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    backend = await started_machine(backends, "web-1", "web", address, free_port(address))
    dead = loopback_address()
    backends.put(machine("dead-1", "dead", dead, [service(80, free_port(dead))]))
    async with (
        running(backends, tmp_path, response_timeout_s=0.3) as proxy,
        client(proxy) as http,
    ):
        refused = await http.get("/", headers=host("dead"))
        assert refused.status_code == 502 and "dead-1" in refused.text
        silent = await http.get("/hold", headers=host("web"))
        assert silent.status_code == 504
        async with httpx.AsyncClient(timeout=20) as direct:
            await direct.get(f"http://{backend.host}:{backend.port}/release")
        assert (await http.get("/", headers=host("web"))).text == "web-1"
        assert proxy.pools[("web", 80)].load == {}  # every lease given back


async def test_a_machine_that_answers_garbage_or_huge_headers_gets_502(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    answers = {
        "/huge": b"HTTP/1.1 200 OK\r\n" + b"x-filler: " + b"y" * 200_000 + b"\r\n\r\n",
        "/garbage": b"SPDY/9 what\r\n\r\n",
    }

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers[line.split()[1].decode()])
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, address, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        backends.put(machine("bad-1", "bad", address, [service(80, port)]))
        async with running(backends, tmp_path) as proxy, client(proxy) as http:
            for path in answers:
                response = await http.get(path, headers=host("bad"))
                assert response.status_code == 502, path
            assert proxy.pools[("bad", 80)].load == {}
    finally:
        server.close()
