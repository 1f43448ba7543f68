"""cluster.yaml, checked by the Ray cluster launcher's own validation (what `ray up` runs first), and the
security defaults it must keep."""

import copy

import pytest
import yaml
from jsonschema.exceptions import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_the_launchers_validation(cluster_config):
    validate_config(prepare_config(copy.deepcopy(cluster_config)))  # raises on any schema error


def test_the_validation_catches_a_misspelled_key(cluster_config):
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["max_workerz"] = 4
    with pytest.raises(ValidationError, match="max_workerz"):
        validate_config(prepare_config(broken))


def test_the_dashboard_stays_on_localhost_and_every_node_installs_the_project(cluster_config):
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in (PROJECT_ROOT / "cluster.yaml").read_text()
    assert cluster_config["file_mounts"]["/home/ray/lorasweep"] == "."
    assert any("pip install" in c and "/home/ray/lorasweep" in c for c in cluster_config["setup_commands"])
