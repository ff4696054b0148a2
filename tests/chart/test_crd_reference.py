"""docs/crd-reference.md is generated from crds/vlmcaptioner.yaml and must be up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def load_generator():
    spec = importlib.util.spec_from_file_location("crd_reference", REPO / "scripts" / "crd_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_up_to_date():
    gen = load_generator()
    expected = gen.render(yaml.safe_load((REPO / "crds" / "vlmcaptioner.yaml").read_text()))
    committed = (REPO / "docs" / "crd-reference.md").read_text()
    assert committed == expected, "docs/crd-reference.md is stale: run python3 scripts/crd_reference.py"


def test_reference_lists_every_leaf_field_of_the_spec():
    """Each schema property (outside embedded Kubernetes types) has a row."""
    gen = load_generator()
    crd = yaml.safe_load((REPO / "crds" / "vlmcaptioner.yaml").read_text())
    text = gen.render(crd)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]

    def paths(node, path):
        if path in gen.EXTERNAL_TYPES or f"{path}[]" in gen.EXTERNAL_TYPES:
            yield path
            return
        yield path
        items = node.get("items", {})
        for name, child in node.get("properties", {}).items():
            yield from paths(child, f"{path}.{name}")
        for name, child in items.get("properties", {}).items():
            yield from paths(child, f"{path}[].{name}")

    for part in ("spec", "status"):
        for name, child in schema[part]["properties"].items():
            for p in paths(child, f"{part}.{name}"):
                assert f"| `{p}` |" in text, p
