"""Deployment files: valid YAML, entrypoints the real job CLIs accept, valid cron schedules.

The KubeRay manifests cannot run here (no Kubernetes), so the tests check what breaks them in
practice: a flag a job does not have, a schedule cron rejects, a CronJob script that renders a bad
RayJob, a RayCronJob that drifted from the one-shot RayJob, documented commands that no longer parse.
The CronJob's shell script is run for real with /bin/sh, as its container runs it, with a stand-in
`kubectl` on PATH that records what it is asked to create and delete. Every ``ray.io`` manifest is
validated against KubeRay's own CRD schemas (``../shared/vendor/kuberay/``, strict about unknown
fields as ``kubectl apply --validate=strict`` is; skipped where that folder is absent), and the plain
Kubernetes ones are checked for what broke them before: a withdrawn image tag, a service account
nobody creates, GPU pods kept for minutes after a run, runs that overlap.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
DOCS = REPO / "docs" / "operations.md"
KUBERAY_CRDS = REPO.parent / "shared" / "vendor" / "kuberay"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict:
    docs = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def parse_job_command(words: list[str]):
    """Parse ``python -m jobs.<name> ARGS`` with that job's own ``build_parser()``."""
    assert words[:2] == ["python", "-m"] and words[2].startswith("jobs."), words
    module = importlib.import_module(words[2])
    assert hasattr(module, "build_parser"), f"{words[2]} has no build_parser(); the deploy checks need it"
    try:
        return module.build_parser().parse_args(words[3:])
    except SystemExit as e:  # argparse reports bad flags by exiting
        raise AssertionError(f"{words[2]} rejects {shlex.join(words[3:])}") from e


# --- cron syntax --------------------------------------------------------------------------------

_FIELDS = [  # (name, low, high, names)
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}),
    ("day of week", 0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
]


def cron_errors(expr: str) -> list[str]:
    """Problems with a standard 5-field cron expression ([] if valid): lists, ranges, steps, names."""
    fields = expr.split()
    if len(fields) != 5:
        return [f"{len(fields)} fields, expected 5 (minute hour day-of-month month day-of-week)"]
    errors = []
    for text, (name, low, high, names) in zip(fields, _FIELDS, strict=True):
        def value(v: str) -> int | None:
            v = v.lower()
            if v in names:
                return names[v]
            return int(v) if v.isdigit() and low <= int(v) <= high else None

        for item in text.split(","):
            match = re.fullmatch(r"(\*|[^-/]+(?:-[^-/]+)?)(?:/(\d+))?", item)
            if not match or (match.group(2) is not None and int(match.group(2)) < 1):
                errors.append(f"{name}: bad item {item!r}")
                continue
            base = match.group(1)
            if base == "*":
                continue
            ends = [value(v) for v in base.split("-")]
            if any(e is None for e in ends) or (len(ends) == 2 and ends[0] > ends[1]):
                errors.append(f"{name}: {item!r} outside {low}-{high}")
    return errors


@pytest.mark.parametrize("expr", ["7 * * * *", "*/15 2-5 1,15 * mon-fri", "0 0 1 jan *", "0 12 * * 7"])
def test_cron_checker_accepts_valid(expr):
    assert cron_errors(expr) == []


@pytest.mark.parametrize("expr", ["7 * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "*/0 * * * *",
                                  "5-1 * * * *", "* * * foo *", "@hourly"])
def test_cron_checker_rejects_invalid(expr):
    assert cron_errors(expr)


# --- YAML and manifests -------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted([*DEPLOY.rglob("*.yaml"), REPO / "cluster.yaml"]), ids=lambda p: p.name)
def test_yaml_files_parse(path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    if path.parent == KUBERAY:
        for d in docs:
            assert d.get("apiVersion") and d.get("kind"), path.name
            if d["kind"] != "Kustomization":
                assert d["metadata"]["name"], path.name


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _one(KUBERAY / "rayjob-infer.yaml", "RayJob")


def test_rayjob_entrypoint_is_an_incremental_infer_command(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "jobs.infer"]
    args = parse_job_command(words)
    assert args.incremental is True
    assert args.check_resources is False  # the job may start before the worker pods have joined
    assert args.input.startswith("s3://") and args.output.startswith("s3://")
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True  # the cluster goes away after each run
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"


def test_rayjob_uses_the_cluster_image(rayjob):
    image = yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["image"]
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert [c["image"] for c in pod["spec"]["containers"]] == [image]
    gpus = [g for g in cluster["workerGroupSpecs"]
            if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpus, "no GPU worker group"
    assert parse_job_command(shlex.split(rayjob["spec"]["entrypoint"])).gpus_per_worker > 0


def test_raycronjob_runs_the_same_rayjob(rayjob):
    cron = _one(KUBERAY / "raycronjob-infer.yaml", "RayCronJob")
    assert cron_errors(cron["spec"]["schedule"]) == []
    assert cron["spec"]["jobTemplate"] == rayjob["spec"]


def test_cronjob_schedule_and_wiring():
    cronjob = _one(KUBERAY / "cronjob-infer.yaml", "CronJob")
    assert cronjob["apiVersion"] == "batch/v1"
    assert cron_errors(cronjob["spec"]["schedule"]) == []
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    (mount,) = container["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    # The CronJob reads the ConfigMap the kustomization builds from rayjob-infer.yaml.
    assert volume["configMap"]["name"] == generator["name"]
    assert generator["files"] == ["rayjob-infer.yaml"]
    assert env["MANIFEST"] == f"{mount['mountPath']}/rayjob-infer.yaml"
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    assert set(kustomization["resources"]) == {"cronjob-infer.yaml", "serviceaccount.yaml"}
    # RBAC: the pod's service account may create/list/delete RayJobs.
    role = _one(KUBERAY / "cronjob-infer.yaml", "Role")
    binding = _one(KUBERAY / "cronjob-infer.yaml", "RoleBinding")
    assert pod["serviceAccountName"] == binding["subjects"][0]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"create", "list", "delete"} <= set(role["rules"][0]["verbs"])


_STUB = """#!/bin/sh
# Stand-in for kubectl: answers from files, records what it is asked to do.
echo "$*" >> "$STUB_DIR/calls"
case "$1" in
  get)
    case "$*" in
      *custom-columns*) cat "$STUB_DIR/statuses" ;;
      *) cat "$STUB_DIR/all" ;;
    esac ;;
  create) cat > "$STUB_DIR/created.yaml" ;;
  delete) shift; echo "$@" >> "$STUB_DIR/deleted" ;;
esac
"""


def _run_cron_script(tmp_path: Path, statuses: str, existing: list[str]) -> subprocess.CompletedProcess:
    cronjob = _one(KUBERAY / "cronjob-infer.yaml", "CronJob")
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(_STUB)
    (bin_dir / "kubectl").chmod(0o755)
    (tmp_path / "statuses").write_text(statuses)
    (tmp_path / "all").write_text("".join(f"rayjob.ray.io/{n}\n" for n in existing))
    env.update(MANIFEST=str(KUBERAY / "rayjob-infer.yaml"), STUB_DIR=str(tmp_path),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True,
                          timeout=60)


def test_cronjob_script_creates_a_timestamped_rayjob_and_prunes(tmp_path, rayjob):
    existing = [f"unet-infer-202601{d:02d}-0007" for d in range(1, 27)]  # 26, oldest first
    ended = ["Complete", "Failed", "ValidationFailed", "Suspended"] * 7  # every state in which a run is over
    finished = "".join(f"{n}   {s}\n" for n, s in zip(existing, ended))
    proc = _run_cron_script(tmp_path, statuses=finished, existing=existing)
    assert proc.returncode == 0, proc.stderr
    created = yaml.safe_load((tmp_path / "created.yaml").read_text())
    assert re.fullmatch(r"unet-infer-\d{8}-\d{4}", created["metadata"]["name"])
    assert f"created rayjob/{created['metadata']['name']}" in proc.stdout
    # Everything but the name is the RayJob as written.
    assert created["spec"] == rayjob["spec"] and created["kind"] == "RayJob"
    assert created["metadata"]["labels"] == rayjob["metadata"]["labels"]
    # KEEP=24: the two oldest are deleted, newest kept.
    assert (tmp_path / "deleted").read_text().split() == [f"rayjob.ray.io/{n}" for n in existing[:2]]


@pytest.mark.parametrize("status", ["<none>", "Initializing", "Running", "Retrying", "Waiting", "Suspending"])
def test_cronjob_script_skips_while_a_previous_run_has_not_ended(tmp_path, status):
    statuses = f"unet-infer-20260101-0007   Complete\nunet-infer-20260101-0107   {status}\n"
    proc = _run_cron_script(tmp_path, statuses=statuses, existing=[])
    assert proc.returncode == 0, proc.stderr
    assert "skipping" in proc.stdout and "unet-infer-20260101-0107" in proc.stdout
    assert not (tmp_path / "created.yaml").exists()


def test_cronjob_script_creates_the_first_run(tmp_path):
    proc = _run_cron_script(tmp_path, statuses="", existing=[])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "created.yaml").exists() and not (tmp_path / "deleted").exists()


# --- cron line and documented commands ----------------------------------------------------------

def _crontab_line() -> str:
    lines = [line for line in (DEPLOY / "cron" / "infer.crontab").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) == 1
    return lines[0]


def _ray_job_submit_ok(words: list[str]) -> list[str]:
    """Check ``ray job submit OPTIONS -- ENTRYPOINT`` against Ray's own CLI; returns the entrypoint."""
    from ray.dashboard.modules.job.cli import submit

    assert words[:3] == ["ray", "job", "submit"] or words[0].endswith("/ray") and words[1:3] == ["job", "submit"], words
    try:
        ctx = submit.make_context("submit", list(words[3:]))
    except click.ClickException as e:
        raise AssertionError(f"ray job submit rejects {shlex.join(words[3:])}: {e.format_message()}") from e
    return list(ctx.params["entrypoint"])


def test_crontab_line():
    line = _crontab_line()
    schedule, command = " ".join(line.split()[:5]), line.split(None, 5)[5]
    assert cron_errors(schedule) == []
    words = shlex.split(command.split(">>")[0])
    start = next(i for i, w in enumerate(words) if w.endswith("ray") and words[i + 1: i + 3] == ["job", "submit"])
    entrypoint = _ray_job_submit_ok(words[start:])
    assert "--runtime-env" in words and "deploy/runtime_env.yaml" in words
    args = parse_job_command(entrypoint)
    assert args.incremental is True and args.check_resources is False  # autoscaling cluster
    assert line in DOCS.read_text(), "docs/operations.md must show the shipped crontab line"


def _documented_submits(path: Path = DOCS) -> list[list[str]]:
    """Every ``ray job submit ...`` command in a Markdown file's code blocks, as words."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"```(?:bash|cron)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            if "ray job submit" in line:
                words = shlex.split(line.split(">>")[0], comments=True)
                start = words.index("ray") if "ray" in words else next(i for i, w in enumerate(words) if w.endswith("/ray"))
                commands.append(words[start:])
    return commands


def test_documented_submit_commands_parse():
    commands = _documented_submits()
    jobs = set()
    for words in commands:
        entrypoint = _ray_job_submit_ok(words)
        parse_job_command(entrypoint)
        jobs.add(entrypoint[2])
    assert {"jobs.prepare", "jobs.train", "jobs.infer", "jobs.evaluate"} <= jobs


def test_runtime_env_keeps_the_upload_small():
    env = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    for heavy in (".venv/", ".git/", "runs/"):
        assert heavy in env["excludes"]
    # The inline JSON form in the docs excludes the same things.
    docs = DOCS.read_text()
    for pattern in env["excludes"]:
        assert f'"{pattern}"' in docs, pattern


# --- KubeRay CRD schemas and Kubernetes pitfalls (issue 13) -------------------------------------

def _ray_manifests() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in _docs(path)
            if str(doc.get("apiVersion", "")).startswith("ray.io/")]


def _strict(schema):
    """The CRD schema with unknown fields refused (the API server prunes them silently, so a typo
    such as ``ttlSecondAfterFinished`` would otherwise pass and do nothing)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crd_validators() -> dict:
    """``{(apiVersion, kind): validator}`` for every served version of the vendored CRDs (2 MB of
    YAML: read once, with libyaml where PyYAML has it)."""
    import jsonschema

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    validators = {}
    for path in sorted(KUBERAY_CRDS.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)  # noqa: S506 - a safe loader
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                validators[key] = jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return validators


def _crd_validator(api_version: str, kind: str):
    validator = _crd_validators().get((api_version, kind))
    assert validator is not None, f"no served CRD version for {api_version} {kind} in {KUBERAY_CRDS}"
    return validator


def _schema_errors(doc: dict) -> list[str]:
    errors = _crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


needs_crds = pytest.mark.skipif(not KUBERAY_CRDS.is_dir(), reason=f"no KubeRay CRDs at {KUBERAY_CRDS}")


@needs_crds
@pytest.mark.parametrize("name, doc", _ray_manifests(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_ray_manifests_match_the_kuberay_crds(name, doc):
    assert _schema_errors(doc) == [], name


@needs_crds
def test_crd_check_catches_a_typo_and_a_wrong_type(rayjob):
    import copy

    typo = copy.deepcopy(rayjob)
    typo["spec"]["ttlSecondAfterFinished"] = typo["spec"].pop("ttlSecondsAfterFinished")
    assert any("ttlSecondAfterFinished" in e for e in _schema_errors(typo))
    wrong = copy.deepcopy(rayjob)
    wrong["spec"]["backoffLimit"] = "once"
    assert any(e.startswith("spec.backoffLimit") for e in _schema_errors(wrong))


def _pod_specs(doc: dict) -> list[dict]:
    """Every pod spec in a manifest (RayJob / RayCronJob cluster pods, CronJob pod)."""
    spec = doc.get("spec", {})
    spec = spec.get("jobTemplate", spec) if doc["kind"] == "RayCronJob" else spec
    if doc["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    cluster = spec.get("rayClusterSpec")
    if not cluster:
        return []
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def _all_manifests() -> list[dict]:
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in _docs(path) if doc.get("kind") != "Kustomization"]


def test_images_are_pinned_and_not_withdrawn():
    images = [c["image"] for doc in _all_manifests() for pod in _pod_specs(doc) for c in pod["containers"]]
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"{image}: pin a version tag"
        assert not name.startswith(("bitnami/", "docker.io/bitnami/")), f"{image}: Bitnami withdrew its versioned tags"


def test_every_service_account_used_is_created_by_the_kustomization():
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    created = {d["metadata"]["name"] for f in kustomization["resources"] for d in _docs(KUBERAY / f)
               if d["kind"] == "ServiceAccount"}
    used = {pod.get("serviceAccountName", "default") for doc in _all_manifests() for pod in _pod_specs(doc)}
    assert used and used <= created | {"default"}, f"never created: {used - created}"
    assert "unet-ray" in used


def test_runs_release_gpus_soon_and_cannot_overlap(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] <= 120
    # RayCronJob has no concurrencyPolicy: each run (every attempt) must end before the next tick.
    cron = _one(KUBERAY / "raycronjob-infer.yaml", "RayCronJob")
    minute, hour = cron["spec"]["schedule"].split()[:2]
    assert hour == "*" and minute.isdigit(), "the overlap rule below assumes an hourly schedule"
    assert spec["activeDeadlineSeconds"] * (spec.get("backoffLimit", 0) + 1) < 3600
    cronjob = _one(KUBERAY / "cronjob-infer.yaml", "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def _entrypoint_paths(words: list[str]) -> dict[str, str | None]:
    """The data/storage/output paths a documented job command names (train: after --config)."""
    args = parse_job_command(words)
    if words[2] == "jobs.train":
        from jobs.train import config_from_args

        cfg = config_from_args(args).resolved()
        return {"--data": cfg.data, "--storage": cfg.storage, "--export": cfg.export}
    flags = ("input", "output", "data", "out", "images", "masks", "classes")
    return {f"--{f}": getattr(args, f) for f in flags if getattr(args, f, None)}


def test_documented_submits_name_shared_uris_only(monkeypatch):
    """Every `ray job submit` in docs/operations.md, the README and the crontab, and the RayJob's
    entrypoint, passes the check a submitted job makes first (unet.runtime.require_shared_paths)."""
    from unet.runtime import SUBMITTED_JOB_ENV, require_shared_paths

    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    monkeypatch.chdir(REPO)
    entrypoints = [_ray_job_submit_ok(w) for w in _documented_submits(DOCS) + _documented_submits(REPO / "README.md")]
    words = shlex.split(_crontab_line().split(">>")[0])
    entrypoints.append(_ray_job_submit_ok(words[next(i for i, w in enumerate(words) if w.endswith("/ray")):]))
    entrypoints.append(shlex.split(_one(KUBERAY / "rayjob-infer.yaml", "RayJob")["spec"]["entrypoint"]))
    assert len(entrypoints) >= 7
    for entrypoint in entrypoints:
        paths = _entrypoint_paths(entrypoint)
        assert paths, entrypoint
        require_shared_paths(paths)  # raises UsageError naming the flag otherwise


def test_jobs_that_work_in_the_driver_are_submitted_with_entrypoint_resources():
    """jobs.prepare and jobs.evaluate do their work in the driver: the docs submit them with
    --entrypoint-num-cpus, so Ray runs the driver on a worker, not on the CPU-less head."""
    for words in _documented_submits(DOCS):
        entrypoint = _ray_job_submit_ok(words)
        if entrypoint[2] in ("jobs.prepare", "jobs.evaluate"):
            from ray.dashboard.modules.job.cli import submit

            options = submit.make_context("submit", list(words[3:])).params
            assert (options["entrypoint_num_cpus"] or 0) > 0, shlex.join(words)
