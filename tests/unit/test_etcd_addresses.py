"""meshd.sources.etcd_addresses: every address of the configured etcd endpoints, host names
resolved, so that no VIP can capture meshd's own connections to its registry (issue 12 item 6).
Only names that resolve without the network (localhost from /etc/hosts) or fail before any
query (a label longer than 63 characters) are used."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address, ip_network

from meshd.model import check_services, parse_service
from meshd.sources.etcd_addresses import resolve_etcd_addresses

BAD_NAME = "a" * 64 + ".example"  # rejected before any DNS query


def localhost() -> set:
    return {ip_address(i[4][0]) for i in socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)}


def test_literals_and_host_names_are_all_returned() -> None:
    got = asyncio.run(resolve_etcd_addresses([
        "https://10.0.0.1:2379", "http://[fd00::5]:2379", "http://localhost:2379", "https://localhost:2380",
        "unix:///var/lib/meshd/default/etcd-sock/client.sock:1"]))
    assert localhost() and localhost() <= got
    assert got == {ip_address("10.0.0.1"), ip_address("fd00::5")} | localhost()


def test_a_name_that_does_not_resolve_is_logged_not_fatal(caplog) -> None:
    got = asyncio.run(resolve_etcd_addresses([f"https://{BAD_NAME}:2379", "https://10.0.0.1:2379"]))
    assert got == {ip_address("10.0.0.1")}
    assert f"cannot resolve {BAD_NAME}" in caplog.text and "not protected" in caplog.text


def test_resolution_is_bounded_in_time(caplog) -> None:
    got = asyncio.run(resolve_etcd_addresses(["http://localhost:2379", "http://10.0.0.1:2379"], timeout=0))
    assert got == {ip_address("10.0.0.1")}
    assert "resolving localhost took longer than 0s" in caplog.text


def test_a_vip_on_an_address_of_etcd_given_by_name_is_refused() -> None:
    """A VIP equal to the address of etcd (configured by host name) would cut the daemon off."""
    forbidden = asyncio.run(resolve_etcd_addresses(["http://localhost:2379"]))
    svc = parse_service({"namespace": "a", "name": "grab", "vips": ["127.0.0.1"],
                         "ports": [{"name": "p", "port": 2379}]}, "a/grab")
    kept, errors = check_services([svc], [ip_network("127.0.0.0/8")], forbidden)
    assert kept == [] and "vip 127.0.0.1 is an address of this node or of etcd" in errors[0].reason
