"""The cluster definitions under cluster/ parse, carry what their tools require, and stay safe.

Offline and quick (no kubectl, no cluster, no cloud): the `ray up` file is validated against the
autoscaler's own JSON schema shipped in the installed ray package (and Ray's own config checks);
KubeRay manifests get structural checks of the fields KubeRay requires (the lists below are taken
from KubeRay's CRDs and its RayJob validation; the CRD files themselves are 0.7-1.1 MB each, too
big to vendor); the project config is loaded with load_config; secrets and public endpoints are
looked for in every file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
JOBS = ROOT / "jobs"

IMAGE_REPO = "REGISTRY/cam2seg"           # the placeholder registry every manifest names
MAX_GPU_WORKERS = 8

# --- what KubeRay requires (KubeRay v1.x, ray-operator/config/crd/bases/*.yaml "required:" lists,
# and ray-operator/pkg/utils/validation.go ValidateRayJobSpec / ValidateRayJobMetadata) ---------------
RAY_API_VERSION = "ray.io/v1"
HEAD_GROUP_REQUIRED = {"template", "rayStartParams"}      # rayStartParams: required in older CRDs
WORKER_GROUP_REQUIRED = {"groupName", "template", "minReplicas", "maxReplicas", "rayStartParams"}
RAYCRONJOB_SPEC_REQUIRED = {"schedule", "jobTemplate"}    # ray.io_raycronjobs.yaml (KubeRay v1.6, alpha)
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
# Known fields (ray-operator/apis/ray/v1/*_types.go, v1.x). The API server silently prunes a field its
# structural schema does not know, so a misspelt one would be dropped without an error: refuse them here.
KNOWN_FIELDS = {
    "RayClusterSpec": {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                       "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                       "gcsFaultToleranceOptions", "authOptions"},
    "HeadGroupSpec": {"serviceType", "headService", "enableIngress", "rayStartParams", "template"},
    "WorkerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                        "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"},
    "AutoscalerOptions": {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                          "securityContext", "idleTimeoutSeconds", "upscalingMode", "version"},
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
                   "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy",
                   "metadata", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode",
                   "submitterPodTemplate", "submitterConfig", "suspend", "ttlSecondsAfterFinished",
                   "preRunningDeadlineSeconds"},
    "RayCronJobSpec": {"schedule", "jobTemplate", "suspend"},
}
CLUSTER_SELECTOR_KEY = "ray.io/cluster"                    # utils.RayJobClusterSelectorKey
MAX_RAYJOB_NAME = 47                                       # MaxRayClusterNameLength (53) - 6
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]


def _one(path: Path, kind: str) -> dict:
    docs = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def _configmap_rayjob() -> dict:
    cm = _one(KUBERAY / "cronjob-nightly.yaml", "ConfigMap")
    (key, text), = cm["data"].items()
    return yaml.safe_load(text)


def _rayjob_specs() -> list[tuple[str, dict]]:
    """(where, RayJob spec) for every RayJob the manifests define or create."""
    out = [(p.name, _one(p, "RayJob")["spec"]) for p in sorted(KUBERAY.glob("rayjob-*.yaml"))]
    out.append(("raycronjob-nightly.yaml jobTemplate", _one(KUBERAY / "raycronjob-nightly.yaml",
                                                             "RayCronJob")["spec"]["jobTemplate"]))
    out.append(("cronjob-nightly.yaml ConfigMap", _configmap_rayjob()["spec"]))
    return out


def _raycluster_specs() -> list[tuple[str, dict]]:
    out = [("raycluster.yaml", _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"])]
    out += [(where, spec["rayClusterSpec"]) for where, spec in _rayjob_specs() if "rayClusterSpec" in spec]
    return out


def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def _installed_ray_version() -> str:
    import ray

    return ray.__version__


# --- every file ---------------------------------------------------------------------------------------

def test_cluster_files_exist():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file()}
    expected = {"Dockerfile", "ray-cluster.yaml", "runtime_env.yaml", "cam2seg.yaml",
                "kuberay/raycluster.yaml", "kuberay/rayjob-train-classifiers.yaml", "kuberay/rayjob-label.yaml",
                "kuberay/rayjob-train-segmenter.yaml", "kuberay/rayjob-evaluate.yaml",
                "kuberay/raycronjob-nightly.yaml", "kuberay/cronjob-nightly.yaml", "kuberay/s3-access.yaml"}
    assert expected <= names, f"missing under cluster/: {sorted(expected - names)}"


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{path}: no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


_AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
_AWS_SECRET = re.compile(r"aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}", re.IGNORECASE)
_AWS_TOKEN = re.compile(r"aws_session_token\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{40,}", re.IGNORECASE)
_PUBLIC_DASHBOARD = re.compile(r"dashboard[-_]host[\"']?\s*[:=]?\s*[\"']?0\.0\.0\.0")


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()),
                         ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_no_credentials_and_no_public_dashboard(path):
    text = path.read_text()
    for pattern, what in ((_AWS_KEY_ID, "an AWS access key id"), (_AWS_SECRET, "an AWS secret access key"),
                          (_AWS_TOKEN, "an AWS session token")):
        m = pattern.search(text)
        assert m is None, f"{path}: looks like {what}: {m.group(0)[:12]}..."
    m = _PUBLIC_DASHBOARD.search(text)
    assert m is None, f"{path}: the dashboard must not listen on 0.0.0.0 ({m.group(0)})"


# --- ray up ----------------------------------------------------------------------------------------------

def test_ray_cluster_yaml_validates_against_rays_schema():
    import jsonschema  # a dependency of ray itself (ray's own validate_config imports it)
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _docs(CLUSTER / "ray-cluster.yaml")[0]
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    validate_config(config)                      # what `ray up` runs: schema + node-type checks
    validate_config(prepare_config(config))      # and again after merging the provider's defaults


def test_ray_cluster_yaml_content():
    c = _docs(CLUSTER / "ray-cluster.yaml")[0]
    assert c["provider"]["type"] == "aws"
    assert c["docker"]["image"].startswith(IMAGE_REPO + ":")
    assert "idle_timeout_minutes" in c
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU", 1) == 0, \
        "the head should take no work (resources: {CPU: 0})"
    gpu_types = [t for name, t in types.items() if name != c["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no worker type declares GPU resources"
    for t in gpu_types:
        assert t.get("min_workers", 0) == 0 and t["max_workers"] <= c["max_workers"] == MAX_GPU_WORKERS
    for name, t in types.items():
        nc = t["node_config"]
        assert "Arn" in nc.get("IamInstanceProfile", {}), f"{name}: S3 through an IAM instance profile"
    head_cmds = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert not re.search(r"aws_access_key|aws_secret", json.dumps(c), re.IGNORECASE)


def test_runtime_env_yaml_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    d = _docs(CLUSTER / "runtime_env.yaml")[0]
    env = RuntimeEnv(**d)                       # unknown or mistyped fields raise here
    assert set(d) <= set(RuntimeEnv.known_fields)
    assert all(isinstance(v, str) for v in d.get("env_vars", {}).values()), "env_vars values must be strings"
    assert not any(k.upper().startswith(("AWS_ACCESS", "AWS_SECRET", "AWS_SESSION")) for k in d.get("env_vars", {}))
    assert ".venv/" in d.get("excludes", []) and ".git/" in d.get("excludes", [])
    assert env.get("config")["setup_timeout_seconds"] > 0


# --- image and versions ----------------------------------------------------------------------------------

def test_dockerfile_base_image_matches_installed_ray():
    text = (CLUSTER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms, "no FROM line"
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", froms[-1])
    assert m, f"base image {froms[-1]!r} is not an official rayproject/ray Python GPU image"
    assert m.group(1) == _installed_ray_version(), \
        f"Dockerfile's Ray {m.group(1)} != installed ray {_installed_ray_version()}: bump them together"
    assert (m.group(2), m.group(3)) == ("3", "11")
    assert not re.search(r"^USER\s+(root|0)\b", text, re.MULTILINE), "the image must stay non-root"
    assert not re.search(r"^(ENV|ARG)\s+AWS_", text, re.MULTILINE), "no AWS settings baked into the image"
    assert "[dev]" not in text, "no dev extras in the image"
    # the KubeRay entrypoints run /home/ray/cam2seg/jobs/NAME.py from the image
    assert re.search(r"^WORKDIR\s+/home/ray/cam2seg\s*$", text, re.MULTILINE)
    assert re.search(r"^COPY\b.*\sjobs/\s+jobs/\s*$", text, re.MULTILINE)


def test_ray_version_and_image_agree_everywhere():
    import cam2seg

    ray_version = _installed_ray_version()
    image = f"{IMAGE_REPO}:{cam2seg.__version__}"
    assert _docs(CLUSTER / "ray-cluster.yaml")[0]["docker"]["image"] == image
    for where, spec in _raycluster_specs():
        assert spec["rayVersion"] == ray_version, f"{where}: rayVersion {spec['rayVersion']} != ray {ray_version}"
        for pod in _pod_specs(spec):
            for c in pod["containers"]:
                assert c["image"] == image, f"{where}: container {c['name']} runs {c['image']}, not {image}"


def test_cam2seg_yaml_loads_and_asks_for_gpus():
    from cam2seg.config import load_config

    cfg = load_config(str(CLUSTER / "cam2seg.yaml"))
    # The GPU workers autoscale from zero: automatic GPU detection would see none at job start.
    assert cfg.classifier.gpus_per_worker == 1 and cfg.segmenter.gpus_per_worker == 1
    assert cfg.label.gpus_per_actor == 1 and cfg.label.actors is not None
    assert cfg.label.actors * cfg.label.gpus_per_actor <= MAX_GPU_WORKERS
    assert cfg.classifier.folds * cfg.classifier.workers_per_fold <= MAX_GPU_WORKERS
    assert (cfg.classifier.encoder, cfg.classifier.size, cfg.classifier.folds, cfg.classifier.epochs,
            cfg.classifier.batch_size) == ("efficientnet_b0", (256, 1600), 5, 20, 64)


# --- KubeRay ----------------------------------------------------------------------------------------------

def test_kuberay_kinds_and_api_versions():
    kinds = {p.name: [d["kind"] for d in _docs(p)] for p in sorted(KUBERAY.glob("*.yaml"))}
    assert kinds["raycluster.yaml"] == ["RayCluster"]
    for name in ("rayjob-train-classifiers.yaml", "rayjob-label.yaml", "rayjob-train-segmenter.yaml",
                 "rayjob-evaluate.yaml"):
        assert kinds[name] == ["RayJob"], name
    assert kinds["raycronjob-nightly.yaml"] == ["RayCronJob"]
    assert sorted(kinds["cronjob-nightly.yaml"]) == sorted(["ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                                                            "CronJob"])
    for path, d in _k8s_docs():
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata"), f"{path.name}: {d.get('kind')}"
        if d["kind"] in ("RayCluster", "RayJob", "RayCronJob", "RayService"):
            assert d["apiVersion"] == RAY_API_VERSION, f"{path.name}: {d['kind']} must be {RAY_API_VERSION}"
        if d["kind"] == "Secret":
            pytest.fail(f"{path.name}: no Secret objects in the manifests (credentials stay out of git)")
    assert _configmap_rayjob()["apiVersion"] == RAY_API_VERSION


@pytest.mark.parametrize("where,spec", _raycluster_specs(), ids=[w for w, _ in _raycluster_specs()])
def test_raycluster_spec(where, spec):
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling must be on"
    head = spec["headGroupSpec"]
    assert HEAD_GROUP_REQUIRED <= set(head), f"{where}: headGroupSpec lacks {HEAD_GROUP_REQUIRED - set(head)}"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head service must stay ClusterIP"
    assert head.get("enableIngress") is not True
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"
    assert params.get("dashboard-host", "") != "0.0.0.0"
    assert params.get("num-cpus") == "0", f"{where}: no work on the head"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), f"{where}: the head is CPU-only"
    groups = spec["workerGroupSpecs"]
    assert groups
    gpu_groups = []
    for g in groups:
        assert WORKER_GROUP_REQUIRED <= set(g), f"{where}: {g.get('groupName')} lacks {WORKER_GROUP_REQUIRED - set(g)}"
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        limits = [c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"]]
        if any(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits):
            gpu_groups.append(g)
    assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"
    for g in gpu_groups:
        assert int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 1
        assert g["minReplicas"] == 0 and g["maxReplicas"] == MAX_GPU_WORKERS
    for pod in _pod_specs(spec):
        assert pod["containers"], f"{where}: a pod template without containers"
        assert pod.get("serviceAccountName"), f"{where}: pods need the S3 ServiceAccount"
        for c in pod["containers"]:
            assert c.get("name") and c.get("image")
            for ef in c.get("envFrom", []):
                if "secretRef" in ef:
                    assert ef["secretRef"].get("optional") is True, "the S3 Secret is optional (IRSA otherwise)"
            for e in c.get("env", []):
                assert not e["name"].startswith(("AWS_ACCESS", "AWS_SECRET", "AWS_SESSION")) or "value" not in e, \
                    f"{where}: {e['name']} must come from a Secret, not a literal"


def _unknown(kind: str, obj: dict) -> set:
    return set(obj) - KNOWN_FIELDS[kind]


def test_no_unknown_kuberay_fields():
    problems = []
    for where, spec in _raycluster_specs():
        problems += [f"{where}: RayClusterSpec.{k}" for k in _unknown("RayClusterSpec", spec)]
        problems += [f"{where}: headGroupSpec.{k}" for k in _unknown("HeadGroupSpec", spec["headGroupSpec"])]
        problems += [f"{where}: autoscalerOptions.{k}"
                     for k in _unknown("AutoscalerOptions", spec.get("autoscalerOptions", {}))]
        for g in spec.get("workerGroupSpecs", []):
            problems += [f"{where}: workerGroupSpecs[{g.get('groupName')}].{k}" for k in _unknown("WorkerGroupSpec", g)]
    for where, spec in _rayjob_specs():
        problems += [f"{where}: RayJobSpec.{k}" for k in _unknown("RayJobSpec", spec)]
    cron = _one(KUBERAY / "raycronjob-nightly.yaml", "RayCronJob")["spec"]
    problems += [f"raycronjob-nightly.yaml: spec.{k}" for k in _unknown("RayCronJobSpec", cron)]
    assert not problems, "fields KubeRay does not know (they would be dropped silently): " + ", ".join(problems)


def test_rayjob_cluster_specs_equal_the_rayclusters():
    base = _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]
    for where, spec in _rayjob_specs():
        if "rayClusterSpec" in spec:
            assert spec["rayClusterSpec"] == base, \
                f"{where}: rayClusterSpec differs from raycluster.yaml's spec; keep the copies equal"


def _entry_script(where: str, spec: dict) -> str:
    """The jobs/NAME.py an entrypoint runs (by absolute path in the image, or relative)."""
    entry = spec.get("entrypoint", "")
    m = re.search(r"\bpython3?\s+(?:\S*/)?(jobs/[\w-]+\.py)\b", entry)
    assert m, f"{where}: entrypoint {entry!r} does not run a jobs/*.py script"
    return m.group(1)


@pytest.mark.parametrize("where,spec", _rayjob_specs(), ids=[w for w, _ in _rayjob_specs()])
def test_rayjob_entrypoint_script_exists(where, spec):
    script = _entry_script(where, spec)
    assert (ROOT / script).is_file(), f"{where}: entrypoint names {script}, which does not exist"
    if spec["entrypoint"].split()[1].startswith("/"):
        # the image's copy of the project (cluster/Dockerfile: WORKDIR /home/ray/cam2seg, COPY jobs/)
        assert spec["entrypoint"].split()[1] == f"/home/ray/cam2seg/{script}"


@pytest.mark.parametrize("where,spec", _rayjob_specs(), ids=[w for w, _ in _rayjob_specs()])
def test_rayjob_spec(where, spec):
    from ray.runtime_env import RuntimeEnv

    script = _entry_script(where, spec)
    assert "--config" in spec["entrypoint"]
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    assert spec.get("shutdownAfterJobFinishes") is True
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] > 0
    # KubeRay's ValidateRayJobSpec: exactly one way to get a cluster, and its side conditions
    assert ("rayClusterSpec" in spec) != bool(spec.get("clusterSelector")), \
        f"{where}: set exactly one of rayClusterSpec and clusterSelector"
    if spec.get("clusterSelector"):
        assert spec["clusterSelector"].get(CLUSTER_SELECTOR_KEY)
        assert spec.get("backoffLimit", 0) == 0
    assert spec.get("activeDeadlineSeconds", 1) > 0
    assert spec.get("backoffLimit", 0) >= 0
    assert not spec.get("suspend")
    if "runtimeEnvYAML" in spec:
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        RuntimeEnv(**env)
        assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())
    if script == "jobs/evaluate.py":
        # evaluate runs in the driver: it needs a GPU for the entrypoint, or it runs on the CPU head
        assert spec.get("entrypointNumGpus", 0) >= 1


def test_rayjob_names():
    for p in sorted(KUBERAY.glob("rayjob-*.yaml")):
        name = _one(p, "RayJob")["metadata"]["name"]
        assert DNS1035.match(name) and len(name) <= MAX_RAYJOB_NAME, f"{p.name}: bad RayJob name {name!r}"
    meta = _configmap_rayjob()["metadata"]
    assert "name" not in meta and DNS1035.match(meta["generateName"].rstrip("-"))
    assert len(meta["generateName"]) + 5 <= MAX_RAYJOB_NAME        # the API server appends 5 characters


def test_raycronjob():
    cron = _one(KUBERAY / "raycronjob-nightly.yaml", "RayCronJob")
    spec = cron["spec"]
    assert RAYCRONJOB_SPEC_REQUIRED <= set(spec)
    assert spec["schedule"] == "0 2 * * *"
    # jobTemplate is a RayJob spec inline (raycronjob_types.go: JobTemplate *RayJobSpec), no wrapper
    assert "spec" not in spec["jobTemplate"] and "metadata" not in spec["jobTemplate"]
    assert "jobs/nightly.py" in spec["jobTemplate"]["entrypoint"]
    assert len(cron["metadata"]["name"]) <= 30      # room for the suffix of the RayJobs it creates


def test_plain_cronjob_launches_a_new_rayjob_each_night():
    path = KUBERAY / "cronjob-nightly.yaml"
    sa, role, binding = _one(path, "ServiceAccount"), _one(path, "Role"), _one(path, "RoleBinding")
    cm, cron = _one(path, "ConfigMap"), _one(path, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["schedule"] == "0 2 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    # RBAC: create and get RayJobs, bound to the launcher's ServiceAccount
    rules = role["rules"]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and {"create", "get"} <= set(r["verbs"])
               for r in rules)
    assert all(r["apiGroups"] == ["ray.io"] and r["resources"] == ["rayjobs"] for r in rules), "least privilege"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert any(s["kind"] == "ServiceAccount" and s["name"] == sa["metadata"]["name"] for s in binding["subjects"])
    # the container runs `kubectl create -f` on the ConfigMap's manifest, as mounted
    (container,) = pod["containers"]
    argv = [*container.get("command", []), *container.get("args", [])]
    assert "kubectl" in os.path.basename(argv[0]) or argv[0] == "create"
    assert "create" in argv and "-f" in argv, "generateName needs `kubectl create`, not apply"
    manifest = argv[argv.index("-f") + 1]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container["volumeMounts"]}
    mount_dir, key = os.path.split(manifest)
    assert mount_dir in mounts, f"{manifest} is not on a mounted volume"
    assert vols[mounts[mount_dir]]["configMap"]["name"] == cm["metadata"]["name"]
    assert key in cm["data"]
    assert _configmap_rayjob()["kind"] == "RayJob"
    assert "jobs/nightly.py" in _configmap_rayjob()["spec"]["entrypoint"]


def test_no_public_services():
    for path, d in _k8s_docs():
        if d["kind"] == "Service":
            assert d.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", f"{path.name}: public Service"
        assert d["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), f"{path.name}: {d['kind']}"
    text = "\n".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    assert not re.search(r"^\s*(type|serviceType):\s*[\"']?(LoadBalancer|NodePort)", text, re.MULTILINE)
