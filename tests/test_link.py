"""The link readout's features: the state at the stop, or the mean over the consequent span."""

import pytest
import torch

from genesis.link import link_features


def test_stop_reads_the_state_itself():
    h = torch.randn(2, 7, 4)
    assert torch.equal(link_features(h, torch.full((2, 7), -1), "stop"), h)


def test_span_is_the_mean_from_the_start_to_the_readout_position_inclusive():
    torch.manual_seed(0)
    h = torch.randn(3, 9, 5)
    start = torch.full((3, 9), -1)
    start[0, 4], start[1, 8], start[2, 0], start[2, 6] = 2, 1, 0, 6  # a span, one to the row's end, one of length 1
    got = link_features(h, start, "span")
    for b, t in zip(*torch.nonzero(start >= 0, as_tuple=True)):
        s = int(start[b, t])
        torch.testing.assert_close(got[b, t], h[b, s:int(t) + 1].mean(0), rtol=1e-5, atol=1e-6)
    keep = (start < 0).unsqueeze(-1).expand_as(h)
    assert torch.equal(got[keep], h[keep])  # positions without a readout keep their own state


def test_unknown_readout_is_refused_in_one_line():
    with pytest.raises(ValueError, match="link readout must be one of stop, span"):
        link_features(torch.zeros(1, 2, 3), torch.full((1, 2), -1), "mean")
