"""A1111 prompt syntax (services/runtime/prompt_syntax.py) against AUTOMATIC1111's own results.

The expected values in tests/data/a1111_prompt_cases.json were produced once by running A1111's own
``parse_prompt_attention``, ``get_learned_conditioning_prompt_schedules`` and ``extra_networks.parse_prompt``
(the commits are recorded in the file); A1111 is not imported here. Weights are compared exactly: the port does
the same float operations in the same order.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime.errors import InvalidArgument
from services.runtime.prompt_syntax import (
    get_learned_conditioning_prompt_schedules,
    parse_extra_networks,
    parse_prompt_attention,
    schedule_index_at,
    split_extra_network_args,
)

CASES = json.loads((Path(__file__).parent / "data" / "a1111_prompt_cases.json").read_text())
ATTENTION = CASES["parse_prompt_attention"]
SCHEDULES = CASES["prompt_schedules"]
EXTRA_NETWORKS = CASES["extra_networks"]


def test_the_table_is_large_enough_and_names_its_source():
    assert len([case for case in ATTENTION if isinstance(case[1], list)]) >= 40
    assert len(SCHEDULES) >= 15
    assert len(EXTRA_NETWORKS) >= 8
    assert len(CASES["commits"]["modules/prompt_parser.py"]) == 40


@pytest.mark.parametrize(("text", "expected"), ATTENTION, ids=[repr(case[0])[:40] for case in ATTENTION])
def test_parse_prompt_attention_equals_a1111(text, expected):
    if isinstance(expected, dict):  # A1111 fails on a weight that is not a number
        with pytest.raises(InvalidArgument) as raised:
            parse_prompt_attention(text)
        assert raised.value.reason == "INVALID_PROMPT_WEIGHT"
        return
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("prompt", "base_steps", "hires_steps", "use_old_scheduling", "expected"),
    SCHEDULES,
    ids=[f"{case[0][:30]!r}-{case[1]}-{case[2]}-{case[3]}" for case in SCHEDULES],
)
def test_prompt_schedules_equal_a1111(prompt, base_steps, hires_steps, use_old_scheduling, expected):
    schedules = get_learned_conditioning_prompt_schedules([prompt], base_steps, hires_steps, use_old_scheduling)
    assert schedules == [expected]


def test_prompts_without_a_square_bracket_parse_back_to_themselves():
    """The premise of the shortcut that skips the schedule parse for prompts without "[" (the parse is slow)."""
    import lark

    from services.runtime.prompt_syntax import _schedule_parser, _text_at_step

    texts = [case[0] for case in ATTENTION + SCHEDULES + EXTRA_NETWORKS if "[" not in case[0]]
    texts += ["a (b:1.2) c, (d) e:f", "(a|b)", "x\\(y\\)", "a) (b", "((a) (b:2)", "a:1.5)"]
    parsed = 0
    for text in texts:
        try:
            tree = _schedule_parser().parse(text)
        except lark.exceptions.LarkError:
            continue
        parsed += 1
        assert _text_at_step(tree, 1) == text
    assert parsed >= 30


def test_schedules_keep_the_order_and_duplicates_of_their_prompts():
    schedules = get_learned_conditioning_prompt_schedules(["[a:b:2]", "c", "[a:b:2]"], 4)
    assert schedules == [[[2, "a"], [4, "b"]], [[4, "c"]], [[2, "a"], [4, "b"]]]


def test_schedule_index_follows_a1111s_denoiser_step_count():
    (schedule,) = get_learned_conditioning_prompt_schedules(["[cat:dog:3]"], 6)
    assert schedule == [[3, "cat"], [6, "dog"]]
    # A1111's CFGDenoiser counts calls from 0 and picks the first entry with step <= end_at_step
    assert [schedule_index_at(schedule, step) for step in range(8)] == [0, 0, 0, 0, 1, 1, 1, 0]
    (alternating,) = get_learned_conditioning_prompt_schedules(["[a|b]"], 4)
    assert [alternating[schedule_index_at(alternating, step)][1] for step in range(4)] == ["a", "a", "b", "a"]


def test_schedule_steps_must_be_positive():
    with pytest.raises(InvalidArgument) as raised:
        get_learned_conditioning_prompt_schedules(["a"], 0)
    assert raised.value.reason == "INVALID_STEPS"


@pytest.mark.parametrize(("prompt", "expected"), EXTRA_NETWORKS, ids=[case[0][:30] for case in EXTRA_NETWORKS])
def test_extra_network_tags_equal_a1111(prompt, expected):
    text, networks = parse_extra_networks(prompt)
    assert [text, {kind: [[name, args] for name, args in found] for kind, found in networks.items()}] == expected
    assert list(networks) == list(expected[1])  # kinds in order of first appearance, as A1111's dict


def test_extra_network_args_split_as_a1111():
    positional, named = split_extra_network_args(["0.8", "te=0.5", "unet=1", "a=b=c"])
    assert positional == ["0.8", "a=b=c"] and named == {"te": "0.5", "unet": "1"}


def test_the_module_imports_without_torch():
    code = (
        "import sys; import services.runtime.prompt_syntax as p; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(p.parse_prompt_attention('(a)'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[['a', 1.1]]"
