"""The bundled tiny CLIP's pretraining pieces, on hand-made inputs with answers derived by hand."""
import math

import pytest
import torch

from dynaprompt.pretrain import PretrainConfig, apply_style, caption_table, multi_positive_loss

EYE = torch.eye(2)


def test_contrastive_loss_with_one_positive_per_image():
    """logits = I: each row's loss is log(1 + e) - 1, in both directions."""
    loss = multi_positive_loss(EYE, EYE, torch.tensor([0, 1]), logit_scale=1.0)
    assert float(loss) == pytest.approx(math.log(1 + math.e) - 1)


def test_contrastive_loss_shares_the_target_between_positives():
    """Same label: the target is 1/2 on each caption, so a row's loss is log(1 + e) - 1/2."""
    loss = multi_positive_loss(EYE, EYE, torch.tensor([3, 3]), logit_scale=1.0)
    assert float(loss) == pytest.approx(math.log(1 + math.e) - 0.5)


def test_style_coupled_labels_make_an_unstyled_caption_a_negative():
    """class_and_style: a noisy image of class 0 and a plain one differ, as distinct classes would."""
    styles, style_of, classes = 4, torch.tensor([-1, 1]), torch.tensor([0, 0])
    coupled = classes * (styles + 1) + style_of + 1
    assert coupled.tolist() == [0, 2]
    assert float(multi_positive_loss(EYE, EYE, coupled, 1.0)) == pytest.approx(
        float(multi_positive_loss(EYE, EYE, torch.tensor([0, 1]), 1.0)))


def test_caption_table_pads_each_class_and_pool():
    labels, pools = torch.tensor([0, 0, 1, 1, 0]), torch.tensor([0, 1, 0, 0, 0])
    table, sizes = caption_table(labels, pools, n_classes=2, n_pools=2)
    assert sizes.tolist() == [[2, 1], [2, 0]]
    assert table[0, 0].tolist() == [0, 4] and table[0, 1, 0] == 1 and table[1, 0].tolist() == [2, 3]


def test_styles_at_their_neutral_strength_leave_the_image_alone():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    assert torch.equal(apply_style(images, "noisy", torch.zeros(2), generator), images)
    assert torch.allclose(apply_style(images, "pixelated", torch.ones(2), generator), images)
    darkened = apply_style(images, "dark", torch.tensor([0.5, 1.0]), generator)
    assert torch.allclose(darkened[0], images[0] * 0.5) and torch.equal(darkened[1], images[1])


def test_pretrain_config_names_a_bad_setting():
    with pytest.raises(ValueError, match="positives"):
        PretrainConfig(positives="style")
    with pytest.raises(ValueError, match="sepia"):
        PretrainConfig(styles={"sepia": "a sepia photo of a {}."})
