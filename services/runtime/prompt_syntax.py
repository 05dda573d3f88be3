"""AUTOMATIC1111's prompt syntax: attention weights, prompt editing and alternation schedules, extra-network tags.

A faithful re-implementation (our own code, A1111's algorithm, the same results) of
AUTOMATIC1111/stable-diffusion-webui:

- ``modules/prompt_parser.py`` at commit 28bd8e142d5f77b71ae8d7d7140b5da1b3a49906: ``parse_prompt_attention``
  (``(a)`` x1.1, ``[a]`` /1.1, ``(a:1.3)``, escapes, ``BREAK``) and
  ``get_learned_conditioning_prompt_schedules`` (``[from:to:when]``, ``[to:when]``, ``[from::when]``,
  ``[a|b|c]``, with A1111's step arithmetic, hires-fix offsets and its "old scheduling" option);
- ``modules/extra_networks.py`` at commit 0a277ab59183df638650d8373d785c94d14634ed: ``parse_prompt``
  (``<lora:name:weight>``, ``<hypernet:name>``, ... tags taken out of the prompt).

A1111 never rejects a prompt: text its schedule grammar cannot parse is one schedule entry with the text
unchanged, and unbalanced brackets weight everything after them. We keep that, so a prompt copied from A1111
means here what it meant there. Nothing here imports torch (the client side may use it for previews).
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence

import lark

from .errors import InvalidArgument, quote

__all__ = [
    "BREAK",
    "parse_prompt_attention",
    "get_learned_conditioning_prompt_schedules",
    "schedule_index_at",
    "parse_extra_networks",
    "split_extra_network_args",
]

#: The fragment ``parse_prompt_attention`` emits for the keyword BREAK: ``["BREAK", -1]`` (a new 75-token chunk).
BREAK = ("BREAK", -1)

#: ``(text)`` multiplies the weight of text by this; ``[text]`` divides it.
ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# The tokens of the attention syntax, in A1111's order of preference: escapes, openers, "(text:weight)"'s
# closing ":weight)", closers, plain text, and a lone ":".
_ATTENTION_TOKEN = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\] | \\\\ | \\    # escapes (a lone backslash too)
    | \( | \[                               # openers
    | :\s*([+-]?[.\d]+)\s*\)                # ":1.3)" closes "(text:1.3)"
    | \) | ]                                # closers
    | [^\\()\[\]:]+                         # plain text
    | :                                     # a colon that closes nothing
    """,
    re.X,
)
_BREAK_KEYWORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list[str | float]]:
    """Split a prompt into ``[text, weight]`` fragments as A1111's ``parse_prompt_attention`` does.

    ``(a)`` multiplies a's weight by 1.1, ``[a]`` divides it by 1.1, ``(a:1.3)`` multiplies it by 1.3; nesting
    multiplies; ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters; brackets left open at the
    end apply to everything after them; the word BREAK becomes the fragment ``["BREAK", -1]``; adjacent
    fragments of equal weight are merged. An empty prompt gives ``[["", 1.0]]``. A weight that is not a number
    (``(a:1.2.3)``, where A1111 fails with a ValueError) raises InvalidArgument (reason INVALID_PROMPT_WEIGHT).
    """
    fragments: list[list[str | float]] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= multiplier

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), _weight_of(weight))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            # Plain text, or a closer with nothing open (kept as text, as in A1111).
            for index, part in enumerate(_BREAK_KEYWORD.split(token)):
                if index > 0:
                    fragments.append(list(BREAK))
                fragments.append([part, 1.0])

    # Unclosed brackets weight everything from where they opened (round ones first, as A1111 does).
    for start in open_round:
        scale_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_MULTIPLIER)

    if not fragments:
        fragments = [["", 1.0]]

    merged = [fragments[0]]
    for fragment in fragments[1:]:
        if merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return merged


def _weight_of(number: str) -> float:
    # The pattern accepts any run of digits and dots ("1.2.3", "."); A1111 fails on those too (a ValueError).
    try:
        return float(number)
    except ValueError:
        raise InvalidArgument(
            f"the prompt weight {quote(number)} is not a number: write (text:1.2)", reason="INVALID_PROMPT_WEIGHT"
        ) from None


# A1111's schedule grammar, rule for rule and in its order of alternatives (the Earley parser resolves the
# grammar's ambiguities by that order, so the order is part of the behaviour).
_SCHEDULE_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


@functools.lru_cache(maxsize=1)
def _schedule_parser() -> lark.Lark:
    return lark.Lark(_SCHEDULE_GRAMMAR)


def get_learned_conditioning_prompt_schedules(
    prompts: Sequence[str],
    base_steps: int,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[list[list[int | str]]]:
    """Each prompt's schedule, ``[[end_at_step, text], ...]``, as A1111's function of the same name computes it.

    ``[from:to:when]`` is ``from`` up to step ``when`` (inclusive) and ``to`` after it; ``[to:when]`` and
    ``[from::when]`` leave one side empty; ``when`` with a "." is a fraction of the steps, without one a step
    number. ``[a|b|c]`` alternates a, b, c at every step. ``end_at_step`` counts from 1: the text of an entry is
    used for steps ``previous end + 1 .. end_at_step``; the last entry ends at the step count.

    With ``hires_steps`` (the second pass of hires fix) the schedule is for that pass: fractions above 1 and
    step numbers above ``base_steps`` reach into it (A1111 1.6+); ``use_old_scheduling`` restores the pre-1.6
    rule (a value below 1 is a fraction, any other a step number, of the pass being scheduled).
    """
    if base_steps < 1 or (hires_steps is not None and hires_steps < 1):
        raise InvalidArgument("steps must be at least 1 to schedule a prompt", reason="INVALID_STEPS")
    if hires_steps is None or use_old_scheduling:
        int_offset, float_offset, steps = 0, 0.0, base_steps
    else:
        int_offset, float_offset, steps = base_steps, 1.0, hires_steps

    def switch_step(number: str) -> int:
        value = float(number)
        if use_old_scheduling:
            value = value * steps if value < 1 else value
        elif "." in number:
            value = (value - float_offset) * steps
        else:
            value = value - int_offset
        return min(steps, int(value))

    def schedule_of(prompt: str) -> list[list[int | str]]:
        # Editing and alternation both open with "["; without one every parse gives the prompt back unchanged,
        # so skip the Earley parse, which is slow on long prompts (seconds at ~600 characters with 20 edits).
        if "[" not in prompt:
            return [[steps, prompt]]
        try:
            tree = _schedule_parser().parse(prompt)
        except lark.exceptions.LarkError:
            return [[steps, prompt]]
        # Resolve each [..:..:when] to its step once, and gather the steps at which the text changes.
        ends = {steps}
        for node in tree.iter_subtrees():
            if node.data == "scheduled":
                when = switch_step(node.children[-2])
                node.children[-2] = when
                if when >= 1:
                    ends.add(when)
            elif node.data == "alternate":
                ends.update(range(1, steps + 1))
        return [[end, _text_at_step(tree, end)] for end in sorted(ends)]

    cache = {prompt: schedule_of(prompt) for prompt in dict.fromkeys(prompts)}
    return [cache[prompt] for prompt in prompts]


def _text_at_step(tree: lark.Tree, step: int) -> str:
    """The prompt text a parsed schedule stands for at a step (its scheduled nodes already hold their steps)."""

    def pieces(node: lark.Tree | lark.Token | None) -> Iterator[str]:
        if node is None:
            return
        if isinstance(node, lark.Token):
            yield node.value
            return
        if node.data == "scheduled":
            before, after, _, when, _ = node.children
            yield from pieces(before if step <= when else after)
        elif node.data == "alternate":
            options = node.children
            yield from pieces(options[(step - 1) % len(options)])
        elif node.data == "plain":
            yield node.children[0].value
        else:  # start, prompt, emphasized: their children in order, brackets included
            for child in node.children:
                yield from pieces(child)

    return "".join(pieces(tree))


def schedule_index_at(schedule: Sequence[Sequence[int | str]], step: int) -> int:
    """Which entry of a prompt schedule conditions a denoiser call, as A1111's ``reconstruct_cond_batch`` picks it.

    ``step`` is A1111's ``CFGDenoiser.step``: the number of denoiser calls made so far (0 on the first call), not
    the 1-based step the schedule's texts were computed for. So an entry ending at step 3 also serves the fourth
    call (``3 <= 3``), and samplers that call the model twice per step (Heun, DPM2) move through the schedule
    twice as fast; both are A1111's behaviour. A step past the last entry gets the first entry, as in A1111.
    """
    for index, (end_at_step, _) in enumerate(schedule):
        if step <= end_at_step:
            return index
    return 0


# "<kind:arg1:arg2...>": an extra network (LoRA, hypernetwork, ...) and its arguments.
_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


def parse_extra_networks(prompt: str) -> tuple[str, dict[str, list[tuple[str, list[str]]]]]:
    """Take A1111's extra-network tags out of a prompt, as its ``extra_networks.parse_prompt`` does.

    Returns the prompt with every ``<kind:name[:arg...]>`` removed (nothing else changes, not even the
    spaces around a tag) and, per kind in order of first appearance, ``(name, [arg, ...])`` in prompt order,
    arguments as the strings written (``<lora:x:0.8:te=1>`` gives ``("x", ["0.8", "te=1"])``).
    """
    found: dict[str, list[tuple[str, list[str]]]] = {}

    def take(match: re.Match) -> str:
        name, *args = match.group(2).split(":")
        found.setdefault(match.group(1), []).append((name, args))
        return ""

    return _EXTRA_NETWORK_TAG.sub(take, prompt), found


def split_extra_network_args(args: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """A tag's arguments as A1111's ``ExtraNetworkParams`` splits them: positional ones, and ``key=value`` ones."""
    positional: list[str] = []
    named: dict[str, str] = {}
    for arg in args:
        parts = arg.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(arg)
    return positional, named
