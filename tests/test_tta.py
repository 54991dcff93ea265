"""Test-time augmentation (vit.tta): the views, their weights, and the settings that name them."""

import pytest
import torch

from vit.errors import ConfigError
from vit.tta import average_distributions, shift, tta_logits, tta_mode


def test_the_average_is_of_distributions_not_of_logits():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g) * 3, torch.randn(6, 4, generator=g) * 3
    out = average_distributions([a, b], [0.25, 0.75])
    torch.testing.assert_close(out.exp(), 0.25 * a.softmax(1) + 0.75 * b.softmax(1))
    torch.testing.assert_close(out.softmax(1), out.exp())  # log-probabilities: softmax gives them back
    torch.testing.assert_close(average_distributions([a, a], [0.5, 0.5]).softmax(1), a.softmax(1))


def test_shift_moves_the_image_one_pixel_and_fills_the_border_by_reflection():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float).reshape(2, 3, 5, 6)
    down_right = shift(x, 1, 1)
    assert down_right.shape == x.shape
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])  # pixel (i, j) moved to (i+1, j+1)
    assert torch.equal(down_right[..., 0, 1:], x[..., 1, :-1])  # the new top row reflects row 1
    assert torch.equal(down_right[..., 1:, 0], x[..., :-1, 1])  # the new left column reflects column 1
    up_left = shift(x, -1, -1)
    assert torch.equal(up_left[..., :-1, :-1], x[..., 1:, 1:])
    assert torch.equal(up_left[..., -1, :-1], x[..., -2, 1:])  # the new bottom row reflects row H-2
    assert torch.equal(shift(x, 0, 0), x)
    with pytest.raises(ValueError, match="at most one pixel"):
        shift(x, 2, 0)


class Recorder(torch.nn.Module):
    """A linear classifier over the pixels that remembers every batch it was given."""

    def __init__(self, pixels: int, classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(pixels, classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.fc(x.flatten(1))


def test_hflip_translate_averages_ten_views_equally():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    net = Recorder(3 * 8 * 8, 5)
    out = tta_logits(net, x, "hflip_translate")
    moved = [x, shift(x, 1, 1), shift(x, 1, -1), shift(x, -1, 1), shift(x, -1, -1)]
    views = [v for m in moved for v in (m, m.flip(-1))]
    assert len(net.seen) == 10 and all(torch.equal(a, b) for a, b in zip(net.seen, views))
    expected = sum(net.fc(v.flatten(1)).softmax(1) for v in views) / 10
    torch.testing.assert_close(out.exp(), expected)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(4))  # log-probabilities of one distribution


def test_given_plain_logits_are_reused_and_not_recomputed():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    net = Recorder(3 * 8 * 8, 5)
    with torch.no_grad():
        plain = net(x)
        net.seen.clear()
        expected = average_distributions([plain, net.fc(x.flip(-1).flatten(1))], [0.5, 0.5])
        torch.testing.assert_close(tta_logits(net, x, "hflip", plain), expected)
    assert len(net.seen) == 1  # only the mirror image


def test_an_image_the_views_do_not_change_keeps_its_prediction():
    x = torch.full((3, 3, 8, 8), 0.7)  # a flat image: every flip and shift is the same image
    net = Recorder(3 * 8 * 8, 5)
    with torch.no_grad():
        for mode in ("hflip", "hflip_translate"):
            torch.testing.assert_close(tta_logits(net, x, mode).softmax(1), net(x).softmax(1))


def test_settings_name_a_mode_or_none():
    assert tta_mode(True) == "hflip" and tta_mode(False) is None and tta_mode(None) is None
    assert tta_mode("hflip_translate") == "hflip_translate"
    with pytest.raises(ConfigError, match=r"test_tta='crops' must be false, true \(hflip\) or one of"):
        tta_mode("crops", "test_tta")
    with pytest.raises(ConfigError, match="tta mode 'crops'"):
        tta_logits(Recorder(3, 2), torch.zeros(1, 3, 1, 1), "crops")
