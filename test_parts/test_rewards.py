"""Rewards on hand-written responses and on real Geometry3K answers (DESIGN.md §4 step 6)."""
import os
import time

from datasets import load_dataset

from rewards import ACCURACY_WEIGHT, FORMAT_WEIGHT, extract_answer, format_ok, is_correct, score

G3K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                   "geometry3k-sample", "test.parquet")


def _resp(boxed, think="Let me work it out."):
    return f"<think>{think}</think> The answer is \\boxed{{{boxed}}}."


def test_rewards_extract_nested_braces():
    assert extract_answer(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{\frac{2\sqrt{2}}{5}}") == r"\frac{2\sqrt{2}}{5}"
    assert extract_answer(r"\boxed{ 7 }") == "7"


def test_rewards_extract_last_box_counts():
    assert extract_answer(r"first \boxed{3}, then \boxed{4}") == "4"
    assert score(r"<think>t</think> \boxed{3} no wait \boxed{4}", "3")["accuracy"] == 0.0
    assert score(r"<think>t</think> \boxed{4} no wait \boxed{3}", "3")["accuracy"] == 1.0


def test_rewards_extract_missing_empty_unclosed():
    assert extract_answer("the answer is 5") is None
    assert extract_answer(r"\boxed{}") is None
    assert extract_answer(r"\boxed{   }") is None
    assert extract_answer(r"\boxed{5} and then \boxed{\frac{1}{2") is None  # truncated last box
    assert extract_answer("None") is None  # mathruler's extractor would return the string "None"


def test_rewards_fractions():
    assert is_correct(r"\frac{1}{2}", "0.5") and is_correct("0.5", r"\frac{1}{2}")
    assert is_correct(r"\dfrac{1}{2}", r"\frac{1}{2}")
    assert is_correct("1/2", r"\frac{1}{2}")
    assert not is_correct(r"\frac{1}{3}", "0.5")
    assert not is_correct("2/4", r"\frac{1}{2}")  # mathruler refuses unreduced fractions


def test_rewards_degrees_and_units():
    for given in [r"80^\circ", r"80^{\circ}", "80°", "80 °", "80 degrees"]:
        assert is_correct(given, "80"), given
    assert not is_correct(r"40^\circ", "80") and not is_correct("40°", "80")
    assert is_correct("5 cm", "5") and is_correct(r"5\text{ cm}", "5")
    assert not is_correct("6 cm", "5")


def test_rewards_spaced_latex_from_dataset():
    # Geometry3K writes answers with spaces around braces; compact and equivalent forms must match
    assert is_correct(r"5\sqrt{3}", r"5 \sqrt { 3 }")
    assert is_correct(r"\sqrt{75}", r"5 \sqrt { 3 }")
    assert is_correct(r"\frac{2\sqrt{2}}{5}", r"\frac { 2 \sqrt { 2 } } { 5 }")
    assert is_correct(r"\frac{2}{5}\sqrt{2}", r"\frac { 2 \sqrt { 2 } } { 5 }")
    assert not is_correct(r"5\sqrt{2}", r"5 \sqrt { 3 }")
    assert not is_correct(r"\frac{\sqrt{2}}{5}", r"\frac { 2 \sqrt { 2 } } { 5 }")


def test_rewards_choice_letters():
    choices = ["8", "10", "12", "13.5"]
    for given in ["B", "(B)", "B.", r"\text{B}"]:
        assert is_correct(given, "10", choices), given
    assert not is_correct("C", "10", choices)
    assert not is_correct("B", "10")  # without choices a letter is just a letter
    assert not is_correct("E", "10", choices)  # out of range
    # the reference may itself be the letter: accept the letter and the option text
    assert is_correct("D", "D", choices) and is_correct("13.5", "D", choices)
    assert is_correct(r"\frac{27}{2}", "D", choices)
    assert not is_correct("A", "D", choices) and not is_correct("8", "D", choices)


def test_rewards_yes_no():
    assert is_correct("Yes", "yes") and is_correct("yes", "Yes") and is_correct("NO", "no")
    assert is_correct(r"\text{No}", "No") and is_correct("Yes.", "Yes")
    assert not is_correct("No", "Yes") and not is_correct("yes", "no")
    assert not is_correct("maybe", "Yes")


def test_rewards_format():
    assert format_ok(_resp("5"))
    assert format_ok("  <think>\nmulti\nline\n</think>\n\\boxed{\\frac{1}{2}}\n")
    assert not format_ok(r"The answer is \boxed{5}.")  # no think
    assert not format_ok(r"Sure. <think>t</think> \boxed{5}")  # text before think
    assert not format_ok("<think>t</think> The answer is 5.")  # no box
    assert not format_ok(r"<think>t</think> \boxed{}")  # empty box
    assert not format_ok(r"<think>t</think> so \boxed{\frac{1}{2")  # truncated at the length limit
    assert not format_ok(r"<think>t \boxed{5}")  # think never closed
    assert not format_ok(r"<think>a</think><think>b</think> \boxed{5}")  # two think blocks
    assert not format_ok(r"<think>a<think>b</think> \boxed{5}")  # nested think


def test_rewards_overall_weights():
    assert (ACCURACY_WEIGHT, FORMAT_WEIGHT) == (0.9, 0.1)
    assert score(_resp("5"), "5") == {"overall": 1.0, "accuracy": 1.0, "format": 1.0}
    r = score(r"The answer is \boxed{5}", "5")  # right answer, bad format
    assert r["accuracy"] == 1.0 and r["format"] == 0.0 and abs(r["overall"] - 0.9) < 1e-12
    r = score(_resp("6"), "5")  # wrong answer, good format
    assert r["accuracy"] == 0.0 and r["format"] == 1.0 and abs(r["overall"] - 0.1) < 1e-12
    assert score("<think>t</think> 5", "5") == {"overall": 0.0, "accuracy": 0.0, "format": 0.0}
    assert score(r"<think>t</think> \boxed{}", "5")["overall"] == 0.0


def test_rewards_pathological_answers_stay_fast():
    t0 = time.time()
    assert not is_correct("(99!)!", r"5 \sqrt { 3 }")  # would hang sympy
    assert not is_correct("9**9**9", r"5 \sqrt { 3 }")  # would hang sympy
    assert not is_correct("1" * 300, "1" * 300)  # too long: wrong, even if equal
    assert is_correct("1,\\!000", "1000")  # LaTeX thin space \! is not a factorial
    assert time.time() - t0 < 2.0


def test_rewards_real_geometry3k():
    ds = load_dataset("parquet", data_files=G3K, split="train")
    assert len(ds) == 6
    letters = "ABCD"
    for row in ds:
        ans, choices, gt = row["answer"], row["choices"], row["ground_truth"]
        assert choices[letters.index(gt)] == ans  # sanity of the sample itself
        assert score(_resp(ans), ans)["overall"] == 1.0
        assert score(_resp(gt), ans, choices)["accuracy"] == 1.0
        # the compact form a model would write (no spaces around braces) is still right
        compact = ans.replace(" {", "{").replace("{ ", "{").replace(" }", "}").replace("} ", "}")
        assert score(_resp(compact), ans, choices)["accuracy"] == 1.0
        for k, wrong in enumerate(choices):
            if letters[k] != gt:
                assert score(_resp(wrong), ans, choices)["accuracy"] == 0.0, (wrong, ans)
                assert score(_resp(letters[k]), ans, choices)["accuracy"] == 0.0
