"""`make demo` installs only what the demo needs: blobscore with its `standin` and `samples` extras — never
TensorFlow (~2 GB, a test-only wire-format reference) nor the Azure ML SDK (deploying to the FPGA service only).

The closure is walked through the installed distributions' own metadata, so a new dependency that drags either in
transitively fails here too."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DEMO_EXTRAS = {"standin", "samples"}
HEAVY = re.compile(r"^(tensorflow|tf-|keras|azureml|azure-ai-ml|torch)", re.IGNORECASE)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(root: str, extras: set[str]) -> set[str]:
    """Every distribution `pip install root[extras]` needs, as installed here (markers for this interpreter)."""
    seen: set[str] = set()
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset(extras))]
    while pending:
        name, wanted = pending.pop()
        key = f"{_canonical(name)}[{','.join(sorted(wanted))}]"
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not any(
                requirement.marker.evaluate({"extra": extra}) for extra in (wanted or {""})
            ):
                continue
            pending.append((requirement.name, frozenset(requirement.extras)))
    return {key.split("[")[0] for key in seen}


def test_the_demo_install_pulls_in_no_tensorflow_and_no_azure_ml_sdk() -> None:
    closure = _closure("blobscore", DEMO_EXTRAS)
    assert {"onnxruntime", "pillow", "celery", "scikit-image"} <= closure  # the walk really followed the extras
    assert sorted(name for name in closure if HEAVY.match(name)) == []


def test_the_full_dev_install_does_pull_them_in_so_the_walk_can_see_them() -> None:
    closure = _closure("blobscore", {"dev"})
    assert "tensorflow-serving-api" in closure
    assert any(name.startswith("tensorflow") and name != "tensorflow-serving-api" for name in closure)


def test_make_demo_installs_exactly_the_demo_extras() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    installs = re.findall(r"pip install -q -e '\.\[([^\]]*)\]'", makefile)
    assert set(installs[0].split(",")) == DEMO_EXTRAS  # the first install, the demo's own (DEMO_INSTALLED)
