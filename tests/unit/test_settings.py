"""Settings: env over config file over the local stack's file; secrets stay secret."""

import json
from pathlib import Path

import pytest

from worker.contracts import ImageTask
from worker.settings import load_settings


def test_layers_env_over_config_over_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLOBSCORE_CONFIG", raising=False)
    (tmp_path / ".blobscore").mkdir()
    stack = {"settings": {"scoring_port": 9001, "scoring_key": "stack-key", "service": "local", "top_k": 3}}
    (tmp_path / ".blobscore" / "stack.json").write_text(json.dumps(stack))
    (tmp_path / "blobscore.toml").write_text('[blobscore]\ntop_k = 7\nscoring_model = "vgg16"\n')
    monkeypatch.setenv("BLOBSCORE_SCORING_MODEL", "densenet121")
    settings = load_settings(tmp_path)
    assert settings.scoring_port == 9001
    assert settings.top_k == 7
    assert settings.scoring_model == "densenet121"
    assert settings.scoring_key is not None
    assert settings.scoring_key.get_secret_value() == "stack-key"
    assert "stack-key" not in repr(settings)


def test_defaults_for_results_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLOBSCORE_CONFIG", raising=False)
    settings = load_settings(tmp_path)
    assert settings.results_prefix_for("eastus-resnet") == "blobscore-results/eastus-resnet/"
    assert settings.jobs_url == settings.broker_url


def test_task_message_carries_no_secrets_and_refuses_extras() -> None:
    task = ImageTask(namespace="a-1", account="a", endpoint="a.blob.core.windows.net", job_id="j", index=3,
                     container="c", blob="b.jpg", etag="e", size=1, service="s", results_container="c",
                     results_prefix="p/")
    assert set(task.to_message()) == {"namespace", "account", "endpoint", "job_id", "index", "container", "blob",
                                      "etag", "size", "service", "results_container", "results_prefix"}
    with pytest.raises(ValueError, match="extra"):
        ImageTask.from_message({**task.to_message(), "connection_string": "x"})
