"""kube-proxy's HTTP contract served by `meshd run`: health check node ports of
external_traffic_policy Local services, and the node's /healthz and /livez."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import yaml

from meshdlib import svc
from testlib import free_port

VIP = "10.96.0.10"


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def answers(url: str) -> int | None:
    try:
        return get(url)[0]
    except urllib.error.URLError:
        return None


def local_service(lab, hc: int, nodes: list[str]) -> dict:
    s = svc(lab, "web", VIP, list(range(1, len(nodes) + 1)))
    s["ports"][0]["node_port"] = 30080
    s["external_traffic_policy"] = "Local"
    s["health_check_node_port"] = hc
    for ep, node in zip(s["endpoints"], nodes):
        ep["node"] = node
    return s


def set_config(d, **changes) -> None:
    doc = yaml.safe_load(d.config.read_text())
    doc.update(changes)
    d.config.write_text(yaml.safe_dump(doc))


def test_health_check_node_port_answers_as_kube_proxy_does(lab, daemon):
    hc = free_port()
    set_config(daemon, node={"name": "node-a"})
    daemon.write(local_service(lab, hc, ["node-a", "node-b"]))
    daemon.start()
    url = f"http://127.0.0.1:{hc}/"
    daemon.wait(lambda r: r["services"] and answers(url), "the health check listener")
    status, body = get(url)
    assert status == 200
    assert body == {"service": {"namespace": "default", "name": "web"}, "localEndpoints": 1,
                    "serviceProxyHealthy": True}
    # the local endpoint goes: 503, so a cloud LB skips this node
    daemon.write(local_service(lab, hc, ["node-b", "node-c"]))
    daemon.wait(lambda r: get(url)[0] == 503, "503 without local endpoints")
    assert get(url)[1]["localEndpoints"] == 0
    # the service goes: no listener left
    daemon.write()
    daemon.wait(lambda r: not r["services"], "service removed")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


def test_node_healthz_and_livez(lab, daemon):
    set_config(daemon, sync={"stuck_after_seconds": 2.0})
    daemon.write(svc(lab, "web", VIP, [1]))
    daemon.start()
    rep = daemon.wait(lambda r: (r.get("daemon") or {}).get("healthz") and r["services"],
                      "healthz listening")
    base = f"http://{rep['daemon']['healthz']}"
    status, body = get(base + "/healthz")
    assert status == 200 and body["nodeEligible"] is True
    assert body["lastUpdated"].endswith("Z") and body["currentTime"].endswith("Z")
    assert get(base + "/livez")[0] == 200
    assert get(base + "/nope")[0] == 404


def test_healthz_is_503_while_syncs_fail(lab, daemon):
    set_config(daemon, sync={"stuck_after_seconds": 1.0})
    daemon.write(svc(lab, "web", VIP, [1]))
    daemon.start(env={"MESHD_FAULT_SYNC_ERRORS": "100000"})
    rep = daemon.wait(lambda r: (r.get("daemon") or {}).get("healthz"), "healthz listening")
    base = f"http://{rep['daemon']['healthz']}"
    daemon.wait(lambda r: get(base + "/livez")[0] == 503, "livez 503 once stuck")
    status, body = get(base + "/healthz")
    assert status == 503 and "syncs have failed" in body["error"]
