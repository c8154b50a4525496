"""Checks deploy/k8s: see tests/k8s/run.

Every region overlay is rendered with `kubectl kustomize`; every object is
validated against the Kubernetes API schemas; then what concord needs of
the rendered region is checked, and its configuration is handed to
`concord-node --check` (CONCORD_NODE_BIN) with the environment of the
container, so the node's own parser has the last word on it.

Without a kubectl that can render (kustomize v4 or later), the raw
manifests are still validated, and the rendering is reported as skipped.
"""

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# Oldest Kubernetes the manifests are meant for (gRPC probes are GA in 1.27).
KUBERNETES_VERSION = "1.27"
GRPC_PORT = 7100


class Failure(Exception):
    pass


def say(msg):
    print(f"k8s check: {msg}", flush=True)


def validate(doc, where):
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise Failure(f"{where}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}: {e.message} at {list(e.path)}")
    except kubernetes_validate.SchemaNotFoundError as e:
        raise Failure(f"{where}: no schema for {doc.get('kind')} ({e})")


def kustomize():
    """The command that renders a kustomization, or None."""
    try:
        out = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    m = re.search(r"Kustomize Version: v(\d+)", out.stdout)
    if out.returncode != 0 or not m or int(m.group(1)) < 4:
        return None
    return ["kubectl", "kustomize"]


def render(cmd, overlay):
    out = subprocess.run(cmd + [str(overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        raise Failure(f"kustomize {overlay.relative_to(ROOT)}: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs, kind, where):
    found = [d for d in docs if d["kind"] == kind]
    if len(found) != 1:
        raise Failure(f"{where}: {len(found)} objects of kind {kind}, expected 1")
    return found[0]


def check_region(docs, where):
    """Checks one rendered region; returns its configuration as the node
    reads it, and its namespace."""
    namespace = one(docs, "Namespace", where)["metadata"]["name"]
    for d in docs:
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") != namespace:
            raise Failure(f"{where}: {d['kind']} {d['metadata']['name']} is outside namespace {namespace}")
    sts = one(docs, "StatefulSet", where)
    spec = sts["spec"]
    if spec.get("replicas") != 1:
        raise Failure(f"{where}: a region is one node; replicas = {spec.get('replicas')}")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    headless = services.get(spec["serviceName"])
    if headless is None or headless["spec"].get("clusterIP") != "None":
        raise Failure(f"{where}: serviceName {spec['serviceName']} is not a headless Service of the region")
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    for name, svc in services.items():
        if not set(svc["spec"]["selector"].items()) <= set(labels.items()):
            raise Failure(f"{where}: Service {name} selects no pod of the StatefulSet")
    if not set(spec["selector"]["matchLabels"].items()) <= set(labels.items()):
        raise Failure(f"{where}: the StatefulSet's selector misses its pods")
    (container,) = [c for c in pod["containers"] if c["name"] == "concord-node"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = container.get(probe, {}).get("grpc")
        if not grpc or grpc.get("port") != GRPC_PORT:
            raise Failure(f"{where}: {probe} is not a gRPC health probe on port {GRPC_PORT}")
    claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    if "data" not in claims or "data" not in mounts:
        raise Failure(f"{where}: the data directory is not on a persistent volume claim")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    cm_name = volumes["config"]["configMap"]["name"]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    if cm_name not in configmaps:
        raise Failure(f"{where}: the pod mounts ConfigMap {cm_name}, which the region does not have")
    args = container.get("args", [])
    config_path = Path(args[args.index("--config") + 1])
    if config_path.parent != Path(mounts["config"]):
        raise Failure(f"{where}: --config {config_path} is not in the mounted ConfigMap")
    text = configmaps[cm_name]["data"][config_path.name]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    config = node_check(text, env, where)
    if Path(config["data_dir"]) != Path(mounts["data"]):
        raise Failure(f"{where}: data_dir {config['data_dir']} is not the volume at {mounts['data']}")
    if not config["listen"].endswith(f":{GRPC_PORT}"):
        raise Failure(f"{where}: the node listens on {config['listen']}, the probes ask port {GRPC_PORT}")
    return config, namespace


def node_check(text, env, where):
    """The configuration as concord-node reads it, from the file and the
    container's environment."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "concord-node.toml"
        path.write_text(text)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CONCORD_NODE_")}
        out = subprocess.run(
            [os.environ["CONCORD_NODE_BIN"], "--check", "--config", str(path)],
            capture_output=True,
            text=True,
            env={**clean, **env},
        )
    if out.returncode != 0:
        raise Failure(f"{where}: concord-node refuses the configuration: {out.stderr.strip()}")
    return tomllib.loads(out.stdout)


def check_mesh(regions):
    """Every region peers with every other, by its id, at its address."""
    ids = {}
    for where, (config, _) in regions.items():
        if config["replica_id"] in ids:
            raise Failure(f"{where} and {ids[config['replica_id']]} share replica id {config['replica_id']}")
        ids[config["replica_id"]] = where
    by_region = {c["region"]: (c, ns) for c, ns in regions.values()}
    if len(by_region) != len(regions):
        raise Failure("two overlays declare the same region")
    for region, (config, _) in by_region.items():
        peers = {p["region"]: p for p in config.get("peers", [])}
        expected = set(by_region) - {region}
        if set(peers) != expected:
            raise Failure(f"{region} peers with {sorted(peers)}, expected {sorted(expected)}")
        for name, peer in peers.items():
            other, namespace = by_region[name]
            if peer["replica_id"] != other["replica_id"]:
                raise Failure(f"{region} knows {name} as replica {peer['replica_id']}, it is {other['replica_id']}")
            host = f"concord-client.{namespace}.svc.cluster.local:{GRPC_PORT}"
            if peer["endpoint"] != f"http://{host}":
                raise Failure(f"{region} reaches {name} at {peer['endpoint']}, it serves at http://{host}")


def main():
    overlays = sorted(p.parent for p in K8S.glob("overlays/*/kustomization.yaml"))
    if not overlays:
        raise Failure("no overlay under deploy/k8s/overlays")
    # Every manifest as written, the optional ones included.
    raw = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    for path in raw:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                validate(doc, path.relative_to(ROOT))
    say(f"{len(raw)} manifests valid against the Kubernetes {KUBERNETES_VERSION} schemas")
    cmd = kustomize()
    if cmd is None:
        say("SKIPPED rendering: no kubectl with kustomize v4 or later on this machine")
        return
    regions = {}
    for overlay in overlays:
        where = str(overlay.relative_to(ROOT))
        docs = render(cmd, overlay)
        for doc in docs:
            validate(doc, where)
        regions[where] = check_region(docs, where)
        say(f"{where}: {len(docs)} objects rendered and valid; region {regions[where][0]['region']} accepted by concord-node")
    check_mesh(regions)
    say(f"{len(regions)} regions, every one peering with every other")


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        say(f"FAILED: {e}")
        sys.exit(1)
    except (KeyError, ValueError, IndexError, TypeError) as e:
        # A field the checks rely on is missing or shaped otherwise.
        say(f"FAILED: a rendered manifest lacks what a region needs: {e!r}")
        sys.exit(1)
    say("ok")
