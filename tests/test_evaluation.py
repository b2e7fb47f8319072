import math

import pytest
import torch

from clipfast.evaluation import retrieval_metrics, zero_shot_classifier, zero_shot_metrics


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_zero_shot_metrics_hand_computed():
    classifier = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    images = _unit([0.9, 0.1, 0], [0.1, 0.9, 0.0], [0.8, 0.0, 0.3], [0, 0.2, 0.9])
    labels = torch.tensor([0, 1, 2, 2])
    m = zero_shot_metrics(images, classifier, labels)
    # Image 2 (class 2) is closest to class 0: wrong; its true class is 2nd.
    assert m["top1"] == pytest.approx(3 / 4)
    assert m["top5"] == pytest.approx(1.0)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_zero_shot_ties_count_in_expectation():
    # An image equally close to its class and one other: top-1 is a coin flip.
    classifier = _unit([1, 0], [0, 1])
    m = zero_shot_metrics(_unit([1, 1]), classifier, torch.tensor([0]))
    assert m["top1"] == pytest.approx(0.5)


def test_zero_shot_classifier_ensembles_normalised_prompts():
    table = {"a x": [2.0, 0.0], "the x": [0.0, 1.0], "a y": [0.0, 3.0], "the y": [0.0, 1.0]}
    classifier = zero_shot_classifier(lambda texts: torch.tensor([table[t] for t in texts]),
                                      ["x", "y"], ["a {}", "the {}"])
    # x: mean of (1, 0) and (0, 1), renormalised; y: (0, 1).
    torch.testing.assert_close(classifier, _unit([1, 1], [0, 1]))


def test_retrieval_matches_open_clip_without_ties():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(12, 5), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(12, 5), dim=-1)
    got = retrieval_metrics(images, texts, ks=(1, 5))
    # open_clip's get_clip_metrics on its (normalised) features, written out.
    logits = images @ texts.t()
    gt = torch.arange(12).view(-1, 1)
    for name, lg in (("image_to_text", logits), ("text_to_image", logits.t())):
        preds = torch.where(torch.argsort(lg, descending=True) == gt)[1].float()
        assert got[f"{name}_mean_rank"] == pytest.approx(preds.mean().item() + 1)
        # numpy's median, as open_clip uses it (torch's median takes the lower one).
        assert got[f"{name}_median_rank"] == pytest.approx(preds.quantile(0.5).floor().item() + 1)
        for k in (1, 5):
            assert got[f"{name}_R@{k}"] == pytest.approx((preds < k).float().mean().item())


def test_retrieval_several_captions_per_image():
    images = _unit([1, 0, 0], [0, 1, 0])
    # captions 0, 1 describe image 0; caption 2 image 1. Caption 1 is a poor one.
    texts = _unit([1, 0, 0], [0, 0.2, 1], [0, 1, 0])
    m = retrieval_metrics(images, texts, text_to_image=torch.tensor([0, 0, 1]), ks=(1, 2))
    # image -> text: both images find a caption of theirs first.
    assert m["image_to_text_R@1"] == 1.0 and m["image_to_text_mean_rank"] == 1.0
    # text -> image: caption 1 is closer to image 1 (0.2 vs 0): rank 2.
    assert m["text_to_image_R@1"] == pytest.approx(2 / 3)
    assert m["text_to_image_R@2"] == 1.0
    assert m["text_to_image_mean_rank"] == pytest.approx((1 + 2 + 1) / 3)


def test_retrieval_identical_captions_are_tied():
    # Three images of one class, three identical captions: each image ranks
    # its own caption first with probability 1/3; expected rank 2.
    images = _unit([1, 0.1, 0], [1, 0, 0.1], [1, 0.05, 0.05])
    texts = _unit([1, 0, 0], [1, 0, 0], [1, 0, 0])
    m = retrieval_metrics(images, texts, ks=(1, 2, 3))
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert m["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert m["image_to_text_R@3"] == pytest.approx(1.0)
    assert m["image_to_text_mean_rank"] == pytest.approx(2.0)


def test_retrieval_needs_mapping_for_unequal_counts():
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(torch.randn(2, 3), torch.randn(3, 3))


def _poisoned(t, value, row=1, col=0):
    t = t.clone()
    t[row, col] = value
    return t


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_zero_shot_non_finite_features_give_nan_metrics(value):
    # NaN features used to score 100% top-1 (every comparison with NaN is
    # false, so the positive had nobody "better" than it).
    classifier = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    images = _unit([0.9, 0.1, 0], [0.1, 0.9, 0.0], [0.8, 0.0, 0.3], [0, 0.2, 0.9])
    labels = torch.tensor([0, 1, 2, 2])
    m = zero_shot_metrics(_poisoned(images, value), classifier, labels)
    assert set(m) == {"top1", "top5", "mean_per_class_recall"}
    assert all(math.isnan(v) for v in m.values()), m
    m = zero_shot_metrics(images, _poisoned(classifier, float("nan")), labels)
    assert all(math.isnan(v) for v in m.values()), m


def test_zero_shot_all_nan_features_are_not_perfect():
    classifier = _unit([1, 0], [0, 1])
    m = zero_shot_metrics(torch.full((3, 2), float("nan")), classifier, torch.tensor([0, 1, 0]))
    assert all(math.isnan(v) for v in m.values()), m


@pytest.mark.parametrize("side", ["image", "text"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_retrieval_non_finite_features_give_nan_metrics(side, value):
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    texts = images + 0.01 * torch.randn(6, 4)
    if side == "image":
        images = _poisoned(images, value)
    else:
        texts = _poisoned(texts, value)
    m = retrieval_metrics(images, texts, ks=(1, 5))
    assert len(m) == 8
    # One non-finite row reaches both directions: it scores against every
    # query of the other side.
    assert all(math.isnan(v) for v in m.values()), m


def test_retrieval_all_nan_is_not_recall_one():
    nan = torch.full((4, 3), float("nan"))
    m = retrieval_metrics(nan, nan, ks=(1,))
    assert math.isnan(m["image_to_text_R@1"]) and math.isnan(m["text_to_image_mean_rank"])
    assert math.isnan(m["image_to_text_median_rank"])


@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1e-10])
def test_metrics_depend_on_directions_only(magnitude):
    # Rows whose squared norms overflow fp32 (or come near underflowing it)
    # rank by their cosines, like the same rows at unit scale. (Rows below
    # eps = 1e-12 are not directions: x / eps, as F.normalize.)
    torch.manual_seed(1)
    images = torch.randn(8, 5)
    texts = images + 0.8 * torch.randn(8, 5)
    want = retrieval_metrics(images, texts, ks=(1, 3))
    assert retrieval_metrics(images * magnitude, texts * magnitude, ks=(1, 3)) == pytest.approx(want)
    classifier = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    assert zero_shot_metrics(images * magnitude, classifier, labels) == pytest.approx(
        zero_shot_metrics(images, classifier, labels))
