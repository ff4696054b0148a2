"""The platform docs keep up with the operator: every condition reason it can set is explained."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_troubleshooting_explains_every_condition_reason():
    src = (REPO / "operator" / "src" / "status.rs").read_text()
    module = re.search(r"pub mod reason \{(.*?)\n\}", src, re.S)
    assert module, "operator/src/status.rs has no `pub mod reason`"
    reasons = re.findall(r'pub const \w+: &str = "([A-Za-z]+)";', module.group(1))
    assert reasons
    doc = (REPO / "docs" / "troubleshooting.md").read_text()
    missing = [r for r in reasons if f"`{r}`" not in doc]
    assert not missing, f"docs/troubleshooting.md does not explain {missing}"


def test_install_doc_uses_the_chart_and_crd_names():
    doc = (REPO / "docs" / "install.md").read_text()
    for needle in (
        "charts/vlm-captioner-operator",
        "crds/vlmcaptioner.yaml",
        "kind: HelmRelease",
        "kind: HelmRepository",
        "kind: Application",
        "VLM_CAPTION_ENDPOINT",
        "VLM_CAPTION_MODEL_NAME",
        "-nv-ingest",
    ):
        assert needle in doc, needle


def test_install_doc_captioner_example_uses_only_crd_fields():
    import yaml

    crd = yaml.safe_load((REPO / "crds" / "vlmcaptioner.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    doc = (REPO / "docs" / "install.md").read_text()
    examples = [
        d
        for block in re.findall(r"```yaml\n(.*?)```", doc, re.S)
        for d in yaml.safe_load_all(block)
        if isinstance(d, dict) and d.get("kind") == "VlmCaptioner"
    ]
    assert examples

    def check(value, node, path):
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} is not a field of the CRD"
                check(child, node["properties"][key], f"{path}.{key}")
            for key in node.get("required", []):
                assert key in value, f"{path}.{key} is required"
        elif isinstance(value, list) and "items" in node:
            for i, item in enumerate(value):
                check(item, node["items"], f"{path}[{i}]")

    for example in examples:
        assert example["apiVersion"] == f"{crd['spec']['group']}/v1alpha1"
        check(example["spec"], schema["properties"]["spec"], "spec")
