"""Kubernetes manifests: every overlay renders with kustomize, validates against the Kubernetes API schemas,
and holds the properties the deployment relies on (probes, security, GPU requests, secrets, policies).
Static only: no cluster is contacted."""

from __future__ import annotations

import copy

import pytest

from deploy_contract import (
    OVERLAYS,
    TEACHER_GRPC_PORT,
    env_of,
    find,
    pod_spec,
)

WORKLOADS = ("Deployment", "StatefulSet", "Job")
# Kubernetes versions checked: the oldest still common on managed clusters, and the newest the
# kubernetes-validate package ships schemas for.
K8S_VERSIONS = ("1.29.0", "latest")
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}


def workloads(docs):
    return [d for d in docs if d["kind"] in WORKLOADS]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_its_namespace(rendered, overlay):
    docs = rendered[overlay]
    namespaces = [d["metadata"]["name"] for d in find(docs, "Namespace")]
    assert len(namespaces) == 1
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == namespaces[0], f"{d['kind']}/{d['metadata']['name']}"
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Job", "NetworkPolicy", "PodDisruptionBudget", "ConfigMap", "Secret"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_validates_against_kubernetes_schemas(rendered, overlay, version):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kv.latest_version() if version == "latest" else version
    for d in rendered[overlay]:
        if d["kind"] in KEDA_KINDS:
            continue  # a CRD: checked by test_keda_objects_are_well_formed
        kv.validate(d, version, strict=True)


def test_schema_validation_can_fail(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    bad = copy.deepcopy(find(rendered["cpu-demo"], "Deployment")[0])
    pod_spec(bad)["containers"][0]["readinesProbe"] = pod_spec(bad)["containers"][0].pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_restricted_pod_security(rendered, overlay):
    ns = find(rendered[overlay], "Namespace")[0]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for w in workloads(rendered[overlay]):
        spec = pod_spec(w)
        where = f"{overlay} {w['kind']}/{w['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            # A read-only root needs a writable /tmp (HOME points there for torch / triton / vLLM caches).
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_and_configmap_reference_resolves(rendered, overlay):
    docs = rendered[overlay]
    secrets = {
        s["metadata"]["name"]: set(s.get("data", {})) | set(s.get("stringData", {})) for s in find(docs, "Secret")
    }
    configmaps = {c["metadata"]["name"]: set(c.get("data", {})) for c in find(docs, "ConfigMap")}
    for w in workloads(docs):
        spec = pod_spec(w)
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], ()), f"{w['metadata']['name']}: {ref}"
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in configmaps
        for v in spec.get("volumes", []):
            if "configMap" in v:
                keys = [i["key"] for i in v["configMap"].get("items", [])] or ["run.yaml"]
                assert set(keys) <= configmaps[v["configMap"]["name"]], (w["metadata"]["name"], keys)
    for ta in find(docs, "TriggerAuthentication"):
        for ref in ta["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets.get(ref["name"], ()), f"TriggerAuthentication: {ref}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_teachers_have_native_grpc_probes(rendered, overlay):
    teachers = [
        d for d in find(rendered[overlay], "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "teacher"
    ]
    assert len(teachers) >= 2
    for t in teachers:
        c = pod_spec(t)["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == TEACHER_GRPC_PORT, f"{t['metadata']['name']} {probe}"
        assert c["readinessProbe"]["grpc"]["service"] == "fuseflow.v1.TeacherService"
        assert c["livenessProbe"]["grpc"].get("service", "") == ""


def test_gpu_overlay_requests_gpus_and_cpu_demo_does_not(rendered):
    for w in workloads(rendered["cpu-demo"]):
        for c in pod_spec(w)["containers"]:
            assert "nvidia.com/gpu" not in str(c.get("resources")), w["metadata"]["name"]
    for w in workloads(rendered["gpu"]):
        if w["kind"] == "StatefulSet":
            continue  # Redis
        if w["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway":
            assert "nvidia.com/gpu" not in str(pod_spec(w)["containers"][0].get("resources"))  # gRPC client only
            continue
        spec = pod_spec(w)
        res = spec["containers"][0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert {"models", "shm"} <= {v["name"] for v in spec["volumes"]}
        assert pod_spec(w)["containers"][0]["image"].endswith(":cuda")
    for w in workloads(rendered["cpu-demo"]):
        if w["kind"] != "StatefulSet":
            assert pod_spec(w)["containers"][0]["image"].endswith(":cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_is_persistent_and_password_protected(rendered, overlay):
    (sts,) = find(rendered[overlay], "StatefulSet", "redis")
    c = pod_spec(sts)["containers"][0]
    script = " ".join(c["command"] + c["args"])
    assert "--appendonly yes" in script and "--maxmemory-policy noeviction" in script
    assert "requirepass" in script and "$REDIS_PASSWORD" in script  # read from the env, not written here
    assert env_of(c)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admitted_components(policy: dict) -> set[str]:
    out = set()
    for rule in policy["spec"].get("ingress", []):
        if "from" not in rule:
            out.add("any")
        for peer in rule.get("from", []):
            if "podSelector" in peer:
                out.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"])
            if "namespaceSelector" in peer:
                out.add("namespace:" + peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_only_trainer_and_gateway_to_teachers_and_redis(rendered, overlay):
    docs = rendered[overlay]
    policies = find(docs, "NetworkPolicy")
    (deny,) = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")

    def admitted(component: str) -> set[str]:
        labels = {"app.kubernetes.io/name": "fuseflow", "app.kubernetes.io/component": component}
        out = set()
        for p in policies:
            if p["spec"]["podSelector"] and _selects(p["spec"]["podSelector"], labels):
                out |= _admitted_components(p)
        return out

    assert admitted("teacher") == {"trainer", "gateway", "namespace:monitoring"}
    expected_redis = {"teacher", "trainer"} | ({"namespace:keda"} if overlay == "gpu" else set())
    assert admitted("redis") == expected_redis  # the gateway needs no Redis
    assert admitted("trainer") == {"trainer", "namespace:monitoring"}
    assert admitted("gateway") == {"any"}  # its API key guards /v1 (issue 26)
    (gateway,) = [p for p in policies if p["metadata"]["name"] == "gateway-ingress"]
    assert [q["port"] for r in gateway["spec"]["ingress"] for q in r["ports"]] == [8000]
    # Only the metrics port is open to monitoring.
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            if any("namespaceSelector" in peer for peer in rule.get("from", [])):
                ns = rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                ports = {q["port"] for q in rule["ports"]}
                assert ports == ({6379} if ns == "keda" else {9400} if "teacher" in p["metadata"]["name"] else {9401})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_every_workload(rendered, overlay):
    docs = rendered[overlay]
    pdbs = find(docs, "PodDisruptionBudget")
    for w in workloads(docs):
        labels = w["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in pdbs if _selects(p["spec"]["selector"], labels)]
        assert len(matching) == 1, f"{w['kind']}/{w['metadata']['name']}: {len(matching)} PDBs"
        component = labels["app.kubernetes.io/component"]
        assert matching[0]["spec"]["maxUnavailable"] == (1 if component in ("teacher", "gateway") else 0)


def test_keda_objects_are_well_formed(rendered):
    docs = rendered["gpu"]
    (ns,) = [d["metadata"]["name"] for d in find(docs, "Namespace")]
    auth = {a["metadata"]["name"] for a in find(docs, "TriggerAuthentication")}
    deployments = {d["metadata"]["name"] for d in find(docs, "Deployment")
                   if d["metadata"]["labels"]["app.kubernetes.io/component"] == "teacher"}
    scaled = find(docs, "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == deployments
    for s in scaled:
        assert s["apiVersion"] == "keda.sh/v1alpha1"
        assert 1 <= s["spec"]["minReplicaCount"] <= s["spec"]["maxReplicaCount"]
        (trigger,) = s["spec"]["triggers"]
        assert trigger["type"] == "redis-streams"
        assert trigger["authenticationRef"]["name"] in auth
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values must be strings"
        assert meta["address"] == f"redis.{ns}.svc.cluster.local:6379"
        assert int(meta["lagCount"]) >= 1 and "activationLagCount" in meta  # KEDA requires both together
        assert "pendingEntriesCount" not in meta


def test_trainer_is_an_indexed_job_with_a_headless_rendezvous(rendered):
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        (job,) = find(docs, "Job")
        spec = job["spec"]
        assert spec["completionMode"] == "Indexed"
        pod = pod_spec(job)
        (svc,) = find(docs, "Service", pod["subdomain"])
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        assert _selects({"matchLabels": svc["spec"]["selector"]}, job["spec"]["template"]["metadata"]["labels"])
        c = pod["containers"][0]
        env = env_of(c)
        # Pod i of an indexed Job is <job>-<i>; with the subdomain it resolves as <job>-0.<subdomain>.
        assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
        assert int(env["MASTER_PORT"]["value"]) in {p["port"] for p in svc["spec"]["ports"]}
        assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        )
        nodes = int(env["NNODES"]["value"])
        assert nodes == spec["completions"] == spec["parallelism"], overlay
        gpus = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 1))
        assert int(env["NPROC_PER_NODE"]["value"]) == gpus, overlay
        for flag in ("--nnodes=$(NNODES)", "--node-rank=$(NODE_RANK)", "--nproc-per-node=$(NPROC_PER_NODE)",
                     "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"):
            assert flag in c["args"], (overlay, flag)
    assert find(rendered["gpu"], "Job")[0]["spec"]["completions"] > 1  # the gpu overlay is multi-node
    (runs,) = find(rendered["gpu"], "PersistentVolumeClaim", "fuseflow-runs")
    assert runs["spec"]["accessModes"] == ["ReadWriteMany"]  # every rank writes its shards


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_takes_its_api_key_from_the_secret_and_probes_open_paths(rendered, overlay):
    """Issue 26: the gateway binds the pod's interfaces, so it must have its key — from the Secret into env
    FUSEFLOW_GATEWAY_API_KEY, never in argv — and its probes use the open paths (/healthz, /metrics)."""
    docs = rendered[overlay]
    (gw,) = find(docs, "Deployment", "gateway")
    c = pod_spec(gw)["containers"][0]
    env = env_of(c)
    assert env["FUSEFLOW_GATEWAY_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "gateway-api-key"
    assert env["FUSEFLOW_TEACHER_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "teacher-token"
    assert "FUSEFLOW_REDIS_URL" not in env
    assert not any(a.startswith(("--api-key", "--allow-unauthenticated")) for a in c["args"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/metrics"
    (svc,) = find(docs, "Service", "gateway")
    assert svc["spec"]["selector"] == gw["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
