"""Typed vision services end to end on tiny exported models (random weights),
checked against onnxruntime run directly on the exporter's reference preprocessing."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from PIL import Image

from taskserve.exporters.image_options import preprocess
from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import image_segmentation_pb2 as seg
from taskserve.protocol.generated.taskserve.v1 import image_segmentation_pb2_grpc as seg_grpc
from taskserve.protocol.generated.taskserve.v1 import image_text_match_pb2 as itm
from taskserve.protocol.generated.taskserve.v1 import image_text_match_pb2_grpc as itm_grpc
from taskserve.protocol.generated.taskserve.v1 import object_detection_pb2 as od
from taskserve.protocol.generated.taskserve.v1 import object_detection_pb2_grpc as od_grpc


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random color image (gradients plus a block), not square on purpose."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3)
    pixels = np.stack([(base[c] + x * (c + 1) + y * (3 - c)) % 256 for c in range(3)], axis=-1)
    pixels[height // 4 : height // 2, width // 3 : width // 2] = rng.uniform(0, 255, 3)
    return Image.fromarray(pixels.astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _session(repo: Path, name: str) -> tuple[ort.InferenceSession, dict[str, Any]]:
    config = yaml.safe_load((repo / name / "config.yaml").read_text())
    return ort.InferenceSession(
        str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    ), config


PHOTOS = [_photo(120, 80, 0), _photo(50, 90, 1), _photo(64, 64, 2)]


# -- ObjectDetection ------------------------------------------------------------------------


def test_detect_boxes_in_original_pixels(channel: grpc.Channel, task_repository: Path) -> None:
    stub = od_grpc.ObjectDetectionStub(channel)
    images = [common.Image(encoded=_png(p)) for p in PHOTOS]
    # Threshold 0 and IoU 1: every query comes back, so the answer can be compared box by box.
    reply = stub.Detect(od.DetectRequest(model=common.ModelRef(name="tiny-yolos"), images=images,
                                         score_threshold=0.0, iou_threshold=1.0))  # fmt: skip
    session, config = _session(task_repository, "tiny-yolos")
    labels = (task_repository / "tiny-yolos" / "labels.txt").read_text().split()
    for photo, got in zip(PHOTOS, reply.results, strict=True):
        assert (got.width, got.height) == photo.size
        pixels = preprocess(photo, config["task_options"]["image"])[None]
        logits, boxes = session.run(["logits", "pred_boxes"], {"pixel_values": pixels})
        probs = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
        scores = probs[:, :-1].max(-1)
        order = np.argsort(-scores, kind="stable")
        assert len(got.detections) == len(order) == 5
        w, h = photo.size
        for d, q in zip(got.detections, order, strict=True):
            cx, cy, bw, bh = boxes[0, q]
            expected = np.clip([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 0, 1) * [w, h, w, h]
            assert [d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max] == pytest.approx(expected, abs=1e-2)
            assert d.score == pytest.approx(scores[q], abs=1e-5)
            assert d.label == labels[int(probs[q, :-1].argmax())] and d.index == int(probs[q, :-1].argmax())
            assert 0 <= d.box.x_min <= d.box.x_max <= w and 0 <= d.box.y_min <= d.box.y_max <= h


def test_detect_threshold_nms_and_limit(channel: grpc.Channel) -> None:
    stub = od_grpc.ObjectDetectionStub(channel)
    ref = common.ModelRef(name="tiny-yolos")
    images = [common.Image(encoded=_png(PHOTOS[0]))]
    every = stub.Detect(od.DetectRequest(model=ref, images=images, score_threshold=0.0, iou_threshold=1.0))
    scores = [d.score for d in every.results[0].detections]
    cut = float(np.median(scores))
    kept = stub.Detect(od.DetectRequest(model=ref, images=images, score_threshold=cut, iou_threshold=1.0))
    assert [d.score for d in kept.results[0].detections] == [s for s in scores if s >= cut]
    limited = stub.Detect(
        od.DetectRequest(model=ref, images=images, score_threshold=0.0, iou_threshold=1.0, max_detections=2)
    )
    assert [d.score for d in limited.results[0].detections] == scores[:2]
    assert len(limited.results[0].detections) == 2
    nms = stub.Detect(od.DetectRequest(model=ref, images=images, score_threshold=0.0, iou_threshold=0.05))
    boxes = nms.results[0].detections
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if a.label == b.label:
                assert _iou(a.box, b.box) <= 0.05


def _iou(a: od.BoundingBox, b: od.BoundingBox) -> float:
    w = max(0.0, min(a.x_max, b.x_max) - max(a.x_min, b.x_min))
    h = max(0.0, min(a.y_max, b.y_max) - max(a.y_min, b.y_min))
    union = (a.x_max - a.x_min) * (a.y_max - a.y_min) + (b.x_max - b.x_min) * (b.y_max - b.y_min) - w * h
    return w * h / union if union > 0 else 0.0


def test_detect_batch_raw_and_encoded_agree(channel: grpc.Channel) -> None:
    stub = od_grpc.ObjectDetectionStub(channel)
    ref = common.ModelRef(name="tiny-yolos")

    def boxes(reply: od.DetectResponse) -> list[list[tuple[float, ...]]]:
        return [[(d.index, d.score, d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max) for d in r.detections]
                for r in reply.results]  # fmt: skip

    together = boxes(stub.Detect(od.DetectRequest(model=ref, images=[common.Image(encoded=_png(p)) for p in PHOTOS],
                                                  score_threshold=0.0)))  # fmt: skip
    for photo, batched in zip(PHOTOS, together, strict=True):
        alone = boxes(stub.Detect(od.DetectRequest(model=ref, images=[common.Image(encoded=_png(photo))],
                                                   score_threshold=0.0)))[0]  # fmt: skip
        assert np.array(alone) == pytest.approx(np.array(batched), abs=1e-4)
        raw = common.Image(raw=common.RawImage(height=photo.height, width=photo.width, channels=3,
                                               data=np.asarray(photo).tobytes()))  # fmt: skip
        # PNG is lossless: the raw pixels give the same answer.
        assert (
            boxes(stub.Detect(od.DetectRequest(model=ref, images=[raw], score_threshold=0.0)))[0] == batched
        )


def test_image_input_errors(channel: grpc.Channel) -> None:
    stub = od_grpc.ObjectDetectionStub(channel)
    ref = common.ModelRef(name="tiny-yolos")
    bomb = Image.new("1", (10_000, 10_000))  # 100 M pixels, a few kB as PNG
    cases = [
        ([], "none"),
        ([common.Image()], "images[0] is empty"),
        ([common.Image(encoded=b"not an image at all")], "images[0] could not be decoded"),
        ([common.Image(encoded=_png(PHOTOS[0])[:60])], "images[0] could not be decoded"),
        (
            [common.Image(encoded=_png(PHOTOS[0])), common.Image(encoded=_png(bomb))],
            "images[1] is 10000x10000 pixels",
        ),
        ([common.Image(raw=common.RawImage(height=2, width=2, channels=3, data=b"\0" * 11))], "needs 12"),
        (
            [common.Image(raw=common.RawImage(height=2, width=2, channels=2, data=b"\0" * 8))],
            "channels must be",
        ),
    ]
    for images, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Detect(od.DetectRequest(model=ref, images=images), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Detect(
            od.DetectRequest(model=ref, images=[common.Image(encoded=_png(PHOTOS[0]))], iou_threshold=0.0)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "iou_threshold" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Detect(
            od.DetectRequest(
                model=common.ModelRef(name="tiny-segformer"), images=[common.Image(encoded=b"x")]
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "serves task 'image-segmentation'" in err.value.details()


# -- ImageSegmentation ---------------------------------------------------------------------


def test_segment_masks_cover_the_original_image(channel: grpc.Channel, task_repository: Path) -> None:
    import torch

    stub = seg_grpc.ImageSegmentationStub(channel)
    images = [common.Image(encoded=_jpeg(p)) for p in PHOTOS[:2]]
    reply = stub.Segment(seg.SegmentRequest(model=common.ModelRef(name="tiny-segformer"), images=images))
    session, config = _session(task_repository, "tiny-segformer")
    labels = (task_repository / "tiny-segformer" / "labels.txt").read_text().split()
    for photo, encoded, got in zip(PHOTOS[:2], images, reply.results, strict=True):
        w, h = photo.size
        assert (got.width, got.height) == (w, h)
        total = np.zeros((h, w), np.int64)
        for s in got.segments:
            mask = np.asarray(Image.open(io.BytesIO(s.mask_png)))
            assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
            assert s.area == int((mask == 255).sum()) > 0
            assert s.label == labels[s.index] and 0 < s.score <= 1
            total += mask == 255
        assert (total == 1).all()  # every pixel in exactly one mask
        assert [s.area for s in got.segments] == sorted((s.area for s in got.segments), reverse=True)
        # Reference: the same decoded photo through onnxruntime, probabilities upsampled by torch.
        decoded = Image.open(io.BytesIO(encoded.encoded))
        (logits,) = session.run(
            ["logits"], {"pixel_values": preprocess(decoded, config["task_options"]["image"])[None]}
        )
        probs = torch.softmax(torch.from_numpy(logits), 1)
        label_map = torch.nn.functional.interpolate(probs, size=(h, w), mode="bilinear").argmax(1)[0].numpy()
        areas = {s.index: s.area for s in got.segments}
        for index in range(len(labels)):
            # Two bilinear implementations may disagree on pixels near class borders only.
            assert areas.get(index, 0) == pytest.approx(int((label_map == index).sum()), abs=0.03 * w * h)
    small = stub.Segment(seg.SegmentRequest(model=common.ModelRef(name="tiny-segformer"), images=images[:1],
                                            min_area=reply.results[0].segments[0].area))  # fmt: skip
    assert [s.index for s in small.results[0].segments] == [reply.results[0].segments[0].index]


# -- ImageTextMatch ---------------------------------------------------------------------------


def test_image_text_match_matches_onnxruntime(
    channel: grpc.Channel, task_repository: Path, tiny_sources: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    captions = ["a photo of a cat", "a dog in the park", "the capital of France"]
    stub = itm_grpc.ImageTextMatchStub(channel)
    reply = stub.Compare(itm.CompareImageTextRequest(model=common.ModelRef(name="tiny-clip"),
                                                     images=[common.Image(encoded=_png(p)) for p in PHOTOS],
                                                     captions=captions))  # fmt: skip
    session, config = _session(task_repository, "tiny-clip")
    tokens = AutoTokenizer.from_pretrained(tiny_sources["tiny-clip"])(
        captions, padding=True, return_tensors="np"
    )
    pixels = np.stack([preprocess(p, config["task_options"]["image"]) for p in PHOTOS])
    feeds = {
        "input_ids": tokens["input_ids"].astype(np.int64),
        "attention_mask": tokens["attention_mask"].astype(np.int64),
        "pixel_values": pixels,
    }
    logits, image_embeds, text_embeds = session.run(
        ["logits_per_image", "image_embeds", "text_embeds"], feeds
    )
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cosine = (image_embeds / np.linalg.norm(image_embeds, axis=1, keepdims=True)) @ (
        text_embeds / np.linalg.norm(text_embeds, axis=1, keepdims=True)
    ).T
    assert len(reply.results) == len(PHOTOS)
    for i, got in enumerate(reply.results):
        assert list(got.probabilities) == pytest.approx(list(probs[i]), abs=1e-4)
        assert sum(got.probabilities) == pytest.approx(1.0, abs=1e-5)
        assert list(got.similarities) == pytest.approx(list(cosine[i]), abs=1e-4)
    with pytest.raises(grpc.RpcError) as err:
        stub.Compare(itm.CompareImageTextRequest(model=common.ModelRef(name="tiny-clip"),
                                                 images=[common.Image(encoded=_png(PHOTOS[0]))]))  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "captions" in err.value.details()
