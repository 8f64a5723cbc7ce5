"""deploy/k8s: a kustomize base that every manifest of validates against the Kubernetes schemas
(kubernetes-validate, offline, strict), that runs every role of catq.topology as `catq worker
ROLE` with `catq health ROLE` probes, Redis and the SGLang engines as compose.yaml does, and whose
KEDA ScaledObjects name streams and consumer groups that exist in catq's topology."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from catq.bus import run_key
from catq.config import load_config
from catq.topology import CONSUMER_ROLE, ROLES, input_of

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
NOT_APPLIED = {"kustomization.yaml", "secret.example.yaml"}
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
# The oldest Kubernetes the manifests are meant for, and the newest kubernetes-validate bundles.
K8S_VERSIONS = ("1.30", "latest")
SCALED_ROLES = ("rollout", "anchor", "judge")
CATQ_IMAGE = "catq:latest"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def applied(kustomization) -> list[dict]:
    """Every object `kubectl apply -k deploy/k8s` creates, in kustomization order."""
    return [d for name in kustomization["resources"] for d in documents(name)]


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    found = {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}
    assert found, f"no {kind}"
    return found


def container(obj: dict) -> dict:
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, obj["metadata"]["name"]
    return containers[0]


def catq_role(deployment: dict) -> str | None:
    command = container(deployment).get("command", [])
    return command[2] if command[:2] == ["catq", "worker"] else None


@pytest.fixture(scope="module")
def role_deployments(applied) -> dict[str, dict]:
    """role -> the Deployment that runs `catq worker ROLE`."""
    found: dict[str, dict] = {}
    for deployment in of_kind(applied, "Deployment").values():
        role = catq_role(deployment)
        if role is not None:
            assert role not in found, f"two Deployments run catq worker {role}"
            found[role] = deployment
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def compose_default(value: str) -> str:
    """compose's ${VAR:-default} and ${VAR:?message} with the default taken (no variable set)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def values_of(node, key: str):
    """Every value of ``key`` anywhere in a parsed manifest."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from values_of(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from values_of(item, key)


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


# ---- the kustomization ------------------------------------------------------------------------

def test_kustomization_lists_every_manifest_but_the_secret_example(kustomization):
    on_disk = {p.name for p in K8S.glob("*.yaml")} | {p.name for p in K8S.glob("*.yml")}
    assert sorted(kustomization["resources"]) == sorted(on_disk - NOT_APPLIED)
    assert len(set(kustomization["resources"])) == len(kustomization["resources"])
    assert kustomization["kind"] == "Kustomization" and kustomization["namespace"] == "catq"
    assert kustomization["labels"][0]["pairs"] == {"app.kubernetes.io/part-of": "catq"}


def test_the_namespace_is_catq_and_no_manifest_pins_another(applied, kustomization):
    assert list(of_kind(applied, "Namespace")) == [kustomization["namespace"]]
    for obj in applied:
        assert obj["metadata"].get("namespace", "catq") == "catq", obj["metadata"]["name"]


def test_no_secret_is_applied_and_the_example_holds_no_real_value(applied):
    assert not [o for o in applied if o["kind"] == "Secret"]
    (example,) = documents("secret.example.yaml")
    assert example["kind"] == "Secret" and example["metadata"]["name"] == "catq-secrets"
    assert all(v.startswith("REPLACE-") for v in example["stringData"].values())
    assert "kubectl -n catq create secret generic catq-secrets" in (K8S / "secret.example.yaml").read_text()


def test_every_secret_reference_names_a_key_of_the_example_secret(applied):
    (example,) = documents("secret.example.yaml")
    keys = set(example["stringData"])
    refs = [ref for obj in applied for ref in values_of(obj, "secretKeyRef")]
    assert len(refs) >= len(ROLES)
    for ref in refs:
        assert ref["name"] == "catq-secrets", ref
        assert ref["key"] in keys or ref.get("optional") is True, ref
    for auth in of_kind(applied, "TriggerAuthentication").values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == "catq-secrets" and ref["key"] in keys, ref


# ---- schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    """Strict: an unknown field anywhere fails too. KEDA's kinds have no bundled schema: they
    are checked structurally below (test_scaled_objects_*), and counted here so that nothing
    is passed over unnoticed."""
    import kubernetes_validate

    wanted = kubernetes_validate.latest_version() if version == "latest" else version
    validated, keda = [], []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # kustomize's own file, not an object (tested above)
            continue
        for doc in documents(path.name):
            where = f"{path.name}: {doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] in KEDA_KINDS:
                assert doc["apiVersion"] == "keda.sh/v1alpha1", where
                keda.append(where)
                continue
            try:
                got = kubernetes_validate.validate(doc, wanted, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} against {wanted}: {'.'.join(map(str, exc.path))}: {exc.message}")
            assert got == ".".join(wanted.split(".")[:2]), (where, got)  # no older schema stood in
            validated.append(where)
    kinds = {w.split(": ")[1].split("/")[0] for w in validated}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Service", "Deployment",
            "StatefulSet", "Secret"} <= kinds
    assert len(keda) == 1 + len(SCALED_ROLES)


def test_the_validator_rejects_what_it_should():
    """A control: strict validation is not vacuous (a misspelt field, a wrong type)."""
    import kubernetes_validate

    (deployment,) = documents("learner.yaml")
    misspelt = copy.deepcopy(deployment)
    container(misspelt)["livenesProbe"] = container(misspelt).pop("livenessProbe")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


# ---- roles ----------------------------------------------------------------------------------------

def test_every_role_has_a_deployment_running_catq_worker(role_deployments):
    assert set(role_deployments) == set(ROLES)
    for role, deployment in role_deployments.items():
        c = container(deployment)
        assert c["image"] == CATQ_IMAGE, role
        command = c["command"]
        assert command[:3] == ["catq", "worker", role] and command[3] == "--config", role
        config = command[4]
        assert config.startswith("/app/configs/"), role  # the image's configs dir (Dockerfile)
        assert (ROOT / "configs" / config.removeprefix("/app/configs/")).is_file(), config


def test_every_role_is_probed_with_catq_health_of_its_role(role_deployments):
    for role, deployment in role_deployments.items():
        c = container(deployment)
        health = ["catq", "health", role]
        assert c["livenessProbe"]["exec"]["command"] == health, role
        # `catq health` retries Redis for ~8 s before it gives up: room for that
        assert c["livenessProbe"]["timeoutSeconds"] >= 10, role
        if role == "ingest":  # behind a Service: ready when this pod's own /healthz answers
            assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        else:
            assert c["readinessProbe"]["exec"]["command"] == health, role
    learner = container(role_deployments["learner"])
    assert learner["startupProbe"]["exec"]["command"] == ["catq", "health", "learner"]
    startup = learner["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a model loads first


def test_one_learner_recreated_never_two(role_deployments):
    spec = role_deployments["learner"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert container(role_deployments["learner"])["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_roles_connect_to_redis_with_the_secret_password_as_compose_does(role_deployments, applied):
    (config_map,) = of_kind(applied, "ConfigMap").values()
    for role, deployment in role_deployments.items():
        c = container(deployment)
        names = [e["name"] for e in c["env"]]
        env = env_of(c)
        assert env["CATQ_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "catq-secrets", "key": "redis-password"}
        assert env["CATQ_REDIS_URL"]["value"] == "redis://:$(CATQ_REDIS_PASSWORD)@redis:6379", role
        # $(VAR) expands only variables defined before it
        assert names.index("CATQ_REDIS_PASSWORD") < names.index("CATQ_REDIS_URL"), role
        assert c["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}], role
    ingest = env_of(container(role_deployments["ingest"]))
    assert ingest["CATQ_INGEST_HOST"]["value"] == "0.0.0.0"
    token = ingest["CATQ_INGEST_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "catq-secrets", "key": "ingest-token"}  # required: not optional


def test_the_config_map_sets_what_compose_sets(applied, compose):
    (config_map,) = of_kind(applied, "ConfigMap").values()
    data = config_map["data"]
    compose_env = compose["rollout"]["environment"]
    for name in ("CATQ_RUN", "CATQ_POLICY_URLS", "CATQ_ANCHOR_URL", "CATQ_JUDGE_URL",
                 "CATQ_METRICS_HOST", "CATQ_METRICS_PORT"):
        assert data[name] == compose_default(compose_env[name]), name
    assert all(isinstance(v, str) for v in data.values())
    assert not {"CATQ_REDIS_URL", "CATQ_REDIS_PASSWORD", "CATQ_INGEST_TOKEN"} & set(data)


def test_roles_serve_metrics_on_9100_annotated_for_prometheus(role_deployments, applied):
    (config_map,) = of_kind(applied, "ConfigMap").values()
    assert config_map["data"]["CATQ_METRICS_PORT"] == "9100"
    for role, deployment in role_deployments.items():
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        ports = {p["containerPort"] for p in container(deployment).get("ports", [])}
        if role == "ingest":  # /metrics on its API port behind the token, as prometheus.yml skips it
            assert "prometheus.io/scrape" not in annotations and ports == {8000}
            continue
        assert annotations["prometheus.io/scrape"] == "true", role
        assert annotations["prometheus.io/port"] == "9100" and 9100 in ports, role


def test_pod_grace_outlasts_the_workers_own_grace_period(role_deployments):
    grace = load_config(str(ROOT / "configs/gpu-math.toml")).worker.grace_period_s
    for role, deployment in role_deployments.items():
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace, role


def test_scaled_roles_leave_their_replica_count_to_keda(role_deployments):
    for role in SCALED_ROLES:
        assert "replicas" not in role_deployments[role]["spec"], role  # a re-apply must not reset it


# ---- services, volumes --------------------------------------------------------------------------

def pod_templates(applied) -> list[dict]:
    return [o["spec"]["template"] for o in applied if o["kind"] in ("Deployment", "StatefulSet")]


def test_every_service_selects_pods_and_targets_a_named_port(applied):
    templates = pod_templates(applied)
    for name, service in of_kind(applied, "Service").items():
        selector = service["spec"]["selector"]
        matching = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        assert len(matching) == 1, name
        port_names = {p["name"] for c in matching[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (name, port)
    for obj in applied:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_redis_keeps_an_aof_on_its_own_volume_and_requires_the_password(applied):
    (redis,) = of_kind(applied, "StatefulSet").values()
    assert redis["spec"]["replicas"] == 1
    c = container(redis)
    assert c["image"] == "redis:7"
    args = c["args"]
    assert args[0] == "redis-server" and args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(CATQ_REDIS_PASSWORD)"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"  # refuse writes, lose nothing
    gib = {"gb": 1, "Gi": 1}
    maxmemory, limit = args[args.index("--maxmemory") + 1], c["resources"]["limits"]["memory"]
    assert int(maxmemory[:-2]) * gib[maxmemory[-2:]] < int(limit[:-2]) * gib[limit[-2:]]  # room for the fork
    env = env_of(c)
    for name in ("CATQ_REDIS_PASSWORD", "REDISCLI_AUTH"):  # REDISCLI_AUTH: the probes' redis-cli
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "catq-secrets", "key": "redis-password"}
    assert "redis-cli ping" in " ".join(c["livenessProbe"]["exec"]["command"])
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    service = of_kind(applied, "Service")["redis"]
    assert service["spec"]["ports"][0]["port"] == 6379 and redis["spec"]["serviceName"] == "redis"


def test_engines_run_compose_gpu_profile_sglang_behind_services_of_compose_names(applied, compose):
    deployments = of_kind(applied, "Deployment")
    services = of_kind(applied, "Service")
    for name in ("policy", "anchor", "judge"):
        spec = compose[name]
        engine = deployments[f"{name}-engine"]
        c = container(engine)
        assert c["command"] == compose_default(spec["command"]).split(), name
        assert c["image"] == spec["image"]
        assert {e["name"]: e["value"] for e in c["env"]} == spec["environment"], name
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/health", (name, probe)
        assert engine["spec"]["strategy"] == {"type": "Recreate"}
        port = int(spec["environment"]["PORT"])
        assert services[name]["spec"]["ports"][0]["port"] == port
        assert c["ports"] == [{"name": "http", "containerPort": port}]
    assert compose["policy"]["environment"]["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1"


def test_published_weights_are_one_rwx_volume_at_the_same_path(applied, role_deployments):
    claims = of_kind(applied, "PersistentVolumeClaim")
    assert claims["runs"]["spec"]["accessModes"] == ["ReadWriteMany"]
    sharing = {"learner": role_deployments["learner"], "syncer": role_deployments["syncer"],
               "policy-engine": of_kind(applied, "Deployment")["policy-engine"]}
    for name, deployment in sharing.items():
        pod = deployment["spec"]["template"]["spec"]
        volume = {v["name"]: v for v in pod["volumes"]}
        mounts = [m for m in container(deployment)["volumeMounts"]
                  if volume[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == "runs"]
        assert [m["mountPath"] for m in mounts] == ["/app/runs"], name
        assert mounts[0].get("readOnly", False) is (name != "learner"), name  # only the learner writes
    for obj in applied:  # every claim a pod names exists
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for v in obj["spec"]["template"]["spec"].get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, obj["metadata"]["name"]


# ---- KEDA -----------------------------------------------------------------------------------------

def test_scaled_objects_scale_rollout_anchor_and_judge_on_their_input_streams(applied, role_deployments):
    """Each trigger names the stream the role consumes (catq.topology.input_of) under the run of
    config.yaml, and the role's own consumer group."""
    (config_map,) = of_kind(applied, "ConfigMap").values()
    run = config_map["data"]["CATQ_RUN"]
    auths = of_kind(applied, "TriggerAuthentication")
    deployments = of_kind(applied, "Deployment")
    scaled = of_kind(applied, "ScaledObject")
    assert len(scaled) == len(SCALED_ROLES)
    scaled_roles = set()
    for name, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        target = spec["scaleTargetRef"]["name"]
        assert target in deployments, name
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        role = catq_role(deployments[target])
        assert role in SCALED_ROLES, (name, target)
        scaled_roles.add(role)
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        triggers = spec["triggers"]
        assert triggers and triggers[0]["type"] == "redis-streams", name
        for trigger in triggers:
            assert trigger["type"] == "redis-streams", name
            meta = trigger["metadata"]
            assert all(isinstance(v, str) for v in meta.values()), (name, meta)  # map[string]string
            assert meta["stream"] == run_key(run, input_of(role).name), (name, meta["stream"])
            assert meta["consumerGroup"] == role
            assert CONSUMER_ROLE[input_of(role).name] == meta["consumerGroup"]
            # KEDA dials from its own namespace: the Service with ours
            assert meta["address"] == "redis.catq.svc:6379", name
            assert set(meta) <= {"address", "stream", "consumerGroup", "lagCount",
                                 "activationLagCount", "pendingEntriesCount"}, name
            auth = auths[trigger["authenticationRef"]["name"]]
            assert {"parameter": "password", "name": "catq-secrets", "key": "redis-password"} in auth["spec"]["secretTargetRef"]
        lag = [t["metadata"] for t in triggers if "lagCount" in t["metadata"]]
        assert len(lag) == 1 and int(lag[0]["lagCount"]) > 0 and "activationLagCount" in lag[0], name
    # every stage role but the learner (one per run) scales
    assert scaled_roles == set(SCALED_ROLES) == set(CONSUMER_ROLE.values()) - {"learner"}


def test_scaled_objects_in_flight_target_is_the_workers_concurrency(applied):
    """The pendingEntriesCount trigger keeps as many replicas as there are busy workers: one
    worker holds at most worker.concurrency entries of the config the Deployments run."""
    concurrency = load_config(str(ROOT / "configs/gpu-math.toml")).worker.concurrency
    for name, obj in of_kind(applied, "ScaledObject").items():
        pending = [t["metadata"] for t in obj["spec"]["triggers"] if "pendingEntriesCount" in t["metadata"]]
        assert [p["pendingEntriesCount"] for p in pending] == [str(concurrency)], name
        assert "lagCount" not in pending[0]  # KEDA: lagCount, when set, wins over pendingEntriesCount


def test_the_run_in_the_stream_keys_is_the_compose_default(compose):
    assert compose_default(compose["rollout"]["environment"]["CATQ_RUN"]) == "main"
    assert "catq:{main}:prompts" in (K8S / "keda.yaml").read_text()


# ---- docs, kubectl ----------------------------------------------------------------------------------

def test_readme_says_how_to_apply_and_the_main_readme_points_to_it():
    text = (K8S / "README.md").read_text()
    for needed in ("kubectl create namespace catq", "kubectl -n catq create secret generic catq-secrets",
                   "kubectl apply -k deploy/k8s", "KEDA", "ReadWriteMany", "nvidia.com/gpu"):
        assert needed in text, needed
    assert "deploy/k8s" in (ROOT / "README.md").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl installed (kustomize build)")
def test_kubectl_kustomize_builds_the_base(applied):
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == len(applied)
    for obj in built:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "catq"
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "catq", obj["metadata"]["name"]
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "catq"
