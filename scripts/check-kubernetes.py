#!/usr/bin/env python3
"""Checks that deploy/kubernetes/tokengate.yaml agrees with itself and with tokengate.

kubernetes-validate checks the manifest against the Kubernetes schema; this checks what a schema
cannot: the probes use the admin port and the endpoints tokengate serves, the pre-stop sleep is
shorter than the grace period and leaves room for server.shutdown_grace, the NetworkPolicy lets
the proxy port and the metrics scrape in, every secret file the config names is mounted, and the
image is a name a cluster can pull.

    python3 scripts/check-kubernetes.py [deploy/kubernetes/tokengate.yaml]
"""

import re
import sys
import tomllib

import yaml

SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def seconds(text):
    """A humantime duration such as "30s" or "1m 30s", in seconds."""
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*(ms|s|m|h)", text):
        total += int(number) * SECONDS[unit]
    return total


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "deploy/kubernetes/tokengate.yaml"
    docs = {d["kind"]: d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d}
    problems = []

    def expect(ok, message):
        if not ok:
            problems.append(message)

    config = tomllib.loads(docs["ConfigMap"]["data"]["proxy.toml"])
    proxy_port = int(config["server"]["listen"].rsplit(":", 1)[1])
    admin_port = int(config.get("admin", {}).get("listen", "127.0.0.1:9901").rsplit(":", 1)[1])
    shutdown_grace = seconds(config["server"].get("shutdown_grace", "30s"))

    pod = docs["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    container = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expect(ports.get("proxy") == proxy_port, f"containerPort proxy is not server.listen's {proxy_port}")
    expect(ports.get("admin") == admin_port, f"containerPort admin is not admin.listen's {admin_port}")

    for probe, want in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]:
        get = container.get(probe, {}).get("httpGet", {})
        expect(get.get("path") == want, f"{probe} must GET {want}")
        expect(get.get("port") in ("admin", admin_port), f"{probe} must use the admin port")

    grace = spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    expect(pre_stop is not None, "no pre-stop sleep: a rolling update would send requests to a draining pod")
    if pre_stop is not None:
        expect(0 < pre_stop < grace, f"pre-stop sleep {pre_stop}s must be shorter than the grace period {grace}s")
        expect(
            pre_stop + shutdown_grace <= grace,
            f"grace period {grace}s leaves no room for the pre-stop {pre_stop}s plus "
            f"server.shutdown_grace {shutdown_grace:g}s",
        )

    mounts = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", [])]
    for secret_file in re.findall(r'file\s*=\s*"([^"]+)"', docs["ConfigMap"]["data"]["proxy.toml"]):
        expect(
            any(secret_file.startswith(m) for m in mounts),
            f"{secret_file}, named in proxy.toml, is under no volume mount",
        )

    annotations = pod["metadata"].get("annotations", {})
    expect(
        annotations.get("prometheus.io/port") == str(admin_port),
        "prometheus.io/port must be the admin port",
    )

    ingress_ports = {
        p["port"]
        for rule in docs["NetworkPolicy"]["spec"].get("ingress", [])
        for p in rule.get("ports", [])
    }
    expect(proxy_port in ingress_ports, "the NetworkPolicy does not let clients reach the proxy port")
    expect(admin_port in ingress_ports, "the NetworkPolicy blocks the metrics scrape of the admin port")

    image = container["image"]
    expect(
        "/" in image.split(":")[0] and not image.endswith(":local"),
        f"image `{image}` is a local name a cluster cannot pull",
    )

    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"{path}: probes, pre-stop ({pre_stop}s of {grace}s), NetworkPolicy and image agree")


if __name__ == "__main__":
    main()
