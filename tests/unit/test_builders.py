"""The children of a FineTuneJob: deterministic names, restricted pods, secrets only by reference."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import FineTuneJob
from finetune_operator import builders
from finetune_operator.config import OperatorConfig
from finetune_operator.validation import validate_spec

EXAMPLES = Path(__file__).parents[2] / "examples"
META = {"name": "chat-job", "namespace": "team-a", "uid": "1234-uid", "generation": 1}


def resolved(name: str) -> FineTuneJobSpec:
    raw = yaml.safe_load((EXAMPLES / name).read_text())["spec"]
    result = validate_spec(raw, OperatorConfig())
    assert result.spec is not None
    return result.spec


def test_names_are_deterministic_and_short() -> None:
    assert builders.workload_name("a") == "a-trainer"
    long = "x" * 63
    name = builders.workload_name(long)
    assert len(name) <= 52 and name == builders.workload_name(long)
    assert builders.workload_name("x" * 62 + "y") != name


def test_pod_is_restricted_and_has_no_token() -> None:
    job = builders.build_workload(META, resolved("07-chat.yaml"))
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert not any(v.get("hostPath") for v in pod["volumes"])
    assert job["metadata"]["name"] == "chat-job-trainer"
    assert job["spec"]["template"]["metadata"]["labels"][builders.LABEL_UID] == "1234-uid"


def test_credentials_are_referenced_never_copied() -> None:
    job = builders.build_workload(META, resolved("07-chat.yaml"))
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
    creds = [e for e in env.values() if e["name"].startswith("AWS_") and "KEY" in e["name"]]
    assert len(creds) == 2 and all("value" not in e for e in creds)


def test_gpu_resources_and_placement() -> None:
    spec = resolved("04-llama-qlora-classification.yaml")
    spec = spec.model_copy(
        update={
            "resources": spec.resources.model_copy(
                update={"node_selector": {"gpu": "a100"}, "gpu_resource_name": "amd.com/gpu"}
            )
        }
    )
    job = builders.build_workload(META, spec)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "1"
    assert "amd.com/gpu" not in pod["containers"][0]["resources"]["requests"]
    assert pod["nodeSelector"] == {"gpu": "a100"}


def test_config_map_round_trips_to_the_trainer_model() -> None:
    spec = resolved("03-pythia-instruction-medical.yaml")
    cm = builders.build_config_map(META, spec)
    job = FineTuneJob.model_validate(yaml.safe_load(cm["data"]["job.yaml"]))
    assert job.spec == spec
    assert job.metadata.name == "chat-job"


def test_the_preflight_pod_is_as_restricted_as_the_trainer_requests_no_gpu_and_is_placed_by_the_platform() -> None:
    from finetune_operator.config import Preflight

    spec = resolved("07-chat.yaml")
    settings = Preflight.model_validate(
        {"cpu": "500m", "memory": "2Gi", "nodeSelector": {"pool": "cpu"}, "tolerations": [{"operator": "Exists"}]}
    )
    job = builders.build_preflight(META, spec, "IfNotPresent", settings)
    trainer = builders.build_workload(META, spec)["spec"]["template"]["spec"]
    pod = job["spec"]["template"]["spec"]
    c, t = pod["containers"][0], trainer["containers"][0]
    assert c["securityContext"] == t["securityContext"] and pod["securityContext"] == trainer["securityContext"]
    assert pod["automountServiceAccountToken"] is False and pod["volumes"] == trainer["volumes"]
    assert c["resources"]["limits"] == {"cpu": "500m", "memory": "2Gi", "ephemeral-storage": "50Gi"}
    assert pod["nodeSelector"] == {"pool": "cpu"} and pod["tolerations"] == [{"operator": "Exists"}]
    assert c["image"] == t["image"] and c["command"][:3] == ["python", "-m", "finetune_trainer.preflight"]
    # The same object-store access (credentials by reference), and no hold after an error: nobody waits on it.
    creds = [e for e in c["env"] if e["name"].startswith("AWS_")]
    assert creds == [e for e in t["env"] if e["name"].startswith("AWS_")] and creds
    assert "FINETUNE_HOLD_ON_USER_ERROR_SECONDS" not in {e["name"] for e in c["env"]}
    assert job["metadata"]["name"] == "chat-job-preflight" and job["spec"]["backoffLimit"] == 0
    assert job["spec"]["template"]["metadata"]["labels"][builders.LABEL_COMPONENT] == "preflight"
