"""Replicas found by DNS (services/orchestrator/discovery.py): a stage address dns:///NAME:PORT is every address
NAME resolves to, re-resolved while the orchestrator runs.

The end-to-end test is real all the way: two VAE processes listen on the loopback aliases 127.0.0.2 and
127.0.0.3 with the same port, a test name resolves to both through the system resolver (two /etc/hosts lines,
as a Kubernetes headless Service resolves to its pods), and a real orchestrator, given only
``--vae-address dns:///NAME:PORT``, spreads jobs over both; when a line leaves /etc/hosts its replica drops out
(while its process still runs and reports SERVING), and it rejoins when the line comes back. It needs root
(to edit /etc/hosts) and Linux's 127/8 loopback; it skips, saying so, without them.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from latentwire.client import Client
from latentwire.common.v1 import status_pb2, status_pb2_grpc
from latentwire.orchestrator.v1 import orchestrator_pb2_grpc
from services.orchestrator import discovery
from services.orchestrator.config import build_parser, settings_from_flags
from services.orchestrator.placement import ReplicaPool, ReplicaSpec, load_placement_file
from services.runtime.errors import Unavailable
from services.suite.launcher import ORCHESTRATOR_MODULE, STAGES, start_service, wait_serving

HOSTS = Path("/etc/hosts")
ALIASES = ("127.0.0.2", "127.0.0.3")
#: Seconds between two resolutions in the test orchestrator; the test waits a few of them after each edit.
INTERVAL_S = 0.5


# -- parsing and the pool, no processes ------------------------------------------------------------


@pytest.mark.parametrize("text,host,port", [
    ("dns:///denoiser-headless.latentwire.svc:50053", "denoiser-headless.latentwire.svc", 50053),
    ("dns:vae:50054", "vae", 50054),
    ("DNS:///[fd00::7]:1", "fd00::7", 1),
])
def test_dns_targets_parse(text, host, port):
    target = discovery.parse_dns_target(text)
    assert (target.host, target.port) == (host, port)
    assert discovery.parse_dns_target(target.address) == target


@pytest.mark.parametrize("text,words", [
    ("dns:///vae", "port"),
    ("dns://8.8.8.8/vae:50054", "DNS server"),
    ("dns:///vae:0", "between 1 and 65535"),
    ("dns:///a b:1", "dns:///HOST:PORT"),
])
def test_bad_dns_targets_say_what_to_fix(text, words):
    with pytest.raises(ValueError, match=words):
        discovery.parse_dns_target(text)


def test_flags_and_placement_take_dns_targets(tmp_path):
    flags = build_parser().parse_args(["--text-encoder-address", "te:50052", "--denoiser-address",
                                       "dns:///denoiser-headless:50053", "--vae-address", "dns:vae-headless:50054",
                                       "--discovery-interval-s", "3"])
    placement = settings_from_flags(flags).placement
    assert placement["denoiser"] == (ReplicaSpec("dns:///denoiser-headless:50053", discovery_interval_s=3.0),)
    assert placement["vae"][0].address == "dns:///vae-headless:50054"
    assert placement["text_encoder"][0].discovery_interval_s == 10.0  # not a DNS target; unused
    path = tmp_path / "placement.yaml"
    path.write_text("denoiser:\n  - {address: 'dns:///gpu-a:50053', device: a100}\n  - '10.0.0.9:50053'\n")
    assert [spec.address for spec in load_placement_file(path)["denoiser"]] == ["dns:///gpu-a:50053",
                                                                                "10.0.0.9:50053"]
    path.write_text("controlnet:\n  - 'dns:///controlnet-headless:50057'\n")
    with pytest.raises(ValueError, match="controlnet replicas cannot come from DNS"):
        load_placement_file(path)
    path.write_text("vae:\n  - 'dns:///vae-headless'\n")
    with pytest.raises(ValueError, match=r"vae\[0\].*port"):
        load_placement_file(path)
    with pytest.raises(ValueError, match="discovery-interval-s"):
        settings_from_flags(build_parser().parse_args([*["--text-encoder-address", "a:1", "--denoiser-address", "a:2",
                                                         "--vae-address", "a:3"], "--discovery-interval-s", "0"]))


def test_pool_follows_the_answers_and_keeps_its_rotation():
    """add_replica / remove_replica as DnsDiscovery drives them, on a pool without channels (health set by hand)."""
    async def scenario():
        pool = ReplicaPool("vae", (ReplicaSpec("dns:///vae-headless:50054", device="cpu"),), lambda *a, **k: None,
                           wait_s=0.05)
        source = pool.discovery.sources[0]
        assert pool.replicas == [] and pool.devices == {"cpu"}
        with pytest.raises(Unavailable) as empty:
            await pool.pick()
        assert empty.value.reason == "NO_HEALTHY_REPLICA"
        assert "replicas: none; DNS: dns:///vae-headless:50054 [cpu]: not resolved yet" in empty.value.message
        pool.discovery._apply(source, ["10.0.0.1:50054", "10.0.0.2:50054", "10.0.0.3:50054"])
        for replica in pool.replicas:
            replica.serving = True
        assert [r.device for r in pool.replicas] == ["cpu"] * 3
        first = pool.pick_now()
        assert first.address == "10.0.0.1:50054"
        pool.discovery._apply(source, ["10.0.0.1:50054", "10.0.0.3:50054"])  # .2 left: the next pick is .3
        assert pool.pick_now().address == "10.0.0.3:50054"
        assert pool.pick_now().address == "10.0.0.1:50054"
        pool.mark_down(first, "gone")  # a replica DNS still names: watched again (no channel here: cancel it)
        pool._watches.pop(first).cancel()
        pool.discovery._apply(source, ["10.0.0.3:50054"])
        assert [r.address for r in pool.replicas] == ["10.0.0.3:50054"] and first.state.startswith("REMOVED")
        pool.mark_down(first, "late failure of a removed replica")  # no error, no watch
        assert first not in pool._watches
        pool.advance(first)
        assert "1 address(es)" in pool.discovery.describe()
        pool.discovery._apply(source, [])
        assert pool.replicas == [] and "no addresses" in pool.discovery.describe()

        # A placed replica that DNS also names stays one replica (with the placed label).
        mixed = ReplicaPool("vae", (ReplicaSpec("10.0.0.9:50054", device="l4"),
                                    ReplicaSpec("dns:///vae-headless:50054", device="cpu")), lambda *a, **k: None)
        mixed.discovery._apply(mixed.discovery.sources[0], ["10.0.0.8:50054", "10.0.0.9:50054"])
        assert [(r.address, r.device) for r in mixed.replicas] == [("10.0.0.9:50054", "l4"), ("10.0.0.8:50054", "cpu")]
        assert mixed.devices == {"l4", "cpu"}
    asyncio.run(scenario())


def test_discovered_replicas_verify_tls_against_the_name_they_came_by(tmp_path):
    """A replica dialled by IP checks the certificate against the DNS name; plaintext stays plaintext."""
    from latentwire.cli.certs import write_certificates
    from latentwire.client.security import PLAINTEXT, CertificateDir
    from services.runtime import security

    assert discovery.replica_security("vae-headless") == PLAINTEXT
    write_certificates(tmp_path, names=["orchestrator"])
    previous = security.default_channel_security()
    security.set_default_channel_security(CertificateDir(tmp_path).client("orchestrator"))
    try:
        secured = discovery.replica_security("vae-headless")
        assert secured.tls and secured.server_name == "vae-headless"
        assert ("grpc.ssl_target_name_override", "vae-headless") in secured.options()
        assert secured.certificate_chain == security.default_channel_security().certificate_chain
    finally:
        security.set_default_channel_security(previous)


def test_discovered_replicas_over_tls_verify_the_dns_name(tmp_path):
    """Two TLS servers whose certificate names only "lw-...test" (no IP), behind that name in /etc/hosts: a pool fed
    by DNS discovery reaches both (health SERVING over TLS), because it verifies the name it resolved; dialled by
    IP without that, the same handshakes fail."""
    why = _can_run()
    if why:
        pytest.skip(why)
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from latentwire.cli.certs import write_certificates
    from latentwire.client.security import CertificateDir
    from services.orchestrator.placement import STAGE_SERVICES
    from services.runtime import security
    from services.runtime.channels import aio_channel

    hosts = EtcHosts(f"lw-tls-{uuid.uuid4().hex[:10]}.test")
    certificates = CertificateDir(write_certificates(tmp_path, names=["vae", "orchestrator"], hosts=[hosts.name]))
    port = _port_free_on_both()

    async def scenario():
        servers = []
        for ip in ALIASES:
            server = grpc.aio.server()
            servicer = health.aio.HealthServicer()
            await servicer.set(STAGE_SERVICES["vae"], health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            credentials = grpc.ssl_server_credentials([(certificates.key("vae").read_bytes(),
                                                        certificates.cert("vae").read_bytes())])
            assert server.add_secure_port(f"{ip}:{port}", credentials) == port
            await server.start()
            servers.append(server)
        previous = security.default_channel_security()
        security.set_default_channel_security(certificates.client("orchestrator"))
        spec = ReplicaSpec(f"dns:///{hosts.name}:{port}", discovery_interval_s=0.5)

        def by_name(address, server_name=None):  # as the orchestrator's servicer opens replica channels
            return aio_channel(address, security=discovery.replica_security(server_name) if server_name else None)

        def by_ip_only(address, server_name=None):
            return aio_channel(address)

        async def serving(factory, wait_s: float) -> list[str]:
            pool = ReplicaPool("vae", (spec,), factory, wait_s=wait_s)
            pool.start()
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + wait_s
                while loop.time() < deadline and not (len(pool.replicas) == 2 and all(r.serving for r in pool.replicas)):
                    await asyncio.sleep(0.05)
                return sorted(f"{r.address} {r.state}" for r in pool.replicas)
            finally:
                await pool.close()

        try:
            assert await serving(by_name, 20.0) == [f"{ip}:{port} SERVING" for ip in ALIASES]
            refused = await serving(by_ip_only, 3.0)
            assert len(refused) == 2 and not any(state.endswith("SERVING") for state in refused), refused
        finally:
            security.set_default_channel_security(previous)
            for server in servers:
                await server.stop(None)

    hosts.set(*ALIASES)
    try:
        asyncio.run(scenario())
    finally:
        hosts.clear()


def test_resolver_reads_every_address_of_a_name():
    async def scenario():
        assert await discovery.resolve(discovery.DnsTarget("localhost", 7)) in (["127.0.0.1:7"],
                                                                                  ["127.0.0.1:7", "[::1]:7"])
        assert await discovery.resolve(discovery.DnsTarget(f"lw-{uuid.uuid4().hex}.invalid", 7)) == []
    asyncio.run(scenario())


# -- the real thing: two VAE processes behind one name ------------------------------------------------


class EtcHosts:
    """Lines for one test name in /etc/hosts, removed again afterwards (only ours: the file is shared)."""

    def __init__(self, name: str):
        self.name = name

    def set(self, *addresses: str) -> None:
        kept = [line for line in HOSTS.read_text().splitlines() if not line.rstrip().endswith(" " + self.name)]
        HOSTS.write_text("\n".join([*kept, *(f"{address} {self.name}" for address in addresses)]) + "\n")

    def clear(self) -> None:
        self.set()


def _port_free_on_both() -> int:
    for _ in range(20):
        with socket.socket() as first:
            first.bind((ALIASES[0], 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind((ALIASES[1], port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both loopback aliases")


def _can_run() -> str | None:
    if not os.access(HOSTS, os.W_OK):
        return "needs write access to /etc/hosts (root) to make a name resolve to two addresses"
    try:
        _port_free_on_both()
    except OSError as error:
        return f"needs the loopback aliases {', '.join(ALIASES)} (Linux 127/8): {error}"
    return None


def _recent_jobs(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        status = status_pb2_grpc.StatusServiceStub(channel).GetStatus(status_pb2.GetStatusRequest(), timeout=10)
    return {job.job_id for job in status.recent_jobs}


@pytest.fixture(scope="module")
def dns_vaes(suite, tiny_model, tmp_path_factory):
    """Two VAE replicas behind one name, and an orchestrator that knows only the name (the suite's text encoder and
    denoiser are its other stages)."""
    why = _can_run()
    if why:
        pytest.skip(why)
    log_dir = tmp_path_factory.mktemp("discovery-logs")
    hosts = EtcHosts(f"lw-vae-{uuid.uuid4().hex[:10]}.test")
    hosts.set(*ALIASES)
    services = {}
    try:
        port = _port_free_on_both()
        with ThreadPoolExecutor(2) as pool:
            futures = {ip: pool.submit(start_service, f"vae-{ip}", STAGES["vae"],
                                       ["--host", ip, "--port", str(port), "--model", str(tiny_model)],
                                       log_dir=log_dir) for ip in ALIASES}
            failures = []
            for ip, future in futures.items():  # keep every process that started, so `finally` stops it
                try:
                    services[ip] = future.result()
                except Exception as error:
                    failures.append(error)
            if failures:
                raise failures[0]
        # The replicas SERVING first, as a headless Service lists only ready pods: the orchestrator's health streams
        # then find them up at once (one opened earlier would back off, up to 5 s, while the process loads).
        for ip in ALIASES:
            wait_serving(services[ip].address, 120, f"vae-{ip}", services[ip].process)
        services["orchestrator"] = start_service("orchestrator", ORCHESTRATOR_MODULE, [
            "--port", "0", "--text-encoder-address", suite.services["text_encoder"].address,
            "--denoiser-address", suite.services["denoiser"].address,
            "--vae-address", f"dns:///{hosts.name}:{port}", "--discovery-interval-s", str(INTERVAL_S),
            "--replica-wait-s", "20"], log_dir=log_dir)
        for name, service in services.items():
            wait_serving(service.address, 120, name, service.process)
        yield hosts, services
    finally:
        hosts.clear()
        for service in services.values():
            service.process.terminate()
        for service in services.values():
            try:
                service.process.wait(30)
            except Exception:
                service.process.kill()


def _generate(address: str, seed: int) -> str:
    request = Client.build_request("a lighthouse", seed=seed, steps=2, width=64, height=64)
    with grpc.insecure_channel(address) as channel:
        for event in orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Generate(request, timeout=120):
            if event.WhichOneof("event") == "accepted":
                job_id = event.accepted.job_id
            if event.WhichOneof("event") == "result":
                return job_id
    raise AssertionError("the stream ended without a result")


def _served(services, job_ids) -> dict[str, int]:
    """How many of ``job_ids`` each VAE replica ran."""
    return {ip: len(set(job_ids) & _recent_jobs(services[ip].address)) for ip in ALIASES}


def _until_both_serve(services, orchestrator: str, first_seed: int, most: int = 8) -> dict[str, int]:
    """Run jobs until each VAE replica ran one (at most ``most`` jobs); how many each ran. A replica's health
    stream may report SERVING a moment after the orchestrator itself is up, so the first jobs may all go to one."""
    jobs = []
    for seed in range(first_seed, first_seed + most):
        jobs.append(_generate(orchestrator, seed))
        served = _served(services, jobs)
        if len(jobs) >= 2 and min(served.values()) >= 1:
            break
    return served


@pytest.mark.slow
def test_jobs_spread_over_the_addresses_a_name_resolves_to(dns_vaes):
    hosts, services = dns_vaes
    orchestrator = services["orchestrator"].address
    served = _until_both_serve(services, orchestrator, 0)
    assert min(served.values()) >= 1, f"both resolved replicas should get jobs, round robin: {served}"

    # The second address leaves the name (a pod left the headless Service): its process still runs and is SERVING,
    # but the orchestrator no longer sends it work.
    hosts.set(ALIASES[0])
    time.sleep(INTERVAL_S * 6)
    jobs = [_generate(orchestrator, seed) for seed in range(10, 13)]
    assert _served(services, jobs) == {ALIASES[0]: 3, ALIASES[1]: 0}

    # It comes back (scaled up again): it rejoins the rotation.
    hosts.set(*ALIASES)
    time.sleep(INTERVAL_S * 6)
    served = _until_both_serve(services, orchestrator, 20)
    assert served[ALIASES[1]] >= 1, f"the address back in DNS should get jobs again: {served}"
