"""Tests of the vlm-captioner-operator Helm chart, rendered with the real Helm v4 SDK
(helm-python-sdk binds libhelm; no helm binary, no cluster).

Run: pip install -r tests/chart/requirements.txt && pytest tests/chart
"""

from __future__ import annotations

import re
from pathlib import Path

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "vlm-captioner-operator"
REPO_CRD = REPO / "crds" / "vlmcaptioner.yaml"
OPERATOR_MAIN = REPO / "operator" / "src" / "main.rs"
RELEASE = "vlm-captioner-operator"
NAMESPACE = "vlm-system"

# What the operator calls (operator/src/{controller,reconcile,wiring,download,inputs}.rs and
# kube's Recorder), as (apiGroup, resource, verb). Tests compare the rendered rules with this set
# exactly. ConfigMaps, Secrets and Services include the nv-ingest copies: watched by label.
OPERATOR_RULES = (
    {("captioning.dev", "vlmcaptioners", v) for v in ("get", "list", "watch", "patch")}
    | {("captioning.dev", "vlmcaptioners/status", "patch")}
    | {("captioning.dev", "vlmcaptioners/finalizers", "update")}
    | {
        (g, r, v)
        for g, r in (("apps", "deployments"), ("", "services"), ("", "configmaps"))
        for v in ("get", "list", "watch", "create", "patch", "delete")
    }
    | {("", "secrets", v) for v in ("get", "list", "watch", "create", "patch", "delete")}
    | {("policy", "poddisruptionbudgets", v) for v in ("create", "patch")}
    | {(g, r, v) for g, r in (("autoscaling", "horizontalpodautoscalers"),
                             ("monitoring.coreos.com", "servicemonitors"))
       for v in ("create", "patch", "delete")}
    | {("", "persistentvolumeclaims", v) for v in ("get", "list", "watch", "create")}
    | {("batch", "jobs", v) for v in ("get", "list", "watch", "create", "delete")}
    | {(g, "events", v) for g in ("events.k8s.io", "") for v in ("create", "patch")}
)
# Cluster-scoped reads, granted only by the ClusterRole: namespaces for
# spec.nvIngest.namespaceSelector (a list by label and a metadata watch; never a GET).
CLUSTER_ONLY_RULES = {("", "namespaces", v) for v in ("list", "watch")}
LEASE_RULES = {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update", "patch")}


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart, values: dict | None = None) -> list[dict]:
    """Render like `helm template`, and parse every manifest into objects."""
    manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__template__"] = path
                objects.append(doc)
    return objects


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def rule_set(role: dict) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role["rules"]:
        assert "resourceNames" not in rule or rule["resourceNames"], rule
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    out.add((g, r, v))
    return out


def operator_container(objects: list[dict]) -> dict:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def operator_flags() -> set[str]:
    """The long flags of `vlm-operator run`, read from the clap struct in operator/src/main.rs."""
    src = OPERATOR_MAIN.read_text()
    body = re.search(r"struct RunArgs \{(.*?)\n\}", src, re.S)
    assert body, "struct RunArgs not found in operator/src/main.rs"
    flags = set()
    for attrs, field in re.findall(r"#\[arg\(([^\]]*)\)\]\s*(?:pub\s+)?(\w+)\s*:", body.group(1)):
        if re.search(r"\blong\b", attrs):
            explicit = re.search(r'long\s*=\s*"([^"]+)"', attrs)
            flags.add(explicit.group(1) if explicit else field.replace("_", "-"))
    return flags


# ---------------------------------------------------------------------------- lint and schema


def test_lint_is_clean_with_defaults_and_namespaced_values():
    for values in (None, {"watchNamespaces": ["team-a"]}):
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
        errors = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not errors, report


def test_defaults_pass_the_schema(chart):
    chart.validate_schema(chart.values)


@pytest.mark.parametrize(
    "bad",
    [
        {"replicaCount": "two"},
        {"replicaCount": 11},
        {"logFormat": "yaml"},
        {"image": {"repository": "vlm-operator", "tag": "latest"}},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"securityContext": {"allowPrivilegeEscalation": True, "capabilities": {"drop": ["ALL"]}}},
        {"replicaCont": 1},  # a typo is an error, not a silently ignored key
    ],
)
def test_schema_rejects_bad_values(chart, bad):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)
    # `helm template`/`install` validate too.
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def test_every_values_key_is_documented():
    """Each key in values.yaml, at any depth, has a comment on the line above it or inline."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    parents: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m or line.lstrip().startswith("- "):
            continue
        indent, key = len(m.group(1)), m.group(2)
        parents = [(d, k) for d, k in parents if d < indent]
        path = ".".join([k for _, k in parents] + [key])
        parents.append((indent, key))
        prev = lines[i - 1].strip() if i else ""
        if "#" not in line and not prev.startswith("#"):
            undocumented.append(path)
    assert not undocumented, f"values.yaml keys without a comment: {undocumented}"


# ---------------------------------------------------------------------------- CRD


def test_chart_crd_is_byte_identical_to_the_generated_crd(chart):
    assert REPO_CRD.exists(), "crds/vlmcaptioner.yaml is generated by `vlm-operator crd`"
    expected = REPO_CRD.read_bytes()
    assert (CHART / "crds" / "vlmcaptioner.yaml").read_bytes() == expected, (
        "charts/vlm-captioner-operator/crds/vlmcaptioner.yaml differs from crds/vlmcaptioner.yaml;"
        " copy it: cp crds/vlmcaptioner.yaml charts/vlm-captioner-operator/crds/"
    )
    (crd,) = chart.crds
    assert crd["data"].encode() == expected
    doc = yaml.safe_load(expected)
    assert doc["kind"] == "CustomResourceDefinition"
    assert doc["spec"]["group"] == "captioning.dev"
    assert doc["spec"]["names"]["kind"] == "VlmCaptioner"
    assert [v["name"] for v in doc["spec"]["versions"]] == ["v1alpha1"]


def test_crds_are_not_templated(chart):
    """CRDs live in crds/ (installed before templates, never deleted by `helm uninstall`)."""
    assert not by_kind(render(chart), "CustomResourceDefinition")


# ---------------------------------------------------------------------------- default render


def test_default_render_has_the_expected_objects(chart):
    objects = render(chart)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ]
    )
    for o in objects:
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_cluster_rbac_covers_exactly_what_the_operator_calls(chart):
    objects = render(chart)
    role = one(objects, "ClusterRole")
    assert rule_set(role) == OPERATOR_RULES | CLUSTER_ONLY_RULES
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    sa = one(objects, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]


def test_leader_election_role_is_namespaced_and_only_leases(chart):
    objects = render(chart)
    (role,) = by_kind(objects, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert rule_set(role) == LEASE_RULES
    (binding,) = by_kind(objects, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert not by_kind(render(chart, {"leaderElection": {"enabled": False}}), "Role")


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["team-a"]}])
def test_no_wildcards_and_no_broad_secret_writes(chart, values):
    for role in by_kind(render(chart, values), "ClusterRole") + by_kind(
        render(chart, values), "Role"
    ):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (role["metadata"]["name"], rule)
            if "secrets" in rule["resources"]:
                # Reads, plus the labelled nv-ingest copy it publishes: never update or a
                # deletecollection that could sweep Secrets that are not its own.
                assert set(rule["verbs"]) <= {"get", "list", "watch", "create", "patch", "delete"}, rule
            assert "escalate" not in rule["verbs"] and "bind" not in rule["verbs"], rule


def test_restricted_pod_security(chart):
    objects = render(chart)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = operator_container(objects)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert not pod.get("volumes"), "a read-only root fs needs no scratch volume for the operator"


def test_operator_args_use_only_flags_the_binary_has(chart):
    flags = operator_flags()
    assert {"log-format", "http-addr", "namespace", "concurrency"} <= flags, flags
    for values in ({}, {"watchNamespaces": ["team-a"]}):
        args = operator_container(render(chart, values))["args"]
        assert args[0] == "run"
        for arg in args[1:]:
            name = re.match(r"--([a-z0-9-]+)", arg)
            assert name and name.group(1) in flags, f"{arg!r}: vlm-operator run has no such flag"


def test_default_deployment_wiring(chart):
    objects = render(chart)
    c = operator_container(objects)
    assert c["image"] == "vlm-operator:0.1.0"
    assert c["args"] == [
        "run",
        "--log-format=json",
        "--http-addr=0.0.0.0:8080",
        "--concurrency=4",
        "--leader-elect=true",
    ]
    env = {e["name"]: e for e in c["env"]}
    assert env["VLM_DEFAULT_SERVER_IMAGE"]["value"] == "vlm-server:0.1.0"
    assert env["RUST_LOG"]["value"] == "info,kube=warn"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "WATCH_NAMESPACE" not in env
    (port,) = c["ports"]
    assert port == {"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    dep = one(objects, "Deployment")
    assert dep["spec"]["replicas"] == 1
    # Leader election makes a surge pod safe: it waits as a ready standby.
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == one(
        objects, "ServiceAccount"
    )["metadata"]["name"]
    svc = one(objects, "Service")
    assert svc["spec"]["ports"] == [
        {"name": "http-metrics", "port": 8080, "targetPort": "http-metrics", "protocol": "TCP"}
    ]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())


# ---------------------------------------------------------------------------- non-default values


def test_namespaced_mode_grants_only_roles_in_the_watched_namespace(chart):
    objects = render(chart, {"watchNamespaces": ["team-a"]})
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(objects, "Role")}
    operator_role = roles[("team-a", RELEASE)]
    assert rule_set(operator_role) == OPERATOR_RULES
    assert rule_set(roles[(NAMESPACE, f"{RELEASE}-leader-election")]) == LEASE_RULES
    bindings = {
        (b["metadata"]["namespace"], b["metadata"]["name"]): b for b in by_kind(objects, "RoleBinding")
    }
    binding = bindings[("team-a", RELEASE)]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": RELEASE,
    }
    assert binding["subjects"][0]["namespace"] == NAMESPACE
    assert "--namespace=team-a" in operator_container(objects)["args"]


def test_several_watched_namespaces_get_a_role_and_a_flag_each(chart):
    objects = render(chart, {"watchNamespaces": ["team-a", "team-b"]})
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    for ns in ("team-a", "team-b"):
        (role,) = [r for r in by_kind(objects, "Role") if r["metadata"]["namespace"] == ns]
        assert rule_set(role) == OPERATOR_RULES
        (binding,) = [b for b in by_kind(objects, "RoleBinding") if b["metadata"]["namespace"] == ns]
        assert binding["roleRef"]["kind"] == "Role"
    args = operator_container(objects)["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]


def test_replicas_with_leader_election(chart):
    dep = one(render(chart, {"replicaCount": 3}), "Deployment")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"


def test_without_leader_election_one_replica_and_recreate(chart):
    objects = render(chart, {"leaderElection": {"enabled": False}})
    dep = one(objects, "Deployment")
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert "--leader-elect=false" in operator_container(objects)["args"]
    with pytest.raises(helm.HelmRenderError, match="needs leaderElection.enabled"):
        render(chart, {"replicaCount": 2, "leaderElection": {"enabled": False}})


def test_custom_images_resources_and_scheduling(chart):
    values = {
        "image": {"repository": "registry.example.com/ml/vlm-operator", "tag": "0.1.1"},
        "imagePullSecrets": [{"name": "regcred"}],
        "defaultServerImage": {"repository": "registry.example.com/ml/vlm-server", "tag": "0.1.1-cu13"},
        "logFormat": "text",
        "concurrency": 8,
        "metrics": {"port": 9090, "service": {"port": 9090}},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "nodeSelector": {"kubernetes.io/os": "linux", "node-role.example.com/system": "true"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy.example.com:3128"}],
    }
    objects = render(chart, values)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = operator_container(objects)
    assert c["image"] == "registry.example.com/ml/vlm-operator:0.1.1"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["VLM_DEFAULT_SERVER_IMAGE"] == "registry.example.com/ml/vlm-server:0.1.1-cu13"
    assert env["HTTPS_PROXY"] == "http://proxy.example.com:3128"
    assert c["args"] == [
        "run",
        "--log-format=text",
        "--http-addr=0.0.0.0:9090",
        "--concurrency=8",
        "--leader-elect=true",
    ]
    assert c["ports"][0]["containerPort"] == 9090
    assert c["resources"] == values["resources"]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert one(objects, "Service")["spec"]["ports"][0]["port"] == 9090


def test_image_digest_pins_the_operator_image(chart):
    digest = "sha256:" + "ab" * 32
    c = operator_container(render(chart, {"image": {"repository": "r.example.com/vlm-operator", "digest": digest}}))
    assert c["image"] == f"r.example.com/vlm-operator@{digest}"


def test_existing_service_account_and_no_rbac(chart):
    objects = render(chart, {"serviceAccount": {"create": False, "name": "platform-sa"}, "rbac": {"create": False}})
    assert not by_kind(objects, "ServiceAccount")
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"
    with pytest.raises(helm.HelmRenderError, match="serviceAccount.name is required"):
        render(chart, {"serviceAccount": {"create": False}})


def test_service_monitor_is_opt_in(chart):
    assert not by_kind(render(chart), "ServiceMonitor")
    sm = one(render(chart, {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}}), "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["endpoints"] == [{"port": "http-metrics", "path": "/metrics", "interval": "30s"}]


def test_readme_documents_every_top_level_value(chart):
    readme = (CHART / "README.md").read_text()
    missing = [k for k in chart.values if f"`{k}" not in readme]
    assert not missing, f"charts/vlm-captioner-operator/README.md does not mention {missing}"


def test_chart_metadata_matches_the_workspace_version(chart):
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "vlm-captioner-operator"
    workspace = (REPO / "Cargo.toml").read_text()
    version = re.search(r'\[workspace\.package\][^\[]*?version\s*=\s*"([^"]+)"', workspace, re.S)
    assert version and meta["appVersion"] == version.group(1)
