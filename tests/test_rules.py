"""The trap-rule registry (rules.py) and the `perm` rule."""

import pytest
import torch

from llm_audit import AuditOptions, monitor_weights
from llm_audit.errors import UsageError
from llm_audit.rules import PERM_SHUFFLES, RULES


def _traps(W, rule, seed):
    opts = AuditOptions(trap_rule=rule, seed=seed, device="cpu")
    return monitor_weights({"w.weight": W}, options=opts).layers[0].rand_num_spikes


def test_registry_drives_the_options_and_the_cli():
    from click.testing import CliRunner

    from llm_audit.cli import audit_command

    assert list(RULES) == ["ww", "tw", "perm"]
    with pytest.raises(UsageError, match="--trap-rule must be one of ww, tw, perm, got 'xx'"):
        AuditOptions(trap_rule="xx")
    out = " ".join(CliRunner().invoke(audit_command, ["--help"]).output.split())
    assert "[ww|tw|perm]" in out and f"median over {PERM_SHUFFLES} shuffles" in out


def test_perm_gaussian_and_planted(gen):
    W = torch.randn(300, 600, generator=gen, dtype=torch.float64)
    assert _traps(W, "perm", 0) == 0
    W[3, 7], W[100, 200], W[250, 42] = 60.0, 55.0, 50.0
    assert _traps(W, "perm", 0) == _traps(W, "tw", 0) == 3


def test_perm_removes_the_one_shuffle_noise_of_a_borderline_entry():
    """An entry whose spike sits at the tw threshold: one shuffle says 0 or 1 by chance
    (seed to seed), the median over 8 shuffles says the same every time."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 600, generator=g, dtype=torch.float64)
    W[3, 3] = 24.0
    assert {_traps(W, "tw", s) for s in range(10)} == {0, 1}
    assert {_traps(W, "perm", s) for s in range(5)} == {0}
