"""Rollout / Credit / LossOutput: validation catalogue and row selection."""

import pytest
import torch

import rlcredit
from rlcredit import Credit, LossOutput, Rollout, RolloutError


def _rollout(**kw):
    base = dict(
        response_mask=torch.tensor([[True, True, False], [True, False, False]]),
        rewards=torch.tensor([1.0, 0.0]),
        group_ids=torch.tensor([0, 0]),
    )
    base.update(kw)
    return Rollout(**base)


def test_valid_rollout_properties():
    r = _rollout(old_logprobs=torch.zeros(2, 3), signals={"entropy": torch.ones(2, 3), "profile": torch.ones(2, 3, 4)})
    assert (r.batch_size, r.response_length) == (2, 3)
    from rlcredit.requirements import Field, Signal
    assert Field("old_logprobs").met(r, None) and not Field("ref_logprobs").met(r, None)
    assert Signal("entropy").met(r, None) and not Signal("aug_logprobs").met(r, None)


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(response_mask=torch.ones(2, 3)), "torch.bool"),
        (dict(response_mask=torch.ones(6, dtype=torch.bool)), "2-D"),
        (dict(response_mask=torch.ones(0, 3, dtype=torch.bool), rewards=torch.zeros(0), group_ids=torch.zeros(0, dtype=torch.long)), "B = 0"),
        (dict(rewards=torch.tensor([1.0, 0.0, 1.0])), "rewards has shape [3], expected [2]"),
        (dict(rewards=torch.tensor([1j, 0j])), "rewards must be a floating"),
        (dict(rewards=torch.tensor([float("nan"), 0.0])), "non-finite"),
        (dict(group_ids=torch.tensor([0.0, 0.0])), "group_ids must be an integer"),
        (dict(group_ids=[0, 0]), "group_ids must be a torch.Tensor"),
        (dict(old_logprobs=torch.zeros(2, 4)), "old_logprobs has shape [2, 4], expected [2, 3]"),
        (dict(old_logprobs=torch.full((2, 3), float("-inf"))), "old_logprobs contains"),
        (dict(ref_logprobs=torch.zeros(2, 3, dtype=torch.long)), "ref_logprobs must be a floating"),
        (dict(signals={"entropy": torch.zeros(3, 3)}), "signals['entropy'] has shape [3, 3]"),
        (dict(signals={"entropy": torch.tensor([[0.0, float("inf"), 0.0]] * 2)}), "non-finite"),
        (dict(model_inputs={"input_ids": torch.zeros(2, 2, dtype=torch.long)}), "input_ids"),
        (dict(model_inputs={"input_ids": torch.zeros(2, 5, dtype=torch.long),
                            "attention_mask": torch.ones(2, 4)}), "['attention_mask'] must match"),
    ],
)
def test_bad_fields_raise_rollout_error_naming_the_problem(kw, fragment):
    with pytest.raises(RolloutError) as err:
        _rollout(**kw)
    assert fragment in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():  # pragma: no cover - CPU CI
    with pytest.raises(RolloutError, match="device"):
        _rollout(rewards=torch.tensor([1.0, 0.0], device="cuda"))


def test_integer_and_bool_rewards_are_read_as_float():
    assert _rollout(rewards=torch.tensor([1, 0])).rewards.dtype == torch.float32
    assert torch.equal(_rollout(rewards=torch.tensor([True, False])).rewards, torch.tensor([1.0, 0.0]))


def test_rollout_error_is_value_error_and_rlcredit_error():
    with pytest.raises(ValueError):
        _rollout(rewards=torch.tensor([1.0]))
    assert issubclass(RolloutError, rlcredit.RLCreditError)


@pytest.mark.parametrize("rows", [[1, 0], torch.tensor([1, 0]), slice(None, None, -1)])
def test_select_rows(rows):
    r = _rollout(old_logprobs=torch.arange(6.0).view(2, 3), signals={"s": torch.arange(6.0).view(2, 3)},
                 model_inputs={"input_ids": torch.zeros(2, 5, dtype=torch.long)})
    s = r.select(rows)
    assert torch.equal(s.rewards, torch.tensor([0.0, 1.0]))
    assert torch.equal(s.old_logprobs, torch.tensor([[3.0, 4.0, 5.0], [0.0, 1.0, 2.0]]))
    assert torch.equal(s.signals["s"][0], torch.tensor([3.0, 4.0, 5.0]))
    assert s.model_inputs is None


def test_select_bool_mask_and_bad_selectors():
    r = _rollout()
    assert torch.equal(r.select(torch.tensor([False, True])).rewards, torch.tensor([0.0]))
    with pytest.raises(RolloutError, match=r"indices must lie in \[0, 2\)"):
        r.select([2])
    with pytest.raises(RolloutError, match="bool mask must have shape"):
        r.select(torch.tensor([True]))
    with pytest.raises(RolloutError, match="takes row indices"):
        r.select("rows")


def test_rollout_is_frozen():
    r = _rollout()
    with pytest.raises(AttributeError):
        r.rewards = torch.zeros(2)
    with pytest.raises(TypeError):
        r.signals["x"] = torch.zeros(2, 3)


def test_credit_validation_and_select():
    c = Credit({"v": torch.ones(2, 3)}, torch.ones(2, 3), torch.tensor([1.0, -1.0]), {"m": torch.tensor(0.5)})
    s = c.select([1])
    assert torch.equal(s.advantages, torch.tensor([-1.0]))
    assert s.scores["v"].shape == (1, 3) and s.metrics["m"] == 0.5
    with pytest.raises(RolloutError, match="advantages must be"):
        Credit({}, torch.ones(2, 3), torch.ones(3))
    with pytest.raises(RolloutError, match="token_weights must be"):
        Credit({}, torch.ones(2, 3, 1), torch.ones(2))
    with pytest.raises(RolloutError, match="non-finite"):
        Credit({}, torch.full((2, 3), float("nan")), torch.ones(2))
    with pytest.raises(RolloutError, match="scores\\['v'\\] has shape"):
        Credit({"v": torch.ones(3, 3)}, torch.ones(2, 3), torch.ones(2))


def test_loss_output_requires_scalar():
    assert LossOutput(torch.tensor(1.0)).metrics == {}
    with pytest.raises(RolloutError, match="scalar"):
        LossOutput(torch.ones(2))


def test_select_skips_no_field_and_keeps_the_cached_views_right():
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0, 0, 1]),
                         old_logprobs=-torch.rand(3, 3), ref_logprobs=-torch.rand(3, 3), signals={"s": torch.rand(3, 3, 2)})
    _ = r.token_counts, r.float_mask  # cached on the parent: the child computes its own
    s = r.select([2, 0])
    direct = rlcredit.Rollout(mask[[2, 0]], r.rewards[[2, 0]], r.group_ids[[2, 0]], old_logprobs=r.old_logprobs[[2, 0]],
                              ref_logprobs=r.ref_logprobs[[2, 0]], signals={"s": r.signals["s"][[2, 0]]})
    for name in ("response_mask", "rewards", "group_ids", "old_logprobs", "ref_logprobs", "token_counts", "float_mask"):
        assert torch.equal(getattr(s, name), getattr(direct, name)), name
    assert torch.equal(s.signals["s"], direct.signals["s"]) and s.model_inputs is None
    assert s.token_counts.tolist() == [3, 2]
    with pytest.raises(AttributeError):
        s.rewards = torch.zeros(2)
    with pytest.raises(TypeError):
        s.signals["x"] = torch.zeros(2, 3)
    with pytest.raises(RolloutError, match="no rows"):
        r.select(torch.tensor([False, False, False]))


def test_credit_select_keeps_values():
    c = rlcredit.Credit({"s": torch.arange(6.0).view(2, 3)}, torch.ones(2, 3), torch.tensor([1.0, -1.0]),
                        metrics={"m": torch.tensor(0.5)})
    s = c.select([1])
    assert torch.equal(s.scores["s"], torch.tensor([[3.0, 4.0, 5.0]])) and torch.equal(s.advantages, torch.tensor([-1.0]))
    assert s.metrics["m"] == 0.5
    with pytest.raises(TypeError):
        s.scores["t"] = torch.zeros(1, 3)
    with pytest.raises(AttributeError):
        s.advantages = torch.zeros(1)
