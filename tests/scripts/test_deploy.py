"""deploy/: the Kubernetes manifests under strict schema validation (pinned
Kubernetes version), the KServe InferenceService checked as far as its schema
can be offline, and the pieces that must agree with the repo (config.properties,
the Secret's name, the ports, the limits) held to it."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import manage
from manage import properties

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37.0"  # kubernetes-validate==1.37.0's newest schemas (requirements-dev.txt)
# The config.properties keys a pod sets otherwise than the repo (marked "pod:" in the ConfigMap).
POD_KEYS = {"inference_address", "metrics_address", "grpc_inference_port", "disable_token_authorization"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def configmap() -> dict:
    return load(DEPLOY / "kubernetes" / "configmap.yaml")["data"]


def pod_spec() -> dict:
    return load(DEPLOY / "kubernetes" / "deployment.yaml")["spec"]["template"]["spec"]


def container(spec: dict, name: str) -> dict:
    return next(c for c in spec["containers"] if c["name"] == name)


@pytest.mark.parametrize("path", sorted((DEPLOY / "kubernetes").glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_passes_strict_validation(path):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_misspelt_field_fails_strict_validation():
    """The check has teeth: strict mode refuses a field the schema lacks."""
    deployment = load(DEPLOY / "kubernetes" / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_k8s_secret_command_prints_a_valid_secret_with_a_fresh_key():
    def run() -> dict:
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "manage.py"), "k8s-secret"],
                             capture_output=True, text=True, check=True).stdout
        return yaml.safe_load(out)

    a, b = run(), run()
    kubernetes_validate.validate(a, K8S_VERSION, strict=True)
    key = a["stringData"]["inference-key"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key)  # 32 random bytes; no character nginx's map or a header would mangle
    assert key != b["stringData"]["inference-key"]
    gateway = container(pod_spec(), "gateway")
    ref = next(e for e in gateway["env"] if e["name"] == "INFERENCE_KEY")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": manage.K8S_SECRET, "key": "inference-key"} and a["metadata"]["name"] == manage.K8S_SECRET
    # the README's line that reads the key back names that Secret and that key
    readme = (ROOT / "README.md").read_text()
    assert f"kubectl get secret {manage.K8S_SECRET} -o jsonpath='{{.data.inference-key}}' | base64 -d" in readme


def test_pod_config_is_the_repos_config_but_for_the_pod_keys():
    repo = properties((ROOT / "config.properties").read_text())
    pod = properties(configmap()["config.properties"])
    assert set(pod) == set(repo)
    assert {k for k in repo if repo[k] != pod[k]} == POD_KEYS
    assert pod["disable_token_authorization"] == "true"
    assert pod["inference_address"].startswith("http://127.0.0.1:")  # only the gateway reaches it
    assert pod["grpc_inference_address"] == "127.0.0.1"


def test_gateway_forwards_to_the_pods_torchserve_with_the_repos_limits():
    pod = properties(configmap()["config.properties"])
    template = configmap()["gateway.conf.template"]
    inference_port = pod["inference_address"].rsplit(":", 1)[1]
    assert set(re.findall(r"proxy_pass http://127\.0\.0\.1:(\d+);", template)) == {inference_port}
    assert re.findall(r"grpc_pass grpc://127\.0\.0\.1:(\d+);", template) == [pod["grpc_inference_port"]]
    assert "${INFERENCE_KEY}" in template
    body_mb = {int(v) for v in re.findall(r"client_max_body_size (\d+)m;", template)}
    assert body_mb == {int(pod["max_request_size"]) // 2**20}
    model_config = load(ROOT / "handler" / "model-config.yaml")
    for timeout in re.findall(r"(?:proxy|grpc)_read_timeout (\d+)s;", template):
        assert int(timeout) >= model_config["responseTimeout"]
    ports = {p["name"]: p["containerPort"] for p in container(pod_spec(), "gateway")["ports"]}
    assert {int(p) for p in re.findall(r"listen (\d+);", template)} == set(ports.values())


def test_pods_run_non_root_with_a_gpu_and_probes_on_declared_ports():
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        named = {p["name"] for p in c["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c:
                assert c[probe]["httpGet"]["port"] in named, (c["name"], probe)
    torchserve = container(spec, "torchserve")
    assert torchserve["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # With a read-only root, every cache torch, inductor and triton write must be on a writable mount.
    writable = [m["mountPath"] for m in torchserve["volumeMounts"] if not m.get("readOnly")]
    env = {e["name"]: e["value"] for e in torchserve["env"]}
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        assert any(env[name].startswith(path + "/") for path in writable), name
    assert "livenessProbe" in torchserve and "readinessProbe" in container(spec, "gateway")
    # The model's readiness is TorchServe's /ping, which the gateway lets through without a key.
    assert container(spec, "gateway")["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert re.search(r"location = /ping \{[^{}]*(\{[^{}]*\}[^{}]*)*proxy_pass http://127\.0\.0\.1:8090/ping;",
                     configmap()["gateway.conf.template"])
    # The pod outlives a request cut off at the time budget.
    from nst.config import Limits

    budget = Limits.from_mapping(load(ROOT / "handler" / "model-config.yaml").get("limits")).time_budget_s
    assert spec["terminationGracePeriodSeconds"] >= budget


def test_service_and_autoscaler_point_at_the_deployment():
    deployment = load(DEPLOY / "kubernetes" / "deployment.yaml")
    service = load(DEPLOY / "kubernetes" / "service.yaml")
    hpa = load(DEPLOY / "kubernetes" / "hpa.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    declared = {p["name"] for c in pod_spec()["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= declared
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}


# KServe's ComponentExtensionSpec (serving.kserve.io/v1beta1, from its API
# reference) beside a predictor's inlined PodSpec; the framework keys are left
# out on purpose: this predictor is a custom container.
KSERVE_COMPONENT_FIELDS = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy",
}
KSERVE_SCALE_METRICS = {"cpu", "memory", "concurrency", "rps"}
KSERVE_DEPLOYMENT_MODES = {"Serverless", "RawDeployment", "ModelMesh"}


def test_inference_service_is_the_deployments_pod_under_kserves_fields():
    isvc = load(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert set(isvc["spec"]) == {"predictor"}
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in KSERVE_DEPLOYMENT_MODES
    predictor = isvc["spec"]["predictor"]
    assert predictor["scaleMetric"] in KSERVE_SCALE_METRICS
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
    pod = {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}
    # The rest must be a PodSpec: validated strictly as a Pod's.
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "style-transfer"},
                                  "spec": pod}, K8S_VERSION, strict=True)
    # ... and the Deployment's own pod, the gateway first as kserve-container.
    expected = copy.deepcopy(pod_spec())
    gateway = container(expected, "gateway")
    gateway["name"] = "kserve-container"
    expected["containers"] = [gateway, container(expected, "torchserve")]
    assert pod == expected
    assert predictor["timeout"] >= load(ROOT / "handler" / "model-config.yaml")["responseTimeout"]


def _gateway_tree(tmp_path: Path, key: str = "k3y_-Test") -> list[dict]:
    """The gateway's config as nginx would read it (envsubst done), parsed."""
    import crossplane

    conf = tmp_path / "nginx.conf"
    conf.write_text("events {}\nhttp {\n" + configmap()["gateway.conf.template"].replace("${INFERENCE_KEY}", key)
                    + "\n}\n")
    parsed = crossplane.parse(str(conf), check_ctx=True, check_args=True, comments=False)
    assert parsed["status"] == "ok", parsed["errors"]
    [http] = [d for d in parsed["config"][0]["parsed"] if d["directive"] == "http"]
    return http["block"]


def _walk(block: list[dict]):
    for d in block:
        yield d
        if d["directive"] != "map":  # a map's block holds value pairs, not directives
            yield from _walk(d.get("block", []))


def test_gateway_config_is_valid_nginx_that_lets_nothing_but_health_through_without_the_key(tmp_path):
    import crossplane.analyzer

    http = _gateway_tree(tmp_path, key="k3y_-Test")
    # Every directive is one nginx has (crossplane knows nginx's table up to
    # 1.23; http2 is 1.25.1's, and the pinned image is 1.27).
    unknown = {d["directive"] for d in _walk(http)} - set(crossplane.analyzer.DIRECTIVES) - {"http2"}
    assert not unknown, unknown
    [key_map] = [d for d in http if d["directive"] == "map"]
    assert key_map["args"] == ["$http_authorization", "$style_transfer_key_ok"]
    assert {(e["directive"], *e["args"]) for e in key_map["block"]} == {("default", "0"), ("~^Bearer k3y_-Test$", "1")}
    servers = [d for d in http if d["directive"] == "server"]
    assert len(servers) == 2  # HTTP and gRPC
    open_paths = set()
    for server in servers:
        for loc in (d for d in server["block"] if d["directive"] == "location"):
            first = loc["block"][0]
            guarded = first["directive"] == "if" and first["args"] == ["$style_transfer_key_ok", "=", "0"] \
                and first["block"][0]["directive"] == "return" and first["block"][0]["args"][0] == "401"
            refused = [(d["directive"], *d["args"]) for d in loc["block"]] == [("return", "404")]
            if not (guarded or refused):
                assert loc["args"][0] == "=", loc["args"]  # only exact paths go unguarded
                open_paths.add(loc["args"][1])
                # An unguarded path reaches TorchServe as itself, by GET only: a
                # proxy_pass without a path forwards the client's path, `..`
                # unresolved, which TorchServe reads as another route
                # (/predictions/style_transfer/1.0/../../../ping ran a prediction).
                passes = [d["args"] for d in _walk(loc["block"]) if d["directive"] == "proxy_pass"]
                assert all(re.fullmatch(r"http://[^/]+" + re.escape(loc["args"][1]), a[0]) for a in passes), passes
                if passes:
                    [limit] = [d for d in loc["block"] if d["directive"] == "limit_except"]
                    assert limit["args"] == ["GET"] and [(d["directive"], *d["args"]) for d in limit["block"]] \
                        == [("deny", "all")]
    assert open_paths == {"/ping", "/gateway-health"}


def test_the_grpc_gateway_passes_three_inference_methods_and_refuses_the_rest(tmp_path):
    """StreamPredictions2 with a sequence_id leaves this model with no worker
    until TorchServe restarts (tests/server/test_grpc_hostile.py, a strict
    xfail): the gateway that stands in front of a pod lets only Predictions,
    StreamPredictions and Ping through, each behind the key, and answers
    anything else 404 (UNIMPLEMENTED to a gRPC client)."""
    import re

    grpc = next(d for d in _gateway_tree(tmp_path) if d["directive"] == "server"
                and any(x["directive"] == "listen" and x["args"] == ["7070"] for x in d["block"]))
    locations = [d for d in grpc["block"] if d["directive"] == "location"]
    passing = [loc for loc in locations if any(d["directive"] == "grpc_pass" for d in _walk(loc["block"]))]
    [only] = passing
    assert only["args"][0] == "~"
    service = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/"
    allowed = {service + m for m in ("Predictions", "StreamPredictions", "Ping")}
    others = {service + "StreamPredictions2", service + "PredictionsX", service + "Predictions/",
              "/org.pytorch.serve.grpc.management.ManagementAPIsService/ScaleWorker",
              "/org.pytorch.serve.grpc.management.ManagementAPIsService/RegisterModel",
              "/x" + service + "Predictions"}
    matched = {path for path in allowed | others if re.search(only["args"][1], path)}
    assert matched == allowed
    [rest] = [loc for loc in locations if loc["args"] == ["/"]]
    assert [(d["directive"], *d["args"]) for d in rest["block"]] == [("return", "404")]


def _references(doc) -> set[tuple[str, str]]:
    """(kind, name) of every ConfigMap and Secret a manifest's pods read."""
    found = set()
    if isinstance(doc, dict):
        for key, kind in (("configMap", "ConfigMap"), ("configMapKeyRef", "ConfigMap"),
                          ("secretKeyRef", "Secret"), ("secret", "Secret")):
            ref = doc.get(key)
            if isinstance(ref, dict) and ("name" in ref or "secretName" in ref):
                found.add((kind, ref.get("name") or ref["secretName"]))
        for value in doc.values():
            found |= _references(value)
    elif isinstance(doc, list):
        for value in doc:
            found |= _references(value)
    return found


def test_each_kubectl_apply_in_the_readme_brings_what_its_pods_read():
    """The README's `kubectl apply` lines, each with the Secret that
    `manage.py k8s-secret` applies first: every ConfigMap and Secret their
    pods mount or read is among what that line applies. The KServe line once
    applied the InferenceService alone, whose pods then waited for a
    ConfigMap only deploy/kubernetes/ made."""
    readme = (ROOT / "README.md").read_text()
    lines = [line.split("#")[0] for line in readme.splitlines() if line.startswith("kubectl apply -f")]
    assert len(lines) == 2, lines  # plain Kubernetes, or KServe
    for line in lines:
        paths = [ROOT / p for p in re.findall(r"-f (\S+)", line)]
        files = [f for p in paths for f in (sorted(p.glob("*.yaml")) if p.is_dir() else [p])]
        assert files and all(f.exists() for f in files), line
        docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
        applied = {(d["kind"], d["metadata"]["name"]) for d in docs} | {("Secret", manage.K8S_SECRET)}
        assert _references(docs) <= applied, (line, _references(docs) - applied)
