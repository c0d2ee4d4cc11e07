"""docker/k8s: every manifest validates offline, and the pieces agree with each other."""

from __future__ import annotations

import ast
import re
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT

K8S = ROOT / "docker" / "k8s"
# The oldest Kubernetes minor we promise to run on; newer ones accept these manifests too.
K8S_VERSION = "1.30.0"
# Kept out of kustomization.yaml on purpose: a Secret with placeholder values, and the
# migration Job that is applied (and awaited) before a rollout.
NOT_IN_KUSTOMIZATION = {"secret.example.yaml", "migrate-job.yaml"}


def _documents() -> list[tuple[str, int, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((path.name, index, doc))
    return docs


DOCS = _documents()


def _ids() -> list[str]:
    return [f"{name}#{i}:{doc['kind']}/{doc['metadata']['name']}" for name, i, doc in DOCS]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, _, doc in DOCS if doc["kind"] == kind}


def _celery_queue_keys(queue: str) -> set[str]:
    """The Redis lists Celery's transport uses for `queue`, read from celery_config.py.

    Parsed, not imported: importing it would read (and cache) this process's settings.
    """
    tree = ast.parse((ROOT / "celery_config.py").read_text())
    options: dict[str, Any] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "broker_transport_options"
            and isinstance(node.value, ast.Dict)
        ):
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(key, ast.Constant) and key.value in ("priority_steps", "sep"):
                    options[key.value] = ast.literal_eval(value)
            break
    else:
        pytest.fail("celery_config.py must assign broker_transport_options a dict display")
    steps = options.get("priority_steps", [0, 3, 6, 9])
    sep = options.get("sep", "\x06\x16")
    # kombu names the list of step 0 after the queue itself.
    return {queue if step == 0 else f"{queue}{sep}{step}" for step in steps}


@pytest.mark.parametrize(("filename", "index", "doc"), DOCS, ids=_ids())
def test_manifest_validates(filename: str, index: int, doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        _check_scaled_object(doc)
        return
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="dev dependency kubernetes-validate is not installed"
    )
    # strict: unknown fields are errors, as `kubectl apply --validate=strict` would say.
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["metadata"].get("namespace", "spool") == "spool"


def _check_scaled_object(doc: dict[str, Any]) -> None:
    # The KEDA CRD is not bundled with kubernetes-validate: check what KEDA needs by hand.
    assert doc["kind"] == "ScaledObject"
    spec = doc["spec"]
    allowed = {
        "scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
        "cooldownPeriod", "idleReplicaCount", "advanced", "triggers", "fallback",
        "initialCooldownPeriod",
    }  # fmt: skip
    assert set(spec) <= allowed, set(spec) - allowed
    assert isinstance(spec["scaleTargetRef"]["name"], str)
    for key in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
        assert isinstance(spec.get(key, 0), int), key
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    names = set()
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis"
        meta = trigger["metadata"]
        # KEDA reads trigger metadata as strings only.
        assert all(isinstance(v, str) for v in meta.values()), meta
        assert {"listName", "listLength"} <= set(meta)
        assert "address" in meta or "addressFromEnv" in meta
        names.add(trigger["name"])
    modifiers = spec["advanced"]["scalingModifiers"]
    assert set(modifiers) <= {"formula", "target", "activationTarget", "metricType"}
    assert all(isinstance(v, str) for v in modifiers.values())
    assert set(modifiers["formula"].replace("+", " ").split()) == names


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - NOT_IN_KUSTOMIZATION
    assert kustomization["namespace"] == "spool"


def test_each_model_worker_scales_on_its_own_queue_lists() -> None:
    deployments = _by_kind("Deployment")
    scaled = _by_kind("ScaledObject")
    assert scaled, "no ScaledObject"
    for name, obj in scaled.items():
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        container = target["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        model = args[args.index("--models") + 1]
        lists = {t["metadata"]["listName"] for t in obj["spec"]["triggers"]}
        assert lists == _celery_queue_keys(f"spool.model.{model}"), name
        env = {e["name"] for e in container.get("env", [])}
        for trigger in obj["spec"]["triggers"]:
            for key in ("addressFromEnv", "passwordFromEnv"):
                if key in trigger["metadata"]:
                    assert trigger["metadata"][key] in env, (name, key)


def test_gpu_workers_ask_for_a_gpu_and_use_the_cli_check() -> None:
    gpu_workers = [
        d for n, d in _by_kind("Deployment").items() if n.startswith("spool-worker-tiny-")
    ]
    assert len(gpu_workers) == 2
    for dep in gpu_workers:
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == ["spool", "worker-check"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/models" in mounts


def test_api_probes_use_healthz_and_readyz() -> None:
    container = _by_kind("Deployment")["spool-api"]["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    service = _by_kind("Service")["spool-api"]
    assert (
        service["spec"]["selector"]
        == _by_kind("Deployment")["spool-api"]["spec"]["selector"]["matchLabels"]
    )


def test_beat_is_a_single_recreated_replica() -> None:
    beat = _by_kind("Deployment")["spool-beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert beat["spec"]["template"]["spec"]["containers"][0]["args"] == ["beat"]


def test_pods_run_as_non_root_with_memory_limits_and_shared_config() -> None:
    for kind in ("Deployment", "Job"):
        for name, obj in _by_kind(kind).items():
            pod = obj["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            for container in pod["containers"]:
                assert container["resources"]["limits"]["memory"], name
                assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
                refs = {next(iter(ref.values()))["name"] for ref in container.get("envFrom", [])}
                assert refs == {"spool-config", "spool-secrets"}, name


def test_workers_and_api_expose_what_prometheus_scrapes() -> None:
    for name, dep in _by_kind("Deployment").items():
        if name == "spool-beat":
            continue
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        ports = {
            p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) in ports, name


def test_manifest_files_are_plain_yaml() -> None:
    # Guard against tabs and template placeholders (@MODEL@) left in generated copies.
    for path in K8S.glob("*.yaml"):
        text = path.read_text()
        assert "\t" not in text, path.name
        assert not re.search(r"@[A-Z_]+@", text), path.name
