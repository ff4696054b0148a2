"""Cheap static checks of the container images' Dockerfiles (no Docker daemon needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"vlm-server": REPO / "server" / "Dockerfile", "vlm-operator": REPO / "operator" / "Dockerfile"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        buf += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions per build stage; ARGs before the first FROM form stage 0's preamble."""
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(path):
        if ins[0] == "FROM" and result[-1] and any(i[0] == "FROM" for i in result[-1]):
            result.append([])
        result[-1].append(ins)
    return result


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(
        a.split("=", 1) for w, a in instructions(path) if w == "ARG" and "=" in a
    )


def resolve(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def cargo_bins(crate: str) -> set[str]:
    manifest = (REPO / crate / "Cargo.toml").read_text()
    return set(re.findall(r'\[\[bin\]\]\s*name\s*=\s*"([^"]+)"', manifest))


def final_stage(path: Path) -> list[tuple[str, str]]:
    return stages(path)[-1]


@pytest.mark.parametrize("binary", sorted(DOCKERFILES))
def test_base_images_are_pinned_tags_not_latest(binary):
    path = DOCKERFILES[binary]
    args = arg_defaults(path)
    for word, rest in instructions(path):
        if word != "FROM":
            continue
        image = resolve(rest.split()[0], args)
        assert "$" not in image, f"{path.name}: unresolved ARG in {image}"
        name = image.split("@")[0]
        assert "@sha256:" in image or ":" in name.rsplit("/", 1)[-1], f"{image}: no tag"
        assert not name.endswith(":latest"), f"{image}: `latest` is not reproducible"


@pytest.mark.parametrize("binary", sorted(DOCKERFILES))
def test_runtime_stage_runs_as_a_numeric_non_root_user(binary):
    users = [a for w, a in final_stage(DOCKERFILES[binary]) if w == "USER"]
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: numeric and non-zero, for runAsNonRoot"
    assert not gid or (gid.isdigit() and int(gid) != 0)


@pytest.mark.parametrize("binary,crate", [("vlm-server", "server"), ("vlm-operator", "operator")])
def test_binary_names_match_cargo(binary, crate):
    assert binary in cargo_bins(crate), f"{crate}/Cargo.toml has no [[bin]] {binary}"
    path = DOCKERFILES[binary]
    builds = [a for w, a in instructions(path) if w == "RUN" and "cargo build" in a]
    assert builds, "no cargo build"
    build = builds[0]
    assert f"-p {binary}" in build and f"--bin {binary}" in build and "--locked" in build
    assert f"target/release/{binary}" in build
    runtime = final_stage(path)
    copies = [a for w, a in runtime if w == "COPY"]
    assert any(a.startswith("--from=builder") and a.endswith(f"/{binary}") for a in copies), copies
    (entrypoint,) = [json.loads(a) for w, a in runtime if w == "ENTRYPOINT"]
    assert Path(entrypoint[0]).name == binary


def test_server_image():
    path = DOCKERFILES["vlm-server"]
    args = arg_defaults(path)
    froms = [resolve(a.split()[0], args) for w, a in instructions(path) if w == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-devel-ubuntu\d+\.\d+", froms[0]), froms
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-(runtime|base)-ubuntu\d+\.\d+", froms[-1]), froms
    text = path.read_text()
    assert "CUDA_COMPUTE_CAP=90" in text
    assert "rustup" in text
    build = next(a for w, a in instructions(path) if w == "RUN" and "cargo build" in a)
    assert "--features cuda" in build and "--release" in build
    runtime = final_stage(path)
    assert ("ENTRYPOINT", '["vlm-server"]') in runtime
    assert ("CMD", '["serve", "/model"]') in runtime
    assert any(w == "EXPOSE" and "8000" in a.split() for w, a in runtime)
    # Only the binary is copied from the builder.
    assert [a for w, a in runtime if w == "COPY"] == ["--from=builder /out/vlm-server /usr/local/bin/vlm-server"]


def test_server_image_user_matches_the_pods_the_operator_creates():
    """The operator's Deployment runs vlm-server as a fixed UID; the image uses the same one."""
    src = (REPO / "operator" / "src" / "builders" / "deployment.rs").read_text()
    m = re.search(r"const RUN_AS_ID: i64 = (\d+);", src)
    if not m:
        pytest.skip("the operator no longer pins a UID for the server pods")
    users = [a for w, a in final_stage(DOCKERFILES["vlm-server"]) if w == "USER"]
    assert users[-1].split(":")[0] == m.group(1)


def test_operator_image():
    path = DOCKERFILES["vlm-operator"]
    args = arg_defaults(path)
    froms = [resolve(a.split()[0], args) for w, a in instructions(path) if w == "FROM"]
    assert froms[-1] == "gcr.io/distroless/cc-debian12:nonroot"
    assert froms[0].endswith("-bookworm"), "builder glibc must match Debian 12"
    runtime = final_stage(path)
    assert ("CMD", '["run"]') in runtime
    # The chart's default podSecurityContext runs the operator as this UID.
    values = (REPO / "charts" / "vlm-captioner-operator" / "values.yaml").read_text()
    uid = [a for w, a in runtime if w == "USER"][-1].split(":")[0]
    assert re.search(rf"^\s+runAsUser: {uid}$", values, re.M)


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {"target", ".git"} <= ignored
    assert not ignored & {"operator", "server", "Cargo.toml", "Cargo.lock"}
