"""The attention algorithm records (``cptoolkit.layers.algorithms``): pure, each rule stated once, each record's
code where it says. Their communication models are checked against the collectives the layers count in
tests/test_plan.py, their rules at every edge in tests/test_config.py, test_ulysses_prefill.py and
test_megatron_dropin.py."""
from __future__ import annotations

import re
import subprocess
import sys
import typing

import pytest

from cptoolkit.layers.algorithms import (DECODE_ALGORITHMS, PREFILL_ALGORITHMS, DecodeComm, PrefillComm,
                                         decode_algorithm, history_names, prefill_algorithm)


def test_the_records_and_the_config_import_no_torch():
    code = ("import sys, cptoolkit.config, cptoolkit.layers.algorithms; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"


def test_every_record_names_code_that_exists():
    assert tuple(PREFILL_ALGORITHMS) == typing.get_args(PrefillComm) == ("p2p", "all_gather", "a2a", "a2a+p2p")
    assert tuple(DECODE_ALGORITHMS) == typing.get_args(DecodeComm) == ("a2a", "ag_rs")
    for algorithm in PREFILL_ALGORITHMS.values():
        assert callable(algorithm.run), algorithm.name
        assert not algorithm.attends_history or callable(algorithm.history_forward), algorithm.name
    for algorithm in DECODE_ALGORITHMS.values():
        assert callable(algorithm.combine), algorithm.name
    assert history_names() == ("p2p", "all_gather")
    assert [name for name, algorithm in PREFILL_ALGORITHMS.items() if algorithm.hierarchical] == ["a2a+p2p"]


@pytest.mark.parametrize("name, q_heads, pcp, a2a_size, error", [
    ("p2p", 3, 4, None, None),
    ("all_gather", 3, 4, None, None),
    ("a2a", 8, 4, None, None),
    ("a2a", 6, 4, None, r"^query heads per TP rank \(6\) must be a multiple of the a2a group size \(4 = pcp\): each "
                       r"member attends whole query heads \(KV heads need no such rule: each is replicated 4 / "
                       r"gcd\(kv_heads, 4\) times\); use p2p or all_gather, or an a2a group size that divides the "
                       r"query heads$"),
    ("a2a+p2p", 6, 4, 2, None),
    ("a2a+p2p", 6, 4, 4, r"^query heads per TP rank \(6\) must be a multiple of the a2a group size \(4 = "
                         r"hierarchical_a2a_size\)"),
    ("a2a+p2p", 8, 4, 3, r"^the a2a group size \(3\) must be a positive divisor of pcp \(4\): pcp = a2a size x ring "
                         r"size; valid values are 1, 2, 4$"),
    ("a2a+p2p", 8, 4, None, r"^needs the a2a group size \(hierarchical_a2a_size\), a divisor of pcp$"),
])
def test_each_rule_names_the_sizes_and_the_fix(name, q_heads, pcp, a2a_size, error):
    found = prefill_algorithm(name).check(q_heads, pcp, a2a_size)
    assert found is None if error is None else re.search(error, found or ""), found


def test_an_unknown_name_is_refused_naming_the_field_and_the_names():
    with pytest.raises(ValueError, match=r"^comm \('ring'\) must be one of \['a2a', 'a2a\+p2p', 'all_gather', "
                                         r"'p2p'\]$"):
        prefill_algorithm("ring", "comm")
    with pytest.raises(ValueError, match=r"^decode_comm \('ring'\) must be one of \['a2a', 'ag_rs'\]$"):
        decode_algorithm("ring")
