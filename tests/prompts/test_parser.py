"""The A1111 prompt grammar. Expected values are A1111's doctests (modules/prompt_parser.py, v1.10.1), the
documented example at the top of that file, or hand computation from the grammar's rules."""

import pytest

from sdstack.prompts.parser import get_prompt_schedules, parse_prompt_attention, split_and


def g(prompt, steps=10, hires_steps=None, old=False):
    return [list(x) for x in get_prompt_schedules([prompt], steps, hires_steps, old)[0]]


def attn(text):
    return [list(x) for x in parse_prompt_attention(text)]


# ---------------------------------------------------------------------------------------------- attention doctests


@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [["normal text", 1.0]]),
        ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
        ("(unbalanced", [["unbalanced", 1.1]]),
        ("\\(literal\\]", [["(literal]", 1.0]]),
        ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ["a ", 1.0],
                ["house", 1.5730000000000004],
                [" ", 1.1],
                ["on", 1.0],
                [" a ", 1.1],
                ["hill", 0.55],
                [", sun, ", 1.1],
                ["sky", 1.4641000000000006],
                [".", 1.1],
            ],
        ),
    ],
)
def test_attention_a1111_doctests(text, expected):
    assert attn(text) == expected


def test_attention_empty_prompt_is_one_empty_run():
    assert attn("") == [["", 1.0]]


def test_attention_square_brackets_divide():
    assert attn("[a]") == [["a", 1 / 1.1]]
    assert attn("[[a]]") == [["a", 1 / 1.1 / 1.1]]


def test_attention_explicit_weight_with_spaces_and_nesting():
    assert attn("(a: 1.5 )") == [["a", 1.5]]
    assert attn("((a:2))") == [["a", 2 * 1.1]]
    assert attn("[(a:2)]") == [["a", 2 / 1.1]]


def test_attention_escapes_and_lone_backslash():
    assert attn("\\\\") == [["\\", 1.0]]
    assert attn("a\\b") == [["ab", 1.0]]  # a backslash before an ordinary character is dropped, as in A1111
    assert attn("\\(x\\)") == [["(x)", 1.0]]


def test_attention_unmatched_closers_and_colons_are_text():
    assert attn("a) b] c:d") == [["a) b] c:d", 1.0]]
    assert attn("x:1.2)") == [["x:1.2)", 1.0]]  # a weight with no open "(" is text


def test_attention_unclosed_round_then_square():
    assert attn("([a") == [["a", 1.1 / 1.1]]


def test_break_splits_chunks():
    assert attn("a BREAK b") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert attn("BREAK") == [["", 1.0], ["BREAK", -1], ["", 1.0]]
    assert attn("aBREAK b") == [["aBREAK b", 1.0]]  # needs word boundaries


def test_break_inside_brackets_stays_a_break():
    # the later A1111 doctest; upstream v1.10.1 weights the marker itself (-1.1), which loses the BREAK
    assert attn("a (b BREAK c) [d BREAK]") == [
        ["a ", 1.0],
        ["b", 1.1],
        ["BREAK", -1],
        ["c", 1.1],
        [" ", 1.0],
        ["d", 0.9090909090909091],
        ["BREAK", -1],
        ["", 0.9090909090909091],
    ]


def test_break_never_merges_with_negative_weight_text():
    assert attn("(x:-1) BREAK") == [["x", -1.0], ["", 1.0], ["BREAK", -1], ["", 1.0]]


def test_malformed_weight_is_text_not_a_crash():
    assert attn("(a:1.2.3)") == [["a:1.2.3)", 1.1]]


# ---------------------------------------------------------------------------------------------- schedule doctests


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("test", [[10, "test"]]),
        ("a [b:3]", [[3, "a "], [10, "a b"]]),
        ("a [b: 3]", [[3, "a "], [10, "a b"]]),
        ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
        ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
        ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
        ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
        ("a [unbalanced", [[10, "a [unbalanced"]]),
        ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
        ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
        (
            "[a|(b:1.1)]",
            [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"], [8, "(b:1.1)"],
             [9, "a"], [10, "(b:1.1)"]],
        ),
        (
            "[fe|]male",
            [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"], [7, "female"],
             [8, "male"], [9, "female"], [10, "male"]],
        ),
        (
            "[fe|||]male",
            [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"], [7, "male"],
             [8, "male"], [9, "female"], [10, "male"]],
        ),
    ],
)  # fmt: skip
def test_schedule_a1111_doctests(prompt, expected):
    assert g(prompt) == expected


def test_schedule_unparsable_prompt_is_used_as_written():
    # A1111's doctest for this prompt predates the "|" alternation syntax; with it, the "|" has no parse and
    # A1111 falls back to the prompt as written
    assert g("a [{b|d{:.5] c") == [[10, "a [{b|d{:.5] c"]]


def test_schedule_hires_doctests():
    assert g("a [b:.5] c", 10, 10) == [[10, "a b c"]]
    assert g("a [b:1.5] c", 10, 10) == [[5, "a  c"], [10, "a b c"]]


def test_schedule_documented_example():
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert g(prompt, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
    ]


def test_schedule_hires_integer_counts_from_end_of_first_pass():
    assert g("a [b:15] c", 10, 10) == [[5, "a  c"], [10, "a b c"]]
    assert g("a [b:15] c", 10) == [[10, "a  c"]]  # clipped to the last step: b never appears


def test_schedule_old_scheduling():
    assert g("a [b:1.5] c", 10, 10, old=True) == [[1, "a  c"], [10, "a b c"]]  # 1.5 >= 1: a step, truncated
    assert g("a [b:.5] c", 10, 10, old=True) == [[5, "a  c"], [10, "a b c"]]


def test_schedule_fraction_truncates_like_a1111():
    # 0.29 * 100 == 28.999999999999996 and A1111 truncates it with int()
    assert g("a [b:c:0.29]", 100) == [[28, "a b"], [100, "a c"]]
    assert g("a [b:c:29]", 100) == [[29, "a b"], [100, "a c"]]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("[a:-3]", [[10, "a"]]),  # never "before"
        ("[a:+3]", [[3, ""], [10, "a"]]),
        ("[a:1e1]", [[10, ""]]),  # no ".": an integer step, 10
        ("[a:b:0]", [[10, "b"]]),
        ("[a::2]", [[2, "a"], [10, ""]]),
        ("[a: b :3 ]", [[3, "a"], [10, " b "]]),
        ("(a:[b:c:2])", [[2, "(a:b)"], [10, "(a:c)"]]),
    ],
)
def test_schedule_numbers_and_forms(prompt, expected):
    assert g(prompt) == expected


def test_schedule_nested_alternation_and_editing():
    assert g("[a|[b:3]]") == [[1, "a"], [2, ""], [3, "a"], [4, "b"], [5, "a"], [6, "b"], [7, "a"], [8, "b"],
                              [9, "a"], [10, "b"]]  # fmt: skip
    assert g("x [a:b:2] [c|d] y")[:4] == [[1, "x a c y"], [2, "x a d y"], [3, "x b c y"], [4, "x b d y"]]


@pytest.mark.parametrize("prompt", ["a | [b:3]", "a [b:3] \\", "a \\[b:3]", "[a|b:3]", "[a:b:c:3]"])
def test_schedule_no_parse_or_escaped_means_no_editing(prompt):
    assert g(prompt) == [[10, prompt]]


def test_schedule_escaped_pipe_is_text():
    assert g("a [b:3] \\| c") == [[3, "a  \\| c"], [10, "a b \\| c"]]


def test_schedule_many_prompts_keep_order_and_share_results():
    res = get_prompt_schedules(["a [b:3]", "plain", "a [b:3]"], 10)
    assert res == [[(3, "a "), (10, "a b")], [(10, "plain")], [(3, "a "), (10, "a b")]]
    res[0].append((99, "x"))
    assert res[2] == [(3, "a "), (10, "a b")]


def test_schedule_deep_nesting_does_not_crash():
    prompt = "(" * 5000 + "a" + ")" * 5000
    assert g(prompt) == [[10, prompt]]
    deep = "(" * 300 + "[a:b:2]" + ")" * 300
    assert g(deep) == [[2, "(" * 300 + "a" + ")" * 300], [10, "(" * 300 + "b" + ")" * 300]]


def test_schedule_long_unbalanced_prompt_is_fast():
    prompt = "[(" * 3000 + " [a:b:2]"
    assert g(prompt)[0] == [2, "[(" * 3000 + " a"]


# ---------------------------------------------------------------------------------------------- AND


def test_split_and_weights():
    assert split_and("a cat :1.2 AND a dog") == [("a cat", 1.2), (" a dog", 1.0)]
    assert split_and("a AND b:-0.5 AND c : .5") == [("a", 1.0), (" b", -0.5), (" c", 0.5)]


def test_split_and_needs_word_boundaries_and_keeps_newlines():
    assert split_and("SANDY beach") == [("SANDY beach", 1.0)]
    assert split_and("line one\nline two:2") == [("line one\nline two", 2.0)]


def test_split_and_attention_weight_is_not_an_and_weight():
    assert split_and("(cat:1.2)") == [("(cat:1.2)", 1.0)]
