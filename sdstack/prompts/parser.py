"""The A1111 prompt grammar: attention weights, prompt editing / alternation schedules, composable ``AND``.

Three independent readings of one prompt string, each matching AUTOMATIC1111 v1.10.1 (`modules/prompt_parser.py`):

- :func:`parse_prompt_attention` - ``(x)``, ``[x]``, ``(x:1.3)`` and ``BREAK`` -> ``[(text, weight), ...]``;
- :func:`get_prompt_schedules` - ``[from:to:when]`` and ``[a|b]`` -> ``[(end_at_step, prompt), ...]`` per prompt;
- :func:`split_and` - ``a :1.2 AND b`` -> ``[(text, weight), ...]``.

The schedule grammar is A1111's (a lark grammar there; a small recursive-descent parser here)::

    start:      (prompt | any of "[]():")*        stray brackets and colons are text at the top level only
    prompt:     (emphasized | scheduled | alternate | plain | whitespace)*
    emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
    scheduled:  "[" [prompt ":"] prompt ":" [ws] NUMBER [ws] "]"
    alternate:  "[" prompt ("|" [prompt])+ "]"
    plain:      (any char but \\ [ ] ( ) : |  or  a backslash and the next char)+

A prompt the grammar cannot read (a ``|`` outside an alternation, a dangling backslash) is used as written.
Where stray brackets make the grammar ambiguous (``[a:3]]``), A1111's Earley parser picks a reading that varies
with Python's string hash seed; here a bracket that opens a well-formed construct always starts that construct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["parse_prompt_attention", "get_prompt_schedules", "split_and", "BREAK"]

BREAK = "BREAK"
_ROUND_MULT = 1.1
_SQUARE_MULT = 1 / 1.1

_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_RE_ATTENTION_TOKEN = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\])
    | (?P<backslash>\\)
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
    """,
    re.X,
)
_RE_AND = re.compile(r"\bAND\b")
_RE_AND_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)
_RE_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_RE_SPACE = re.compile(r"\s+")
_SPECIAL = frozenset("\\[]():|")
_MAX_DEPTH = 100  # bracket nesting the schedule parser follows; deeper groups are read as text


# ---------------------------------------------------------------------------------------------- attention


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into runs of equal attention weight; ``BREAK`` becomes ``("BREAK", -1)``.

    ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:w)`` multiplies by ``w``; nesting multiplies and an
    unclosed bracket weights everything to the end. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters.
    """
    res: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            if not item[2]:
                item[1] *= factor

    for m in _RE_ATTENTION_TOKEN.finditer(text):
        kind, token = m.lastgroup, m.group(0)
        if kind == "escape":
            res.append([token[1], 1.0, False])
        elif kind == "backslash":
            res.append(["", 1.0, False])  # a lone backslash is dropped, as in A1111
        elif kind == "open":
            (round_open if token == "(" else square_open).append(len(res))
        elif kind == "weight" and round_open and _is_float(m.group("weight")):
            multiply(round_open.pop(), float(m.group("weight")))
        elif token == ")" and round_open:
            multiply(round_open.pop(), _ROUND_MULT)
        elif token == "]" and square_open:
            multiply(square_open.pop(), _SQUARE_MULT)
        else:
            _append_text(res, token)

    for start in round_open:
        multiply(start, _ROUND_MULT)
    for start in square_open:
        multiply(start, _SQUARE_MULT)
    return _merge_runs(res)


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _append_text(res: list[list], text: str) -> None:
    for i, part in enumerate(_RE_BREAK.split(text)):
        if i > 0:
            res.append([BREAK, -1.0, True])
        res.append([part, 1.0, False])


def _merge_runs(res: list[list]) -> list[tuple[str, float]]:
    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for item in res[1:]:
        last = merged[-1]
        if not item[2] and not last[2] and item[1] == last[1]:
            last[0] += item[0]
        else:
            merged.append(item)
    return [(t, -1 if brk else w) for t, w, brk in merged]


# ---------------------------------------------------------------------------------------------- composable AND


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt on ``AND`` into ``(subprompt, weight)``; a trailing ``:number`` is the weight (default 1.0)."""
    out = []
    for sub in _RE_AND.split(prompt):
        m = _RE_AND_WEIGHT.search(sub)
        text, weight = m.group(1), m.group(2)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out


# ---------------------------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class _Scheduled:
    before: tuple | None  # None when the "[to:when]" form has no "from" part
    after: tuple
    when: str  # the NUMBER as written


@dataclass(frozen=True)
class _Alternate:
    options: tuple  # one node tuple per option; () for an empty option


class _Unparsable(Exception):
    pass


class _ScheduleParser:
    """Recursive descent over one prompt; `parse()` returns a tuple of nodes (str, _Scheduled, _Alternate)."""

    def __init__(self, text: str):
        self.s = text
        self.n = len(text)
        self.memo: dict[int, tuple[tuple, int] | None] = {}
        self.depth = 0

    def parse(self) -> tuple:
        s, nodes, i = self.s, [], 0
        while i < self.n:
            c = s[i]
            if c in "[(":
                group = self.group(i)
                if group is not None:
                    nodes.extend(group[0])
                    i = group[1]
                    continue
                nodes.append(c)
                i += 1
            elif c in "]):":
                nodes.append(c)
                i += 1
            else:
                j = self.plain(i)
                if j == i:  # '|' outside an alternation, or a backslash with nothing to escape
                    raise _Unparsable
                nodes.append(s[i:j])
                i = j
        return tuple(nodes)

    def plain(self, i: int) -> int:
        s, n = self.s, self.n
        while i < n:
            c = s[i]
            if c == "\\":
                if i + 1 >= n or s[i + 1] == "\n":
                    break
                i += 2
            elif c in _SPECIAL:
                break
            else:
                i += 1
        return i

    def prompt(self, i: int) -> tuple[list, int] | None:
        """A strict `prompt`: stops before ] ) : | or the end; None if a bracket in it does not close."""
        nodes: list = []
        while i < self.n:
            c = self.s[i]
            if c in "[(":
                group = self.group(i)
                if group is None:
                    return None
                nodes.extend(group[0])
                i = group[1]
                continue
            j = self.plain(i)
            if j == i:
                break
            nodes.append(self.s[i:j])
            i = j
        return nodes, i

    def group(self, i: int) -> tuple[tuple, int] | None:
        """The construct opening at i (memoised: it does not depend on what encloses it), or None."""
        if i not in self.memo:
            if self.depth >= _MAX_DEPTH:  # absurd nesting: read as literal text rather than overflow the stack
                return None
            self.depth += 1
            try:
                self.memo[i] = self._round(i) if self.s[i] == "(" else self._square(i)
            finally:
                self.depth -= 1
        return self.memo[i]

    def _peek(self, i: int) -> str:
        return self.s[i] if i < self.n else ""

    def _round(self, i: int) -> tuple[tuple, int] | None:
        first = self.prompt(i + 1)
        if first is None:
            return None
        nodes, j = first
        if self._peek(j) == ")":
            return ("(", *nodes, ")"), j + 1
        if self._peek(j) != ":":
            return None
        second = self.prompt(j + 1)
        if second is None or self._peek(second[1]) != ")":
            return None
        return ("(", *nodes, ":", *second[0], ")"), second[1] + 1

    def _square(self, i: int) -> tuple[tuple, int] | None:
        first = self.prompt(i + 1)
        if first is None:
            return None
        nodes, j = first
        nxt = self._peek(j)
        if nxt == "]":
            return ("[", *nodes, "]"), j + 1
        if nxt == "|":
            return self._alternate(nodes, j)
        if nxt == ":":
            return self._scheduled(nodes, j + 1)
        return None

    def _alternate(self, first: list, j: int) -> tuple[tuple, int] | None:
        options = [tuple(first)]
        while self._peek(j) == "|":
            nxt = self.prompt(j + 1)
            if nxt is None:
                return None
            options.append(tuple(nxt[0]))
            j = nxt[1]
        if self._peek(j) != "]":
            return None
        return (_Alternate(tuple(options)),), j + 1

    def _scheduled(self, first: list, k: int) -> tuple[tuple, int] | None:
        when = self._when(k)
        if when is not None:  # "[to:when]"
            return (_Scheduled(None, tuple(first), when[0]),), when[1]
        second = self.prompt(k)
        if second is None or self._peek(second[1]) != ":":
            return None
        when = self._when(second[1] + 1)
        if when is None:
            return None
        return (_Scheduled(tuple(first), tuple(second[0]), when[0]),), when[1]

    def _when(self, k: int) -> tuple[str, int] | None:
        """``[ws] NUMBER [ws] "]"`` at k -> (number text, index after "]")."""
        m = _RE_SPACE.match(self.s, k)
        k = m.end() if m else k
        num = _RE_NUMBER.match(self.s, k)
        if num is None:
            return None
        k = num.end()
        m = _RE_SPACE.match(self.s, k)
        k = m.end() if m else k
        if self._peek(k) != "]":
            return None
        return num.group(0), k + 1


@dataclass(frozen=True)
class _Timeline:
    steps: int  # the step count that the schedule is expressed in
    int_offset: int
    float_offset: float
    old: bool

    def when(self, raw: str) -> int:
        v = float(raw)
        if self.old:
            v = v * self.steps if v < 1 else v
        elif "." in raw:
            v = (v - self.float_offset) * self.steps
        else:
            v = v - self.int_offset
        return min(self.steps, int(v))


def _collect_steps(nodes: tuple, tl: _Timeline, out: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = tl.when(node.when)
            if when >= 1:
                out.add(when)
            _collect_steps(node.before or (), tl, out)
            _collect_steps(node.after, tl, out)
        elif isinstance(node, _Alternate):
            out.update(range(1, tl.steps + 1))
            for option in node.options:
                _collect_steps(option, tl, out)


def _render(nodes: tuple, step: int, tl: _Timeline) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            chosen = (node.before or ()) if step <= tl.when(node.when) else node.after
            parts.append(_render(chosen, step, tl))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, tl))
    return "".join(parts)


def _schedule_one(prompt: str, tl: _Timeline) -> list[tuple[int, str]]:
    try:
        nodes = _ScheduleParser(prompt).parse()
    except (_Unparsable, RecursionError):
        return [(tl.steps, prompt)]
    steps = {tl.steps}
    _collect_steps(nodes, tl, steps)
    return [(step, _render(nodes, step, tl)) for step in sorted(steps)]


def get_prompt_schedules(
    prompts: list[str], steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[list[tuple[int, str]]]:
    """For each prompt, ``[(end_at_step, text), ...]``: use ``text`` up to and including step ``end_at_step``.

    ``when`` in ``[from:to:when]`` is a step when an integer, a fraction of ``steps`` when written with a ``.``;
    with ``hires_steps`` the schedule is for the hires pass: ``1.x`` is a fraction of it and an integer counts on
    from the end of the first pass. ``use_old_scheduling`` is A1111's pre-1.6 rule (``when < 1`` is a fraction).
    """
    if hires_steps is None or use_old_scheduling:
        tl = _Timeline(steps, 0, 0.0, use_old_scheduling)
    else:
        tl = _Timeline(hires_steps, steps, 1.0, False)
    cache: dict[str, list[tuple[int, str]]] = {}
    out = []
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = _schedule_one(prompt, tl)
        out.append(list(cache[prompt]))
    return out
