"""Every public function's errors name its own parameters."""

import pytest
import torch

from clipfast import CoCaLoss, clip_loss, info_nce_loss


@pytest.mark.parametrize("q,k,match", [
    (torch.randn(3, 4), torch.randn(5, 4), r"queries has shape \(3, 4\) and keys has shape \(5, 4\)"),
    (torch.randn(3, 4), torch.randn(3, 6), r"embedding dim mismatch: queries .* keys"),
    (torch.randn(3), torch.randn(3, 4), r"queries must be 2-D"),
    (torch.randn(3, 4), torch.randn(3, 4, 1), r"keys must be 2-D"),
    (torch.randn(0, 4), torch.randn(0, 4), r"empty batch: queries"),
])
def test_info_nce_errors_name_queries_and_keys(q, k, match):
    with pytest.raises(ValueError, match=match) as err:
        info_nce_loss(q, k, 2.0, backend="chunked")
    assert "image_features" not in str(err.value) and "text_features" not in str(err.value)


def test_info_nce_dtype_refusal_names_queries_and_keys():
    q = torch.randn(3, 4, dtype=torch.float16)
    with pytest.raises(TypeError, match="got queries torch.float16 and keys torch.float16"):
        info_nce_loss(q, q, 2.0, backend="cpu")
    with pytest.raises(TypeError, match="queries must be float16"):
        info_nce_loss(q.int(), q, 2.0, backend="chunked")


def test_clip_loss_errors_still_name_its_own_arguments():
    with pytest.raises(ValueError, match=r"image_features has shape \(3, 4\) and text_features"):
        clip_loss(torch.randn(3, 4), torch.randn(5, 4), 2.0, backend="chunked")


@pytest.mark.parametrize("token", [11, -3])
def test_coca_caption_label_outside_the_vocabulary_is_a_value_error(token):
    loss = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0, pad_id=0, backend="chunked")
    x = torch.randn(2, 4)
    logits = torch.randn(2, 3, 11)
    labels = torch.tensor([[1, 2, 0], [4, token, 0]])
    with pytest.raises(ValueError, match=rf"labels must be token ids in \[0, 11\).*pad_id=0; got "
                                         rf"{token} at position \(1, 1\)"):
        loss(x, x, logits, labels, 2.0)


def test_coca_pad_id_outside_the_vocabulary_is_still_ignored():
    # open_clip's default pad_id is 0, but a pad id past the vocabulary is legal:
    # cross_entropy ignores it.
    loss = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0, pad_id=-100, backend="chunked")
    logits = torch.randn(2, 3, 11)
    labels = torch.tensor([[1, 2, -100], [4, 5, -100]])
    _, caption = loss(torch.randn(2, 4), torch.randn(2, 4), logits, labels, 2.0)
    want = torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=-100)
    torch.testing.assert_close(caption, want)
