import pytest
import torch

from ditlab.inference import sample_labels
from ditlab.metrics.protocol import FIDProtocol


def test_balanced_labels_give_every_class_equally_often_in_a_seeded_order():
    labels = sample_labels(10, 1003, seed=4, draw="balanced")
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 1003 and set(counts.tolist()) == {100, 101}
    assert torch.equal(labels, sample_labels(10, 1003, seed=4, draw="balanced"))  # the same on every rank
    assert not torch.equal(labels, sample_labels(10, 1003, seed=5, draw="balanced"))
    assert not torch.equal(labels[:20], torch.arange(20) % 10)  # shuffled, not in class order


def test_uniform_labels_are_the_previous_protocols():
    """``uniform`` stays what every earlier FID and .npz used: the same labels for the same seed."""
    generator = torch.Generator().manual_seed(0)
    from ditlab.seeding import stream_seed

    generator.manual_seed(stream_seed(7, "sample_labels"))
    assert torch.equal(sample_labels(10, 50, seed=7), torch.randint(0, 10, (50,), generator=generator))


def test_an_unknown_class_draw_is_one_clear_error():
    expected = r"fid_protocol.class_draw='stratified'; expected one of \('uniform', 'balanced'\)"
    with pytest.raises(ValueError, match=expected):
        FIDProtocol(extractor=None, class_draw="stratified")
    with pytest.raises(ValueError, match="class draw 'x'"):
        sample_labels(10, 5, 0, draw="x")
