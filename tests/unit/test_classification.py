"""Softmax/logits ranking and ImageNet label names."""

import numpy as np
import pytest

from worker.errors import ConfigurationError, PermanentError, RejectionCode
from worker.models.catalog import PROFILES, LabelSet, get_profile
from worker.models.classification import stable_softmax, top_k
from worker.models.labels import class_names
from worker.models.postprocess import classify


def test_imagenet_names_for_known_ids() -> None:
    names = class_names(LabelSet.IMAGENET_1K)
    assert len(names) == 1000
    assert names[285] == "Egyptian cat"
    assert names[967] == "espresso"
    assert names[0] == "tench"


def test_softmax_is_stable_for_huge_logits() -> None:
    probabilities = stable_softmax(np.array([1000.0, 999.0, -1000.0]))
    assert np.isfinite(probabilities).all()
    assert probabilities.sum() == pytest.approx(1.0)
    assert probabilities[0] > probabilities[1] > probabilities[2]


def test_logits_and_softmax_rank_the_same() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(size=1000).astype(np.float32) * 5
    names = class_names(LabelSet.IMAGENET_1K)
    from_logits = top_k(logits, names, 5, are_logits=True)
    from_softmax = top_k(stable_softmax(logits).astype(np.float32), names, 5)
    assert [label.class_id for label in from_logits] == [label.class_id for label in from_softmax]
    assert [label.class_id for label in from_logits] == list(np.argsort(-logits)[:5])
    assert from_logits[0].score == pytest.approx(from_softmax[0].score, abs=1e-6)


def test_top_k_names_and_order() -> None:
    scores = np.zeros(1000, dtype=np.float32)
    scores[285], scores[281], scores[967] = 0.6, 0.3, 0.1
    labels = top_k(scores, class_names(LabelSet.IMAGENET_1K), 3)
    named = [(label.class_id, label.label) for label in labels]
    assert named == [(285, "Egyptian cat"), (281, "tabby"), (967, "espresso")]
    assert labels[0].score == pytest.approx(0.6)


def test_wrong_sized_output_is_a_bad_model_output() -> None:
    with pytest.raises(PermanentError) as caught:
        top_k(np.ones(10, dtype=np.float32), class_names(LabelSet.IMAGENET_1K), 5)
    assert caught.value.code is RejectionCode.BAD_MODEL_OUTPUT


def test_classify_uses_the_profile_output_name_and_kind() -> None:
    vgg = get_profile("vgg16")
    logits = np.full((1, 1000), -5.0, dtype=np.float32)
    logits[0, 967] = 9.0
    labels = classify(vgg, {vgg.outputs[0]: logits}, 5)
    assert labels[0].class_id == 967
    assert labels[0].score > 0.99
    with pytest.raises(PermanentError):
        classify(vgg, {"other:0": logits}, 5)


def test_catalog_output_names_and_overrides() -> None:
    assert PROFILES["resnet50"].outputs == ("classifier_1/resnet_v1_50/predictions/Softmax:0",)
    assert len(PROFILES["ssd_vgg"].outputs) == 12
    edge = get_profile("resnet50").with_outputs(("classifier/resnet_v1_50/predictions/Softmax:0",))
    assert edge.outputs == ("classifier/resnet_v1_50/predictions/Softmax:0",)
    with pytest.raises(ConfigurationError, match="unknown model profile"):
        get_profile("inception")
