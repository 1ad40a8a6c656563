"""The services registry: config-file services, keys from their variables, queues per service and region."""

from pathlib import Path

import pytest

from worker.errors import ConfigurationError
from worker.settings import load_settings
from worker.worker_main import queues_to_consume

CONFIG = """
[blobscore]
queue = "bs"

[services.eastus-resnet]
region = "eastus"
address = "resnet.eastus.example"
port = 443
tls = true
key_env = "EASTUS_RESNET_KEY"
route = "resnet-svc"
model = "resnet50"

[services.westeurope-ssd]
region = "westeurope"
address = "ssd.westeurope.example"
model = "ssd_vgg"
output_names = []
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("BLOBSCORE_CONFIG", "BLOBSCORE_QUEUE", "BLOBSCORE_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EASTUS_RESNET_KEY", "the-eastus-key")
    path = tmp_path / "blobscore.toml"
    path.write_text(CONFIG)
    return path


def test_registry_services_come_from_the_config_file_with_keys_from_variables(config: Path) -> None:
    settings = load_settings(config.parent)
    eastus = settings.service_config("eastus-resnet")
    assert (eastus.region, eastus.target) == ("eastus", "resnet.eastus.example:443")
    assert (eastus.tls, eastus.route) == (True, "resnet-svc")
    assert eastus.key is not None
    assert eastus.key.get_secret_value() == "the-eastus-key"
    assert settings.service_config("westeurope-ssd").key is None
    described = eastus.describe()
    assert "the-eastus-key" not in str(described)
    assert described["key_set"] is True
    assert described["key_env"] == "EASTUS_RESNET_KEY"


def test_the_default_service_comes_from_the_flat_settings(config: Path) -> None:
    settings = load_settings(config.parent, scoring_port=9000, scoring_service_name="standin")
    local = settings.service_config()
    assert (local.name, local.port, local.route, local.region) == ("local", 9000, "standin", "local")
    assert set(settings.all_services()) == {"local", "eastus-resnet", "westeurope-ssd"}


def test_unknown_service_is_a_configuration_error(config: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown service 'nowhere'"):
        load_settings(config.parent).service_config("nowhere")


def test_queues_per_service_and_region(config: Path) -> None:
    settings = load_settings(config.parent, namespace="prod")
    assert queues_to_consume(settings, region="eastus") == ["bs.prod.eastus-resnet"]
    assert queues_to_consume(settings, services=["westeurope-ssd"]) == ["bs.prod.westeurope-ssd"]
    assert queues_to_consume(settings) == ["bs.prod.eastus-resnet", "bs.prod.local", "bs.prod.westeurope-ssd"]
    with pytest.raises(ConfigurationError, match="no service in region"):
        queues_to_consume(settings, region="southeastasia")
