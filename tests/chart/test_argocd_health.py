"""The Argo CD health check shipped in deploy/argocd: every case in deploy/argocd/tests/*.yaml
(an object and the expected {status, message}) is run through health.lua with a real Lua
interpreter (lupa), and the argocd-cm snippet carries the same script."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

lupa = pytest.importorskip("lupa")
try:  # Argo CD runs gopher-lua, a Lua 5.1: test with 5.1 where lupa ships it.
    import lupa.lua51 as lua_impl
except ImportError:  # pragma: no cover
    lua_impl = lupa

REPO = Path(__file__).resolve().parents[2]
ARGOCD = REPO / "deploy" / "argocd"
SCRIPT = (ARGOCD / "health.lua").read_text()
CASES = sorted((ARGOCD / "tests").glob("*.yaml"))
KEY = "resource.customizations.health.captioning.dev_VlmCaptioner"


def to_lua(lua, value):
    """Python data to Lua tables: lists become 1-based sequences, as Argo CD's JSON decoding does."""
    if isinstance(value, dict):
        return lua.table_from({k: to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([to_lua(lua, v) for v in value])
    return value


def health(obj: dict) -> dict:
    lua = lua_impl.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = to_lua(lua, obj)
    result = lua.execute(SCRIPT)
    return {"status": result["status"], "message": result["message"]}


def test_there_are_cases_for_every_status():
    statuses = {yaml.safe_load(p.read_text())["expected"]["status"] for p in CASES}
    assert statuses == {"Healthy", "Progressing", "Degraded", "Suspended"}


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_health_case(case):
    doc = yaml.safe_load(case.read_text())
    assert doc["object"]["kind"] == "VlmCaptioner"
    assert health(doc["object"]) == doc["expected"]


def test_argocd_cm_snippet_is_the_script():
    cm = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][KEY] == SCRIPT


def test_reasons_used_by_the_script_exist_in_the_operator():
    src = (REPO / "operator" / "src" / "status.rs").read_text()
    for reason in ("ScaledToZero", "ChatProbeFailed", "ChatProbeTimedOut"):
        assert f'"{reason}"' in src, reason


def kstatus(obj: dict) -> str:
    """kstatus' generic rules for a custom resource (sigs.k8s.io/cli-utils pkg/kstatus/status,
    checkGenericProperties): a generation not yet observed or Reconciling=True is InProgress,
    Stalled=True is Failed, the first of the two found wins; otherwise Current."""
    status = obj.get("status") or {}
    generation = obj["metadata"].get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return "InProgress"
    for cond in status.get("conditions") or []:
        if cond["type"] == "Reconciling" and cond["status"] == "True":
            return "InProgress"
        if cond["type"] == "Stalled" and cond["status"] == "True":
            return "Failed"
    return "Current"


KSTATUS_OF_HEALTH = {
    "Progressing": "InProgress",
    "Degraded": "Failed",
    "Healthy": "Current",
    "Suspended": "Current",
}
KSTATUS_CASES = [
    p
    for p in CASES
    if {"Reconciling", "Stalled"}
    <= {c["type"] for c in (yaml.safe_load(p.read_text())["object"].get("status") or {}).get("conditions") or []}
]


def test_there_are_cases_with_the_kstatus_conditions():
    statuses = {yaml.safe_load(p.read_text())["expected"]["status"] for p in KSTATUS_CASES}
    assert statuses == {"Healthy", "Progressing", "Degraded", "Suspended"}


@pytest.mark.parametrize("case", KSTATUS_CASES, ids=[p.stem for p in KSTATUS_CASES])
def test_argo_cd_and_kstatus_agree(case):
    doc = yaml.safe_load(case.read_text())
    conditions = doc["object"]["status"]["conditions"]
    reconciling, stalled = (
        next(c for c in conditions if c["type"] == t) for t in ("Reconciling", "Stalled")
    )
    assert not (reconciling["status"] == "True" and stalled["status"] == "True"), "never both"
    assert kstatus(doc["object"]) == KSTATUS_OF_HEALTH[health(doc["object"])["status"]]
