"""Multi-host: every stage on its own "host", a Linux network namespace with its own 10.x address, the
hosts joined by veth links to one bridge. A job spans the hosts and equals the single-host suite's
result exactly; then the link of the denoiser replica serving a job is cut mid-run (``ip link set
... down`` in its namespace, which resets no connection) and the job finishes on the other replica,
again with an identical image. Keepalive (1 s + 1 s here) is what notices the dead link.

Needs root and iproute2 (`ip netns`); skipped otherwise. Every name carries this process's id and
everything is removed in ``finally``.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from services.suite.launcher import ORCHESTRATOR_MODULE, start_service, wait_serving
from test_failover import DEVICES, STEPS, Cluster, _jobs, request, run, start_replicas, write_placement

#: Starts service processes: left out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

#: Keepalive of every service here: a ping each second, 1 s to answer it.
KEEPALIVE = {"LATENTWIRE_KEEPALIVE_TIME_S": "1", "LATENTWIRE_KEEPALIVE_TIMEOUT_S": "1"}
CUT_AFTER_STEP = 4
#: Which host each service runs on (text encoder and VAE share one).
HOSTS = {"orchestrator": 1, "text_encoder": 2, "vae": 2, "denoiser-a": 3, "denoiser-b": 4}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces and veth links"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command for network namespaces"
    probe = f"lwprobe{os.getpid()}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return "`ip netns add` fails here (no network namespace support)"
    _ip("netns", "del", probe, check=False)
    return None


class Network:
    """Namespaces as hosts, each with one veth link to a bridge in a "switch" namespace; this process (the
    test, in the root namespace) joins the bridge too, as address .254."""

    def __init__(self):
        self.tag = f"lw{os.getpid() % 100000}"
        used = _ip("-4", "route").stdout
        for _ in range(100):
            subnet = f"10.{random.randint(200, 249)}.{random.randint(0, 254)}"
            if f"{subnet}." not in used:
                break
        self.subnet = subnet
        self.namespaces: list[str] = []
        self.links: dict[int, tuple[str, str]] = {}  # host number -> (namespace, its end of the link)
        self.switch = self._namespace("sw")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        # The root namespace's own link, so the test reaches the orchestrator and the replicas.
        self.root_link = f"{self.tag}r"
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", f"{self.tag}rs")
        _ip("link", "set", f"{self.tag}rs", "netns", self.switch)
        _ip("-n", self.switch, "link", "set", f"{self.tag}rs", "master", "br0", "up")
        _ip("addr", "add", f"{subnet}.254/24", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")

    def _namespace(self, suffix: str) -> str:
        name = f"{self.tag}{suffix}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def add_host(self, number: int) -> str:
        """A namespace with address SUBNET.number on a veth link to the bridge; returns the address."""
        namespace = self._namespace(f"h{number}")
        link, peer = f"{self.tag}h{number}", f"{self.tag}h{number}s"
        _ip("link", "add", link, "type", "veth", "peer", "name", peer)
        _ip("link", "set", link, "netns", namespace)
        _ip("link", "set", peer, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", peer, "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{self.subnet}.{number}/24", "dev", link)
        _ip("-n", namespace, "link", "set", link, "up")
        self.links[number] = (namespace, link)
        return f"{self.subnet}.{number}"

    def prefix(self, number: int) -> list[str]:
        """Run a command on host ``number``."""
        return ["ip", "netns", "exec", self.links[number][0]]

    def cut(self, number: int) -> None:
        """Take host ``number``'s link down, inside its namespace: packets stop, no connection is reset."""
        namespace, link = self.links[number]
        _ip("-n", namespace, "link", "set", link, "down")

    def close(self) -> None:
        _ip("link", "del", self.root_link, check=False)
        for namespace in reversed(self.namespaces):
            _ip("netns", "del", namespace, check=False)


@pytest.fixture(scope="module")
def hosts(tiny_model, tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    log_dir = tmp_path_factory.mktemp("multihost-logs")
    network = Network()
    cluster = None
    try:
        by_number = {number: network.add_host(number) for number in sorted(set(HOSTS.values()))}
        addresses = {name: by_number[number] for name, number in HOSTS.items()}
        prefixes = {name: network.prefix(number) for name, number in HOSTS.items()}
        services, args = start_replicas(tiny_model, log_dir, host=addresses, prefixes=prefixes, env=KEEPALIVE)
        cluster = Cluster(services, args, log_dir)
        placement = write_placement(log_dir / "placement.yaml", services)
        cluster.services["orchestrator"] = start_service("orchestrator", ORCHESTRATOR_MODULE, [
            "--host", addresses["orchestrator"], "--port", "0", "--placement", str(placement),
            "--max-steps", "1000", "--step-timeout-s", "30",
        ], log_dir=log_dir, prefix=prefixes["orchestrator"], env=KEEPALIVE)
        for name, service in cluster.services.items():
            assert service.address.startswith(addresses[name] + ":"), (name, service.address)
            wait_serving(service.address, 120, name, service.process)
        yield network, cluster
    finally:
        if cluster is not None:
            for service in cluster.services.values():
                if service.process.poll() is None:
                    service.process.send_signal(signal.SIGKILL)
                    service.process.wait(30)
            cluster.stop()
        network.close()
    assert not [ns for ns in _ip("netns", "list").stdout.split() if ns.startswith(network.tag)], \
        "network namespaces were left behind"


def _single_host(suite, generate_request) -> np.ndarray:
    """The same request on the single-host suite (every service on 127.0.0.1)."""
    single = Cluster(dict(suite.services), {}, suite.log_dir, security=getattr(suite, "security", None))
    try:
        return run(single, generate_request)[1]
    finally:
        for channel in single.channels:
            channel.close()


def test_a_job_across_hosts_equals_the_single_host_result(hosts, suite):
    _, cluster = hosts
    generate_request = request("EulerAncestralDiscreteScheduler", seed=5, steps=12)
    _, pixels, steps = run(cluster, generate_request)
    assert steps == list(range(1, 13))
    expected = _single_host(suite, generate_request)
    assert float(np.abs(pixels - expected).max()) == 0.0


def test_cut_link_mid_job_finishes_on_the_other_replica_identically(hosts, suite, record_property):
    network, cluster = hosts
    generate_request = request("EulerAncestralDiscreteScheduler", seed=9)
    expected = _single_host(suite, generate_request)
    cut: dict[str, float | str] = {}
    step_times: dict[int, float] = {}

    def cut_after_a_few_steps(job_id: str, step: int) -> None:
        step_times[step] = time.monotonic()
        if step == CUT_AFTER_STEP:
            name = cluster.replica_running(job_id)
            assert name is not None, "no denoiser replica reports the job as running"
            network.cut(HOSTS[name])
            cut.update(name=name, at=time.monotonic())

    job_id, pixels, steps = run(cluster, generate_request, cut_after_a_few_steps)
    assert cut, "the job finished before the link was cut"
    survivor = next(name for name in DEVICES if name != cut["name"])
    assert steps == list(range(1, STEPS + 1))  # resumed after the last step, not restarted
    assert job_id in _jobs(cluster.channel(cluster.services[survivor].address), recent=True)
    assert float(np.abs(pixels - expected).max()) == 0.0
    gap = step_times[CUT_AFTER_STEP + 1] - float(cut["at"])
    record_property("failover_seconds_after_link_cut", round(gap, 3))
    print(f"\nstep {CUT_AFTER_STEP + 1} arrived {gap:.2f} s after the link of {cut['name']} was cut")
    # Keepalive of 1 s + 1 s notices the cut well before the 30 s step timeout would.
    assert gap < 15, f"the cut link took {gap:.1f} s to notice"
