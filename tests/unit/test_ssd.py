"""SSD-VGG decoding: anchors, offsets, NMS, validation, and the replay tensors that invert it."""

import math
from pathlib import Path

import numpy as np
import pytest

from deploy.standin.ssd_replay import (
    KnownBox,
    best_free_anchor,
    build_replay,
    encode_offsets,
    main,
    write_replay,
)
from worker.errors import PermanentError, RejectionCode
from worker.models.catalog import SSD_ANCHORS_PER_CELL, SSD_GRID_SIZES, SSD_NUM_CLASSES, get_profile
from worker.models.ssd import (
    ANCHOR_COUNT,
    DEFAULT_LOGITS_NAMES,
    DEFAULT_OFFSETS_NAMES,
    LAYER_ANCHOR_COUNTS,
    Detection,
    anchors,
    decode_boxes,
    decode_detections,
    iou,
    nms,
    nms_per_class,
)

CAT, DOG, PERSON = 8, 12, 15


def _as_tuples(detections: list[Detection]) -> list[tuple[int, float, tuple[float, ...]]]:
    return [(d.class_id, d.score, d.box) for d in detections]


def _assert_detected(detections: list[Detection], expected: list[KnownBox]) -> None:
    """`detections` are exactly `expected` (in score order), boxes within 1e-4 and scores within 1e-5."""
    ordered = sorted(expected, key=lambda known: -known.score)
    assert [d.class_id for d in detections] == [known.class_id for known in ordered]
    for detection, known in zip(detections, ordered, strict=True):
        assert detection.score == pytest.approx(known.score, abs=1e-5)
        assert detection.box == pytest.approx(known.box, abs=1e-4)


# --- anchors ---------------------------------------------------------------------------------------------------


def test_anchor_counts_match_the_tensor_shapes() -> None:
    # 8432, not the 8732 usually quoted for SSD-300: that figure is for a 38×38 first layer; this model's is 37×37.
    expected = [grid * grid * per_cell for grid, per_cell in zip(SSD_GRID_SIZES, SSD_ANCHORS_PER_CELL, strict=True)]
    assert list(LAYER_ANCHOR_COUNTS) == expected == [5476, 2166, 600, 150, 36, 4]
    assert ANCHOR_COUNT == 8432
    assert anchors().shape == (8432, 4)
    replay = build_replay([])
    assert sum(replay[name].size // SSD_NUM_CLASSES for name in DEFAULT_LOGITS_NAMES) == 8432
    assert sum(replay[name].size // 4 for name in DEFAULT_OFFSETS_NAMES) == 8432


def test_anchor_geometry_follows_the_training_spec() -> None:
    table = anchors()
    step = 8 / 300
    # Layer 1, cell (0, 0): square s0, square sqrt(s0·s1), then ratio 2 and ratio 0.5.
    assert table[0] == pytest.approx([0.5 * step, 0.5 * step, 21 / 300, 21 / 300])
    assert table[1, 2:] == pytest.approx([math.sqrt(21 * 45) / 300] * 2)
    assert table[2, 2:] == pytest.approx([21 / math.sqrt(2) / 300, 21 * math.sqrt(2) / 300])
    assert table[3, 2:] == pytest.approx([21 / math.sqrt(0.5) / 300, 21 * math.sqrt(0.5) / 300])
    # Cell (row 0, column 1): the column moves x, not y.
    assert table[4, :2] == pytest.approx([0.5 * step, 1.5 * step])
    # Cell (row 1, column 0) starts after the 37 cells of row 0.
    assert table[37 * 4, :2] == pytest.approx([1.5 * step, 0.5 * step])
    # Layer 2 starts at its own grid, step 16, s0 = 45, and has the ratio-3 and ratio-1/3 anchors.
    layer2 = table[5476:5482]
    assert layer2[0] == pytest.approx([0.5 * 16 / 300, 0.5 * 16 / 300, 45 / 300, 45 / 300])
    assert layer2[4, 2:] == pytest.approx([45 / math.sqrt(3) / 300, 45 * math.sqrt(3) / 300])
    assert layer2[5, 2:] == pytest.approx([45 * math.sqrt(3) / 300, 45 / math.sqrt(3) / 300])
    # The last layer's single cell sits in the middle, step 300.
    assert table[-4:, :2] == pytest.approx(np.full((4, 2), 0.5))
    assert table[-4, 2:] == pytest.approx([261 / 300, 261 / 300])


def test_anchors_are_cached_and_read_only() -> None:
    assert anchors() is anchors()
    with pytest.raises(ValueError, match="read-only"):
        anchors()[0, 0] = 1.0


# --- box offsets -----------------------------------------------------------------------------------------------


def test_offsets_at_the_best_anchor_decode_back_to_the_box() -> None:
    rng = np.random.default_rng(3)
    taken = np.zeros(ANCHOR_COUNT, dtype=bool)
    for _ in range(50):
        y1, x1 = rng.uniform(0.0, 0.7, size=2)
        h, w = rng.uniform(0.02, 0.3, size=2)
        box = (float(y1), float(x1), float(y1 + h), float(x1 + w))
        anchor_id = best_free_anchor(box, taken)
        offsets = encode_offsets(box, anchors()[anchor_id]).astype(np.float32)
        decoded = decode_boxes(anchors()[[anchor_id]], offsets[None, :])
        assert decoded[0] == pytest.approx(box, abs=1e-4)


def test_best_anchor_has_the_highest_iou() -> None:
    box = (0.2, 0.3, 0.5, 0.45)
    chosen = best_free_anchor(box, np.zeros(ANCHOR_COUNT, dtype=bool))
    table = anchors()
    corners = np.concatenate([table[:, :2] - table[:, 2:] / 2, table[:, :2] + table[:, 2:] / 2], axis=1)
    overlaps = iou(np.array(box), corners)
    assert overlaps[chosen] == overlaps.max() > 0.5


def test_zero_offsets_decode_to_the_anchor_itself() -> None:
    table = anchors()[:3]
    decoded = decode_boxes(table, np.zeros((3, 4), dtype=np.float32))
    cy, cx, h, w = table.T
    assert decoded == pytest.approx(np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=1))


# --- end to end: replay tensors -> detections -------------------------------------------------------------------


def test_known_boxes_come_back() -> None:
    known = [
        KnownBox(CAT, 0.91, (0.10, 0.05, 0.55, 0.40)),
        KnownBox(DOG, 0.77, (0.40, 0.50, 0.95, 0.98)),
        KnownBox(PERSON, 0.63, (0.02, 0.60, 0.30, 0.72)),
    ]
    detections = decode_detections(build_replay(known), 640, 480)
    _assert_detected(detections, known)
    assert [d.label for d in detections] == ["cat", "dog", "person"]


def test_all_background_gives_no_detections() -> None:
    assert decode_detections(build_replay([]), 300, 300) == []
    uniform = {name: np.zeros_like(array) for name, array in build_replay([]).items()}
    assert decode_detections(uniform, 300, 300) == []  # every class at 1/21, far below 0.5


def test_overlapping_boxes_of_one_class_keep_the_higher_score() -> None:
    weaker = KnownBox(CAT, 0.7, (0.20, 0.20, 0.60, 0.60))
    stronger = KnownBox(CAT, 0.9, (0.22, 0.21, 0.62, 0.61))
    detections = decode_detections(build_replay([weaker, stronger]), 300, 300)
    _assert_detected(detections, [stronger])


def test_overlapping_boxes_of_different_classes_are_both_kept() -> None:
    cat = KnownBox(CAT, 0.7, (0.20, 0.20, 0.60, 0.60))
    dog = KnownBox(DOG, 0.9, (0.22, 0.21, 0.62, 0.61))
    _assert_detected(decode_detections(build_replay([cat, dog]), 300, 300), [cat, dog])


def test_separate_boxes_of_one_class_are_both_kept() -> None:
    left = KnownBox(PERSON, 0.8, (0.10, 0.05, 0.90, 0.45))
    right = KnownBox(PERSON, 0.6, (0.10, 0.55, 0.90, 0.95))
    _assert_detected(decode_detections(build_replay([left, right]), 300, 300), [left, right])


def test_score_threshold_and_top_k() -> None:
    known = [KnownBox(CAT, 0.9, (0.0, 0.0, 0.3, 0.3)), KnownBox(DOG, 0.4, (0.6, 0.6, 0.9, 0.9))]
    tensors = build_replay(known)
    assert [d.class_id for d in decode_detections(tensors, 300, 300)] == [CAT]
    assert [d.class_id for d in decode_detections(tensors, 300, 300, score_threshold=0.3)] == [CAT, DOG]
    assert [d.class_id for d in decode_detections(tensors, 300, 300, score_threshold=0.3, top_k=1)] == [CAT]


def test_box_px_scales_to_a_non_square_image() -> None:
    known = KnownBox(CAT, 0.9, (0.25, 0.10, 0.75, 0.60))
    (detection,) = decode_detections(build_replay([known]), 1000, 400)
    # (y1·height, x1·width, y2·height, x2·width)
    assert detection.box_px == pytest.approx((100.0, 100.0, 300.0, 600.0), abs=0.1)
    assert all(value == round(value, 1) for value in detection.box_px)


def test_boxes_reaching_past_the_image_are_clipped() -> None:
    inside = (0.1, 0.05, 0.5, 0.4)
    tensors = build_replay([KnownBox(CAT, 0.9, inside)])
    # Rewrite that anchor's offsets so it decodes to a box reaching 0.2 past the left edge.
    anchor_id = best_free_anchor(inside, np.zeros(ANCHOR_COUNT, dtype=bool))
    layer = int(np.searchsorted(np.cumsum(LAYER_ANCHOR_COUNTS), anchor_id, side="right"))
    local = anchor_id - sum(LAYER_ANCHOR_COUNTS[:layer])
    offsets = tensors[DEFAULT_OFFSETS_NAMES[layer]].reshape(-1, 4)
    assert offsets[local].any()  # the row build_replay wrote
    offsets[local] = encode_offsets((0.1, -0.2, 0.5, 0.4), anchors()[anchor_id])
    (detection,) = decode_detections(tensors, 300, 300)
    assert detection.box == pytest.approx((0.1, 0.0, 0.5, 0.4), abs=1e-4)


def test_absurd_size_offsets_cover_the_image_without_overflow() -> None:
    tensors = build_replay([KnownBox(CAT, 0.9, (0.4, 0.4, 0.6, 0.6))])
    for name in DEFAULT_OFFSETS_NAMES:
        tensors[name][..., 2:] = np.float32(1e30)  # would overflow exp (a RuntimeWarning, an error here)
    (detection,) = decode_detections(tensors, 300, 300)
    assert detection.box == (0.0, 0.0, 1.0, 1.0)


def test_tensors_without_the_batch_dimension_are_accepted() -> None:
    known = [KnownBox(DOG, 0.8, (0.3, 0.3, 0.7, 0.8))]
    unbatched = {name: array[0] for name, array in build_replay(known).items()}
    _assert_detected(decode_detections(unbatched, 300, 300), known)


def test_overridden_tensor_names() -> None:
    known = [KnownBox(DOG, 0.8, (0.3, 0.3, 0.7, 0.8))]
    renamed = {f"edge/{name}": array for name, array in build_replay(known).items()}
    detections = decode_detections(
        renamed, 300, 300,
        logits_names=[f"edge/{name}" for name in DEFAULT_LOGITS_NAMES],
        offsets_names=[f"edge/{name}" for name in DEFAULT_OFFSETS_NAMES],
    )
    _assert_detected(detections, known)


def test_catalog_profile_lists_the_same_tensors() -> None:
    assert get_profile("ssd_vgg").outputs == DEFAULT_LOGITS_NAMES + DEFAULT_OFFSETS_NAMES


# --- bad model output --------------------------------------------------------------------------------------------


def _rejection(outputs: dict[str, np.ndarray]) -> PermanentError:
    with pytest.raises(PermanentError) as caught:
        decode_detections(outputs, 300, 300)
    return caught.value


def test_wrong_shape_is_a_bad_model_output() -> None:
    tensors = build_replay([])
    tensors[DEFAULT_LOGITS_NAMES[0]] = np.zeros((1, 38, 38, 4, 21), dtype=np.float32)
    error = _rejection(tensors)
    assert error.code is RejectionCode.BAD_MODEL_OUTPUT
    assert "38" in error.message


def test_batch_of_two_is_a_bad_model_output() -> None:
    tensors = build_replay([])
    tensors[DEFAULT_OFFSETS_NAMES[5]] = np.zeros((2, 1, 1, 4, 4), dtype=np.float32)
    assert _rejection(tensors).code is RejectionCode.BAD_MODEL_OUTPUT


def test_missing_tensor_is_a_bad_model_output() -> None:
    tensors = build_replay([])
    del tensors[DEFAULT_OFFSETS_NAMES[2]]
    error = _rejection(tensors)
    assert error.code is RejectionCode.BAD_MODEL_OUTPUT
    assert DEFAULT_OFFSETS_NAMES[2] in error.message


def test_non_finite_output_is_a_bad_model_output() -> None:
    tensors = build_replay([])
    tensors[DEFAULT_LOGITS_NAMES[1]][0, 3, 3, 0, 5] = np.nan
    assert _rejection(tensors).code is RejectionCode.BAD_MODEL_OUTPUT


# --- NMS on its own ----------------------------------------------------------------------------------------------


def test_nms_drops_only_boxes_overlapping_a_better_one() -> None:
    boxes = np.array([
        [0.0, 0.0, 1.0, 1.0],
        [0.0, 0.0, 1.0, 0.9],  # IoU 0.9 with box 0
        [0.0, 0.0, 1.0, 0.3],  # IoU 1/3 with box 1: under 0.45
        [0.0, 2.0, 1.0, 3.0],  # disjoint
    ])
    scores = np.array([0.8, 0.9, 0.5, 0.1])
    assert nms(boxes, scores, 0.45).tolist() == [1, 2, 3]  # box 1 scores best and suppresses only box 0
    assert nms(boxes, scores, 0.95).tolist() == [1, 0, 2, 3]


def test_nms_per_class_never_suppresses_across_classes() -> None:
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    scores = np.array([0.6, 0.9, 0.7])
    class_ids = np.array([3, 3, 4], dtype=np.intp)
    assert nms_per_class(boxes, scores, class_ids, 0.45).tolist() == [1, 2]
    assert nms_per_class(np.empty((0, 4)), np.empty(0), np.empty(0, dtype=np.intp), 0.45).tolist() == []


def test_iou_of_empty_boxes_is_zero() -> None:
    assert iou(np.zeros(4), np.zeros((1, 4))).tolist() == [0.0]


# --- replay files ------------------------------------------------------------------------------------------------


def test_replay_tensors_have_the_served_shapes_and_dtype() -> None:
    tensors = build_replay([KnownBox(CAT, 0.9, (0.1, 0.1, 0.5, 0.5))])
    assert list(tensors) == list(DEFAULT_LOGITS_NAMES + DEFAULT_OFFSETS_NAMES)
    for name, grid, per_cell in zip(DEFAULT_LOGITS_NAMES, SSD_GRID_SIZES, SSD_ANCHORS_PER_CELL, strict=True):
        assert tensors[name].shape == (1, grid, grid, per_cell, SSD_NUM_CLASSES)
        assert tensors[name].dtype == np.float32
    for name, grid, per_cell in zip(DEFAULT_OFFSETS_NAMES, SSD_GRID_SIZES, SSD_ANCHORS_PER_CELL, strict=True):
        assert tensors[name].shape == (1, grid, grid, per_cell, 4)


def test_replay_file_round_trips_through_npz(tmp_path: Path) -> None:
    known = [KnownBox(CAT, 0.91, (0.10, 0.05, 0.55, 0.40)), KnownBox(DOG, 0.77, (0.40, 0.50, 0.95, 0.98))]
    path = tmp_path / "replays" / "two.npz"
    write_replay(path, known)
    with np.load(path, allow_pickle=False) as archive:
        loaded = {name: archive[name] for name in archive.files}
    assert sorted(loaded) == sorted(DEFAULT_LOGITS_NAMES + DEFAULT_OFFSETS_NAMES)  # '/' and ':' keys survive
    original = build_replay(known)
    assert all(np.array_equal(loaded[name], original[name]) for name in original)
    _assert_detected(decode_detections(loaded, 300, 300), known)


def test_cli_writes_a_replay_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cli.replay"  # any suffix: the file is written where asked
    assert main([str(path), "--box", "8,0.9,0.1,0.2,0.5,0.6", "--box", "15, 0.8, 0.5, 0.5, 0.9, 0.7"]) == 0
    assert "2 box(es)" in capsys.readouterr().out
    with np.load(path) as archive:
        detections = decode_detections({name: archive[name] for name in archive.files}, 300, 300)
    _assert_detected(
        detections, [KnownBox(CAT, 0.9, (0.1, 0.2, 0.5, 0.6)), KnownBox(PERSON, 0.8, (0.5, 0.5, 0.9, 0.7))]
    )


def test_cli_rejects_a_malformed_box(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        main([str(tmp_path / "bad.npz"), "--box", "8,0.9,0.1,0.2"])
    assert caught.value.code == 2
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.parametrize(
    ("class_id", "score", "box"),
    [
        (0, 0.9, (0.1, 0.1, 0.5, 0.5)),  # background
        (21, 0.9, (0.1, 0.1, 0.5, 0.5)),  # no such class
        (8, 1.0, (0.1, 0.1, 0.5, 0.5)),  # a softmax never reaches 1
        (8, 0.9, (0.5, 0.1, 0.4, 0.5)),  # y2 < y1
        (8, 0.9, (0.1, 0.1, 0.5, 1.2)),  # outside the image: clipping would change it
    ],
)
def test_known_box_validation(class_id: int, score: float, box: tuple[float, float, float, float]) -> None:
    with pytest.raises(ValueError, match=r"class_id|score|box"):
        KnownBox(class_id, score, box)
